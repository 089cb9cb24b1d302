"""Lifelong editing on a bundled model (SmolLM2-135M; Gemma-3-270M with ``--model gemma3``): a stream of
CounterFact edits per method, measured every k edits.

Each method runs :func:`hf_knowedit.run_lifelong` on the first ``--n-edits`` records of
``counterfact_flat_edit_10000.json`` in batches of ``--batch-size``, with a checkpoint row every
``--checkpoint-every`` edits (ES/PS/NS on all edits so far; generation metrics and fluency on a fixed sample of
``--gen-sample`` records; accuracy on the first ``--n-known`` facts of ``known_1000.json`` that mention no subject
of the stream; perplexity of the next 200 such facts, as sentences; seconds; weight-norm growth of the edited
layers). Writes one markdown file with a table per
method and the command, a JSON file and a PNG of the curves.

Methods are names registered in hf_knowedit, optionally with ``+nas`` (NAS, ``methods/nas.py``) and
``+option=value`` (any method option): ``memit``, ``alphaedit``, ``alphaedit+nas``, ``encore``,
``encore+norm_anchor=original``, ...

Resumable: every method keeps its checkpoints in ``--state-dir/<method>``; run the same command again after a
kill and it continues from the last checkpoint (rows identical to an uninterrupted run, seconds aside).
``--report`` edits nothing: it writes the files from the checkpoints the state folders hold so far (streams
still short of ``--n-edits`` are marked as such), e.g. to merge methods run by separate processes.

The markdown ends with the issue's targets (each stream's last row against its row 0, :data:`TARGETS`).
A hand-written ``## Reading`` section at the end of an existing ``--out`` file is kept when the file is rewritten.

    python benchmarks/bench_lifelong.py --n-edits 300 --batch-size 100 --checkpoint-every 100     # CPU, small
    python benchmarks/bench_lifelong.py --n-edits 3000 --checkpoint-every 500                      # the issue's
    python benchmarks/bench_lifelong.py --n-edits 10000 --checkpoint-every 1000 --device cuda     # GPU
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from benchlib import ROOT, data_dir, machine_info, method_options, write_markdown

logger = logging.getLogger("bench_lifelong")
#: tokens of the second-moment statistics (as bench_memit; cached on disk after the first run)
N_TOKENS = 20_000
FLAT = "counterfact_flat_edit_10000.json"
#: the issue's targets for the best method at 3,000 edits: (heading, passes(last, unedited), shown value)
TARGETS = (
    ("ES (≥ 90)", lambda r, r0: r["ES"] >= 90, lambda r, r0: f"{r['ES']:.1f}"),
    ("NS drop (≤ 10)", lambda r, r0: r0["NS"] - r["NS"] <= 10, lambda r, r0: f"{r0['NS'] - r['NS']:.1f}"),
    ("GE change (≤ 5 %)", lambda r, r0: abs(r["GE"] / r0["GE"] - 1) <= 0.05,
     lambda r, r0: change(r["GE"] / r0["GE"])),
    ("ppl change (≤ 10 %)", lambda r, r0: r["ppl"] / r0["ppl"] - 1 <= 0.10, lambda r, r0: change(r["ppl"] / r0["ppl"])),
    ("known-fact drop (≤ 5)", lambda r, r0: r0["known_acc"] - r["known_acc"] <= 5,
     lambda r, r0: f"{r0['known_acc'] - r['known_acc']:.0f}"),
)  # fmt: skip
#: the targets in generation and chat form, for streams measured with ``--chat`` (1,000 edits, best method)
GEN_TARGETS = (
    ("gen_ES (≥ 80)", lambda r, r0: r["gen_ES"] >= 80, lambda r, r0: f"{r['gen_ES']:.1f}"),
    ("chat_ES (≥ 70)", lambda r, r0: r["chat_ES"] >= 70, lambda r, r0: f"{r['chat_ES']:.1f}"),
    ("known-fact drop (≤ 5)", lambda r, r0: r0["known_acc"] - r["known_acc"] <= 5,
     lambda r, r0: f"{r0['known_acc'] - r['known_acc']:.0f}"),
)  # fmt: skip
KNOWN = "known_1000.json"
COLUMNS = (
    "n_edits",
    "ES",
    "PS",
    "NS",
    "S",
    "gen_ES",
    "gen_PS",
    "gen_NS",
    "gen_ES_prefix",
    "gen_ES_neg",
    "gen_ES_neg_n",
    "chat_ES",
    "chat_PS",
    "chat_NS",
    "chat_keep",
    "GE",
    "ppl",
    "known_acc",
    "norm_growth",
    "norm_growth_max",
    "edit_s",
    "failed",
)


def change(ratio: float) -> str:
    """A ratio as a signed percent change, or as a factor once it is 10× or more (a collapsed model's perplexity)."""
    return f"×{ratio:.3g}" if ratio >= 10 else f"{100 * (ratio - 1):+.1f} %"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", choices=("smollm2", "gemma3"), help="bundled model to edit")
    p.add_argument("--chat", action="store_true", help="also the chat metrics (chat_ES/PS/NS/keep) on the sample")
    p.add_argument("--methods", nargs="+", default=["memit", "alphaedit", "alphaedit+nas", "encore"])
    p.add_argument("--n-edits", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--gen-sample", type=int, default=100)
    p.add_argument("--n-known", type=int, default=100)
    p.add_argument("--context-templates", type=int, default=0, help="MEMIT-family context templates (CPU: 0)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default=None, help="e.g. cuda (default: CPU)")
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--state-dir", type=Path, default=ROOT / "runs" / "lifelong")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "lifelong_smollm2.md")
    p.add_argument("--report", action="store_true", help="write the files from the state folders; edit nothing")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.report:
        results = [checkpointed(args.state_dir / spec, spec) for spec in args.methods]
        ran = args.state_dir / args.methods[0] / "machine.json"  # where the first stream started
        write(args, results, json.loads(ran.read_text()) if ran.exists() else machine_info(args.threads), None)
        return
    if args.threads:
        torch.set_num_threads(args.threads)

    from hf_knowedit._bundled import load_bundled
    from hf_knowedit.evaluation import run_lifelong
    from hf_knowedit.methods import alphaedit, encore, rlsedit

    machine = machine_info(args.threads)
    start = time.perf_counter()
    model, tok = load_bundled(args.model)
    if args.device:
        model.to(args.device)
    data = data_dir(args.data)
    results = []
    for spec in args.methods:
        name, options = method_options(spec)
        for method_module in (alphaedit, encore, rlsedit):  # each stream starts from a clean method history
            method_module.reset_history(model)
        (args.state_dir / spec).mkdir(parents=True, exist_ok=True)
        machine_file = args.state_dir / spec / "machine.json"
        if not machine_file.exists():  # the machine that started the stream, for --report
            machine_file.write_text(json.dumps(machine))
        res = run_lifelong(
            model,
            tok,
            data / FLAT,
            method=name,
            n_edits=args.n_edits,
            batch_size=args.batch_size,
            checkpoint_every=args.checkpoint_every,
            gen_sample=args.gen_sample,
            known=data / KNOWN,
            n_known=args.n_known,
            state_dir=args.state_dir / spec,
            mom2_n_tokens=N_TOKENS,
            context_templates=args.context_templates,
            chat=args.chat,
            **options,
        )
        res.method = spec
        results.append(res)
        logger.info("%s done:\n%s", spec, res.to_markdown(columns=COLUMNS))
        write(args, results, machine, time.perf_counter() - start)  # after every method: a kill keeps what is done


def checkpointed(state: Path, spec: str) -> Any:
    """The rows a stream's state folder holds so far, as a result (``--report``)."""
    from hf_knowedit.evaluation.lifelong import LifelongResult

    progress = state / "progress.json"
    if not progress.exists():
        raise SystemExit(f"no stream checkpoints in {state}: run the method first (without --report)")
    saved = json.loads(progress.read_text(encoding="utf-8"))
    settings = {k: v for k, v in saved["settings"].items() if k != "case_ids"}
    return LifelongResult(spec, saved["rows"], settings)


def write(args: argparse.Namespace, results: list, machine: dict[str, Any], wall: float | None) -> None:
    """The markdown (a table per method, the command), the JSON and the PNG of ``results``."""
    from hf_knowedit.evaluation import plot_lifelong

    png = args.out.with_suffix(".png")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot_lifelong(results, path=png)
    tables = "\n\n".join(r.to_markdown(columns=COLUMNS) + short_of(r) for r in results)
    settings = {k: str(v) for k, v in vars(args).items()}
    note = (
        f"Stream: the first {args.n_edits} records of `{FLAT}` in batches of {args.batch_size}, a row every "
        f"{args.checkpoint_every} edits; generation metrics and GE on a fixed sample of {args.gen_sample} records; "
        f"known-fact accuracy on the first {args.n_known} facts of `{KNOWN}` that mention no subject of the stream "
        f"(`known_excluded` in the JSON's settings: how many were passed over), perplexity on the next 200 such facts "
        f"as sentences; statistics from {N_TOKENS} tokens; "
        f"context templates {args.context_templates}. Row 0 is the unedited model (ES/PS/NS there on all "
        f"{args.n_edits} records). Curves: `{png.name}`.\n\n"
    )
    reading = ""
    if args.out.exists():  # keep the hand-written reading of an earlier report
        old = args.out.read_text(encoding="utf-8")
        reading = old[old.index("\n## Reading") :].strip("\n") if "\n## Reading" in old else ""
    body = note + tables + "\n\n" + targets_table(results) + ("\n\n" + reading if reading else "")
    title = {"smollm2": "SmolLM2-135M", "gemma3": "Gemma-3-270M"}[args.model]
    write_markdown(args.out, f"Lifelong editing on {title}", body, machine, wall, drop=("--report",))
    args.out.with_suffix(".json").write_text(
        json.dumps({"settings": settings, "machine": machine, "results": [r.to_dict() for r in results]}, indent=1)
    )
    logger.info("wrote %s, %s", args.out, png)


def targets_table(results: list) -> str:
    """Each stream's last row against its unedited row 0, one column per target (✗: missed), and how far
    the stream kept every target (:func:`all_met_until`); then the targets in generation and chat form for the
    streams measured with ``--chat``."""
    text = _targets(results, TARGETS, "## Targets\n")
    chatted = [r for r in results if all("chat_ES" in row for row in r.rows)]
    if chatted:
        text += "\n\n" + _targets(chatted, GEN_TARGETS, "## Targets in generation and chat form\n")
    return text


def _targets(results: list, targets: tuple, heading: str) -> str:
    lines = [
        heading,
        "Last row of each stream against its row 0 (unedited); ✗ marks a missed target. *All met until*: the last "
        "checkpoint up to which every row met every target (— when the first one missed one).\n",
        "| method | edits reached | " + " | ".join(t[0] for t in targets) + " | all met until |",
        "|---|---|" + "---|" * (len(targets) + 1),
    ]
    for res in results:
        r0, r = res.rows[0], res.rows[-1]
        cells = [show(r, r0) + ("" if passes(r, r0) else " ✗") for _, passes, show in targets]
        until = all_met_until(res.rows, targets)
        lines.append(f"| {res.method} | {r['n_edits']} | " + " | ".join(cells) + f" | {until or '—'} |")
    return "\n".join(lines)


def all_met_until(rows: list[dict], targets: tuple = TARGETS) -> int | None:
    """``n_edits`` of the last checkpoint before the first row (after the unedited row 0) that misses a target;
    ``None`` when the first edited row already misses one."""
    until = None
    for r in rows[1:]:
        if not all(passes(r, rows[0]) for _, passes, _ in targets):
            break
        until = r["n_edits"]
    return until


def short_of(result: Any) -> str:
    """A line under a stream that has not reached its length yet."""
    reached, planned = result.rows[-1]["n_edits"], result.settings.get("n_edits")
    if planned is None or reached >= planned:
        return ""
    return f"\n\n*Stream in progress: {reached} of {planned} edits so far (resumable from its state folder).*"


if __name__ == "__main__":
    main()
