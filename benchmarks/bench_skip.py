"""Skipping the work an edit cannot change, against today's path, in the same run (SmolLM2-135M-Instruct).

1. **v\\* / z from the subject's last token on** (``optimize_targets(prefix_cache=True)`` vs ``False``): ROME's v\\*
   (one request, ROME's defaults and context templates) and MEMIT's batched z (``--requests``, default 20 and 100,
   with 5 context templates) at ROME's layer / the top of MEMIT's band. Seconds of each, ratio, the largest
   relative difference of the vectors, and the token-layers a step runs (``TargetResult.step_work``) as a
   fraction of the whole model's (``work_left("full")``) and of today's path (``work_left("replayed")``).
2. **Solves per layer without new d x d factorisations** at SmolLM2's key dimension (1,536; ``--d``), ``n``
   keys, a synthetic well-conditioned C: MEMIT (Woodbury on C's cached Cholesky factor vs factoring λC + KKᵀ),
   EMMET (C⁻¹K on the cached factor vs factoring λ₀C), AlphaEdit (the null-space basis vs ``P @ S`` + LU, with
   earlier keys). The cached factor itself is computed once per layer (its time is in the table, not in the
   per-solve figure), as ``SecondMoment.cholesky`` does for ROME already.

Timings are meaningless on a loaded machine: run it alone.

    python benchmarks/bench_skip.py [--quick] [--requests 20 100] [--steps N] [--d 1536] [--threads 1]
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchlib import data_dir, machine_info, write_markdown

logger = logging.getLogger("bench_skip")
#: quick (``make bench``): MEMIT z for 20 requests; full: 20 and 100
SIZES = {True: dict(requests=(20,), steps=None, d=1536), False: dict(requests=(20, 100), steps=None, d=1536)}


def _timed(fn: Any, repeat: int = 1) -> tuple[Any, float]:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return out, best


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def target_rows(
    model: Any, tok: Any, requests: Sequence[Any], layer: int, config: Any, templates: Sequence[str], label: str
) -> dict[str, Any]:
    """Today's path and the prefix cache on the same requests: one table row."""
    from hf_knowedit.hooks import frozen
    from hf_knowedit.methods.targets import optimize_targets

    def run(prefix_cache: bool) -> Any:
        with frozen(model):
            return optimize_targets(
                model,
                tok,
                list(requests),
                layer,
                config,
                site="mlp" if label.startswith("ROME") else "residual",
                templates=templates,
                prefix_cache=prefix_cache,
            )

    today, t_today = _timed(lambda: run(False))
    cached, t_cached = _timed(lambda: run(True))
    return {
        "operation": label,
        "today_s": round(t_today, 3),
        "new_s": round(t_cached, 3),
        "ratio": round(t_cached / t_today, 3),
        "max_rel_diff": _rel(cached.targets, today.targets),
        "work_left_full": round(cached.work_left("full"), 3),
        "work_left_today": round(cached.work_left("replayed"), 3),
        "steps": sum(cached.steps_taken),
    }


