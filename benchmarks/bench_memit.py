"""Mass and sequential editing on SmolLM2-135M: MEMIT, AlphaEdit, batched vs serial target vectors.

Experiments (CounterFact, EasyEdit's flat split ``counterfact_flat_edit_10000.json``: efficacy on ``prompt``,
paraphrase on ``rephrase_prompt``, neighbourhood on ``locality_prompt``; ROME's ES/PS/NS, mean NLL per token):

1. **batch** — MEMIT, ``n_batch`` edits in one call: ES/PS/NS beside the unedited model's, seconds.
2. **sequential** — ``n_seq`` edits as ``seq_batches`` consecutive calls, with MEMIT and with AlphaEdit:
   ES/PS/NS after the last batch, and fluency (``GE``: ROME's n-gram entropy of sampled generations from
   CounterFact ``generation_prompts``) before and after.
3. **counterfact** — MEMIT, ``n_cf`` records of ``counterfact_500.json`` in one call, scored by
   :func:`hf_knowedit.evaluate` with the full CounterFact prompts (two paraphrases and about ten
   neighbourhood prompts per record; S, ES, PS, NS and EasyEdit's token accuracies; fluency is left out: ten
   90-token generations per record are too slow on a CPU).
4. **targets** — the z vectors of ``n_z`` requests optimised together (batched) and one after another
   (serial, the reference's way), in the same run: seconds of each, their ratio, and how far apart they are.

Sizes: ``--quick`` (minutes on a GPU, tens of minutes on 2 busy CPU cores) or the issue's numbers (default:
1,000 edits in one call; 10 x 100 sequential; 100 requests for batched vs serial z), overridable by flags.
The statistics ``C`` use the default corpus (sampled from the model when no Wikipedia-like dataset is
reachable) with ``N_TOKENS`` tokens, cached on disk after the first run.

    python benchmarks/bench_memit.py --quick [--data DIR] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from benchlib import data_dir, machine_info, write_markdown

logger = logging.getLogger("bench_memit")
#: tokens of the second-moment statistics (model-sampled default corpus; cached after the first run)
N_TOKENS = 20_000
FLAT = "counterfact_flat_edit_10000.json"
FULL = "counterfact_500.json"
SIZES = {  # n_batch, n_seq, seq_batches, n_z, n_cf, fluency prompts, context templates
    True: dict(n_batch=10, n_seq=10, seq_batches=2, n_z=6, n_cf=10, n_fluency=5, context_templates=2),
    False: dict(n_batch=1000, n_seq=1000, seq_batches=10, n_z=100, n_cf=500, n_fluency=50, context_templates=5),
}


def scores(model: Any, tok: Any, records: Sequence[dict]) -> dict[str, float]:
    """ES, PS, NS (percent) of ``records`` on the model as it is."""
    import hf_knowedit

    result = hf_knowedit.evaluate(model, tok, list(records), fluency=False, progress=False)
    return {k: result.pre[k] for k in ("ES", "PS", "NS")}


def fluency(model: Any, tok: Any, prompts: Sequence[str], max_new_tokens: int) -> float:
    """ROME's GE: 100 x mean n-gram entropy of top-5 samples (seeded) continuing ``prompts``."""
    from hf_knowedit.evaluation import generate_texts
    from hf_knowedit.evaluation.metrics import ngram_entropy

    texts: list[str] = []
    for i in range(0, len(prompts), 10):
        texts += generate_texts(model, tok, prompts[i : i + 10], max_new_tokens=max_new_tokens, seed=i)
    return ngram_entropy(texts)


def _row(
    experiment: str,
    method: str,
    edits: int,
    pre: dict[str, float],
    post: dict[str, float],
    seconds: float,
    **extra: Any,
) -> dict[str, Any]:
    row = {"experiment": experiment, "method": method, "edits": edits}
    for k in ("ES", "PS", "NS"):
        row[f"{k} pre"], row[k] = round(pre[k], 1), round(post[k], 1)
    row["seconds"] = round(seconds, 1)
    row.update(extra)
    return row


def _targets(
    model: Any, tok: Any, requests: Sequence[Any], config: Any, layer: int, templates: Sequence[str], serial: bool
) -> tuple:
    from hf_knowedit.hooks import frozen
    from hf_knowedit.methods.targets import optimize_targets

    start = time.perf_counter()
    with frozen(model):
        result = optimize_targets(
            model,
            tok,
            list(requests),
            layer,
            config,
            site="residual",
            templates=templates,
            batched=not serial,
            batch_tokens=config.target_batch_tokens,
        )
    return result, time.perf_counter() - start


