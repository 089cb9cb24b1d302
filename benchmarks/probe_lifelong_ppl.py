"""Perplexity of saved lifelong streams on a second held-out text: plain prose.

The lifelong rows (``bench_lifelong.py``) measure perplexity on held-out known-fact sentences: facts about named
entities that no edit of the stream rewrites. Entity edits may move such sentences more than ordinary prose. This
walks each saved stream on the unedited bundled model (:func:`hf_knowedit.evaluation.replay_stream`: the model as
it was at each row, no edit recomputed) and measures perplexity on plain prose as well: the sentences of
``hf_knowedit.evaluation.generative.FILLER`` joined, the text the lifelong rows used before they moved to held-out
facts. Writes a markdown table per stream, each text's change from row 0 and how far the ≤ 10 % target held on it,
and a JSON beside it.

    python benchmarks/probe_lifelong_ppl.py --state-dir runs/ll3000_authors --methods encore alphaedit+nas \\
        --out docs/results/lifelong_smollm2_3000_prose.md
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from bench_lifelong import change
from benchlib import ROOT, machine_info, write_markdown

#: the lifelong perplexity target: at most this rise over row 0
TARGET = 0.10


def met_until(rows: list[dict[str, Any]], key: str) -> int | None:
    """The last row (n_edits) up to which every row kept ``key`` within :data:`TARGET` of row 0 (None: not one)."""
    last = None
    for r in rows[1:]:
        if r[key] / rows[0][key] - 1 > TARGET:
            break
        last = r["n_edits"]
    return last


def table(method: str, rows: list[dict[str, Any]]) -> str:
    head = (
        f"**{method}**\n\n| n_edits | ES | ppl, held-out facts | change | ppl, prose | change |\n"
        "|---|---|---|---|---|---|\n"
    )
    body = "".join(
        f"| {r['n_edits']} | {r['ES']:.1f} | {r['ppl']:.1f} | {change(r['ppl'] / rows[0]['ppl'])} "
        f"| {r['ppl_prose']:.2f} | {change(r['ppl_prose'] / rows[0]['ppl_prose'])} |\n"
        for r in rows
    )
    until = {k: met_until(rows, k) for k in ("ppl", "ppl_prose")}
    shown = {k: "—" if v is None else str(v) for k, v in until.items()}
    return head + body + f"\nppl ≤ +10 % held up to: {shown['ppl']} edits (facts), {shown['ppl_prose']} (prose).\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", choices=("smollm2", "gemma3"), help="the bundled model streamed")
    p.add_argument("--methods", nargs="+", required=True, help="stream folders under --state-dir")
    p.add_argument("--state-dir", type=Path, required=True)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "lifelong_prose.md")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    from hf_knowedit._bundled import load_bundled
    from hf_knowedit.evaluation import generative, replay_stream
    from hf_knowedit.evaluation.lifelong import perplexity

    machine, start = machine_info(args.threads), time.perf_counter()
    model, tok = load_bundled(args.model)
    prose = " ".join(generative.FILLER)
    results = {}
    for method in args.methods:
        rows = []
        for row in replay_stream(model, args.state_dir / method):
            rows.append({**row, "ppl_prose": perplexity(model, tok, prose)})
        results[method] = rows
    note = (
        "Perplexity at each saved row of each stream on two held-out texts: the row's own (held-out known-fact "
        "sentences that mention no subject of the stream) and plain prose (`generative.FILLER`, "
        f"{len(prose)} characters). The model at each row is the stream's saved sets reloaded, as measured.\n\n"
    )
    body = note + "\n".join(table(m, rows) for m, rows in results.items())
    title = {"smollm2": "SmolLM2-135M", "gemma3": "Gemma-3-270M"}[args.model]
    write_markdown(args.out, f"Lifelong perplexity on two held-out texts, {title}", body, machine,
                   time.perf_counter() - start)  # fmt: skip
    args.out.with_suffix(".json").write_text(json.dumps({"machine": machine, "results": results}, indent=1))


if __name__ == "__main__":
    main()
