"""Layer sweep on a bundled model: ROME's edited layer and the MEMIT-family band, beside causal tracing.

For each ROME layer: ``evaluate(protocol="single")`` on the first ``--records`` CounterFact records
(ES / PS / NS and S, their harmonic mean). For each band: MEMIT (or ``--band-method``) with all records in
one call (``protocol="batch"``). Beside them, the average indirect effect (AIE) of the MLP at the last
subject token from ``trace_facts`` on the first ``--trace-facts`` known_1000 facts the model gets right
(also giving the model's known-fact rate). Statistics: ``--stats-tokens`` tokens of CounterFact prompts of
records 200-499 (never edited here). Writes a markdown table and a PNG plot.

    python benchmarks/bench_sweep.py --model gemma3 --records 50 --rome-layers 0:18:3 --bands 0,3,6,9 \\
        --out docs/results/layer_sweep_gemma3.md
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

logger = logging.getLogger("bench_sweep")

METRICS = ("ES", "PS", "NS")
#: the generation family (``evaluate(generation=True)``), shown when the run computed it
GEN_METRICS = ("gen_ES", "gen_PS", "gen_NS", "gen_ES_prefix")


def harmonic(values: list[float]) -> float:
    """ROME's S: the harmonic mean of ES, PS and NS (0 when any is 0)."""
    return 0.0 if min(values) <= 0 else len(values) / sum(1 / v for v in values)


def parse_layers(text: str, n_layers: int) -> list[int]:
    """``"a:b:c"`` (a range) or ``"1,4,7"``; ``"default"`` entries are resolved by the caller."""
    if ":" in text:
        parts = [int(x) if x else None for x in text.split(":")]
        return list(range(n_layers))[slice(*parts)]
    return [int(x) for x in text.split(",") if x]


def row(name: str, layers: list[int], result: Any, seconds: float) -> dict[str, Any]:
    post = {k: float(result.post[k]) for k in METRICS}
    gen = {k: float(result.post[k]) for k in GEN_METRICS if k in result.post}
    return {"name": name, "layers": layers, **post, "S": harmonic(list(post.values())), **gen, "s": seconds}


def load_partial(path: Path | None, signature: dict[str, Any]) -> dict[str, Any]:
    """The rows an earlier run with the same settings finished (``--json``): a killed sweep resumes."""
    if path is None or not path.exists():
        return {}
    done = json.loads(path.read_text())
    return done if done.get("signature") == signature else {}


