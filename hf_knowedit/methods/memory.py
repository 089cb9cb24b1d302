"""The memory model: peak bytes of the statistics pass, the v*/z optimisation and the solves.

Each function returns the bytes a step allocates *on top of the model's weights* (the weights of an
offloaded module are loaded one module at a time by accelerate and are not counted), as a dict of
named terms with their sum under ``"total"``, so a reader sees which term dominates. ``docs/memory.md``
states the formulas; ``benchmarks/bench_memory.py`` prints them next to the measured peaks.

Symbols: ``d_in`` the edited module's input (the MLP inner size, the key dimension), ``d_out`` its
output (the hidden size), ``d_ff`` the MLP inner size, ``T`` padded tokens per forward pass (the
budget: ``mom2_batch_tokens`` for statistics, ``target_batch_tokens`` for z), ``L`` the longest row,
``heads`` attention heads, ``s`` bytes per element of the model's dtype, ``s_C`` of ``mom2_dtype``,
``n`` edits per solve, ``layers_above`` blocks between the edited layer and the output (inclusive).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..architectures import decoder_config, get_architecture, mlp_out_dims, num_layers

__all__ = [
    "statistics_bytes",
    "targets_bytes",
    "targets_bytes_for",
    "solve_bytes",
    "state_bytes",
    "model_shape",
    "measure_peak",
]


def _total(terms: dict[str, int]) -> dict[str, int]:
    return {**terms, "total": sum(terms.values())}


def forward_activation_bytes(
    tokens: int, d_model: int, d_ff: int, heads: int, longest: int, s: int, eager: bool = True
) -> int:
    """Live activations of one block's forward without gradients: the residual stream and attention
    output (``4 T d_model``), the MLP's gate, up and product (``3 T d_ff``), and, with eager attention,
    its scores and probabilities (``2 heads T L``; sdpa and flash attention do not keep them), in the
    model's dtype."""
    return s * (4 * tokens * d_model + 3 * tokens * d_ff + (2 * heads * tokens * longest if eager else 0))


def statistics_bytes(
    d_in: int,
    d_model: int,
    d_ff: int,
    heads: int,
    tokens: int,
    longest: int,
    s: int = 4,
    s_C: int = 4,
    eager: bool = True,
    experts: int | None = None,
) -> dict[str, int]:
    """One statistics pass (:func:`hf_knowedit.methods.statistics.compute_second_moment`):

    * ``C``: the ``d_in × d_in`` sum, ``s_C d_in²`` (accumulated in place on the blocks of its upper
      triangle: no per-batch ``d_in²`` temporary);
    * ``keys``: the traced input ``s T d_in``, its padding-free copy ``s T d_in`` and the copy in the
      accumulation dtype ``s_C T d_in``;
    * ``forward``: the activations of the block being run (:func:`forward_activation_bytes`); the pass
      stops after the edited module, so nothing above it is computed.

    ``experts=E``: MoEEdit's per-expert pass (:func:`~hf_knowedit.methods.statistics.compute_expert_moments`)
    with ``d_in`` the expert's inner size ``I``: ``C`` is ``E`` blocks, ``s_C E I²`` (not the joint ``(E·I)²``),
    and ``keys`` are one expert's at a time (at most ``T`` rows).
    """
    blocks = 1 if experts is None else int(experts)
    return _total(
        {
            "C": s_C * blocks * d_in * d_in,
            "keys": (2 * s + s_C) * tokens * d_in,
            "forward": forward_activation_bytes(tokens, d_model, d_ff, heads, longest, s, eager),
        }
    )


def block_saved_bytes(tokens: int, d_model: int, d_ff: int, heads: int, longest: int, s: int, eager: bool) -> int:
    """What autograd keeps of one block for its backward pass: about ``10`` vectors of ``d_model`` per
    token (the block's input, the two norms' inputs and outputs, queries, keys, values, their rotated
    copies, the attention output, the residual) and ``4`` of ``d_ff`` (gate, up, the activation and the
    product), in the model's dtype; with eager attention also the scores and probabilities
    (``2 heads T L``); checked against ``saved_tensors_hooks`` counts in ``docs/memory.md``."""
    return s * tokens * (10 * d_model + 4 * d_ff) + (2 * s * heads * tokens * longest if eager else 0)


