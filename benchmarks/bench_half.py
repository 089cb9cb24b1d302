"""Half precision on the ROME benchmark: the same records, statistics settings and layer with the bundled
SmolLM2 loaded in float32 and in bfloat16 (and float16 with ``--fp16``), in the same run.

Each dtype: ``hf_knowedit.evaluate(method="rome")`` on the first ``--records`` CounterFact records (one
edit at a time, reverted in between) with the library's defaults except the statistics corpus
(``--stats-tokens`` tokens of CounterFact prompts of records 200-499, never edited here). The library keeps
statistics, keys, targets and solves in float32 / float64 and casts the update back to the weights' dtype;
the table shows how far the half-precision model's ES / PS / NS land from float32's.

    python benchmarks/bench_half.py --records 50 --out docs/results/half_precision_smollm2.md
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from benchlib import data_dir, machine_info, rows_table, write_markdown

logger = logging.getLogger("bench_half")
METRICS = ("ES", "PS", "NS")


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    import hf_knowedit
    from hf_knowedit._bundled import load_bundled

    cf = json.loads((data_dir(args.data) / "counterfact_500.json").read_text())
    corpus = [p for r in cf[200:] for p in r["attribute_prompts"] + r["generation_prompts"]]
    config = hf_knowedit.ROMEConfig(mom2_corpus=corpus, mom2_n_tokens=args.stats_tokens)
    dtypes = [torch.float32, torch.bfloat16] + ([torch.float16] if args.fp16 else [])
    rows: list[dict[str, Any]] = []
    for dtype in dtypes:
        model, tok = load_bundled(args.model, dtype=dtype)
        t0 = time.perf_counter()
        cases = cf[: args.records]
        res = hf_knowedit.evaluate(model, tok, cases, method="rome", config=config, fluency=False, progress=False)
        seconds = (time.perf_counter() - t0) / args.records
        row = {"dtype": str(dtype).removeprefix("torch."), "s/edit": round(seconds, 1)}
        row.update({f"{k} pre": round(res.pre[k], 1) for k in METRICS})
        row.update({k: round(res.post[k], 1) for k in METRICS})
        if rows:
            row.update({f"Δ{k} vs float32": round(row[k] - rows[0][k], 1) for k in METRICS})
        row["failed"] = len(res.failed)
        rows.append(row)
        logger.info("%s", row)
        del model
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--records", type=int, default=50)
    parser.add_argument("--stats-tokens", type=int, default=20_000)
    parser.add_argument("--fp16", action="store_true", help="also float16")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for name in ("transformers", "hf_knowedit"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    machine, t0 = machine_info(args.threads), time.perf_counter()
    rows = run(args)
    table = rows_table(rows)
    logger.info("\n%s", table)
    if args.out:
        write_markdown(args.out, "ROME in half precision against float32", table, machine, time.perf_counter() - t0)


if __name__ == "__main__":
    main()
