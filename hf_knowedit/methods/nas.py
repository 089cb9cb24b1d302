"""NAS: Norm-Anchor Scaling (arXiv 2602.02543; the authors' code: SasyaTitech/NAS), an option of the MEMIT family.

Sequential MEMIT-style editing collapses as the value vectors it writes drift to ever larger norms. NAS
reads MEMIT's target ``z = h + δ`` at the last critical layer (``h`` the block output at the subject's last
token, ``δ`` the optimised change) as a value the layer's MLP should output: with ``v0`` what the MLP adds to
the residual stream there (so ``h − v0`` is the stream before the MLP), the new value is ``v* = v0 + δ``.
NAS anchors its norm to a reference ``ν``:

    v* = v0 + δ
    v* ← v0                   if ‖v*‖ > 2ν          (δ is dropped: the request's residual is 0)
    v* ← v* · ν / ‖v*‖        otherwise              (rescaled to ν, up or down)
    z  = (h − v0) + v*

``ν`` is measured once per model, on the *original* model (active edit sets disabled), and cached: the
upper-trimmed mean of ``‖v0 + δ‖`` over a request set, with ``δ`` from MEMIT's ``z`` optimisation on the bare
prompt (no context templates) and the largest ``⌊0.05 n⌋`` norms left out (:func:`reference_norm`).
``nas=True`` on MEMIT, AlphaEdit, EMMET, ENCORE (and RLSEdit) applies it in
:func:`hf_knowedit.methods.memit.optimize_z`.

``v0`` is the output of the MLP at the last critical layer (of its post-MLP norm where the architecture has
one: Gemma 2/3, OLMo 2/3, EXAONE 4), read on the model as it is when the batch is edited, at the prompt ``h``
is read on (the first context template's).

Deliberate differences from the authors' code:

* **The request set of ν.** The authors sample ``nas_restart = 1000`` CounterFact rewrites (seed 0). Here it
  is the requests of the first NAS call on the model (at most ``nas_reference_size``, 1,000 by default,
  sampled with seed 0 when there are more), unless :func:`reference_norm` was called first with another set
  (e.g. 1,000 CounterFact rewrites, to reproduce the authors' ν). A small first call gives a noisy ν
  (one request: its own ``‖v*‖``); a warning says so below 100 requests.
* **The settings of ν's optimisation.** The authors read them from the model's MEMIT hyper-parameter file;
  here they are the calling config's ``z`` settings (``v_num_grad_steps``, ``v_lr``, ``v_lr_relative``,
  ``v_weight_decay``, ``kl_factor``, ``clamp_norm_factor``, ``early_stop``), without method extras such as
  ENCORE's MPES.
* **The cache.** The authors keep ν in memory and in a JSON file per model name; here it is kept in the
  model's state (``get_state(model).history``), keyed by a fingerprint of the original weights, the layer,
  those settings and the request-set size, for the life of the model object (not in a file of its own: it
  depends on the request set); a lifelong stream's checkpoints save it with the rest of the history.

``z_to_hidden_norm=True`` (:func:`rescale_to_hidden_norm`, not NAS) is the form this library shipped as
``nas`` before: the whole ``z`` rescaled to ``‖h‖``; ``docs/design.md`` says which ``+nas`` results in
``docs/results/`` are of that form.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..architectures import get_architecture, mlp_path, mlp_post_norm_path, residual_scale
from ..requests import EditRequest
from ..stack import base_view, get_state
from .config import EditConfig
from .keys import DEFAULT_BATCH_TOKENS, output_at_subject, prefixed
from .statistics import model_identity
from .targets import optimize_targets

logger = logging.getLogger(__name__)

#: the authors' outlier trimming: the largest ⌊(1 − UPPER_QUANTILE) · n⌋ norms are left out of ν
UPPER_QUANTILE = 0.95
#: δ is dropped when ‖v*‖ > DROP_FACTOR · ν
DROP_FACTOR = 2.0
#: the ``z`` settings ν depends on (the calling config's)
TARGET_FIELDS = (
    "v_num_grad_steps",
    "v_lr",
    "v_lr_relative",
    "v_weight_decay",
    "kl_factor",
    "clamp_norm_factor",
    "early_stop",
)
#: fewer reference requests than this give a warning (the authors use 1,000)
FEW_REFERENCE_REQUESTS = 100
_MEM_KEY = "nas.reference_norm"


def anchored_targets(
    z: torch.Tensor, h: torch.Tensor, v0: torch.Tensor, reference: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """NAS's ``z = (h − v0) + v*`` per row (see the module docstring) for ``z``, ``h``, ``v0`` ``[n, d]`` and ν.

    Returns the new ``z`` (``z``'s dtype) and a bool ``[n]``: the rows whose ``δ`` was dropped. With ``ν <= 0``
    (as the authors) or ``v* = 0``, ``v*`` is kept as it is. Float64 inside."""
    z64, h64, v064 = z.double(), h.double(), v0.double()
    v_star = v064 + (z64 - h64)
    norm = v_star.norm(dim=1)
    if reference <= 0:
        return z, torch.zeros(len(z), dtype=torch.bool, device=z.device)
    dropped = norm > DROP_FACTOR * reference
    scale = torch.where(norm > 0, reference / norm.clamp_min(1e-300), torch.ones_like(norm))
    v_star = torch.where(dropped.unsqueeze(1), v064, v_star * scale.unsqueeze(1))
    return (h64 - v064 + v_star).to(z.dtype), dropped


def trimmed_mean(norms: Sequence[float] | torch.Tensor, upper_quantile: float = UPPER_QUANTILE) -> float:
    """The mean of ``norms`` without the largest ``⌊(1 − upper_quantile) · n⌋`` of them (the authors'
    upper-trimmed mean: 1,000 norms lose their 50 largest, 19 norms none)."""
    values = sorted(float(x) for x in norms)
    if not values or not all(math.isfinite(x) for x in values):
        raise ValueError("NAS's reference norm needs finite ‖v*‖ values; got none or a non-finite one.")
    drop = math.floor((1.0 - upper_quantile) * len(values))
    kept = values[: len(values) - drop] if drop > 0 else values
    return sum(kept) / len(kept)


def mlp_values(
    model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest], layer: int, template: str = "{}"
) -> torch.Tensor:
    """``v0``: what block ``layer``'s MLP adds to the residual stream (the output of its post-MLP norm where
    the architecture has one, of its whole mixture-of-experts block where it is one, times its residual
    multiplier where it has one: Granite) at the subject's last
    token of each request's prompt in ``template``, ``[n, d_model]`` float32 on the CPU, on the model as it is."""

    spec = get_architecture(model)
    path = mlp_post_norm_path(spec, layer) or mlp_path(spec, layer)
    prompts = [dataclasses.replace(r, prompt=prefixed(template, r)) for r in requests]
    with torch.no_grad():
        return output_at_subject(model, tokenizer, prompts, path) * residual_scale(model, spec)