def targets_bytes(
    d_model: int,
    d_ff: int,
    heads: int,
    vocab: int,
    tokens: int,
    longest: int,
    layers_above: int,
    rows: int,
    s: int = 4,
    *,
    kv: int = 0,
    eager: bool = False,
) -> dict[str, int]:
    """One step of the v* / z optimisation (:func:`hf_knowedit.methods.targets.optimize_targets`, ``fast``):

    * ``saved``: what autograd keeps for the blocks from the edited layer up (``layers_above`` blocks of
      :func:`block_saved_bytes`), for the ``tokens`` the steps run (padded rows × the positions from the
      cut on, with the prefix cache; every position without it);
    * ``backward``: the gradients of one block in flight (as much again as one block saved);
    * ``replay``: the recorded output of the block below the edited layer, ``s T d_model``;
    * ``prefix cache``: the keys and values of the positions before the cut, ``kv`` elements
      (``2 · layers · rows · prefix · d_kv``; 0 without the cache), three times: the recorded copy,
      the step's copy of the active rows, and the prefix + suffix keys / values attention saves, ``3 s kv``;
    * ``logits``: float32 logits, their softmax and gradient at the ``rows`` positions the loss reads
      (``3 · 4 rows vocab``);
    * ``delta``: ``δ``, its gradient and Adam's two moments, one row of ``d_model`` per request (small).

    :func:`targets_bytes_for` fills the symbols in from the requests themselves.
    """
    block = block_saved_bytes(tokens, d_model, d_ff, heads, longest, s, eager)
    return _total(
        {
            "saved": layers_above * block,
            "backward": block,
            "replay": s * tokens * d_model,
            "prefix cache": 3 * s * kv,
            "logits": 3 * 4 * rows * vocab,
            "delta": 4 * 4 * rows * d_model,
        }
    )


