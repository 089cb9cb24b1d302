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

from typing import Any

import torch
from torch import nn

from ..architectures import get_architecture, mlp_out_dims, num_layers

__all__ = ["statistics_bytes", "targets_bytes", "solve_bytes", "model_shape"]


def _total(terms: dict[str, int]) -> dict[str, int]:
    return {**terms, "total": sum(terms.values())}


def forward_activation_bytes(tokens: int, d_model: int, d_ff: int, heads: int, longest: int, s: int) -> int:
    """Live activations of one block's forward without gradients: the residual stream and attention
    output (``4 T d_model``), the MLP's gate, up and product (``3 T d_ff``), and eager attention scores
    and probabilities (``2 heads T L``), in the model's dtype."""
    return s * (4 * tokens * d_model + 3 * tokens * d_ff + 2 * heads * tokens * longest)


def statistics_bytes(
    d_in: int, d_model: int, d_ff: int, heads: int, tokens: int, longest: int, s: int = 4, s_C: int = 4
) -> dict[str, int]:
    """One statistics pass (:func:`hf_knowedit.methods.statistics.compute_second_moment`):

    * ``C``: the ``d_in × d_in`` sum, ``s_C d_in²`` (accumulated in place on the blocks of its upper
      triangle: no per-batch ``d_in²`` temporary);
    * ``keys``: the traced input ``s T d_in``, its padding-free copy ``s T d_in`` and the copy in the
      accumulation dtype ``s_C T d_in``;
    * ``forward``: the activations of the block being run (:func:`forward_activation_bytes`); the pass
      stops after the edited module, so nothing above it is computed.
    """
    return _total(
        {
            "C": s_C * d_in * d_in,
            "keys": (2 * s + s_C) * tokens * d_in,
            "forward": forward_activation_bytes(tokens, d_model, d_ff, heads, longest, s),
        }
    )


def targets_bytes(
    d_model: int, d_ff: int, heads: int, vocab: int, tokens: int, longest: int, layers_above: int, rows: int, s: int = 4
) -> dict[str, int]:
    """One step of the v* / z optimisation (:func:`hf_knowedit.methods.targets.optimize_targets`, ``fast``):

    * ``saved``: activations kept for the backward pass through the blocks from the edited layer up
      (``layers_above`` blocks, each :func:`forward_activation_bytes` plus its input and normed input,
      ``2 s T d_model``); blocks below are replayed from their recorded outputs (``replay``: ``s T d_model``);
    * ``logits``: float32 logits, their softmax and gradient at the ``rows`` positions the loss reads
      (``3 · 4 rows vocab``);
    * ``delta``: ``δ``, its gradient and Adam's two moments, one row of ``d_model`` per request (small).
    """
    per_block = forward_activation_bytes(tokens, d_model, d_ff, heads, longest, s) + 2 * s * tokens * d_model
    return _total(
        {
            "saved": layers_above * per_block,
            "replay": s * tokens * d_model,
            "logits": 3 * 4 * rows * vocab,
            "delta": 4 * 4 * rows * d_model,
        }
    )


def solve_bytes(d_in: int, d_out: int, n: int, method: str = "memit") -> dict[str, int]:
    """One layer's closed-form solve, all in float64 (:mod:`hf_knowedit.methods.solvers`):

    * ``rome``: the Cholesky factor of ``C`` (cached on the ``SecondMoment``), the float64 copy of ``C``,
      the identity and ``C + jitter·I`` it is computed from: ``4 · 8 d_in²``;
    * ``memit`` / ``alphaedit``: ``λC`` (or ``P``), ``K Kᵀ`` and the system matrix: ``3 · 8 d_in²``,
      plus keys and residuals ``8 n (d_in + d_out)`` and the solution ``8 n d_in``;
    * ``emmet``: ``C`` and its factor ``2 · 8 d_in²`` plus the ``n × n`` system ``2 · 8 n²``.
    """
    vectors = 8 * n * (2 * d_in + d_out)
    if method == "rome":
        return _total({"C, I, C + jitter·I, factor (float64)": 4 * 8 * d_in * d_in, "vectors": 8 * (2 * d_in + d_out)})
    if method == "emmet":
        return _total({"C float64 + factor": 2 * 8 * d_in * d_in, "n×n system": 2 * 8 * n * n, "vectors": vectors})
    return _total({"d_in² matrices": 3 * 8 * d_in * d_in, "vectors": vectors})


def model_shape(model: nn.Module, layer: int) -> dict[str, Any]:
    """The symbols of the formulas for ``model`` at ``layer``: ``d_in``, ``d_out``, ``d_model``, ``d_ff``,
    ``heads``, ``vocab``, ``layers_above`` and ``s`` (bytes of the model's floating dtype)."""
    spec = get_architecture(model)
    d_in, d_out = mlp_out_dims(model, spec, layer)
    config = model.config
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
    }
