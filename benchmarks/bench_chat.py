"""Edits that hold when the model speaks: generation and chat metrics per method and option, on the bundled models.

For each model (``--models``: SmolLM2-135M-Instruct, asked through its chat template; Gemma-3-270M, a base model,
asked in ``Q: ... A:`` form), method (``--methods``) and option set (``--variants``: ``default``, or
``name=value[,name=value]`` method options, e.g. ``chat_context=2``), the first ``--records`` records of
``counterfact_500.json`` are edited (ROME one at a time and reverted in between; the MEMIT family in one call)
and scored by :func:`hf_knowedit.evaluate` with ``generation=True`` and ``chat=True``: the papers' ES/PS/NS, the
generation metrics (gen_ES, gen_PS, gen_ES_prefix) and the chat metrics (chat_ES/PS/NS/keep), the unedited
model's beside them. Each (model, method, variant) is saved as it finishes (``--state``); a rerun skips what is
saved. The markdown ends with the issue's targets.

    python benchmarks/bench_chat.py --records 50 --methods rome memit alphaedit encore \\
        --variants default chat_context=2 --threads 1
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from benchlib import ROOT, data_dir, machine_info, write_markdown

logger = logging.getLogger("bench_chat")
N_TOKENS = 20_000
COLUMNS = ("ES", "PS", "NS", "gen_ES", "gen_PS", "gen_ES_prefix", "chat_ES", "chat_PS", "chat_NS", "chat_keep")
#: the issue's targets per family: (heading, passes(post, pre))
TARGETS = (
    ("chat_ES ≥ 90", lambda r, r0: r["chat_ES"] >= 90),
    ("chat_PS ≥ 70", lambda r, r0: r["chat_PS"] >= 70),
    ("gen_PS ≥ 70", lambda r, r0: r["gen_PS"] >= 70),
    ("gen_ES_prefix ≥ 85", lambda r, r0: r["gen_ES_prefix"] >= 85),
    ("NS drop ≤ 5", lambda r, r0: r0["NS"] - r["NS"] <= 5),
    # chat_keep counts the unrelated known questions answered right, so "answered as before" is against the
    # unedited model's own count (a 135M model answers under half of them)
    ("chat_keep ≥ 95 % of unedited", lambda r, r0: r["chat_keep"] >= 0.95 * r0["chat_keep"]),
)


def variant_options(spec: str) -> dict[str, Any]:
    """``"default"`` -> ``{}``; ``"chat_context=2,context_templates=0"`` -> the options (JSON values where they
    parse, else text)."""
    if spec == "default":
        return {}
    out: dict[str, Any] = {}
    for pair in spec.split(","):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"bad variant {spec!r}: use 'default' or name=value[,name=value]")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def run_one(model: Any, tok: Any, cases: list, method: str, variant: str, args: Any) -> dict[str, Any]:
    import hf_knowedit

    # a variant's options override the run's (e.g. context_templates=5 in one variant)
    config = {**dict(mom2_n_tokens=N_TOKENS, context_templates=args.context_templates), **variant_options(variant)}
    t0 = time.perf_counter()
    res = hf_knowedit.evaluate(
        model,
        tok,
        cases,
        method=method,
        protocol="single" if method == "rome" else "batch",
        config=config,
        fluency=False,
        generation=True,
        chat=True,
        progress=False,
    )
    return {
        "method": method,
        "variant": variant,
        "records": len(cases),
        "pre": {k: res.pre.get(k) for k in COLUMNS},
        "post": {k: res.post.get(k) for k in COLUMNS},
        "seconds": time.perf_counter() - t0,
    }


def _cell(x: Any) -> str:
    return "–" if x is None else f"{x:.0f}"


def table(model: str, rows: list[dict]) -> str:
    lines = [
        f"### {model}\n",
        "| method | variant | " + " | ".join(COLUMNS) + " | targets missed | s |",
        "|---|---|" + "---|" * (len(COLUMNS) + 2),
    ]
    if rows:
        pre = rows[0]["pre"]
        lines.append("| unedited | – | " + " | ".join(_cell(pre[k]) for k in COLUMNS) + " | – | – |")
    for r in rows:
        missed = [
            name for name, ok in TARGETS if None in (r["post"].get(c) for c in COLUMNS) or not ok(r["post"], r["pre"])
        ]
        lines.append(
            f"| {r['method']} | {r['variant']} | "
            + " | ".join(_cell(r["post"][k]) for k in COLUMNS)
            + f" | {', '.join(missed) or 'none'} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


#: the library's default number of context templates (``EditConfig.context_templates``): what users get
LIBRARY_TEMPLATES = 5


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["smollm2", "gemma3"], choices=("smollm2", "gemma3"))
    p.add_argument("--methods", nargs="+", default=["rome"])
    p.add_argument("--variants", nargs="+", default=["default", "chat_context=2"])
    p.add_argument("--records", type=int, default=50)
    p.add_argument(
        "--context-templates",
        type=int,
        default=LIBRARY_TEMPLATES,
        help=f"context templates (default: the library's, {LIBRARY_TEMPLATES}; 0 is faster and scores lower)",
    )
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--state", type=Path, default=ROOT / "runs" / "chat.json")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "chat_edits.md")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    from hf_knowedit._bundled import load_bundled

    cases = json.loads((data_dir(args.data) / "counterfact_500.json").read_text())[: args.records]
    state = json.loads(args.state.read_text()) if args.state.exists() else {}
    machine = machine_info(args.threads)
    start = time.perf_counter()
    for name in args.models:
        todo = [(m, v) for m in args.methods for v in args.variants if f"{m}|{v}" not in state.get(name, {})]
        if not todo:
            continue
        model, tok = load_bundled(name)
        for method, variant in todo:
            state.setdefault(name, {})[f"{method}|{variant}"] = run_one(model, tok, cases, method, variant, args)
            args.state.parent.mkdir(parents=True, exist_ok=True)
            args.state.write_text(json.dumps(state, indent=1))
            logger.info("%s %s %s done", name, method, variant)
        del model
    titles = {"smollm2": "SmolLM2-135M-Instruct (chat template)", "gemma3": "Gemma-3-270M (base, Q/A form)"}
    body = (
        f"The first {args.records} records of `counterfact_500.json`; ROME one edit at a time (reverted in between), "
        f"the MEMIT family in one call; default layers; statistics from {N_TOKENS} tokens; context templates "
        f"{args.context_templates}. Percent; 'unedited' is the model before any edit. Targets (per family): "
        + "; ".join(t[0] for t in TARGETS)
        + ".\n\n"
        + "\n\n".join(table(titles[n], list(state[n].values())) for n in args.models if n in state)
    )
    write_markdown(args.out, "Edits in generation and chat form", body, machine, time.perf_counter() - start)
    args.out.with_suffix(".json").write_text(json.dumps(state, indent=1))


if __name__ == "__main__":
    main()