def run(
    quick: bool = False,
    data: Path | None = None,
    *,
    device: str | None = None,
    n_batch: int | None = None,
    n_seq: int | None = None,
    seq_batches: int | None = None,
    n_z: int | None = None,
    n_cf: int | None = None,
    experiments: Sequence[str] | None = None,
    n_templates: int | None = None,
    seq_methods: Sequence[str] = ("memit", "alphaedit"),
    on_row: Callable[[list[dict[str, Any]], dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run the experiments (default: all four; ``quick``: only "targets", since ``make bench`` scores MEMIT
    batches and sequences in its quality section); returns ``{"rows": [...], "table": markdown, "settings": {...}}``.
    ``on_row(rows, settings)`` is called after each finished row (e.g. to write partial results of a long run)."""
    if experiments is None:
        experiments = ("targets",) if quick else ("targets", "batch", "sequential", "counterfact")
    import hf_knowedit
    from hf_knowedit._bundled import load_smollm2
    from hf_knowedit.architectures import num_layers
    from hf_knowedit.methods import alphaedit
    from hf_knowedit.methods.context import context_templates
    from hf_knowedit.methods.memit import default_band
    from hf_knowedit.requests import to_request

    size = dict(SIZES[bool(quick)])
    size.update(
        {
            k: v
            for k, v in dict(
                n_batch=n_batch, n_seq=n_seq, seq_batches=seq_batches, n_z=n_z, n_cf=n_cf, context_templates=n_templates
            ).items()
            if v is not None
        }
    )
    folder = data_dir(data)
    flat = json.loads((folder / FLAT).read_text())
    full = json.loads((folder / FULL).read_text())
    gen_prompts = [p for r in full for p in r["generation_prompts"]]
    gen_prompts = gen_prompts[: size["n_fluency"]]
    max_new = 30 if quick else 90
    model, tok = load_smollm2()
    if device:
        model.to(device)
    common = dict(mom2_n_tokens=N_TOKENS, context_templates=size["context_templates"])
    memit_cfg = hf_knowedit.MEMITConfig(**common)
    alpha_cfg = hf_knowedit.AlphaEditConfig(**common)
    layers = default_band(num_layers(model), memit_cfg.band_size)
    rows: list[dict[str, Any]] = []
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}

    t0 = time.perf_counter()
    templates = context_templates(model, tok, n=memit_cfg.context_templates, length=memit_cfg.context_length)
    for layer in layers:  # statistics once (cached in memory and on disk), outside the timed calls
        hf_knowedit.compute_second_moment(model, tok, layer, n_tokens=N_TOKENS)
    setup_s = time.perf_counter() - t0
    settings = {
        "model": "SmolLM2-135M-Instruct (bundled, float32)",
        "device": str(next(model.parameters()).device),
        "threads": torch.get_num_threads(),
        "layers": layers,
        "stats tokens": N_TOKENS,
        "context templates": size["context_templates"],
        "setup seconds (C + templates)": round(setup_s, 1),
        "data": f"{FLAT}; counterfact experiment: {FULL}",
        "quick": bool(quick),
    }

    def done(row: dict[str, Any]) -> None:
        rows.append(row)
        logger.info("%s: %s", row["experiment"], row)
        if on_row is not None:
            on_row(rows, settings)

    if "targets" in experiments:
        reqs = [to_request(r) for r in flat[: size["n_z"]]]
        batched, tb = _targets(model, tok, reqs, memit_cfg, layers[-1], templates, serial=False)
        serial, ts = _targets(model, tok, reqs, memit_cfg, layers[-1], templates, serial=True)
        moved = (serial.targets - serial.init).norm(dim=1).clamp_min(1e-12)
        gaps = (batched.targets - serial.targets).norm(dim=1) / moved
        # batched and serial differ by rounding (padded batches change matmul shapes), except a request whose
        # loss lands within rounding of early_stop: it takes one Adam step more in one run (a few percent of
        # its z's move); "steps differ" counts those, the median shows the typical agreement
        done(
            {
                "experiment": "targets",
                "method": "z batched vs serial",
                "edits": len(reqs),
                "seconds": round(tb, 1),
                "serial seconds": round(ts, 1),
                "ratio": round(tb / ts, 3),
                "median relative gap": f"{float(gaps.median()):.1e}",
                "max relative gap": f"{float(gaps.max()):.1e}",
                "requests with gap > 1e-3": int((gaps > 1e-3).sum()),
                "steps differ": sum(a != b for a, b in zip(batched.steps_taken, serial.steps_taken)),
            }
        )

    if "batch" in experiments:
        records = flat[: size["n_batch"]]
        pre = scores(model, tok, records)
        t = time.perf_counter()
        es = hf_knowedit.apply_edits(model, tok, records, "memit", config=memit_cfg)
        seconds = time.perf_counter() - t
        post = scores(model, tok, records)
        hf_knowedit.revert_edits(model)
        done(
            _row("batch", "memit", len(records), pre, post, seconds, ranks=sorted({d.rank for d in es.deltas.values()}))
        )

    if "sequential" in experiments:
        records = (
            flat[size["n_batch"] : size["n_batch"] + size["n_seq"]] if "batch" in experiments else flat[: size["n_seq"]]
        )
        per = max(1, len(records) // size["seq_batches"])
        pre = scores(model, tok, records)
        ge_pre = fluency(model, tok, gen_prompts, max_new)
        configs = {"memit": memit_cfg, "alphaedit": alpha_cfg}
        for method in seq_methods:
            cfg = configs[method]
            alphaedit.reset_history(model)
            t = time.perf_counter()
            for i in range(0, len(records), per):
                hf_knowedit.apply_edits(model, tok, records[i : i + per], method, config=cfg)
            seconds = time.perf_counter() - t
            post = scores(model, tok, records)
            ge_post = fluency(model, tok, gen_prompts, max_new)
            hf_knowedit.revert_edits(model)
            alphaedit.reset_history(model)
            done(
                _row(
                    "sequential",
                    method,
                    len(records),
                    pre,
                    post,
                    seconds,
                    batches=f"{len(records) // per} x {per}",
                    **{
                        "GE pre": round(ge_pre, 1),
                        "GE": round(ge_post, 1),
                        "GE change %": round(100 * (ge_post - ge_pre) / ge_pre, 1),
                    },
                )
            )

    if "counterfact" in experiments:
        t = time.perf_counter()
        result = hf_knowedit.evaluate(
            model,
            tok,
            full[: size["n_cf"]],
            method="memit",
            protocol="batch",
            fluency=False,
            progress=False,
            config=memit_cfg,
        )
        keys = ("S", "ES", "PS", "NS", "rewrite_acc", "rephrase_acc", "locality")
        done(
            {
                "experiment": "counterfact",
                "method": "memit",
                "edits": result.n_records,
                "failed": len(result.failed),
                **{f"{k} pre → post": f"{result.pre[k]:.1f} → {result.post[k]:.1f}" for k in keys},
                "seconds (edit + scoring)": round(time.perf_counter() - t, 1),
            }
        )

    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in base.items()), "the model was not restored exactly"
    return {"rows": rows, "table": table(rows, settings), "settings": settings}


def title(rows: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    """What was run, e.g. "MEMIT family on SmolLM2-135M-Instruct: 1000 edits in one call (0 context templates)"."""
    parts = []
    for r in rows:
        if r["experiment"] == "targets":
            parts.append(f"z for {r['edits']} requests, batched vs serial")
        elif r["experiment"] == "batch":
            parts.append(f"{r['edits']} edits in one call")
        elif r["experiment"] == "sequential":
            parts.append(f"{r['method']}, {r['edits']} edits in sequential batches ({r['batches']})")
        else:
            parts.append(f"{r['edits']} counterfact_500 records in one call")
    return (
        "MEMIT family on SmolLM2-135M-Instruct"
        + (": " + "; ".join(parts) if parts else "")
        + f" ({settings['context templates']} context templates)"
    )


def table(rows: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    """One markdown table per experiment."""
    out = [f"SmolLM2 MEMIT-family benchmark — {json.dumps(settings)}", ""]
    for experiment in ("targets", "batch", "sequential", "counterfact"):
        part = [r for r in rows if r["experiment"] == experiment]
        if not part:
            continue
        cols = [c for c in part[0] if c != "experiment"]
        out += [f"### {experiment}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        out += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in part]
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--device", default=None, help="e.g. cuda (default: where the model loads, CPU)")
    parser.add_argument("--n-batch", type=int, default=None)
    parser.add_argument("--n-seq", type=int, default=None)
    parser.add_argument("--seq-batches", type=int, default=None)
    parser.add_argument("--n-z", type=int, default=None)
    parser.add_argument("--n-cf", type=int, default=None, help="counterfact_500 records (default 500, quick 10)")
    parser.add_argument("--context-templates", type=int, default=None, help="default 5 (quick: 2)")
    parser.add_argument("--experiments", default="targets,batch,sequential,counterfact")
    parser.add_argument("--seq-methods", default="memit,alphaedit", help="methods of the sequential experiment")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--out", type=Path, default=None, help="also write the tables as markdown here")
    args = parser.parse_args()
    machine, start = machine_info(), time.perf_counter()

    def save(rows: list[dict[str, Any]], settings: dict[str, Any]) -> None:  # after every row: a cut run keeps its rows
        if args.json:
            args.json.write_text(json.dumps({"rows": rows, "settings": settings}, indent=1, default=str))
        if args.out:
            write_markdown(args.out, title(rows, settings), table(rows, settings), machine, time.perf_counter() - start)

    result = run(
        args.quick,
        args.data,
        device=args.device,
        n_batch=args.n_batch,
        n_seq=args.n_seq,
        seq_batches=args.seq_batches,
        n_z=args.n_z,
        n_cf=args.n_cf,
        experiments=tuple(args.experiments.split(",")),
        n_templates=args.context_templates,
        seq_methods=tuple(args.seq_methods.split(",")),
        on_row=save,
    )
    save(result["rows"], result["settings"])
    print(result["table"])
