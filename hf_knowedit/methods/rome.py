"""ROME: Rank-One Model Editing (Meng et al., NeurIPS 2022), with r-ROME's fix as the default.

A fact ``(s, r, o)`` is read by the MLP output projection ``W`` of one middle layer as a key-value
pair: the key ``k`` is the projection's input at the subject's last token, the value ``v = W k``
its output. ROME writes a new value ``v*`` for the key ``k*`` with the smallest change that
disturbs other keys least (in the metric of their second moment ``C = E[k kᵀ]``):

1. ``k*``: the key averaged over context templates (:func:`~hf_knowedit.methods.keys.compute_keys`).
2. ``u = C⁻¹ k*`` (solved with the cached Cholesky factor of ``C``; :mod:`~hf_knowedit.moments`),
   normalised to unit length as in the reference code.
3. ``v*``: the projection's output plus a vector ``δ`` optimised so that the model says ``o*``
   (:func:`~hf_knowedit.methods.targets.optimize_targets`, ``site="mlp"``).
4. ``Λ = (v* − W k) / (uᵀ k)`` and ``Ŵ = W + Λ uᵀ``, a rank-one update: ``A = uᵀ`` (``[1, d_in]``),
   ``B = Λ`` (``[d_out, 1]``), so that ``Ŵ k = v*``. ``W k`` includes the module's bias; for routed experts
   with biases (``experts_t``, GPT-OSS) that is the routing-weighted sum of the experts' down biases at the
   first prompt's subject (its output there less ``W κ``), which the update leaves unchanged.

r-ROME (Gupta et al. 2024) uses ``k = k*`` in step 4. The original code used the key of the
un-prefixed prompt there (``k = k(s)``), which occasionally makes ``uᵀ k`` tiny and the update
huge ("disabling edits"). ``ROMEConfig(original_implementation=True)`` reproduces the original.

Several requests in one call are edited **one after another**: each update is computed on the
weights including the previous ones (applied through temporary hooks, so nothing is written
until the whole set is pushed), and the set holds their sum as rank-``n`` factors.

Layer: ``layers=[i]`` (one index), ``"auto"`` (the causal-tracing peak of the MLP's indirect
effect, :func:`hf_knowedit.tracing.suggest_layers`; run ``trace_facts`` first) or ``None``:
:func:`default_layer`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..architectures import from_param, get_architecture, get_module, mlp_out_path, num_layers, read_tensor
from ..deltas import ModuleDelta
from ..errors import LayerOutOfRangeError, NonFiniteUpdateError
from ..hooks import module_hook, remove_hooks
from ..moments import SecondMoment
from ..requests import EditRequest
from ..stack import effective_weight
from ..tracing import suggest_layers
from .config import EditConfig, option, with_aliases
from .context import flatten, template_groups
from .keys import compute_keys
from .registry import EditContext, MethodResult, register_method
from .statistics import second_moment_for
from .targets import optimize_targets

logger = logging.getLogger(__name__)

#: ``layers=None`` edits layer ``round(DEFAULT_LAYER_FRACTION * (num_layers - 1))``
DEFAULT_LAYER_FRACTION = 0.2


@with_aliases
@dataclass
class ROMEConfig(EditConfig):
    """ROME / r-ROME hyper-parameters; the shared fields (``v_num_grad_steps``, ``v_lr``,
    ``clamp_norm_factor``, ``mom2_*``, ...) are :class:`~hf_knowedit.methods.config.EditConfig`'s.

    Against the reference's ``hparams/ROME/gpt2-xl.json``: ``v_num_grad_steps`` 20, ``v_weight_decay`` 0.5,
    ``kl_factor`` 0.0625, ``clamp_norm_factor`` 4, ``early_stop`` 0.05 and ``mom2_dtype`` float32 are theirs.
    What differs:

    * r-ROME by default (``original_implementation=True``: the reference's update);
    * Adam's rate is relative: ``v_lr=None`` means ``v_lr_relative · RMS(v's init)`` per request; theirs is an
      absolute 0.5, which ``v_lr=0.5`` restores;
    * ``C`` averages ``ceil(10 · d_in)`` tokens of the default corpus (``mom2_n_keys``); theirs 100,000
      Wikipedia articles (``mom2_n_samples``);
    * ``context_templates=5``: five prefixes of 10 new tokens; theirs 10 of 5 and 10 of 10 tokens sampled from
      the beginning of text (``context_templates="reference"``);
    * the layer (``layers=None``) is :func:`default_layer`, not a config field.

    :meth:`~hf_knowedit.methods.config.EditConfig.from_reference` reads their files as they are."""

    #: ``context_templates="reference"``: ROME's recipe (20 prefixes sampled from the beginning of text)
    reference_context: ClassVar[str] = "rome"

    original_implementation: bool = option(
        False, "False: r-ROME (k* in the denominator and in W k). True: the original ROME code (un-prefixed k).", "bool"
    )


def default_layer(model: nn.Module) -> int:
    """``round(0.2 * (L - 1))``: SmolLM2-135M (30 layers) → 6, GPT-J (28) → 5 (reference 5),
    Llama-7B (32) → 6 (reference 5), GPT-2 XL (48) → 9 (reference 17, where the trace peak is flat
    over layers ~10-20). Chosen by measurement (``docs/layers.md``); pass ``layers=`` or ``"auto"`` to override."""
    return int(round(DEFAULT_LAYER_FRACTION * (num_layers(model) - 1)))


def resolve_layer(model: nn.Module, layers: Any) -> int:
    """The single layer ROME edits, from ``apply_edits``' ``layers`` argument."""
    if layers is None:
        return default_layer(model)
    if layers == "auto":
        return int(suggest_layers(model, kind="mlp", count=1)[0])
    layers = list(layers)
    if len(layers) != 1:
        raise LayerOutOfRangeError(
            f"ROME edits exactly one layer, got {layers}; pass one index (e.g. layers=[5]) "
            "or use method='memit' to spread edits over several layers."
        )
    return int(layers[0])