def kv_width(model: nn.Module, shape: dict[str, Any] | None = None) -> int:
    """Elements of one position's keys (or values) in one attention layer: ``kv_heads · head_dim``."""
    shape = shape or model_shape(model, 0)
    config = decoder_config(model)
    kv_heads = getattr(config, "num_key_value_heads", None) or shape["heads"]
    return int(getattr(config, "head_dim", None) or shape["d_model"] // shape["heads"]) * int(kv_heads)


def kv_cache_bytes(model: nn.Module, positions: int) -> int:
    """Bytes of a KV cache holding ``positions`` positions (rows × length) in every layer, in the model's
    dtype: ``2 · layers · positions · kv_width · s``."""
    shape = model_shape(model, 0)
    return 2 * num_layers(model) * positions * kv_width(model, shape) * shape["s"]


def targets_bytes_for(
    model: nn.Module,
    tokenizer: Any,
    requests: Any,
    layer: int,
    *,
    templates: Any = ("{}",),
    kl_prompts: Any = None,
    prefix_cache: bool = True,
    chat_questions: bool = False,
) -> dict[str, int]:
    """:func:`targets_bytes` for these requests, as :func:`~hf_knowedit.methods.targets.optimize_targets`
    would batch them in one chunk (rows and their lengths from the same tokenisation; the cut at each
    row's subject last token when ``prefix_cache``; the question rows with ``chat_questions``)."""
    from ..requests import to_request
    from .context import question_templates
    from .targets import KL_PROMPT, _build

    shape = model_shape(model, layer)
    reqs = [to_request(r) for r in requests]
    asked = question_templates(tokenizer, reqs) if chat_questions else [None] * len(reqs)
    built = [_build(tokenizer, r, templates, kl_prompts or (KL_PROMPT,), question=q) for r, q in zip(reqs, asked)]
    lengths = [len(row) for b in built for row in b.rows]
    cuts = [c for b in built for c in b.lookups] if prefix_cache else [0] * len(lengths)
    width = max(n - c for n, c in zip(lengths, cuts))
    return targets_bytes(
        shape["d_model"],
        shape["d_ff"],
        shape["heads"],
        shape["vocab"],
        tokens=len(lengths) * width,
        longest=max(lengths),
        layers_above=shape["layers_above"],
        rows=sum(len(b.targets) + len(b.rows) - b.n_rewrite for b in built),
        s=shape["s"],
        kv=2 * num_layers(model) * len(lengths) * max(cuts) * kv_width(model, shape),
        eager=shape["eager"],
    )


def solve_bytes(d_in: int, d_out: int, n: int, method: str = "memit", experts: int | None = None) -> dict[str, int]:
    """One layer's closed-form solve, all in float64 (:mod:`hf_knowedit.methods.solvers`):

    * ``rome``: the Cholesky factor of ``C`` (cached on the ``SecondMoment``), the float64 copy of ``C``,
      the identity and ``C + jitter·I`` it is computed from: ``4 · 8 d_in²``;
    * ``memit`` / ``alphaedit``: ``λC`` (or ``P``), ``K Kᵀ`` and the system matrix: ``3 · 8 d_in²``,
      plus keys and residuals ``8 n (d_in + d_out)`` and the solution ``8 n d_in``;
    * ``emmet``: ``C`` and its factor ``2 · 8 d_in²`` plus the ``n × n`` system ``2 · 8 n²``;
    * ``rlsedit``: on top of the layer's ``P`` (:func:`state_bytes`), the updated ``P`` and its symmetrised
      copy ``2 · 8 d_in²`` (on a model's first batch: the identity and ``P₀ = (λC)⁻¹``, as many), the
      ``n × n`` system ``8 n²`` and ``K``, ``PK``, the gain and the residuals ``8 n (3 d_in + d_out)``;
    * ``moeedit`` (``d_in`` = an expert's inner size ``I``, ``experts=E``): one expert's eigen-decomposition
      (its ``C_e`` in float64, symmetrised, the eigenvectors and the kept ones, about ``3 · 8 I²`` at once),
      the null-space bases of the experts the edits reach (float32, at most ``E`` of at most ``I × I``:
      ``4 E I²``), the
      routed keys and the update's right factor over all experts (float64 both, and the factor in float32:
      ``20 n E I``), the ``n × n`` system ``3 · 8 n²`` and the residuals ``8 n d_out``.
    """
    if method == "moeedit":
        E = 1 if experts is None else int(experts)
        return _total(
            {
                "eigen-decomposition of one C_e (float64)": 3 * 8 * d_in * d_in,
                "null-space bases (float32, experts reached)": E * 4 * d_in * d_in,
                "routed keys and factor": 20 * n * E * d_in,
                "n×n system": 3 * 8 * n * n,
                "vectors": 8 * n * d_out,
            }
        )
    vectors = 8 * n * (2 * d_in + d_out)
    if method == "rome":
        return _total({"C, I, C + jitter·I, factor (float64)": 4 * 8 * d_in * d_in, "vectors": 8 * (2 * d_in + d_out)})
    if method == "emmet":
        return _total({"C float64 + factor": 2 * 8 * d_in * d_in, "n×n system": 2 * 8 * n * n, "vectors": vectors})
    if method == "rlsedit":
        return _total(
            {
                "new P, symmetrised (float64)": 2 * 8 * d_in * d_in,
                "n×n system": 8 * n * n,
                "vectors": 8 * n * (3 * d_in + d_out),
            }
        )
    return _total({"d_in² matrices": 3 * 8 * d_in * d_in, "vectors": vectors})


def state_bytes(d_in: int, layers: int, method: str = "rlsedit", null_rank: int | None = None) -> dict[str, int]:
    """The ``d_in²`` state a lifelong method keeps for a band of ``layers`` layers, at the peak of a call. It
    is held in the model's history between calls and so written into every lifelong checkpoint
    (:func:`hf_knowedit.evaluation.lifelong.run_lifelong` saves the history; it keeps the latest only):

    * ``rlsedit``: ``kept``: ``P = (λC + Σ K Kᵀ)⁻¹`` per layer, ``8 d_in²`` each (float64); ``during a call``:
      the new ``P`` of every layer, held next to the old one until the edit set is committed, as much again.
    * ``alphaedit``: ``kept``: the earlier batches' ``Σ K_p K_pᵀ`` per layer (float64, ``8 d_in²``,
      :mod:`~hf_knowedit.methods.key_history`) and the cached null-space basis ``U`` (float32, ``4 d_in r``,
      ``r = null_rank``, at most ``d_in``: the worst case when not given); ``during a call``: the updated sums,
      as much again as the sums.
    * ``encore``: ``kept``: ``Σ K_p K_pᵀ`` per layer as AlphaEdit's; ``during a call``: as much again.

    Other methods keep none: ``{"total": 0}``."""
    if method == "rlsedit":
        return _total({"kept": layers * 8 * d_in * d_in, "during a call": layers * 8 * d_in * d_in})
    if method in ("alphaedit", "encore"):
        terms = {"kept": layers * 8 * d_in * d_in, "during a call": layers * 8 * d_in * d_in}
        if method == "alphaedit":
            terms["null-space basis"] = layers * 4 * d_in * (d_in if null_rank is None else null_rank)
        return _total(terms)
    return _total({})


def model_shape(model: nn.Module, layer: int) -> dict[str, Any]:
    """The symbols of the formulas for ``model`` at ``layer``: ``d_in``, ``d_out``, ``d_model``, ``d_ff``,
    ``heads``, ``vocab``, ``layers_above``, ``s`` (bytes of the model's floating dtype) and ``eager``
    (the model keeps attention matrices: ``attn_implementation="eager"``)."""
    spec = get_architecture(model)
    d_in, d_out = mlp_out_dims(model, spec, layer)
    config = decoder_config(model, spec)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None) or 1
    return {
        "d_in": d_in,
        "d_out": d_out,
        "d_model": d_out,
        "d_ff": d_in,
        "heads": int(heads),
        "vocab": int(getattr(config, "vocab_size", 0)),
        "layers_above": num_layers(model, spec) - layer,
        "s": torch.finfo(dtype).bits // 8,
        "eager": getattr(config, "_attn_implementation", None) == "eager",
    }


def measure_peak(step: Callable[[], Any], device: torch.device | str = "cpu") -> int:
    """Peak bytes of tensors ``step()`` held at once above what was allocated before it, to check the
    formulas against: on a GPU ``torch.cuda.max_memory_allocated``; on the CPU the running sum of the
    allocations and frees ``torch.profiler`` records with ``profile_memory=True`` (the resident set is
    no measure: the C allocator keeps and reuses freed memory)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage  # an op's own allocations; frees are "[memory]" events
        peak = max(peak, current)
    return peak
