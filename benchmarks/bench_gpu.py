"""Big models on one GPU: ROME and MEMIT on random-weight models of real sizes, statistics throughput,
peak memory. Exits 0 with a message when no GPU is present.

Models (random weights in the real shapes, built on the GPU; the bundled SmolLM2 tokenizer, so the
vocabulary is 49,152 rather than the original's):

* ``gpt2-xl``: GPT-2 XL's shape (48 layers, d_model 1,600, MLP 6,400, 25 heads), float32;
* ``llama-8b``: Llama-3-8B's shape (32 layers, d_model 4,096, MLP 14,336, 32 heads, 8 KV heads), bfloat16.

Per model: one statistics pass at the ROME layer (``--tokens`` tokens of CounterFact prompts): tokens/s
against a plain forward stopped after the same module, and peak memory against the memory model
(``hf_knowedit.methods.memory``); ROME on ``--rome`` records (s/edit, peak); MEMIT with ``--memit``
edits in one call (``context_templates=0``; s, peak). Random weights say nothing about edit quality:
efficacy (the new target beats the old on the rewrite prompt) is reported as a check that edits act.

    python benchmarks/bench_gpu.py --out docs/results/gpu.md
    python benchmarks/bench_gpu.py --models llama-8b --memit 1000,10000
    python benchmarks/bench_gpu.py --smoke          # the same code path on tiny models on the CPU
    python benchmarks/bench_gpu.py --vllm           # an edit served by vLLM as a LoRA (needs the vllm package)

``--vllm``: the bundled SmolLM2-135M-Instruct (real weights) saved as a float16 checkpoint, ``--vllm-edits``
CounterFact records edited with ROME and saved as a PEFT LoRA; vLLM (``LLM(enable_lora=True,
max_lora_rank=check_vllm(es).max_lora_rank)``) generates greedily from each rewrite prompt with and without
the adapter (``LoRARequest``), and so does transformers with the edit on and off. The row counts the prompts
whose vLLM continuation starts with the new object with the adapter, the old one without it, and the
continuations identical to transformers'. Without a GPU or without ``vllm`` the row says why it was not run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchlib import data_dir, machine_info, rows_table, write_markdown

logger = logging.getLogger("bench_gpu")
GiB = 2**30
FLAT = "counterfact_flat_edit_10000.json"

SHAPES: dict[str, tuple[str, dict[str, Any], torch.dtype]] = {
    "gpt2-xl": ("gpt2", dict(n_embd=1600, n_layer=48, n_head=25, n_inner=6400, n_positions=1024), torch.float32),
    "llama-8b": (
        "llama",
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=8192,
            rope_theta=500000.0,
        ),  # fmt: skip
        torch.bfloat16,
    ),
}
SMOKE = {
    "gpt2-xl": ("gpt2", dict(n_embd=64, n_layer=4, n_head=4, n_inner=256, n_positions=256), torch.float32),
    "llama-8b": (
        "llama",
        dict(hidden_size=64, intermediate_size=224, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2),
        torch.bfloat16,
    ),
}


def build(name: str, smoke: bool, device: torch.device, tok: Any) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, kwargs, dtype = (SMOKE if smoke else SHAPES)[name]
    config = AutoConfig.for_model(model_type, vocab_size=len(tok), **kwargs)
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.config._name_or_path = f"random-{name}"
    return model.eval()


class Peak:
    """Peak bytes allocated on ``device`` inside the block, above what was allocated before it."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.bytes = device, 0

    def __enter__(self) -> Peak:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self.before


def plain_forward_rate(model: Any, tok: Any, texts: list[str], layer: int, n_tokens: int, batch_tokens: int) -> float:
    """Tokens/s of forwards stopped after the edited module, over the same batches the statistics pass reads."""
    from hf_knowedit.architectures import get_architecture, mlp_out_path, model_device
    from hf_knowedit.hooks import Trace
    from hf_knowedit.methods.statistics import DEFAULT_MAX_LENGTH, _batches
    from hf_knowedit.tokens import pad_batch

    path = mlp_out_path(get_architecture(model), layer)
    done, t0 = 0, time.perf_counter()
    with torch.no_grad():
        for batch in _batches(tok, texts, DEFAULT_MAX_LENGTH, batch_tokens, n_tokens):
            ids, mask, _, _ = pad_batch(batch, 0, "right", model_device(model))
            with Trace(model, path, retain_input=False, retain_output=False, stop=True):
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            done += int(mask.sum())
    _sync(model)
    return done / (time.perf_counter() - t0)


