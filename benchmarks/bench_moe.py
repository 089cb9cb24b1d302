"""Editing through mixture-of-experts routing, on SmolLM2-135M upcycled into MoE models (real knowledge).

Test beds (:func:`hf_knowedit._testbeds.upcycle_moe`, 4 experts, top 2, experts perturbed by ``--perturb`` so
that they differ): Mixtral (routed experts only) and Qwen2-MoE (a sigmoid-gated shared expert beside the
routed ones). Design choices compared, each on the same CounterFact records as the dense SmolLM2:

* ``mixtral/routed``: the table's Mixtral row: the routed experts edited as one matrix on the routing-weighted
  keys (``mlp_out_layout="experts"``, :mod:`hf_knowedit.experts`);
* ``qwen2_moe/shared``: the table's Qwen2-MoE row: only the shared expert's ``down_proj`` is written;
* ``qwen2_moe/routed``: the same model with its routed experts edited instead (a registered override row).

Per variant: ROME on ``--rome`` records (one at a time, reverted in between), MEMIT and AlphaEdit (its null-space
projection is the routing-stability constraint: unrelated keys keep their outputs, so later routers their
inputs) and, on the ``*/routed`` variants, MoEEdit (the same constraint per expert) on ``--memit`` records in one
call; ES/PS/NS from :func:`hf_knowedit.evaluate`, and the routing
change: the fraction of (token, MoE block) pairs of unrelated text (``--unrelated`` facts of
``known_1000.json`` that name no edited subject, as sentences) whose top-k set of experts differs after the
edit (ROME: after each of its first ``--rome-routing`` edits, averaged). ``--floor``: per MoE variant, the
routing change of the *unedited* model served in bfloat16 and in float16 against float32 (the precision noise
every served model carries), rows ``unedited in <dtype>``. A method's ``+preserve=N`` passes ``mom2_preserve``: ``N``
other known facts, disjoint from the measured ones by subject (:func:`preserved_texts`), e.g.
``memit+preserve=500+mom2_preserve_weight=10``. Each variant × method is saved as it finishes
(``--state``); a rerun skips what is saved.

    python benchmarks/bench_moe.py [--rome 50] [--memit 100] [--threads 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from benchlib import ROOT, data_dir, machine_info, method_options, write_markdown

logger = logging.getLogger("bench_moe")
N_TOKENS = 20_000
VARIANTS = ("dense", "mixtral/routed", "qwen2_moe/shared", "qwen2_moe/routed")
METHODS = ("rome", "memit", "alphaedit", "moeedit")
#: methods that edit routed experts only: run on the ``*/routed`` variants
ROUTED_ONLY = ("moeedit",)
#: the issue's targets for the MoE test bed (against the dense model on the same records)
TARGETS = "ES ≥ 95, PS within 10 points of dense, NS drop ≤ 10, routing change on unrelated text ≤ 1 % of tokens"


def build(variant: str, dense: Any, tok: Any, perturb: float) -> Any:
    """The model of ``variant`` (its table row, or the routed-experts override for ``qwen2_moe/routed``)."""
    import hf_knowedit
    from hf_knowedit._testbeds import upcycle_moe
    from hf_knowedit.architectures import ARCHITECTURES

    if variant == "dense":
        return dense
    kind, design = variant.split("/")
    model = upcycle_moe(dense, kind, perturb=perturb, tokenizer=tok)
    if kind == "qwen2_moe":  # the routed override is registered per run; the table row is put back after
        row = ARCHITECTURES["qwen2_moe"]
        if design == "routed":
            row = dataclasses.replace(row, mlp_out="mlp.experts", mlp_out_layout="experts", mlp_out_gate=None)
        hf_knowedit.register_architecture(row, overwrite=True)
    return model


def unrelated_texts(data: Path, subjects: set[str], n: int) -> list[str]:
    """``n`` known facts (prompt + answer, as sentences) that mention none of ``subjects``."""
    facts = json.loads((data / "known_1000.json").read_text())
    out = []
    for f in facts:
        if not any(s in f["prompt"] for s in subjects):
            out.append(f"{f['prompt']} {f['attribute']}.")
        if len(out) == n:
            break
    return out


def preserved_texts(data: Path, subjects: set[str], measured: list[str], n: int) -> list[str]:
    """``n`` known facts (as sentences) for ``mom2_preserve``: none names an edited subject, none is about a
    subject of the ``measured`` unrelated texts, so the routing change is measured on text the edit did not see."""
    facts = json.loads((data / "known_1000.json").read_text())
    measured = set(measured)
    seen = {f["subject"] for f in facts if f"{f['prompt']} {f['attribute']}." in measured}
    out = [
        f"{f['prompt']} {f['attribute']}."
        for f in facts
        if f["subject"] not in seen and not any(s in f["prompt"] for s in subjects)
    ]
    if len(out) < n:
        raise SystemExit(
            f"+preserve={n}: only {len(out)} known facts are disjoint from the edits and the measured texts"
        )
    return out[:n]


def routing_moved(model: Any, tok: Any, texts: list[str], apply: Any) -> float:
    """Percent of unrelated (token, block) pairs whose top-k experts change when ``apply()`` edits (it returns
    the edit set, reverted here)."""
    import hf_knowedit
    from hf_knowedit.evaluation.routing import routing_change, routing_snapshot

    before = routing_snapshot(model, tok, texts)
    es = apply()
    try:
        return 100 * routing_change(before, routing_snapshot(model, tok, texts)).fraction
    finally:
        hf_knowedit.revert_edits(model, es.name)


#: pseudo-methods of ``--floor``: the unedited model cast to these dtypes
FLOOR_DTYPES = ("bfloat16", "float16")


def floor_row(variant: str, model: Any, tok: Any, texts: list[str], dtype: str) -> dict:
    """Percent of unrelated (token, block) pairs whose top-k experts differ between the unedited model in
    float32 and a copy of it in ``dtype``: the routing noise of serving in that precision, no edit."""
    import copy

    from hf_knowedit.evaluation.routing import routing_change, routing_snapshot

    t0 = time.perf_counter()
    before = routing_snapshot(model, tok, texts)
    cast = copy.deepcopy(model).to(getattr(torch, dtype))
    change = 100 * routing_change(before, routing_snapshot(cast, tok, texts)).fraction
    return {"variant": variant, "method": f"unedited in {dtype}", "records": 0, "routing_change": change,
            "seconds": time.perf_counter() - t0}  # fmt: skip


def run_one(variant: str, method: str, model: Any, tok: Any, cases: list, texts: list[str], args: Any) -> dict:
    import hf_knowedit
    from hf_knowedit.requests import to_request

    method, options = method_options(spec := method)  # "moeedit+nullspace_threshold=0.002": a method's options
    if "preserve" in options:  # "memit+preserve=500": mom2_preserve = 500 held-out known facts
        n_keep = int(options.pop("preserve"))
        subjects = {c["requested_rewrite"]["subject"] for c in cases[: max(args.rome, args.memit)]}
        options["mom2_preserve"] = preserved_texts(data_dir(args.data), subjects, texts, n_keep)
    protocol = "single" if method == "rome" else "batch"
    n = args.rome if method == "rome" else args.memit
    config = dict(mom2_n_tokens=N_TOKENS, context_templates=args.context_templates) | options
    t0 = time.perf_counter()
    res = hf_knowedit.evaluate(
        model, tok, cases[:n], method=method, protocol=protocol, config=config, fluency=False, progress=False
    )
    row = {"variant": variant, "method": spec, "records": n, "edit_s": res.timing.get("edit_s")}
    row |= {f"pre_{k}": res.pre[k] for k in ("ES", "PS", "NS")} | {k: res.post[k] for k in ("ES", "PS", "NS")}
    if variant != "dense":
        requests = [to_request(c) for c in cases[:n]]
        if method == "rome":
            moves = [
                routing_moved(
                    model,
                    tok,
                    texts,
                    lambda r=r: hf_knowedit.apply_edits(model, tok, [r], method="rome", config=config),
                )
                for r in requests[: args.rome_routing]
            ]
            row["routing_change"] = sum(moves) / len(moves)
        else:
            row["routing_change"] = routing_moved(
                model, tok, texts, lambda: hf_knowedit.apply_edits(model, tok, requests, method=method, config=config)
            )
    row["seconds"] = time.perf_counter() - t0
    logger.info("%s %s: %s", variant, method, row)
    return row


def table(rows: list[dict]) -> str:
    dense = {r["method"]: r for r in rows if r["variant"] == "dense"}
    lines = [
        "| variant | method | records | ES | PS | NS | unedited ES / PS / NS | PS − dense PS | NS drop "
        "| routing change (%) | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if not r["records"]:  # a --floor row: routing only
            lines.append(f"| {r['variant']} | {r['method']} | – | – | – | – | – | – | – | "
                         f"{r['routing_change']:.2f} | {r['seconds']:.0f} |")  # fmt: skip
            continue
        d = dense.get(r["method"])
        gap = "–" if d is None else f"{r['PS'] - d['PS']:+.1f}"
        drop = r["pre_NS"] - r["NS"]
        route = "–" if "routing_change" not in r else f"{r['routing_change']:.2f}"
        lines.append(
            f"| {r['variant']} | {r['method']} | {r['records']} | {r['ES']:.1f} | {r['PS']:.1f} | {r['NS']:.1f} | "
            f"{r['pre_ES']:.0f} / {r['pre_PS']:.0f} / {r['pre_NS']:.0f} | {gap} | {drop:.1f} | {route} | "
            f"{r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--methods", nargs="+", default=list(METHODS), help=f"{', '.join(METHODS)}, each +option=value")
    p.add_argument("--rome", type=int, default=50)
    p.add_argument("--memit", type=int, default=100)
    p.add_argument("--rome-routing", type=int, default=5)
    p.add_argument("--unrelated", type=int, default=100)
    p.add_argument("--perturb", type=float, default=0.01)
    p.add_argument("--floor", action="store_true", help="also the routing change of bf16 / fp16 serving, unedited")
    p.add_argument("--context-templates", type=int, default=0, help="context templates (CPU: 0)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--state", type=Path, default=ROOT / "runs" / "moe.json")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "moe_smollm2.md")
    args = p.parse_args(argv)
    if bad := [m for m in args.methods if method_options(m)[0] not in METHODS]:
        p.error(f"unknown method(s) {bad}: choose from {', '.join(METHODS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    from hf_knowedit._bundled import load_smollm2
    from hf_knowedit.architectures import ARCHITECTURES

    data = data_dir(args.data)
    cases = json.loads((data / "counterfact_500.json").read_text())
    n = max(args.rome, args.memit)
    subjects = {c["requested_rewrite"]["subject"] for c in cases[:n]}
    texts = unrelated_texts(data, subjects, args.unrelated)
    machine = machine_info(args.threads)
    rows = json.loads(args.state.read_text()) if args.state.exists() else []
    done = {(r["variant"], r["method"]) for r in rows}
    dense, tok = load_smollm2()
    qwen_row = ARCHITECTURES["qwen2_moe"]
    start = time.perf_counter()
    try:
        for variant in args.variants:
            routed = variant.endswith("/routed")
            todo = [
                m
                for m in args.methods
                if (variant, m) not in done and (routed or method_options(m)[0] not in ROUTED_ONLY)
            ]
            floors = [d for d in FLOOR_DTYPES if args.floor and variant != "dense"]
            floors = [d for d in floors if (variant, f"unedited in {d}") not in done]
            todo += floors
            if not todo:
                continue
            model = build(variant, dense, tok, args.perturb)
            for method in todo:
                if method in FLOOR_DTYPES:
                    rows.append(floor_row(variant, model, tok, texts, method))
                else:
                    rows.append(run_one(variant, method, model, tok, cases, texts, args))
                args.state.parent.mkdir(parents=True, exist_ok=True)
                args.state.write_text(json.dumps(rows, indent=1))
            ARCHITECTURES["qwen2_moe"] = qwen_row
            del model
    finally:
        ARCHITECTURES["qwen2_moe"] = qwen_row
    order = {(v, m): i for i, (v, m) in enumerate((v, m) for v in VARIANTS for m in ("unedited", *METHODS))}
    rows.sort(key=lambda r: (order[(r["variant"], method_options(r["method"].split()[0])[0])], r["method"]))
    body = (
        f"SmolLM2-135M-Instruct upcycled into 4-expert, top-2 MoE models (experts perturbed by {args.perturb}); "
        f"ROME on the first {args.rome} records of `counterfact_500.json` (one at a time), MEMIT, AlphaEdit and "
        f"MoEEdit (routed experts only) on the first {args.memit} in one call; default layers; statistics from "
        f"{N_TOKENS} tokens; context "
        f"templates {args.context_templates}. Routing change: percent of (token, MoE block) pairs of "
        f"{len(texts)} unrelated known facts whose top-2 experts change (ROME: mean over its first "
        f"{args.rome_routing} edits, each alone). Targets: {TARGETS}.\n\n" + table(rows)
    )
    write_markdown(
        args.out,
        "Editing through mixture-of-experts routing (SmolLM2 test beds)",
        body,
        machine,
        time.perf_counter() - start,
    )
    args.out.with_suffix(".json").write_text(
        json.dumps(
            {
                "settings": vars(args) | {"state": str(args.state), "out": str(args.out), "data": str(args.data)},
                "rows": rows,
            },
            indent=1,
            default=str,
        )
    )


if __name__ == "__main__":
    main()