def reference_key(model: nn.Module, layer: int, config: Any, size: int) -> tuple:
    """What ν depends on: the original weights (fingerprint), the layer, the ``z`` settings and the set size."""
    settings = tuple((name, getattr(config, name)) for name in TARGET_FIELDS)
    return (model_identity(model, layer, whole=True), layer, settings, size, UPPER_QUANTILE)


def reference_norm(model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest], layer: int, config: Any) -> float:
    """ν at ``layer`` (the last critical layer) for ``config``'s ``z`` settings: cached per model, else
    measured on ``requests`` (at most ``config.nas_reference_size``, sampled with seed 0) on the original model.

    Measuring: every active edit set is disabled; ``δ`` is MEMIT's ``z`` optimisation on each request's bare
    prompt (batched, ``config.target_batch_tokens`` padded tokens per pass), ``v0`` the MLP's value there, and
    ν the trimmed mean of ``‖v0 + δ‖`` (:func:`trimmed_mean`). Call it before editing to fix ν on a request set
    of your choice (the authors': 1,000 CounterFact rewrites); later NAS edits with the same ``z`` settings at
    this layer reuse it. Must not run while a method's uncommitted updates are hooked in
    (:class:`~hf_knowedit.methods.memit.PendingDeltas`): ``mass_edit`` measures it before the first update."""
    requests = list(requests)
    size = int(getattr(config, "nas_reference_size", 1000))
    memory = get_state(model).history.setdefault(_MEM_KEY, {})
    key = reference_key(model, layer, config, size)
    if key in memory:
        return memory[key]
    if len(requests) > size:
        requests = random.Random(0).sample(requests, size)
    if len(requests) < FEW_REFERENCE_REQUESTS:
        logger.warning(
            "NAS measures its reference norm on %d request(s) (the authors use 1,000): ν is noisy, and with one "
            "request each later edit is rescaled to that request's norm. Call "
            "hf_knowedit.methods.nas.reference_norm(model, tok, requests, layer, config) with a larger set first.",
            len(requests),
        )
    settings = EditConfig(**{name: getattr(config, name) for name in TARGET_FIELDS})
    batch_tokens = getattr(config, "target_batch_tokens", DEFAULT_BATCH_TOKENS)
    with base_view(model):
        result = optimize_targets(
            model, tokenizer, requests, layer, settings, site="residual", templates=["{}"], batch_tokens=batch_tokens
        )
        v0 = mlp_values(model, tokenizer, requests, layer)
    v_star = v0.double() + result.deltas.detach().double().cpu()
    memory[key] = trimmed_mean(v_star.norm(dim=1))
    logger.info("NAS reference norm at layer %d: ν = %.4g over %d requests.", layer, memory[key], len(requests))
    return memory[key]


def rescale_to_hidden_norm(z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``z [n, d]`` rescaled row by row to the norms of ``h [n, d]`` (``z_to_hidden_norm=True``; not NAS:
    NAS rescales the MLP's value ``v*``, not ``z``, to a reference norm of the original model)."""
    z64, h64 = z.double(), h.double()
    return (z64 * (h64.norm(dim=1) / z64.norm(dim=1).clamp_min(1e-30)).unsqueeze(1)).to(z.dtype)