def _sync(model: Any) -> None:
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_model(name: str, args: argparse.Namespace, device: torch.device, tok: Any, folder: Path) -> list[dict]:
    import hf_knowedit
    from hf_knowedit.evaluation.datasets import first_per_fact, load_records
    from hf_knowedit.methods import memory
    from hf_knowedit.methods.memit import default_band
    from hf_knowedit.methods.rome import default_layer
    from hf_knowedit.methods.statistics import DEFAULT_BATCH_TOKENS, compute_second_moment

    cf = json.loads((folder / "counterfact_500.json").read_text())
    flat = json.loads((folder / FLAT).read_text())
    texts = [p for r in cf[100:] for p in r["attribute_prompts"] + r["generation_prompts"]]
    texts = [" ".join(texts[i : i + 12]) for i in range(0, len(texts), 12)]
    t0 = time.perf_counter()
    model = build(name, args.smoke, device, tok)
    _sync(model)
    rows = []
    params = sum(p.numel() for p in model.parameters())
    base = {"model": name, "params": f"{params / 1e9:.2f}B", "dtype": str(model.dtype).removeprefix("torch.")}
    logger.info("%s built in %.1f s", base, time.perf_counter() - t0)
    layer = default_layer(model)
    shape = memory.model_shape(model, layer)

    rate = plain_forward_rate(model, tok, texts, layer, args.tokens, DEFAULT_BATCH_TOKENS)
    with Peak(device) as peak:
        t0 = time.perf_counter()
        # revision=: the key names the model instead of hashing its weights (timed: the pass itself)
        compute_second_moment(model, tok, layer, corpus=texts, n_tokens=args.tokens, cache=False, revision="bench")
        _sync(model)
        seconds = time.perf_counter() - t0
    predicted = memory.statistics_bytes(
        shape["d_in"], shape["d_model"], shape["d_ff"], shape["heads"], DEFAULT_BATCH_TOKENS, 128, s=shape["s"]
    )["total"]
    stats_rate = args.tokens / seconds
    rows.append(
        {
            **base, "step": f"statistics L{layer} ({args.tokens:,} tok)", "seconds": round(seconds, 1),
            "tokens/s": f"{stats_rate:,.0f} ({stats_rate / rate:.2f} of a plain forward)",
            "peak GiB": round(peak.bytes / GiB, 2), "model GiB": round(predicted / GiB, 2),
        }
    )  # fmt: skip
    logger.info("%s", rows[-1])

    config = dict(mom2_corpus=texts, mom2_n_tokens=args.tokens, context_templates=0)
    with Peak(device) as peak:
        t0 = time.perf_counter()
        wins = 0
        for record in cf[: args.rome]:
            es = hf_knowedit.apply_edits(model, tok, record, "rome", layers=[layer], config=config)
            wins += _efficacy(model, tok, record)
            hf_knowedit.revert_edits(model)
            del es
        _sync(model)
        seconds = time.perf_counter() - t0
    rows.append(
        {
            **base, "step": f"ROME x{args.rome} (one at a time)", "seconds": round(seconds / max(args.rome, 1), 1),
            "tokens/s": "", "peak GiB": round(peak.bytes / GiB, 2), "model GiB": "",
            "efficacy": f"{wins}/{args.rome}",
        }
    )  # fmt: skip
    logger.info("%s", rows[-1])

    layers = default_band(shape["layers_above"] + layer, 5)
    # the flat file repeats some facts with another new object, which one MEMIT call rejects (EditConflictError)
    distinct, _ = first_per_fact(load_records(flat))
    for n in args.memit:
        records = [flat[r.index] for r in distinct[:n]]
        with Peak(device) as peak:
            t0 = time.perf_counter()
            hf_knowedit.apply_edits(model, tok, records, "memit", layers=layers, config=config)
            _sync(model)
            seconds = time.perf_counter() - t0
        wins = sum(_efficacy(model, tok, r) for r in records[:100])
        hf_knowedit.revert_edits(model)
        rows.append(
            {
                **base, "step": f"MEMIT {len(records)} edits (one call, layers {layers[0]}-{layers[-1]})",
                "seconds": round(seconds, 1), "tokens/s": "", "peak GiB": round(peak.bytes / GiB, 2),
                "model GiB": "", "efficacy": f"{wins}/{min(len(records), 100)} (first 100)",
            }
        )  # fmt: skip
        logger.info("%s", rows[-1])
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _efficacy(model: Any, tok: Any, record: dict) -> int:
    from hf_knowedit.evaluation import score_targets
    from hf_knowedit.requests import to_request

    req = to_request(record)
    new, true = score_targets(model, tok, [(req.text, req.target_new), (req.text, req.target_true or "")])
    return int(new.mean_nll < true.mean_nll)


def _hf_continuations(model: Any, tok: Any, prompts: list[str], n_tokens: int) -> list[str]:
    """Greedy continuations (``n_tokens`` tokens, whitespace-normalised) in transformers."""
    from hf_knowedit.generation import generate_texts

    texts = generate_texts(model, tok, prompts, max_new_tokens=n_tokens, seed=None)
    return [" ".join(t[len(p) :].split()) for t, p in zip(texts, prompts)]


