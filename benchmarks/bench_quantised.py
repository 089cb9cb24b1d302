"""Do edits survive the quantised model that is served? ROME and MEMIT edits of the bundled SmolLM2-135M-Instruct
(Q4_1 GGUF, dequantised to float32 for transformers) scored in transformers and in llama.cpp.

Edits (CounterFact, ``counterfact_500.json``, the first records):

* **ROME**, ROME's single-edit protocol: each of ``--rome`` records is edited alone, exported, scored on every
  configuration below, and reverted before the next;
* **MEMIT**, one call of ``--memit`` records, exported once and scored on every configuration.

Configurations (the edit's files written by :mod:`hf_knowedit.export_gguf`; llama.cpp through llama-cpp-python,
one thread, its default f16 KV cache, i.e. as served):

* ``transformers f32``: the model the edit was computed on;
* ``Q4_1 + LoRA``: the bundled Q4_1 GGUF as shipped with the f32 adapter (``export_gguf_lora``);
* ``Q4_1, merged f16`` / ``merged q8_0``: ``merge_to_gguf``: the edited tensors ``W + ΔW`` at f16 / q8_0, every
  other tensor the base's Q4_1;
* ``Q4_1, merged Q4_1``: the edited tensors re-quantised to the base's own 4-bit type (gguf's Python
  quantiser): what re-quantising a merged model to Q4_1 does to the edited tensors (the untouched ones come
  back as they were);
* ``q8_0 model``: every Q4_1 tensor of the base dequantised and re-quantised to q8_0 (a q8_0 model of the
  same weights), the edited tensors ``W + ΔW`` at q8_0: "merge in float, then quantise the whole model to
  q8_0"; its unedited row is the q8_0 model without the edit.

Every configuration is scored by the same code: ``(prompt, target)`` pairs tokenized once by transformers'
tokenizer (:func:`hf_knowedit.evaluation.protocols.encode_record`), per-token log-probabilities of the whole
target from next-token logits (float32 ``log_softmax``, :func:`target_score`), ES/PS/NS by ROME's comparison of
mean NLL per token (:func:`hf_knowedit.evaluation.metrics.counterfact_case`). ``gen_ES``: the rewrite prompt
continued greedily for 20 tokens (no EOS stop), cut at the first sentence end and matched as in
:mod:`hf_knowedit.evaluation.generative` (``starts_with``). ``ES≠f32``: records whose ES outcome differs from
transformers' on the same edit.

    python benchmarks/bench_quantised.py --rome 50 --memit 100 --out docs/results/quantised_edits.md
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from statistics import fmean
from typing import Any

import numpy as np
import torch

from benchlib import data_dir, machine_info, rows_table, write_markdown

logger = logging.getLogger("bench_quantised")
#: tokens of the second-moment statistics (as bench_rome / bench_memit; cached after the first run)
N_TOKENS = 20_000
DATA = "counterfact_500.json"
GEN_TOKENS = 20
GROUPS = ("rewrite", "paraphrase", "neighborhood")
CONFIGS = (
    "transformers f32",
    "Q4_1 + LoRA",
    "Q4_1, merged f16",
    "Q4_1, merged q8_0",
    "Q4_1, merged Q4_1",
    "q8_0 model",
)


# ----------------------------------------------------------------------------- scoring, shared by every engine


def target_score(logits: torch.Tensor, target_ids: Sequence[int]) -> Any:
    """The :class:`~hf_knowedit.evaluation.scoring.TargetScore` of ``target_ids`` from the next-token logits
    ``[len(target_ids), vocab]`` at the positions that predict them (float32 ``log_softmax``, arg-max)."""
    from hf_knowedit.evaluation.scoring import TargetScore

    logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(list(target_ids))[:, None])[:, 0]
    return TargetScore(tuple(logp.tolist()), tuple(logits.argmax(-1).tolist()), tuple(target_ids))


def llama_cpp_scores(llm: Any, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[Any]:
    """Score ``(prompt_ids, target_ids)`` pairs with a llama-cpp-python ``Llama`` made with ``logits_all=True``:
    ``prompt + target[:-1]`` evaluated, logits read at the target's positions. A prompt equal to the start of
    what the context holds is not evaluated again (the KV cache past it is dropped by ``eval``)."""
    out = []
    for prompt, target in pairs:
        n = len(prompt)
        if 0 < n <= llm.n_tokens and list(llm.input_ids[:n]) == list(prompt):
            llm.n_tokens = n
        else:
            llm.reset()
            llm.eval(list(prompt))
        llm.eval(list(target[:-1]))
        out.append(target_score(torch.from_numpy(np.array(llm.scores[n - 1 : n + len(target) - 1])), target))
    return out


def llama_cpp_generate(llm: Any, prompt_ids: Sequence[Sequence[int]], tokenizer: Any, steps: int) -> list[str]:
    """Greedy continuations (``steps`` tokens, no EOS stop, as :func:`hf_knowedit.generation.generate_texts`)."""
    out = []
    for ids in prompt_ids:
        llm.reset()
        llm.eval(list(ids))
        new = []
        for _ in range(steps):
            new.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([new[-1]])
        out.append(tokenizer.decode(new, skip_special_tokens=True))
    return out


def record_metrics(
    encoded: Sequence[Any], score: Callable[[list], list], generate: Callable[[list[str]], list[str]]
) -> list[dict[str, float]]:
    """Per record: ES, PS, NS (fractions, ROME's comparison) from ``score(pairs)`` and gen_ES from
    ``generate(rewrite prompts)`` (continuations without the prompt)."""
    from hf_knowedit.evaluation import generative as G
    from hf_knowedit.evaluation import metrics as M

    flat = score([p for e in encoded for p in e.pairs])
    prompts = [p for e in encoded for p in e.record.rewrite_prompts]
    said = iter(G.cut_at_boundary(c) for c in generate(prompts))
    out, k = [], 0
    for e in encoded:
        mine, k = flat[k : k + len(e.pairs)], k + len(e.pairs)
        groups = {g: [(mine[a], mine[b]) for a, b in e.slots[g]] for g in GROUPS}
        case = M.counterfact_case(groups["rewrite"], groups["paraphrase"], groups["neighborhood"])
        gen = [G.starts_with(next(said), e.record.target_new) for _ in e.record.rewrite_prompts]
        out.append({k2: case[k2] for k2 in ("ES", "PS", "NS")} | {"gen_ES": fmean(gen)})
    return out


def transformers_metrics(model: Any, tok: Any, encoded: Sequence[Any]) -> list[dict[str, float]]:
    from hf_knowedit.evaluation.scoring import score_encoded
    from hf_knowedit.generation import generate_texts

    def generate(prompts: list[str]) -> list[str]:
        texts = generate_texts(model, tok, prompts, max_new_tokens=GEN_TOKENS, seed=None)
        return [t[len(p) :] for p, t in zip(prompts, texts)]

    return record_metrics(encoded, lambda pairs: score_encoded(model, pairs, tokenizer=tok), generate)


def gguf_metrics(path: Path, tok: Any, encoded: Sequence[Any], lora: Path | None = None) -> list[dict[str, float]]:
    import llama_cpp

    kwargs = {"lora_path": str(lora)} if lora is not None else {}
    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=256, n_threads=1, n_gpu_layers=0, logits_all=True, verbose=False, seed=0, **kwargs
    )
    try:
        ids = lambda prompts: [tok(p)["input_ids"] for p in prompts]  # noqa: E731  (as generate_texts tokenizes)
        return record_metrics(
            encoded,
            lambda pairs: llama_cpp_scores(llm, pairs),
            lambda prompts: llama_cpp_generate(llm, ids(prompts), tok, GEN_TOKENS),
        )
    finally:
        llm.close()


# ----------------------------------------------------------------------------- the GGUF files


def requantised(reader: Any, path: Path, qtype: Any, deltas: dict[str, torch.Tensor], only_edited: bool) -> Path:
    """A copy of the GGUF in ``reader`` whose tensors named in ``deltas`` are ``W + ΔW`` quantised to ``qtype``;
    with ``only_edited=False`` every other tensor of the base's quantised type is re-quantised to ``qtype`` too."""
    import gguf

    from hf_knowedit.export_gguf import read_base_tensor, rewrite_gguf

    quantised = {t.tensor_type for t in reader.tensors if t.tensor_type not in (gguf.GGMLQuantizationType.F32,)}

    def replace(tensor: Any) -> tuple[np.ndarray, Any] | None:
        if tensor.name in deltas:
            w = torch.from_numpy(read_base_tensor(reader, tensor.name)).double() + deltas[tensor.name].double()
            return gguf.quants.quantize(w.float().numpy(), qtype), qtype
        if only_edited or tensor.tensor_type not in quantised:
            return None
        return gguf.quants.quantize(read_base_tensor(reader, tensor.name), qtype), qtype

    rewrite_gguf(reader, path, reader.fields["general.architecture"].contents(), replace)
    return path


def edited_files(es: Any, model: Any, base: Path, reader: Any, work: Path) -> dict[str, tuple[Path, Path | None]]:
    """Every llama.cpp configuration of the edit set ``es``: ``{name: (model file, adapter or None)}``."""
    import gguf

    from hf_knowedit.export_gguf import export_gguf_lora, gguf_tensor_name, merge_to_gguf

    Q = gguf.GGMLQuantizationType
    deltas = {gguf_tensor_name(model, p): d.delta() for p, d in es.deltas.items()}
    return {
        "Q4_1 + LoRA": (base, export_gguf_lora(es, work / "edit.gguf", model, base_gguf=base)),
        "Q4_1, merged f16": (merge_to_gguf(es, work / "f16.gguf", model, base, type="f16"), None),
        "Q4_1, merged q8_0": (merge_to_gguf(es, work / "q8.gguf", model, base, type="q8_0"), None),
        "Q4_1, merged Q4_1": (requantised(reader, work / "q41.gguf", Q.Q4_1, deltas, only_edited=True), None),
        "q8_0 model": (requantised(reader, work / "q8model.gguf", Q.Q8_0, deltas, only_edited=False), None),
    }


# ----------------------------------------------------------------------------- the run


def run(data: Path | None = None, *, n_rome: int = 50, n_memit: int = 100) -> dict[str, Any]:
    import gguf

    import hf_knowedit
    from hf_knowedit._bundled import MODELS, gguf_dir, load_smollm2
    from hf_knowedit.architectures import num_layers
    from hf_knowedit.evaluation.datasets import load_records
    from hf_knowedit.evaluation.protocols import encode_record
    from hf_knowedit.methods.memit import default_band
    from hf_knowedit.methods.rome import default_layer

    raw = json.loads((data_dir(data) / DATA).read_text())[: max(n_rome, n_memit)]
    model, tok = load_smollm2()
    encoded = [encode_record(tok, r) for r in load_records(raw)]
    base = gguf_dir("smollm2") / MODELS["smollm2"].gguf_file
    reader = gguf.GGUFReader(base)
    work = Path(tempfile.mkdtemp(prefix="bench_quantised_"))
    q8_model = requantised(reader, work / "q8base.gguf", gguf.GGMLQuantizationType.Q8_0, {}, only_edited=False)
    t0 = time.perf_counter()
    pre = {
        "transformers f32": transformers_metrics(model, tok, encoded),
        "Q4_1": gguf_metrics(base, tok, encoded),
        "q8_0 model": gguf_metrics(q8_model, tok, encoded),
    }
    logger.info("unedited scores of %d records: %.0f s", len(encoded), time.perf_counter() - t0)
    rome_cfg = hf_knowedit.ROMEConfig(mom2_n_tokens=N_TOKENS)
    memit_cfg = hf_knowedit.MEMITConfig(mom2_n_tokens=N_TOKENS)

    def edit_and_score(idx: list[int], method: str, config: Any) -> tuple[dict[str, list], float]:
        t = time.perf_counter()
        es = hf_knowedit.apply_edits(model, tok, [raw[i] for i in idx], method, config=config, name="bench")
        edit_s = time.perf_counter() - t
        recs = [encoded[i] for i in idx]
        out = {"transformers f32": transformers_metrics(model, tok, recs)}
        for name, (path, lora) in edited_files(es, model, base, reader, work).items():
            out[name] = gguf_metrics(path, tok, recs, lora)
        hf_knowedit.revert_edits(model, "bench")
        return out, edit_s

    results: dict[str, dict[str, list]] = {}
    seconds: dict[str, float] = {}
    if n_rome:
        t, per, edit_s = time.perf_counter(), {c: [] for c in CONFIGS}, 0.0
        for i in range(n_rome):
            out, s = edit_and_score([i], "rome", rome_cfg)
            edit_s += s
            for c in CONFIGS:
                per[c] += out[c]
            logger.info("ROME %d/%d: %s", i + 1, n_rome, {c: out[c][0]["ES"] for c in CONFIGS})
        results["rome"], seconds["rome"] = per, time.perf_counter() - t
        seconds["rome edit s/edit"] = edit_s / n_rome
    if n_memit:
        t = time.perf_counter()
        results["memit"], seconds["memit edit s"] = edit_and_score(list(range(n_memit)), "memit", memit_cfg)
        seconds["memit"] = time.perf_counter() - t
    for f in work.iterdir():
        f.unlink()
    work.rmdir()

    rows = []
    for method, n in (("rome", n_rome), ("memit", n_memit)):
        if method not in results:
            continue
        label = f"ROME, {n} single edits" if method == "rome" else f"MEMIT, {n} edits in one call"
        ref = results[method]["transformers f32"]
        for c in ("transformers f32", "Q4_1", "q8_0 model"):
            rows.append(row(label, f"{c}, unedited", pre[c][:n]))
        for c in CONFIGS:
            rows.append(row(label, c, results[method][c], ref))
    settings = {
        "model": "SmolLM2-135M-Instruct (bundled Q4_1 GGUF; transformers: dequantised, float32)",
        "rome layer": default_layer(model),
        "memit layers": list(default_band(num_layers(model), memit_cfg.band_size)),
        "stats tokens": N_TOKENS,
        "data": DATA,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }
    return {"rows": rows, "settings": settings, "table": f"Settings: {json.dumps(settings)}\n\n{rows_table(rows)}"}


def row(edits: str, config: str, cases: list[dict[str, float]], ref: list[dict[str, float]] | None = None) -> dict:
    out: dict[str, Any] = {"edits": edits, "served as": config}
    out |= {k: round(100 * fmean(c[k] for c in cases), 1) for k in ("ES", "PS", "NS", "gen_ES")}
    out["ES≠f32"] = "" if ref is None else sum(a["ES"] != b["ES"] for a, b in zip(cases, ref))
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--rome", type=int, default=50, help="records edited one at a time with ROME (default 50)")
    parser.add_argument("--memit", type=int, default=100, help="records in the one MEMIT call (default 100)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--out", type=Path, default=None, help="also write the table as markdown here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    machine, start = machine_info(), time.perf_counter()
    result = run(args.data, n_rome=args.rome, n_memit=args.memit)
    if args.json:
        args.json.write_text(json.dumps({k: v for k, v in result.items() if k != "table"}, indent=1, default=str))
    if args.out:
        title = f"Edits under quantisation: SmolLM2-135M-Instruct, {args.rome} ROME and {args.memit} MEMIT edits"
        write_markdown(args.out, title, result["table"], machine, time.perf_counter() - start)
    print(result["table"])