def run(
    model_key: str,
    data: Path | None,
    records: int,
    rome_layers: str,
    bands: str,
    band_size: int,
    band_method: str,
    trace_facts: int,
    trace_samples: int,
    stats_tokens: int,
    templates: int,
    steps: int | None,
    generation: bool = False,
    json_path: Path | None = None,
) -> dict[str, Any]:
    import hf_knowedit
    from hf_knowedit._bundled import load_bundled
    from hf_knowedit.architectures import num_layers
    from hf_knowedit.methods.memit import default_band
    from hf_knowedit.methods.registry import get_method
    from hf_knowedit.methods.rome import default_layer

    folder = data_dir(data)
    cf = json.loads((folder / "counterfact_500.json").read_text())
    cases = cf[:records]
    corpus = [p for r in cf[200:] for p in r["attribute_prompts"] + r["generation_prompts"]]
    model, tok = load_bundled(model_key)
    n_layers = num_layers(model)
    common = dict(mom2_corpus=corpus, mom2_n_tokens=stats_tokens, context_templates=templates)
    if steps is not None:
        common["v_num_grad_steps"] = steps

    signature = dict(
        model=model_key,
        records=records,
        stats_tokens=stats_tokens,
        templates=templates,
        steps=steps,
        generation=generation,
        band_size=band_size,
        band_method=band_method,
        trace_facts=trace_facts,
        trace_samples=trace_samples,
    )
    partial = load_partial(json_path, signature)
    rows: list[dict[str, Any]] = partial.get("rows", [])
    finished = {(r["name"], tuple(r["layers"])) for r in rows}

    def save(extra: dict[str, Any]) -> None:
        partial.update(extra, signature=signature, rows=rows)
        if json_path is not None:
            tmp = json_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(partial, indent=1))
            tmp.replace(json_path)

    if rows:
        logger.info("resuming: %d rows already in %s", len(rows), json_path)
    if "aie" not in partial:
        t0 = time.perf_counter()
        known = json.loads((folder / "known_1000.json").read_text())[:trace_facts]
        summary = hf_knowedit.trace_facts(model, tok, known, kinds=("mlp",), samples=trace_samples)
        save(
            {
                "aie": [float(x) for x in summary.aie["last_subject"]["mlp"]],
                "known_rate": 100 * summary.n_facts / max(1, summary.n_facts + summary.n_skipped),
                "n_traced": summary.n_facts,
                "trace_facts": len(known),
            }
        )
        logger.info("trace: %d of %d facts known, %.0f s", summary.n_facts, len(known), time.perf_counter() - t0)
    aie = partial["aie"]

    if "pre" not in partial:
        pre_all = hf_knowedit.evaluate(model, tok, cases, fluency=False, generation=generation, progress=False).pre
        save({"pre": {k: float(pre_all[k]) for k in METRICS + GEN_METRICS if k in pre_all}})
    pre = partial["pre"]
    rome_cfg = get_method("rome").config_cls(**common)
    for layer in parse_layers(rome_layers, n_layers):
        if ("rome", (layer,)) in finished:
            continue
        t = time.perf_counter()
        res = hf_knowedit.evaluate(
            model,
            tok,
            cases,
            method="rome",
            layers=[layer],
            config=rome_cfg,
            fluency=False,
            generation=generation,
            progress=False,
        )
        rows.append(row("rome", [layer], res, (time.perf_counter() - t) / records))
        save({})
        logger.info("rome layer %d: %s", layer, rows[-1])
    band_cfg = get_method(band_method).config_cls(**common, band_size=band_size)
    for start in parse_layers(bands, n_layers):
        band = list(range(start, min(start + band_size, n_layers)))
        if (band_method, tuple(band)) in finished:
            continue
        t = time.perf_counter()
        res = hf_knowedit.evaluate(
            model,
            tok,
            cases,
            method=band_method,
            protocol="batch",
            layers=band,
            config=band_cfg,
            fluency=False,
            generation=generation,
            progress=False,
        )
        rows.append(row(band_method, band, res, time.perf_counter() - t))
        save({})
        logger.info("%s band %s: %s", band_method, band, rows[-1])
    result = {
        "model": model_key,
        "name": model.name_or_path,
        "n_layers": n_layers,
        "records": records,
        "pre": pre,
        "aie": aie,
        "known_rate": partial["known_rate"],
        "n_traced": partial["n_traced"],
        "trace_facts": partial["trace_facts"],
        "trace_samples": trace_samples,
        "defaults": {"rome": default_layer(model), "band": default_band(n_layers, band_size)},
        "settings": {
            "stats_tokens": stats_tokens,
            "context_templates": templates,
            "v_num_grad_steps": steps,
            "band_method": band_method,
            "generation": generation,
        },
        "rows": rows,
    }
    save(result)
    return result


def table(result: dict[str, Any]) -> str:
    pre, aie = result["pre"], result["aie"]
    s = result["settings"]
    gen = [k for k in GEN_METRICS if k in pre]
    lines = [
        f"{result['name']} ({result['n_layers']} layers), {result['records']} CounterFact records "
        f"(ROME: one edit at a time, reverted; {s['band_method']}: all records in one call); statistics from "
        f"{s['stats_tokens']} tokens of CounterFact prompts (records 200-499); context_templates="
        f"{s['context_templates']}; v_num_grad_steps={s['v_num_grad_steps'] or 'default'}. Known facts: "
        f"{result['n_traced']} of {result['trace_facts']} known_1000 facts answered right "
        f"({result['known_rate']:.0f} %), traced with {result['trace_samples']} noise samples. "
        f"Library defaults at the time of the run: ROME layer {result['defaults']['rome']}, band "
        f"{result['defaults']['band']}.",
        "",
        "| method | layers | rel. depth | ES | PS | NS | S | " + "".join(f"{k} | " for k in gen) + "MLP AIE | s |",
        "|---|---|---|---|---|---|---|" + "---|" * len(gen) + "---|---|",
        f"| unedited | | | {pre['ES']:.1f} | {pre['PS']:.1f} | {pre['NS']:.1f} | "
        f"{harmonic([pre[k] for k in METRICS]):.1f} | " + "".join(f"{pre[k]:.1f} | " for k in gen) + " | |",
    ]
    for r in result["rows"]:
        layers = r["layers"]
        depth = sum(layers) / len(layers) / (result["n_layers"] - 1)
        effect = sum(aie[i] for i in layers) / len(layers)
        shown = str(layers[0]) if len(layers) == 1 else f"{layers[0]}-{layers[-1]}"
        unit = "s/edit" if r["name"] == "rome" else "s"
        lines.append(
            f"| {r['name']} | {shown} | {depth:.2f} | {r['ES']:.1f} | {r['PS']:.1f} | {r['NS']:.1f} | "
            f"{r['S']:.1f} | " + "".join(f"{r[k]:.1f} | " for k in gen) + f"{effect:.3f} | {r['s']:.1f} {unit} |"
        )
    lines += ["", "MLP AIE per layer (last subject token): " + ", ".join(f"{x:.3f}" for x in aie)]
    return "\n".join(lines)


