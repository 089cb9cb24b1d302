"""Minimal precomputation ("Efficient Knowledge Editing via Minimal Precomputation", ACL 2025): edit quality
with C from a few multiples of d_in keys (FastROME / FastMEMIT) against C from many tokens.

For each statistics setting (``mom2_n_keys`` = 2 and 10, i.e. 2·d_in and 10·d_in keys, and ``--tokens``
tokens): the seconds one statistics pass took per layer (``compute_second_moment``, no cache), ROME on
``--rome-records`` CounterFact records (one edit at a time, reverted in between, ``hf_knowedit.evaluate``) and
MEMIT on ``--memit-records`` records of the flat split in one call (``context_templates=0``), ES / PS / NS.
Corpus: prompts of records the benchmark never edits (CounterFact records 100-499, flat records from 1000 on).

    python benchmarks/bench_minimal_stats.py --out docs/results/minimal_precomputation.md
    python benchmarks/bench_minimal_stats.py --rome-records 10 --memit-records 30 --memit-tokens 20000  # reduced
    python benchmarks/bench_minimal_stats.py --tiny   # smoke test on a tiny random model (seconds)
    python benchmarks/bench_minimal_stats.py --model gemma3 --keys 10 --rome-records 20 --memit-records 50
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from benchlib import data_dir, machine_info, rows_table, write_markdown

logger = logging.getLogger("bench_minimal_stats")
FLAT = "counterfact_flat_edit_10000.json"
MODELS = {"smollm2": "SmolLM2-135M-Instruct", "gemma3": "Gemma-3-270M"}


def corpus(folder: Path) -> list[str]:
    cf = json.loads((folder / "counterfact_500.json").read_text())[100:]
    flat = json.loads((folder / FLAT).read_text())[1000:]
    texts = [p for r in cf for p in r["attribute_prompts"] + r["generation_prompts"]]
    texts += [r[k] for r in flat for k in ("prompt", "rephrase_prompt", "locality_prompt") if r.get(k)]
    return texts


def run(args: argparse.Namespace, on_row: Any = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    import hf_knowedit
    from hf_knowedit.architectures import get_architecture, mlp_out_dims, num_layers
    from hf_knowedit.methods.memit import default_band
    from hf_knowedit.methods.rome import default_layer

    folder = data_dir(args.data)
    if args.tiny:
        from tests.tiny_models import make_tiny_model

        model, tok = make_tiny_model("llama")
    else:
        from hf_knowedit import _bundled

        model, tok = _bundled.load_gemma3() if args.model == "gemma3" else _bundled.load_smollm2()
    texts = corpus(folder)
    cf = json.loads((folder / "counterfact_500.json").read_text())[: args.rome_records]
    flat = json.loads((folder / FLAT).read_text())[: args.memit_records]
    spec = get_architecture(model)
    rome_layer = default_layer(model)
    memit_layers = default_band(num_layers(model), hf_knowedit.MEMITConfig().band_size)
    d_in = mlp_out_dims(model, spec, rome_layer)[0]
    # (label, mom2_n_keys, tokens): the first two through the documented setting, mom2_n_keys
    settings = [(f"{k:g}·d_in", k, math.ceil(k * d_in)) for k in args.keys]
    settings.append((f"{args.tokens:,} tokens", None, args.tokens))
    rows: list[dict[str, Any]] = []

    def stats_pass(layer: int, n_tokens: int) -> float:
        t0 = time.perf_counter()
        hf_knowedit.compute_second_moment(model, tok, layer, corpus=texts, n_tokens=n_tokens, cache=False)
        return time.perf_counter() - t0

    def info(pre_rome: Any, pre_memit: Any) -> dict[str, Any]:
        return {
            "model": "tiny random llama" if args.tiny else f"{MODELS[args.model]} (bundled, float32)",
            "d_in": d_in,
            "ROME layer": rome_layer,
            "MEMIT layers": memit_layers,
            "ROME records": len(cf),
            "MEMIT records (one call)": len(flat),
            "unedited ROME ES/PS/NS": pre_rome and {k: round(pre_rome[k], 1) for k in ("ES", "PS", "NS")},
            "unedited MEMIT ES/PS/NS": pre_memit and {k: round(pre_memit[k], 1) for k in ("ES", "PS", "NS")},
            "corpus texts": len(texts),
        }

    pre_rome = pre_memit = None
    for label, n_keys, n_tokens in settings:
        row: dict[str, Any] = {"C from": label, "keys": n_tokens}
        if args.rome_records:
            row["stats s (ROME layer)"] = round(stats_pass(rome_layer, n_tokens), 1)
            config = hf_knowedit.ROMEConfig(
                mom2_corpus=texts, mom2_n_keys=n_keys, mom2_n_tokens=n_tokens, context_templates=0
            )
            t0 = time.perf_counter()
            res = hf_knowedit.evaluate(
                model, tok, cf, method="rome", layers=[rome_layer], config=config, fluency=False, progress=False
            )
            row["ROME s/edit"] = round((time.perf_counter() - t0) / len(cf), 1)
            pre_rome = res.pre
            row.update({f"ROME {k}": round(res.post[k], 1) for k in ("ES", "PS", "NS")})
        if args.memit_records:
            m_tokens = min(n_tokens, args.memit_tokens)
            row["MEMIT keys"] = m_tokens
            row["stats s (MEMIT, all layers)"] = round(sum(stats_pass(layer, m_tokens) for layer in memit_layers), 1)
            keys = n_keys if m_tokens == n_tokens else None
            config = hf_knowedit.MEMITConfig(
                mom2_corpus=texts, mom2_n_keys=keys, mom2_n_tokens=m_tokens, context_templates=0
            )
            if pre_memit is None:
                pre_memit = hf_knowedit.evaluate(model, tok, flat, fluency=False, progress=False).pre
            t0 = time.perf_counter()
            hf_knowedit.apply_edits(model, tok, flat, "memit", layers=memit_layers, config=config)
            row["MEMIT s"] = round(time.perf_counter() - t0, 1)
            post = hf_knowedit.evaluate(model, tok, flat, fluency=False, progress=False).pre
            hf_knowedit.revert_edits(model)
            row.update({f"MEMIT {k}": round(post[k], 1) for k in ("ES", "PS", "NS")})
        rows.append(row)
        logger.info("%s", row)
        if on_row is not None:
            on_row(rows, info(pre_rome, pre_memit))

    return rows, info(pre_rome, pre_memit)


def table(rows: list[dict[str, Any]], info: dict[str, Any]) -> str:
    return "\n".join([*(f"- {k}: {v}" for k, v in info.items()), "", rows_table(rows)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2", help="bundled model")
    parser.add_argument("--keys", type=float, nargs="+", default=[2, 10], help="multiples of d_in to compare")
    parser.add_argument("--rome-records", type=int, default=50)
    parser.add_argument("--memit-records", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=100_000, help="the many-token setting")
    parser.add_argument("--memit-tokens", type=int, default=100_000, help="cap on MEMIT's statistics tokens")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tiny", action="store_true", help="smoke test on a tiny random model")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    machine = machine_info(args.threads)
    t0 = time.perf_counter()
    title = "Minimal precomputation: C from a few multiples of d_in keys"

    def save(rows: list, info: dict) -> None:  # after every row: a partial table survives an interrupted run
        if args.out:
            write_markdown(args.out, title, table(rows, info), machine, time.perf_counter() - t0)

    rows, info = run(args, on_row=save)
    logger.info("\n%s", table(rows, info))
    save(rows, info)


if __name__ == "__main__":
    main()