def solve_rows(d: int, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Per-layer solve time, today's solvers vs the ones on cached factors, same inputs."""
    from hf_knowedit.methods import solvers
    from hf_knowedit.moments import SecondMoment, StatsKey

    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * d, d, generator=g, dtype=torch.float64)
    C = X.t() @ X / X.shape[0]
    K = torch.randn(n, d, generator=g, dtype=torch.float64)
    R = torch.randn(n, 576, generator=g, dtype=torch.float64)
    Kp = torch.randn(n, d, generator=g, dtype=torch.float64)
    prior = Kp.t() @ Kp
    moment = SecondMoment(C, X.shape[0], StatsKey("synthetic", 0, "mlp", "gaussian", X.shape[0], "float64"))
    _, t_factor = _timed(moment.cholesky)
    inverse = solvers.cached_inverse(moment)
    lam = solvers.scaled_mom2_weight(d)
    threshold = 0.5  # relative: a null space of about half the dimensions
    P = solvers.nullspace_projector(C, threshold, relative=True)
    U = solvers.nullspace_basis(C, threshold, relative=True)
    f64 = torch.float64
    cases = [
        (
            "MEMIT solve",
            lambda: solvers.memit_factors(K, R, C, lam, dtype=f64),
            lambda: solvers.memit_factors(K, R, C, lam, cov_solve=inverse, dtype=f64),
        ),
        (
            "EMMET solve",
            lambda: solvers.emmet_factors(K, R, C, 1.0, dtype=f64),
            lambda: solvers.emmet_factors(K, R, C, 1.0, cov_solve=inverse, dtype=f64),
        ),
        (
            f"AlphaEdit solve (null space {U.shape[1]})",
            lambda: solvers.alphaedit_factors(K, R, P, prior, 10.0, dtype=f64),
            lambda: solvers.alphaedit_factors(K, R, None, prior, 10.0, basis=U, dtype=f64),
        ),
    ]
    rows = []
    for label, today, new in cases:
        (_, a_today), t_today = _timed(today, repeat=3)
        (_, a_new), t_new = _timed(new, repeat=3)
        rows.append(
            {
                "operation": f"{label}, d={d}, n={n}",
                "today_s": round(t_today, 4),
                "new_s": round(t_new, 4),
                "ratio": round(t_new / t_today, 3),
                "max_rel_diff": _rel(a_new, a_today),
                "note": f"C's factor once per layer: {t_factor:.3f} s",
            }
        )
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| operation | today's path (s) | new (s) | ratio new/today | max rel. diff "
        "| token-layers left: of the whole model / of today's | note |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        work = f"{r['work_left_full']:.2f} / {r['work_left_today']:.2f}" if "work_left_full" in r else ""
        note = r.get("note", f"{r.get('steps', '')} Adam updates in all")
        times = f"{r['today_s']:.3f} | {r['new_s']:.3f} | {r['ratio']:.2f}"
        lines.append(f"| {r['operation']} | {times} | {r['max_rel_diff']:.1e} | {work} | {note} |")
    return "\n".join(lines)


def run(
    quick: bool = False,
    data: Path | None = None,
    *,
    requests: Sequence[int] | None = None,
    steps: int | None = None,
    d: int | None = None,
    n_solve: int | None = None,
) -> dict[str, Any]:
    import json

    from hf_knowedit._bundled import load_smollm2
    from hf_knowedit.architectures import num_layers
    from hf_knowedit.methods.context import context_templates
    from hf_knowedit.methods.memit import MEMITConfig, default_band
    from hf_knowedit.methods.rome import ROMEConfig, default_layer
    from hf_knowedit.requests import to_request

    size = dict(SIZES[bool(quick)])
    requests = tuple(requests or size["requests"])
    steps = steps or size["steps"]
    d = d or size["d"]
    n_solve = n_solve or size.get("n_solve", 100)
    cases = json.loads((data_dir(data) / "counterfact_500.json").read_text())
    model, tok = load_smollm2()
    overrides = {"v_num_grad_steps": steps} if steps else {}
    rows = []

    rome_cfg = ROMEConfig(**overrides)
    rome_templates = context_templates(model, tok, n=rome_cfg.context_templates, length=rome_cfg.context_length)
    rows.append(
        target_rows(
            model, tok, [to_request(cases[0])], default_layer(model), rome_cfg, rome_templates, "ROME v* (1 request)"
        )
    )
    memit_cfg = MEMITConfig(**overrides)
    memit_templates = context_templates(model, tok, n=5, length=10)
    top = default_band(num_layers(model))[-1]
    for n in requests:
        reqs = [to_request(c) for c in cases[:n]]
        rows.append(
            target_rows(model, tok, reqs, top, memit_cfg, memit_templates, f"MEMIT z ({n} requests, 5 templates)")
        )
        logger.info("%s", rows[-1])
    rows += solve_rows(d, n_solve)
    return {"rows": rows, "table": markdown(rows), "settings": {"requests": requests, "steps": steps, "d": d}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="MEMIT z for 20 requests only (as make bench)")
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--requests", type=int, nargs="+", default=None, help="MEMIT z batch sizes (default 20 100)")
    parser.add_argument("--steps", type=int, default=None, help="v_num_grad_steps (default: the method's)")
    parser.add_argument("--d", type=int, default=None, help="key dimension of the solve timings (default 1536)")
    parser.add_argument("--n-solve", type=int, default=None, help="keys per solve (default 100)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "results" / "skip.md"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    result = run(args.quick, args.data, requests=args.requests, steps=args.steps, d=args.d, n_solve=args.n_solve)
    print(result["table"])
    if not args.quick:
        write_markdown(
            args.out,
            "Skipping what an edit cannot change",
            result["table"],
            machine_info(args.threads),
            time.perf_counter() - t0,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
