"""Strength parameters across the bundled families: what Adam's rate and AlphaEdit's threshold mean on each.

1. Site scale: RMS of the residual stream and of the MLP output at the last token, per layer.
2. ``v*`` / ``z`` optimisation on ``--requests`` CounterFact requests at a layer, with the reference's absolute
   rate ``v_lr=0.5`` and with the default (``v_lr=None``: ``v_lr_relative · RMS(init)``): last losses and
   ``‖δ‖ / ‖init‖``.
3. AlphaEdit's null space: dimension of the span of C's singular values below ``nullspace_threshold`` (2e-2,
   absolute) and below relative thresholds, per layer, with C from ``--tokens`` tokens of CounterFact prompts.
4. The clamps (``--clamp-requests`` N): with every default, ``‖δ‖ / ‖init‖`` of N requests against the site's
   ``clamp_norm_factor`` (ROME's v* 4, the MEMIT family's z 0.75): quantiles, how many ended at the clamp, and
   how many ended above ``early_stop``. Both bounds (and ROME's weight decay ``‖δ‖² / ‖init‖²``) are relative
   to ``‖init‖`` by construction; this shows whether they bind on a family.

    python benchmarks/bench_strength.py --model gemma3 --z-layer 6 --rome-layer 3 --c-layers 2,4,6
    python benchmarks/bench_strength.py --model smollm2 --z-layer 8 --rome-layer 6 --c-layers 4,6,8
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from benchlib import data_dir

PROMPTS = ["The Eiffel Tower is located in the city of", "Danielle Darrieux's mother tongue is"]


def site_scale(model, tok) -> list[tuple[int, float, float]]:
    from hf_knowedit.architectures import get_architecture, get_module, mlp_out_path, num_layers

    spec, outs = get_architecture(model), {}
    hooks = [
        get_module(model, mlp_out_path(spec, i)).register_forward_hook(
            lambda m, a, o, i=i: outs.__setitem__(i, o.detach())
        )
        for i in range(num_layers(model))
    ]
    try:
        with torch.no_grad():
            out = model(**tok(PROMPTS, return_tensors="pt", padding=True), output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    rms = lambda x: float(x[:, -1].pow(2).mean(-1).sqrt().mean())  # noqa: E731
    return [(i, rms(out.hidden_states[i + 1]), rms(outs[i])) for i in range(num_layers(model))]


def clamps(model, tok, requests, rome_layer: int, z_layer: int) -> None:
    from hf_knowedit.methods.memit import MEMITConfig
    from hf_knowedit.methods.rome import ROMEConfig
    from hf_knowedit.methods.targets import optimize_targets

    print("| site | layer | clamp | ‖δ‖/‖init‖ min / median / max | at the clamp | above early_stop |")
    print("|---|---|---|---|---|---|")
    for site, layer, config in (("mlp (ROME v*)", rome_layer, ROMEConfig()), ("residual (z)", z_layer, MEMITConfig())):
        r = optimize_targets(model, tok, requests, layer, config, site=site.split()[0])
        rel = (r.deltas.norm(dim=1) / r.init.norm(dim=1)).sort().values
        at = int((rel >= 0.999 * config.clamp_norm_factor).sum())
        above = sum(loss > config.early_stop for loss in r.losses)
        print(
            f"| {site} | {layer} | {config.clamp_norm_factor} | {rel[0]:.2f} / {rel[len(rel) // 2]:.2f} / "
            f"{rel[-1]:.2f} | {at} of {len(rel)} | {above} of {len(rel)} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3")
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--z-layer", type=int, required=True)
    parser.add_argument("--rome-layer", type=int, required=True)
    parser.add_argument("--c-layers", default="")
    parser.add_argument("--tokens", type=int, default=20_000)
    parser.add_argument("--clamp-requests", type=int, default=0, help="section 4 only, on this many requests")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)

    from hf_knowedit._bundled import load_bundled
    from hf_knowedit.methods.alphaedit import AlphaEditConfig
    from hf_knowedit.methods.memit import MEMITConfig
    from hf_knowedit.methods.rome import ROMEConfig
    from hf_knowedit.methods.statistics import second_moment_for
    from hf_knowedit.methods.targets import optimize_targets
    from hf_knowedit.requests import to_request

    cf = json.loads((data_dir(args.data) / "counterfact_500.json").read_text())
    model, tok = load_bundled(args.model)
    if args.clamp_requests:
        clamps(model, tok, [to_request(r) for r in cf[: args.clamp_requests]], args.rome_layer, args.z_layer)
        return
    print("| layer | residual RMS | MLP-out RMS |\n|---|---|---|")
    for i, res, mlp in site_scale(model, tok):
        print(f"| {i} | {res:.2f} | {mlp:.3f} |")

    requests = [to_request(r) for r in cf[: args.requests]]
    print("\n| site | layer | v_lr | last losses | ‖δ‖/‖init‖ |\n|---|---|---|---|---|")
    for site, layer, config in (("residual", args.z_layer, MEMITConfig), ("mlp", args.rome_layer, ROMEConfig)):
        for lr in (0.5, None):
            r = optimize_targets(model, tok, requests, layer, config(v_lr=lr), site=site)
            rel = (r.deltas.norm(dim=1) / r.init.norm(dim=1)).tolist()
            shown = "None (relative)" if lr is None else lr
            print(
                f"| {site} | {layer} | {shown} | {', '.join(f'{x:.3f}' for x in r.losses)} | "
                f"{', '.join(f'{x:.2f}' for x in rel)} |"
            )

    corpus = [p for r in cf[200:] for p in r["attribute_prompts"] + r["generation_prompts"]]
    config = AlphaEditConfig(mom2_corpus=corpus, mom2_n_tokens=args.tokens, context_templates=0)
    print("\n| layer | d_in | s_max | median s | null dim: 2e-2 abs | 1e-4 rel | 1e-3 rel | 1e-2 rel |")
    print("|---|---|---|---|---|---|---|---|")
    for layer in [int(x) for x in args.c_layers.split(",") if x]:
        s = torch.linalg.svdvals(second_moment_for(model, tok, layer, config).matrix.double())
        counts = [int((s < 2e-2).sum())] + [int((s < f * s[0]).sum()) for f in (1e-4, 1e-3, 1e-2)]
        print(f"| {layer} | {len(s)} | {s[0]:.3g} | {s[len(s) // 2]:.3g} | " + " | ".join(map(str, counts)) + " |")


if __name__ == "__main__":
    main()
