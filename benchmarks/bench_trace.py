"""Causal tracing on SmolLM2-135M: batched ``trace_fact`` vs one forward pass per cell, and the average
indirect effect over known facts (ROME Figure 2) with the suggested edit layers.

The baseline is the reference protocol (kmeng01/rome ``trace_with_patch``), as the tests' oracle
``tests/oracles.py::NaiveTracer`` implements it: for every (kind, token, layer) cell, one forward pass of the
corrupted samples, the clean states copied back by forward hooks, full logits at every position. Both use
the same noise, so their scores must agree.

    python benchmarks/bench_trace.py [--quick] [--data ../shared/data] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchlib import ROOT, data_dir, machine_info, write_markdown
from hf_knowedit.architectures import num_layers
from hf_knowedit.tracing import KINDS, CausalTracer, suggest_layers, trace_fact, trace_facts

if str(ROOT) not in sys.path:  # the per-cell reference tracer lives with the tests
    sys.path.insert(0, str(ROOT))
from tests.oracles import NaiveTracer  # noqa: E402

IMG = Path(__file__).resolve().parents[1] / "docs" / "img"
FACT = ("Vinson Massif is located in the continent of", "Vinson Massif")


def batched_vs_naive(model, tok, prompt: str, subject: str, kinds=KINDS, samples: int = 10) -> dict[str, Any]:
    """``trace_fact`` against the plain per-cell tracer of the tests (``tests/oracles.py``: one forward pass
    per cell, as the reference ``trace_with_patch``), on the same noise; times and the largest gap."""
    t0 = time.perf_counter()
    result = trace_fact(model, tok, prompt, subject, kinds=kinds, samples=samples, progress=False)
    t_batched = time.perf_counter() - t0
    noise = CausalTracer(model, tok, prompt, subject, samples=samples).corruption.noise  # same seed: same noise
    t0 = time.perf_counter()
    oracle = NaiveTracer(model, tok, prompt, subject, noise)
    ref = {k: oracle.grid(k, window_size=result.settings["window"]) for k in kinds}
    t_naive = time.perf_counter() - t0
    diff = max((result.scores[k] - ref[k]).abs().max().item() for k in kinds)
    cells = sum(v.numel() for v in ref.values())
    row = dict(
        case=f"one fact, {len(kinds)} kind(s), {cells} cells, samples={samples}",
        naive_s=round(t_naive, 2),
        batched_s=round(t_batched, 2),
        ratio=round(t_batched / t_naive, 3),
        max_abs_diff=float(f"{diff:.2e}"),
    )
    return {"row": row, "result": result}


def known_facts(model, tok, data: Path, want: int) -> list[dict[str, Any]]:
    """The first ``want`` records of known_1000.json whose attribute's first token is the model's top-1."""
    from hf_knowedit.tokens import split_prompt_target

    records = json.loads((data / "known_1000.json").read_text())
    good = []
    with torch.no_grad():
        for r in records:
            ids = tok(r["prompt"])["input_ids"]
            first = split_prompt_target(tok, r["prompt"], r["attribute"])[1][0]
            if int(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()) == first:
                good.append(r)
                if len(good) == want:
                    break
    return good


def run(quick: bool = True, data: Path | None = None) -> dict[str, Any]:
    from hf_knowedit._bundled import load_smollm2

    model, tok = load_smollm2()
    samples = 3 if quick else 10
    n_facts = 10 if quick else 200
    kinds = ("mlp",) if quick else KINDS
    rows: list[dict[str, Any]] = []

    # 1. one fact (all three kinds; quick: the MLP): batched vs one forward per cell
    prompt, subject = FACT
    one = batched_vs_naive(model, tok, prompt, subject, kinds=kinds, samples=samples)
    result = one["result"]
    rows.append(one["row"])
    if not quick:  # the figures in docs/ come from the full run
        IMG.mkdir(parents=True, exist_ok=True)
        result.plot(IMG / "smollm2_trace.png")

    # 2. average indirect effect over known facts
    facts = known_facts(model, tok, data_dir(data), n_facts)
    t0 = time.perf_counter()
    summary = trace_facts(model, tok, facts, samples=samples, require_correct=False, progress=True)
    t_aie = time.perf_counter() - t0
    if not quick:
        summary.plot(IMG / "smollm2_aie.png")
    layers1, layers5 = suggest_layers(summary), suggest_layers(summary, count=5)
    peak = {k: int(summary.aie["last_subject"][k].argmax()) for k in summary.aie["last_subject"]}
    rows.append(
        dict(
            case=f"AIE over {summary.n_facts} known facts, samples={samples}",
            seconds=round(t_aie, 1),
            mean_clean=round(summary.mean_clean, 3),
            mean_corrupted=round(summary.mean_corrupted, 3),
            mlp_peak_last_subject=peak.get("mlp"),
            hidden_peak_last_subject=peak.get("hidden"),
            attn_peak_last_token=int(summary.aie["last"]["attn"].argmax()),
            suggest_layers=layers1,
            suggest_layers_5=layers5,
        )
    )
    aie = {p: {k: [round(x, 4) for x in v.tolist()] for k, v in d.items()} for p, d in summary.aie.items()}

    table = [
        "| case | naive (s) | batched (s) | batched / naive | max abs diff |",
        "|---|---|---|---|---|",
        f"| {rows[0]['case']} | {rows[0]['naive_s']} | {rows[0]['batched_s']} | {rows[0]['ratio']} | "
        f"{rows[0]['max_abs_diff']} |",
        "",
        "| case | time (s) | mean clean p | mean corrupted p | MLP AIE peak (last subj.) | "
        "suggest_layers() | suggest_layers(count=5) |",
        "|---|---|---|---|---|---|---|",
        f"| {rows[1]['case']} | {rows[1]['seconds']} | {rows[1]['mean_clean']} | {rows[1]['mean_corrupted']} | "
        f"{peak.get('mlp')} | {layers1} | {layers5} |",
    ]
    return {
        "rows": rows,
        "table": "\n".join(table),
        "aie": aie,
        "threads": torch.get_num_threads(),
        "layers": num_layers(model),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="samples=3, the MLP kind, 10 facts, no figures (default: samples=10, 200 facts, docs/img/*.png)",
    )
    parser.add_argument("--data", type=Path, default=None, help="folder with known_1000.json")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=None, help="also write the table as markdown here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    machine, start = machine_info(), time.perf_counter()
    out = run(quick=args.quick, data=args.data)
    print(out["table"])
    if args.out:
        write_markdown(
            args.out, "Causal tracing on SmolLM2-135M-Instruct", out["table"], machine, time.perf_counter() - start
        )
    print(f"\ntorch threads: {out['threads']}; layers: {out['layers']}")
    print("AIE at the last subject token (mlp):", out["aie"]["last_subject"].get("mlp"))
    print("suggest_layers:", out["rows"][1]["suggest_layers"], " count=5:", out["rows"][1]["suggest_layers_5"])