def depth(row: dict[str, Any]) -> float:
    """A row's x position: its layer, or its band's mean layer."""
    return sum(row["layers"]) / len(row["layers"])


def figure(result: dict[str, Any]) -> Any:
    """One panel per method that has rows (ROME by layer, the band method by its band's mean layer), the
    metrics in percent in depth order, the MLP's indirect effect per layer on a second axis; one key below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ran = [m for m in ("rome", result["settings"]["band_method"]) if any(r["name"] == m for r in result["rows"])]
    methods = ran or ["rome"]  # a trace-only run (no layers, no bands) still shows the indirect effect
    fig, axes = plt.subplots(1, len(methods), figsize=(5.5 * len(methods), 4.8), sharey=True, squeeze=False)
    for ax, method in zip(axes[0], methods):
        rows = sorted((r for r in result["rows"] if r["name"] == method), key=depth)
        x = [depth(r) for r in rows]
        for k in (*METRICS, "S") if rows else ():
            ax.plot(x, [r[k] for r in rows], marker="o", label=k)
        for k in ("gen_ES", "gen_PS", "gen_ES_prefix"):
            if rows and k in rows[0]:
                ax.plot(x, [r[k] for r in rows], marker="x", linestyle=":", label=k)
        ax.set_title(f"{method} ({result['records']} records)")
        ax.set_xlabel("layer (band: its mean)")
        twin = ax.twinx()
        twin.plot(range(result["n_layers"]), result["aie"], color="grey", linestyle="--", label="MLP AIE")
        twin.set_ylabel("MLP AIE")
    axes[0][0].set_ylabel("percent")
    handles, labels = axes[0][0].get_legend_handles_labels()
    twin_handles, twin_labels = twin.get_legend_handles_labels()
    fig.legend(handles + twin_handles, labels + twin_labels, loc="lower center", ncol=4 * len(methods), frameon=False)
    fig.suptitle(f"Layer sweep: {result['name']}")
    fig.tight_layout(rect=(0, 0.16 / len(methods), 1, 1))
    return fig


def plot(result: dict[str, Any], path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig = figure(result)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3", help="bundled model: smollm2 or gemma3")
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--records", type=int, default=50)
    parser.add_argument("--rome-layers", default="0::3", help="'start:stop:step' or '1,4,7' ('' for none)")
    parser.add_argument("--bands", default="0::3", help="band starts, same forms ('' for none)")
    parser.add_argument("--band-size", type=int, default=5)
    parser.add_argument("--band-method", default="memit")
    parser.add_argument("--trace-facts", type=int, default=50)
    parser.add_argument("--trace-samples", type=int, default=3)
    parser.add_argument("--stats-tokens", type=int, default=20_000)
    parser.add_argument("--context-templates", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="v_num_grad_steps (default: the method's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="markdown table (a PNG plot beside it)")
    parser.add_argument("--json", type=Path, default=None, help="rows as they finish (a rerun resumes from it)")
    parser.add_argument("--generation", action="store_true", help="also the generation (WILD) metrics")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for name in ("transformers", "httpx", "urllib3", "hf_knowedit"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    machine, start = machine_info(), time.perf_counter()
    result = run(
        args.model,
        args.data,
        args.records,
        args.rome_layers,
        args.bands,
        args.band_size,
        args.band_method,
        args.trace_facts,
        args.trace_samples,
        args.stats_tokens,
        args.context_templates,
        args.steps,
        args.generation,
        args.json,
    )
    text = table(result)
    print(text)
    if args.out:
        png = plot(result, args.out.with_suffix(".png"))
        text += f"\n\n![layer sweep]({png.name})"
        write_markdown(args.out, f"Layer sweep on {result['name']}", text, machine, time.perf_counter() - start)