def vllm_case(args: argparse.Namespace, folder: Path, work: Path) -> dict:
    """The ``--vllm`` row: an edit served by vLLM as a LoRA adapter, against transformers (see the module
    docstring). Returns ``{"case": "vllm", "not run": why}`` when CUDA or the ``vllm`` package is missing."""
    import importlib.util

    why = (
        "no GPU (torch.cuda.is_available() is False)"
        if not torch.cuda.is_available()
        else "the vllm package is not installed"
        if importlib.util.find_spec("vllm") is None
        else None
    )
    if why is not None:
        logger.warning("bench_gpu --vllm: not run: %s.", why)
        return {"case": "vllm", "not run": why}
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    import hf_knowedit
    from hf_knowedit._bundled import load_smollm2
    from hf_knowedit.evaluation.generative import starts_with
    from hf_knowedit.requests import to_request
    from hf_knowedit.serving import check_vllm

    records = json.loads((folder / "counterfact_500.json").read_text())[: args.vllm_edits]
    model, tok = load_smollm2(dtype=torch.float16, device=torch.device("cuda", torch.cuda.current_device()))
    base = work / "smollm2-f16"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    requests = [to_request(r) for r in records]
    prompts = [r.text for r in requests]
    hf_before = _hf_continuations(model, tok, prompts, args.vllm_tokens)
    es = hf_knowedit.apply_edits(model, tok, records, method="rome", name="vllm-case")
    hf_after = _hf_continuations(model, tok, prompts, args.vllm_tokens)
    es.save_pretrained(work / "edit")
    check = check_vllm(es)
    model.to("cpu")  # the GPU's memory goes to vLLM
    torch.cuda.empty_cache()
    llm = LLM(
        model=str(base),
        dtype="float16",
        enable_lora=True,
        max_lora_rank=check.max_lora_rank,
        max_loras=1,
        enforce_eager=True,
        gpu_memory_utilization=0.3,
    )
    params = SamplingParams(temperature=0.0, max_tokens=args.vllm_tokens)
    lora = LoRARequest("edit", 1, str(work / "edit"))
    before = [" ".join(o.outputs[0].text.split()) for o in llm.generate(prompts, params)]
    after = [" ".join(o.outputs[0].text.split()) for o in llm.generate(prompts, params, lora_request=lora)]
    n = len(requests)
    return {
        "case": "vllm",
        "edits": n,
        "max_lora_rank": check.max_lora_rank,
        "new object with the adapter (vLLM)": sum(starts_with(a, r.target_new) for a, r in zip(after, requests)),
        "old object without it (vLLM)": sum(starts_with(b, r.target_true or "") for b, r in zip(before, requests)),
        "new object with the edit (transformers)": sum(
            starts_with(a, r.target_new) for a, r in zip(hf_after, requests)
        ),
        "same continuation as transformers, edited": sum(a == h for a, h in zip(after, hf_after)),
        "same continuation as transformers, unedited": sum(b == h for b, h in zip(before, hf_before)),
        "example": f"{prompts[0]!r}: vLLM {before[0]!r} -> {after[0]!r}; transformers -> {hf_after[0]!r}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--models", default="gpt2-xl,llama-8b")
    parser.add_argument("--tokens", type=int, default=100_000, help="tokens of each statistics pass")
    parser.add_argument("--rome", type=int, default=10, help="ROME records")
    parser.add_argument("--memit", default="1000,10000", help="MEMIT edits per call, comma-separated")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU (checks the code path)")
    parser.add_argument("--vllm", action="store_true", help="only the vLLM case: an edit served as a LoRA")
    parser.add_argument("--vllm-edits", type=int, default=10, help="ROME edits in the vLLM case")
    parser.add_argument("--vllm-tokens", type=int, default=8, help="tokens generated per prompt in the vLLM case")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.vllm:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="bench_gpu_vllm_") as work:
            row = vllm_case(args, data_dir(args.data), Path(work))
        logger.info("\n%s", rows_table([row]))
        if args.out and "not run" not in row:
            write_markdown(args.out, "An edit served by vLLM (LoRA)", rows_table([row]), machine_info(), 0.0)
        sys.exit(0)
    if not args.smoke and not torch.cuda.is_available():
        logger.warning("bench_gpu: no GPU here (torch.cuda.is_available() is False); nothing to measure, skipped.")
        sys.exit(0)
    args.memit = [int(x) for x in args.memit.split(",") if x]
    device = torch.device("cpu") if args.smoke else torch.device("cuda", torch.cuda.current_device())
    from hf_knowedit._bundled import load_smollm2

    _, tok = load_smollm2()
    folder = data_dir(args.data)
    machine = machine_info()
    t0 = time.perf_counter()
    rows = [row for name in args.models.split(",") for row in bench_model(name, args, device, tok, folder)]
    table = rows_table(rows)
    logger.info("\n%s", table)
    if args.out:
        write_markdown(args.out, "Big models on one GPU (random weights)", table, machine, time.perf_counter() - t0)


if __name__ == "__main__":
    main()
