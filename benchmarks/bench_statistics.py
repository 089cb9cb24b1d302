"""Throughput of the statistics pass against a plain forward stopped after the same module (target: ≥ 0.95).

Both read the same batches (``statistics._batches``: the corpus's first ``--tokens`` tokens, rows
grouped by length, ``--batch-tokens`` padded tokens per pass); the statistics pass adds the trace of
the module's input, the padding-free copy of the keys and the in-place accumulation of ``Σ k kᵀ``
(``revision=`` names the model, so the weight fingerprint is not part of the timing). The two are
timed alternately ``--repeats`` times and the best of each is kept. Run it on an otherwise idle
machine: timings under load mean nothing.

    python benchmarks/bench_statistics.py --tokens 20000 --layer 6 --threads 2
    python benchmarks/bench_statistics.py --tiny --tokens 2000   # smoke test
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from bench_gpu import plain_forward_rate
from benchlib import data_dir, machine_info, write_markdown

logger = logging.getLogger("bench_statistics")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--tokens", type=int, default=20_000)
    parser.add_argument("--layer", type=int, default=None)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="accumulation dtype")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    from hf_knowedit.methods.rome import default_layer
    from hf_knowedit.methods.statistics import compute_second_moment

    if args.tiny:
        from tests.tiny_models import make_tiny_model

        model, tok = make_tiny_model("llama")
    else:
        from hf_knowedit._bundled import load_smollm2

        model, tok = load_smollm2()
    layer = default_layer(model) if args.layer is None else args.layer
    cf = json.loads((data_dir(args.data) / "counterfact_500.json").read_text())
    texts = [p for r in cf[100:] for p in r["attribute_prompts"] + r["generation_prompts"]]
    texts = [" ".join(texts[i : i + 12]) for i in range(0, len(texts), 12)]  # rows of ~128 tokens
    machine = machine_info(args.threads)
    t0 = time.perf_counter()
    plain, stats = [], []
    for _ in range(args.repeats):
        plain.append(plain_forward_rate(model, tok, texts, layer, args.tokens, args.batch_tokens))
        start = time.perf_counter()
        sm = compute_second_moment(
            model, tok, layer, corpus=texts, n_tokens=args.tokens, cache=False, revision="bench",
            batch_tokens=args.batch_tokens, dtype=getattr(torch, args.dtype),
        )  # fmt: skip
        stats.append(sm.n_tokens / (time.perf_counter() - start))
        model._hf_knowedit.history.clear()  # no in-memory hit next time
    table = (
        "| layer | tokens | batch tokens | C dtype | plain forward tok/s | statistics tok/s | ratio |\n"
        "|---|---|---|---|---|---|---|\n"
        f"| {layer} | {args.tokens} | {args.batch_tokens} | {args.dtype} | {max(plain):,.0f} | {max(stats):,.0f} | "
        f"{max(stats) / max(plain):.3f} |"
    )
    logger.info("\n%s", table)
    if args.out:
        write_markdown(args.out, "Statistics pass throughput", table, machine, time.perf_counter() - t0)


if __name__ == "__main__":
    main()
