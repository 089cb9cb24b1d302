"""The memory model (``hf_knowedit.methods.memory``, ``docs/memory.md``) against measured peaks.

For the statistics pass (two batch budgets, float32 and float64 accumulation), the ROME / MEMIT solves
and one v* optimisation on SmolLM2 (or ``--tiny``), prints predicted peak bytes above the model's
weights next to the measured peak: on a GPU ``torch.cuda.max_memory_allocated`` minus what was
allocated before; on a CPU the peak of the running sum of every tensor allocation and free the step
makes, as ``torch.profiler`` records them with ``profile_memory=True`` (:func:`hf_knowedit.methods.memory.measure_peak`:
exact for tensors; the resident set is not a usable measure, since the C allocator keeps and reuses
freed memory).

    python benchmarks/bench_memory.py [--tiny] [--layer 6] [--out docs/results/memory_smollm2.md]
"""

from __future__ import annotations

import argparse
import gc
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchlib import data_dir, machine_info, rows_table, write_markdown

logger = logging.getLogger("bench_memory")
MB = 2**20


def measure(step: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes ``step()`` allocated above what was allocated before it."""
    from hf_knowedit.methods.memory import measure_peak

    gc.collect()
    return measure_peak(step, device)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    import json

    import hf_knowedit
    from hf_knowedit.methods import memory
    from hf_knowedit.methods.rome import ROMEConfig
    from hf_knowedit.methods.solvers import memit_factors
    from hf_knowedit.methods.statistics import compute_second_moment
    from hf_knowedit.methods.targets import optimize_targets
    from hf_knowedit.requests import to_request

    if args.tiny:
        from tests.tiny_models import make_tiny_model

        model, tok = make_tiny_model("llama")
    else:
        from hf_knowedit._bundled import load_smollm2

        model, tok = load_smollm2()
    if torch.cuda.is_available() and not args.cpu:
        model.to("cuda")
    device = next(model.parameters()).device
    layer = args.layer if args.layer is not None else hf_knowedit.methods.rome.default_layer(model)
    shape = memory.model_shape(model, layer)
    d_in, d_out, s = shape["d_in"], shape["d_out"], shape["s"]
    folder = data_dir(args.data)
    records = json.loads((folder / "counterfact_500.json").read_text())
    texts = [p for r in records[100:] for p in r["attribute_prompts"] + r["generation_prompts"]]
    texts = [" ".join(texts[i : i + 12]) for i in range(0, len(texts), 12)]  # rows of ~128 tokens
    rows = []

    def row(step: str, predicted: dict[str, int], fn: Callable[[], Any]) -> None:
        measured = measure(fn, device)
        terms = ", ".join(f"{k} {v / MB:.1f}" for k, v in predicted.items() if k != "total")
        rows.append(
            {
                "step": step,
                "predicted MiB": round(predicted["total"] / MB, 1),
                "measured MiB": round(measured / MB, 1),
                "terms (MiB)": terms,
            }
        )
        logger.info("%s", rows[-1])

    from hf_knowedit.methods.statistics import _MEM_KEY
    from hf_knowedit.stack import get_state

    for batch_tokens in (1024, 4096):
        for dtype, s_C in ((torch.float32, 4), (torch.float64, 8)):
            get_state(model).history.pop(_MEM_KEY, None)  # measure the pass, not the in-memory cache
            predicted = memory.statistics_bytes(
                d_in,
                shape["d_model"],
                shape["d_ff"],
                shape["heads"],
                batch_tokens,
                128,
                s=s,
                s_C=s_C,
                eager=shape["eager"],
            )
            row(
                f"statistics pass, T={batch_tokens}, C in {str(dtype)[6:]}",
                predicted,
                lambda: compute_second_moment(
                    model,
                    tok,
                    layer,
                    corpus=texts,
                    n_tokens=args.tokens,
                    dtype=dtype,
                    cache=False,
                    batch_tokens=batch_tokens,
                ),  # fmt: skip
            )
    C = compute_second_moment(model, tok, layer, corpus=texts, n_tokens=args.tokens, cache=False)
    fresh = type(C)(C.matrix, C.n_tokens, C.key)  # no cached factor yet
    row("ROME solve (Cholesky of C)", memory.solve_bytes(d_in, d_out, 1, "rome"), lambda: fresh.solve(torch.ones(d_in)))
    for n in (100, 1000):
        K, R = torch.randn(n, d_in, device=C.matrix.device), torch.randn(n, d_out, device=C.matrix.device)
        row(f"MEMIT solve, n={n}", memory.solve_bytes(d_in, d_out, n), lambda: memit_factors(K, R, C.matrix, 100.0))
    reqs = [to_request(r) for r in records[:10]]
    config = ROMEConfig(v_num_grad_steps=2)
    for cached in (True, False):
        predicted = memory.targets_bytes_for(model, tok, reqs, layer, prefix_cache=cached)
        row(
            f"v* optimisation, 10 requests, prefix cache {'on' if cached else 'off'}",
            predicted,
            lambda: optimize_targets(model, tok, reqs, layer, config, prefix_cache=cached),
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--layer", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per statistics pass")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even with a GPU")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    machine = machine_info(args.threads)
    t0 = time.perf_counter()
    rows = run(args)
    table = rows_table(rows)
    logger.info("\n%s", table)
    if args.out:
        write_markdown(args.out, "Memory model: predicted vs measured peak", table, machine, time.perf_counter() - t0)


if __name__ == "__main__":
    main()
