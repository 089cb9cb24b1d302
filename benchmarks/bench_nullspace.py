"""How much of ordinary text AlphaEdit's "null space" holds, per layer of the MEMIT band.

AlphaEdit projects every update onto ``P = Û Ûᵀ``, ``Û`` the eigenvectors of the key second moment ``C`` with
eigenvalue below ``nullspace_threshold`` (2e-2, absolute, as the reference). Its premise is ``P k₀ ≈ 0`` for the
keys ``k₀`` of ordinary text, so the updates leave them alone. This measures the premise: the share of the keys'
energy ``E‖P k₀‖² / E‖k₀‖² = Σ_{null} λ / Σ λ`` that lies in that span, and, for comparison, how many of the
smallest directions hold 1 % and 0.1 % of it. Statistics as the lifelong benchmark computes them (``--tokens``).

    python benchmarks/bench_nullspace.py --model smollm2 --out docs/results/nullspace_smollm2.md
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from benchlib import machine_info, rows_table, write_markdown

logger = logging.getLogger("bench_nullspace")


def spectrum_row(layer: int, cov: torch.Tensor, threshold: float) -> dict:
    """Null-space size and the energy it holds, from ``C``'s eigenvalues (float64)."""
    c = cov.double()
    ev = torch.linalg.eigvalsh((c + c.t()) / 2).abs().sort().values
    share = ev.cumsum(0) / ev.sum()
    null = ev < threshold
    return {
        "layer": layer,
        "d": len(ev),
        f"null dims (< {threshold:g})": int(null.sum()),
        "energy in it %": round(100 * float(ev[null].sum() / ev.sum()), 1),
        "dims holding 1 %": int((share <= 0.01).sum()),
        "dims holding 0.1 %": int((share <= 0.001).sum()),
        "median eigenvalue": f"{float(ev.median()):.2e}",
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("smollm2", "gemma3"), default="smollm2")
    p.add_argument("--tokens", type=int, default=20_000, help="statistics tokens (bench_lifelong's)")
    p.add_argument("--threshold", type=float, default=2e-2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from hf_knowedit import _bundled
    from hf_knowedit.architectures import num_layers
    from hf_knowedit.methods.memit import default_band
    from hf_knowedit.methods.statistics import compute_second_moment

    start = time.perf_counter()
    model, tok = getattr(_bundled, f"load_{args.model}")()
    band = default_band(num_layers(model))
    rows = []
    for layer in band:
        cov = compute_second_moment(model, tok, layer, n_tokens=args.tokens).matrix
        rows.append(spectrum_row(layer, cov, args.threshold))
        logger.info("%s", rows[-1])
    table = rows_table(rows)
    logger.info("\n%s", table)
    if args.out:
        name = model.config._name_or_path or args.model
        title = f"AlphaEdit's null space on {name}: the energy of ordinary text's keys it holds"
        write_markdown(args.out, title, table, machine_info(), time.perf_counter() - start)


if __name__ == "__main__":
    main()
