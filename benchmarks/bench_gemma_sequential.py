"""AlphaEdit 5 x 20 sequential on the second bundled family (Gemma-3-270M) with defaults: ES / PS / NS on
all 100 records after the last batch (issue 18's benchmark row). Statistics from 10,000 tokens of CounterFact
records 100-499's prompts (no download), no context templates.

    HF_KNOWEDIT_DATA=/path/to/data python benchmarks/bench_gemma_sequential.py [--batches 5 --batch-size 20]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the ES / PS / NS comparisons live with the tests
    sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("HF_KNOWEDIT_DATA", str(ROOT.parent / "shared" / "data")))
    parser.add_argument("--method", default="alphaedit")
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_KNOWEDIT_STATS_CACHE", tempfile.mkdtemp())

    from tests.test_gemma3 import rates, wins

    import hf_knowedit
    from hf_knowedit._bundled import load_gemma3

    data = json.loads((Path(args.data) / "counterfact_500.json").read_text())
    corpus = [p for r in data[100:] for p in r["attribute_prompts"] + r["generation_prompts"]]
    records = data[: args.batches * args.batch_size]
    model, tok = load_gemma3()
    pre = rates(wins(model, tok, records))
    config = {"mom2_corpus": corpus, "mom2_n_tokens": 10_000, "context_templates": 0}
    start = time.time()
    for b in range(args.batches):
        batch = records[b * args.batch_size : (b + 1) * args.batch_size]
        es = hf_knowedit.apply_edits(model, tok, batch, args.method, config=config)
    seconds = time.time() - start
    post = rates(wins(model, tok, records))
    rows = [
        f"| {args.method}, {args.batches} x {args.batch_size} sequential, layers {es.layers} | "
        f"{pre['ES']:.1f} → {post['ES']:.1f} | {pre['PS']:.1f} → {post['PS']:.1f} | "
        f"{pre['NS']:.1f} → {post['NS']:.1f} | {seconds:.0f} |"
    ]
    sys.stdout.write("| run | ES | PS | NS | edit s |\n|---|---|---|---|---|\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
