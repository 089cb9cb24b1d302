"""What every benchmark script shares: the data folder, the machine description, and writing a result
as markdown (the table, the command that reproduces it, the machine and versions)."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def data_dir(data: Path | None) -> Path:
    """``data``, else ``$HF_KNOWEDIT_DATA``, else ``../shared/data`` beside the checkout."""
    if data is not None:
        return Path(data)
    env = os.environ.get("HF_KNOWEDIT_DATA")
    return Path(env) if env else ROOT.parent / "shared" / "data"


def machine_info(threads: int | None = None) -> dict[str, Any]:
    import transformers

    import hf_knowedit

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": threads or torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "hf_knowedit": hf_knowedit.__version__,
        "git_commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def machine_line(m: dict[str, Any]) -> str:
    return (
        f"{m['cpu']} ({m['cores']} cores, torch threads {m['torch_threads']}, load average at start "
        f"{m['load_average']}); GPU: {m['gpu'] or 'none'}; python {m['python']}, torch {m['torch']}, "
        f"transformers {m['transformers']}, hf_knowedit {m['hf_knowedit']} (git {m['git_commit']}); {m['date']}"
    )


def rows_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of dict rows: one column per key, in first-seen order; missing cells empty."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return "\n".join(lines + ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows])


def write_markdown(
    path: Path, title: str, table: str, machine: dict[str, Any], wall_s: float | None, drop: Sequence[str] = ()
) -> Path:
    """``# title``, the command that produced it (less the arguments in ``drop``), the machine, the wall time
    (``None``: not known, e.g. a report merged from several runs), then ``table``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    args = [os.path.relpath(sys.argv[0], ROOT)] + [a for a in sys.argv[1:] if a not in drop]
    command = "python " + shlex.join(args)  # quoted: an empty value ("--bands ''") survives a paste into a shell
    wall = "" if wall_s is None else f" Wall time {wall_s / 60:.1f} min."
    text = (
        f"# {title}\n\nReproduce: `{command}` (data folder from `--data` or `HF_KNOWEDIT_DATA`).\n\n"
        f"Machine: {machine_line(machine)}.{wall}\n\n{table}\n"
    )
    path.write_text(text, encoding="utf-8")
    return path


def method_options(spec: str) -> tuple[str, dict[str, Any]]:
    """``"alphaedit+nas"`` -> ``("alphaedit", {"nas": True})``; ``"encore+norm_anchor=original"`` ->
    ``("encore", {"norm_anchor": "original"})`` (a value is read as JSON when it parses, else kept as text)."""
    name, *flags = spec.split("+")
    options: dict[str, Any] = {}
    for flag in flags:
        key, sep, value = flag.partition("=")
        if not sep:
            if key != "nas":
                raise SystemExit(f"unknown method flag {flag!r} in {spec!r}: use '+nas' or '+option=value'")
            options["nas"] = True
            continue
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return name, options