@dataclass
class RankOneUpdate:
    """One ROME edit: ``ΔW = B @ A`` with ``A = uᵀ`` ``[1, d_in]`` and ``B = Λ`` ``[d_out, 1]``, plus diagnostics."""

    A: torch.Tensor
    B: torch.Tensor
    k_star: torch.Tensor
    v_star: torch.Tensor
    steps: int
    loss: float


def rank_one_update(
    model: nn.Module,
    tokenizer: Any,
    request: EditRequest,
    layer: int,
    config: ROMEConfig,
    mom2: SecondMoment,
    templates: Sequence[str],
    *,
    fast: bool = True,
    prior: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
) -> RankOneUpdate:
    """Compute one ROME edit on the model as it is (see module docstring, steps 1-4). ``prior``: the
    ``(B, A)`` factors of earlier edits of the same call, acting through hooks while this one is computed."""
    spec = get_architecture(model)
    # 1. keys: k* over the templates; k(s) on the bare prompt (the first template is "{}")
    keys = compute_keys(model, tokenizer, [request], layer, templates, average=False)[0]  # [T, d_in]
    k_star = keys.mean(0)
    # 2. u = C⁻¹ k*, unit length
    u = mom2.solve(k_star.double())
    u = u / u.norm()
    # 3. v* = v_init + δ
    target = optimize_targets(model, tokenizer, [request], layer, config, site="mlp", templates=templates, fast=fast)
    v_star = target.targets[0].double()
    # 4. Λ = (v* − W k) / (uᵀ k)
    k = (keys[0] if config.original_implementation else k_star).double()
    path = mlp_out_path(spec, layer)
    w_k = current_value(model, path, spec.mlp_out_layout, k, prior)
    if spec.mlp_out_layout == "experts_t":
        # the experts' down biases Σ g_e b_e (hf_knowedit.experts), which no key carries: what the module's output
        # v_init at the first prompt holds beyond W κ there, so that v* − w_k is what ΔW must add
        w_k = w_k + target.init[0].to(w_k) - current_value(model, path, spec.mlp_out_layout, keys[0].double(), prior)
    denominator = torch.dot(u.to(k.device), k)
    lam = (v_star.to(w_k.device) - w_k) / denominator
    A, B = u.unsqueeze(0).float(), lam.unsqueeze(1).float()
    if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
        raise NonFiniteUpdateError(
            f"The ROME update for {request.text!r} is not finite (uᵀk = {float(denominator):.3g}); "
            "nothing was written. Check the statistics, or use the default r-ROME "
            "(original_implementation=False)."
        )
    logger.info(
        "ROME %r -> %r at layer %d: %d steps, loss %.3f, |Λ| %.3g, uᵀk %.3g",
        request.text,
        request.target_new,
        layer,
        target.steps_taken[0],
        target.losses[0],
        float(lam.norm()),
        float(denominator),
    )
    return RankOneUpdate(A, B, k_star, v_star.float(), target.steps_taken[0], target.losses[0])


def current_value(
    model: nn.Module, path: str, layout: str, k: torch.Tensor, prior: Sequence[tuple[torch.Tensor, torch.Tensor]] = ()
) -> torch.Tensor:
    """``W k + b`` in float64, ``W`` the weight the module acts with: its (possibly merged) weight,
    hooked edit sets, and the ``prior`` factors. Computed from the weights, not by running the module,
    so a half-precision model or an offloaded module gives the exact value on the weights' device."""
    with torch.no_grad():
        weight = from_param(effective_weight(model, path, layout).double(), layout)  # [out, in], storage device
        k = k.to(weight.device, torch.float64)
        w_k = weight @ k
        for B, A in prior:
            w_k = w_k + B.to(w_k).matmul(A.to(w_k).matmul(k))
        if getattr(get_module(model, path), "bias", None) is not None:
            w_k = w_k + read_tensor(model, f"{path}.bias").to(w_k)
    return w_k


def compute(ctx: EditContext) -> MethodResult:
    """ROME for ``apply_edits``: one rank-one update per request, applied one after another."""
    model, tok, config = ctx.model, ctx.tokenizer, ctx.config
    layer = resolve_layer(model, ctx.layers)
    n = num_layers(model)
    if not 0 <= layer < n:
        raise LayerOutOfRangeError(f"Layer {layer} is out of range: this model has layers 0..{n - 1}.")
    spec = ctx.arch
    path = mlp_out_path(spec, layer)
    templates = flatten(template_groups(model, tok, config))  # ROME averages all templates uniformly
    mom2 = second_moment_for(model, tok, layer, config)
    As: list[torch.Tensor] = []
    Bs: list[torch.Tensor] = []
    handles = []
    try:
        for request in ctx.requests:
            update = rank_one_update(model, tok, request, layer, config, mom2, templates, prior=list(zip(Bs, As)))
            As.append(update.A)
            Bs.append(update.B)
            # the next request sees this edit (hooked, the weights stay untouched until the set is pushed)
            handles.append(
                get_module(model, path).register_forward_hook(
                    module_hook(model, path, spec.mlp_out_layout, [(update.B, update.A)], owner=threading.get_ident())
                )
            )
    finally:
        remove_hooks(handles)
    delta = ModuleDelta.from_factors(torch.cat(Bs, dim=1), torch.cat(As, dim=0))
    return MethodResult(deltas={path: delta}, layers=[layer], stats_key=mom2.key)


register_method("rome", compute, ROMEConfig)
