"""ROME (r-ROME) on SmolLM2-135M-Instruct: CounterFact quality and time per edit.

Protocol (ROME's, see ../shared/data/PROVENANCE.md): one edit at a time, reverted before the next.
ES, PS, NS from :func:`hf_knowedit.evaluate` (``protocol="single"``) for the unedited model and
after the edit. Time: seconds per edit with the statistics cached
(``apply_edits`` wall time, context templates and C already computed), and, on the first few
records, the same ROME update computed with the savings of ``hf_knowedit.vectors`` (lower blocks
cached, logits only where the loss reads them) vs the full forward (all logits) at every step.

    python benchmarks/bench_rome.py [--quick] [--data DIR] [--records N] [--layer L] [--speed-records K]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from benchlib import data_dir, machine_info, write_markdown

logger = logging.getLogger("bench_rome")
#: tokens of the second-moment statistics (model-sampled default corpus; cached after the first run)
N_TOKENS = 20_000


def run(
    quick: bool = False,
    data: Path | None = None,
    *,
    records: int | None = None,
    layer: int | None = None,
    speed_records: int | None = None,
) -> dict[str, Any]:
    import hf_knowedit
    from hf_knowedit._bundled import load_smollm2
    from hf_knowedit.methods.context import context_templates
    from hf_knowedit.methods.rome import ROMEConfig, default_layer, rank_one_update
    from hf_knowedit.methods.statistics import second_moment_for as second_moment
    from hf_knowedit.requests import to_request

    n = records or (5 if quick else 50)
    n_speed = speed_records or (1 if quick else 5)
    cases = json.loads((data_dir(data) / "counterfact_500.json").read_text())[:n]
    model, tok = load_smollm2()
    layer = default_layer(model) if layer is None else layer
    config = ROMEConfig(mom2_n_tokens=N_TOKENS)

    t0 = time.perf_counter()
    mom2 = second_moment(model, tok, layer, config)
    templates = context_templates(model, tok, n=config.context_templates, length=config.context_length)
    setup_s = time.perf_counter() - t0

    result = hf_knowedit.evaluate(
        model, tok, cases, method="rome", protocol="single", layers=[layer], config=config, fluency=False
    )
    seconds_per_edit = result.timing["edit_s"] / n

    fast_s, full_s, diffs = [], [], []
    with hf_knowedit.hooks.frozen(model):
        for c in cases[:n_speed]:
            req = to_request(c)
            t = time.perf_counter()
            a = rank_one_update(model, tok, req, layer, config, mom2, templates, fast=True)
            fast_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            b = rank_one_update(model, tok, req, layer, config, mom2, templates, fast=False)
            full_s.append(time.perf_counter() - t)
            diffs.append(float((a.B - b.B).norm() / b.B.norm()))
            logger.info("speed: fast %.1f s, full %.1f s", fast_s[-1], full_s[-1])

    rows = [
        {
            "model": "SmolLM2-135M unedited",
            "records": n,
            **{k: result.pre[k] for k in ("ES", "PS", "NS")},
            "s/edit": None,
        },
        {
            "model": f"+ r-ROME (layer {layer})",
            "records": n,
            **{k: result.post[k] for k in ("ES", "PS", "NS")},
            "s/edit": seconds_per_edit,
        },
    ]
    speed = {
        "records": n_speed,
        "fast_s": sum(fast_s) / n_speed,
        "full_s": sum(full_s) / n_speed,
        "ratio": sum(full_s) / sum(fast_s),
        "max_rel_diff_B": max(diffs),
    }
    table = [
        f"ROME on SmolLM2-135M-Instruct (CPU, {torch.get_num_threads()} threads), {n} CounterFact records, "
        f"one edit at a time, reverted in between; layer {layer}; C from {mom2.n_tokens} tokens "
        f"({mom2.key.corpus.split(';')[0]}); setup (C + templates) {setup_s:.1f} s",
        "",
        "| model | records | ES | PS | NS | s/edit |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = "" if r["s/edit"] is None else f"{r['s/edit']:.2f}"
        table.append(f"| {r['model']} | {r['records']} | {r['ES']:.1f} | {r['PS']:.1f} | {r['NS']:.1f} | {s} |")
    table += [
        "",
        "| ROME update (same records, same run) | s/edit | ratio |",
        "|---|---|---|",
        f"| full forward + all logits at every step (reference cost) | {speed['full_s']:.2f} | 1.00 |",
        f"| lower blocks cached, logits only where read | {speed['fast_s']:.2f} | {speed['ratio']:.2f}x |",
        "",
        f"max relative difference of the update between the two: {speed['max_rel_diff_B']:.1e}",
        "records whose edit failed efficacy (case_id): "
        + (", ".join(str(r["case_id"]) for r in result.records if r["post"] and r["post"]["ES"] < 1) or "none"),
    ]
    return {"rows": rows, "speed": speed, "table": "\n".join(table)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--records", type=int, default=None)
    parser.add_argument("--layer", type=int, default=None)
    parser.add_argument(
        "--speed-records", type=int, default=None, help="records timed fast vs full (default 5; quick 1)"
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the table as markdown here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for name in ("transformers", "httpx", "urllib3", "hf_knowedit"):
        logging.getLogger(name).setLevel(logging.WARNING)
    machine, start = machine_info(), time.perf_counter()
    result = run(args.quick, args.data, records=args.records, layer=args.layer, speed_records=args.speed_records)
    print(result["table"])
    if args.out:
        title = f"ROME on SmolLM2-135M-Instruct ({result['rows'][0]['records']} CounterFact records)"
        write_markdown(args.out, title, result["table"], machine, time.perf_counter() - start)
