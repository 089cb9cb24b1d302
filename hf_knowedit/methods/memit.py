"""MEMIT: Mass-Editing Memory in a Transformer (Meng et al., ICLR 2023).

Thousands of facts in one call. For a band of critical MLP layers ``R = [l_1 < ... < l_L]``:

1. **Targets.** For every request, a vector ``z_i`` at the residual stream (block output) of
   the last critical layer ``l_L``, at the subject's last token, that makes the model say the new
   object (:func:`hf_knowedit.methods.targets.optimize_targets` with ``site="residual"``). All requests are
   optimised together in batched forward passes, with per-request early stopping and norm clamps
   (``serial_targets=True`` optimises them one after another, as the reference does).
2. **Spread.** For each critical layer ``l`` in ascending order, with the updates of the earlier
   layers already in place: the keys ``K_l`` (input of the MLP output projection at the subject's
   last token, averaged over the context templates of each type, then over the types, as the
   reference's ``compute_ks``: with ``[["{}"], five prefixes]`` the bare prompt weighs ½), the
   residual ``R = Z − H_{l_L}`` (what the block output at ``l_L`` still lacks), of which this
   layer writes ``R / (layers left)``, via

       ΔW_l = R_l K_lᵀ (λ C_l + K_l K_lᵀ)⁻¹            (paper eq. 14, float64)

   with ``C_l`` the second moment of the layer's keys on generic text.

**Storage.** ``ΔW_l = B A`` is stored as its exact factors ``B = R_l`` (``[d_out, n]``) and
``A = ((λC + KKᵀ)⁻¹ K)ᵀ`` (``[n, d_in]``): a LoRA of rank ``n``. When ``n`` exceeds
``dense_fraction · min(d_in, d_out)`` (default one half), the factors would be larger than the
matrix, so the delta is stored dense instead — still exact, no truncation
(:meth:`hf_knowedit.deltas.ModuleDelta.from_factors`).

**Layers.** Explicit indices; ``None`` for the default band (``band_size`` consecutive layers,
5 by default, starting at ``round(num_layers / 8)`` and ending before the last layer — for
Llama-3-8B that is the reference's ``[4..8]``, for SmolLM2-135M ``[4..8]``); or ``"auto"``: a band
of ``band_size`` layers centred on the peak of the MLP's indirect effect found by causal tracing
(:func:`hf_knowedit.tracing.suggest_layers`; run :func:`hf_knowedit.tracing.trace_facts` on the
model first).

**Large batches.** ``max_batch`` bounds one solve (default 10,000, the paper's largest run). A
larger batch raises :class:`~hf_knowedit.errors.BatchTooLargeError` unless ``chunk=True``, which
edits ``max_batch`` requests at a time, each chunk on top of the previous ones, into one edit set.

    >>> es = model.apply_edits(facts, method="memit")                 # default band
    >>> es = model.apply_edits(facts, method="memit", layers=[3, 4, 5], mom2_update_weight=2e4)

**λ.** ``mom2_update_weight=None`` (default) scales GPT-J's 15,000 by the key dimension
(:func:`hf_knowedit.methods.solvers.scaled_mom2_weight`: λ ≈ 1,406 on SmolLM2-135M); a number is used as is.

AlphaEdit (``alphaedit.py``) and EMMET (``emmet.py``) reuse :func:`prepare` and :func:`mass_edit`
with their own per-layer solver.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from huggingface_hub.utils import tqdm
from torch import nn

from ..architectures import (
    execution_device,
    get_architecture,
    get_module,
    layer_path,
    mlp_out_gate_path,
    mlp_out_path,
    mlp_post_norm_gain_eps,
    mlp_post_norm_path,
    num_layers,
    residual_scale,
)
from ..deltas import ModuleDelta
from ..errors import BatchTooLargeError, InvalidConfigError, UnsupportedArchitectureError
from ..hooks import LowRankHook, module_hook, remove_hooks
from ..requests import EditRequest
from ..tracing import suggest_layers
from .config import EditConfig, option, with_aliases
from .context import flatten, template_groups
from .keys import compute_keys, output_at_subject
from .nas import anchored_targets, mlp_values, reference_norm, rescale_to_hidden_norm
from .registry import EditContext, MethodResult, register_method
from .solvers import cached_inverse, memit_factors, scaled_mom2_weight, spread_residual
from .statistics import second_moment_for
from .targets import optimize_targets

logger = logging.getLogger(__name__)

Factors = tuple[torch.Tensor, torch.Tensor]  # (B [d_out, n], A [n, d_in])
#: ``solve(index, layer, keys [n, d_in], resid [n, d_out]) -> (B, A)`` for one critical layer
LayerSolver = Callable[[int, int, torch.Tensor, torch.Tensor], Factors]


@with_aliases
@dataclass
class MassEditConfig(EditConfig):
    """Hyper-parameters every MEMIT-family method shares: :class:`~hf_knowedit.methods.config.EditConfig`
    (target vectors ``z``, context templates, statistics), plus the layer band and the batch limits.

    Against the reference's ``hparams/MEMIT/EleutherAI_gpt-j-6B.json`` and AlphaEdit's
    ``hparams/MEMIT/Llama3-8B.json``: ``v_num_grad_steps`` 25, ``v_weight_decay`` 0.5, ``kl_factor`` 0.0625,
    ``clamp_norm_factor`` 0.75, ``early_stop`` 0.05 and ``mom2_dtype`` float32 are theirs. What differs:

    * Adam's rate is relative: ``v_lr=None`` means ``v_lr_relative · RMS(h)`` per request; theirs is an absolute
      0.5 (GPT-J) or 0.1 (Llama-3-8B), which ``v_lr=`` restores.
    * λ (:class:`MEMITConfig`) scales with the key dimension: 15,000 at GPT-J's d_in of 16,384 as theirs,
      13,125 at Llama-3-8B's 14,336 where theirs is 15,000.
    * The band is ``band_size=5`` layers from ``round(L / 8)``: ``[4..8]`` on Llama-3-8B as theirs, on GPT-J
      ``[4..8]`` against their ``[3..8]``.
    * All ``z`` are optimised in one batch (``serial_targets=True``: one request at a time, as theirs).
    * ``C`` averages ``ceil(10 · d_in)`` tokens of the default corpus (``mom2_n_keys``); theirs 100,000
      Wikipedia articles (``mom2_n_samples``).
    * ``context_templates=5`` are five prefixes of ``context_length`` new tokens from seeded sampling;
      ``"reference"`` follows their recipe (lengths counting the start word).

    :meth:`~hf_knowedit.methods.config.EditConfig.from_reference` reads their files as they are."""

    #: below this many multiples of d_in keys (``mom2_n_keys``) a warning says C is too coarse for MEMIT
    #: (``docs/results/minimal_precomputation.md``)
    min_n_keys: ClassVar[float] = 10.0

    v_num_grad_steps: int = option(25, "forward passes of the z optimisation at most", "int>=1")
    v_lr_relative: float = option(0.1, "z's Adam rate = this * RMS(h) per request when v_lr is None", "num>0")
    clamp_norm_factor: float = option(0.75, "‖δ‖ ≤ clamp_norm_factor · ‖h‖ (residual-stream norm)", "num>0")
    band_size: int = option(5, "number of critical layers when layers is None or 'auto'", "int>=1")
    serial_targets: bool = option(False, "optimise z one request at a time (reference behaviour)", "bool")
    target_batch_tokens: int = option(2048, "memory budget of z optimisation: padded tokens per pass", "int>=1")
    max_batch: int = option(10_000, "most requests in one solve", "int>=1")
    chunk: bool = option(False, "edit batches above max_batch in chunks instead of refusing", "bool")
    dense_fraction: float = option(0.5, "store ΔW dense when its rank > this · min(d_in, d_out)", "(0,1]")
    nas: bool = option(
        False, "NAS: rescale the MLP value v* = v0 + δ to the original model's reference norm (methods/nas.py)", "bool"
    )
    nas_reference_size: int = option(
        1000, "NAS: most requests (of the first NAS call) whose ‖v*‖ set the reference norm", "int>=1"
    )
    z_to_hidden_norm: bool = option(
        False, "rescale each solved z to the norm of the hidden state it started from (not NAS)", "bool"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.nas and self.z_to_hidden_norm:
            raise InvalidConfigError(
                f"{type(self).__name__}: nas=True and z_to_hidden_norm=True both rescale z; choose one "
                "(nas is the paper's NAS, z_to_hidden_norm the whole z rescaled to ‖h‖)."
            )


@with_aliases
@dataclass
class MEMITConfig(MassEditConfig):
    """MEMIT hyper-parameters: :class:`MassEditConfig` plus λ. The reference uses 15,000 for GPT-J and
    Llama-3-8B and 20,000 for GPT-2 XL; λ's effect depends on the key dimension, so the default
    (``None``) scales GPT-J's value to the model (:func:`hf_knowedit.methods.solvers.scaled_mom2_weight`):
    equal to the reference's on GPT-J only."""

    mom2_update_weight: float | None = option(
        None, "λ: weight of preserving C against writing the edits (None: 15000 * d_in / 16384)", "?num>=0"
    )


# -----------------------------------------------------------------------------
# which layers


def default_band(n_layers: int, size: int = 5) -> list[int]:
    """``size`` consecutive layers from ``round(n_layers / 8)``, ending before the last layer."""
    size = max(1, min(size, n_layers - 1 if n_layers > 1 else 1))
    start = max(0, min(int(round(n_layers / 8)), n_layers - 1 - size))
    return list(range(start, start + size))


def band_around(peak: int, n_layers: int, size: int) -> list[int]:
    """``size`` consecutive layers centred on ``peak``, shifted to fit inside the model."""
    size = max(1, min(size, n_layers))
    start = min(max(0, peak - size // 2), n_layers - size)
    return list(range(start, start + size))


def resolve_layers(
    ctx: EditContext, band_size: int, default: Callable[[nn.Module, int], list[int]] | None = None
) -> list[int]:
    """Explicit layers as given; ``None`` → ``default(model, band_size)`` (:func:`default_band` unless
    given); ``"auto"`` → a band at the traced peak."""
    n = num_layers(ctx.model)
    if ctx.layers is None:
        return default(ctx.model, band_size) if default is not None else default_band(n, band_size)
    if ctx.layers == "auto":
        peak = int(suggest_layers(ctx.model, kind="mlp", count=1)[0])
        return band_around(peak, n, band_size)
    return list(ctx.layers)


def check_batch(requests: Sequence[EditRequest], cfg: Any) -> list[list[EditRequest]]:
    """The batch as chunks of at most ``cfg.max_batch`` requests (one chunk unless ``cfg.chunk``)."""
    if not requests:
        raise InvalidConfigError("No edit requests given: pass at least one.")
    if len(requests) > cfg.max_batch and not cfg.chunk:
        raise BatchTooLargeError(
            f"{len(requests)} requests exceed max_batch={cfg.max_batch}. Pass chunk=True to edit them "
            f"{cfg.max_batch} at a time, or raise max_batch."
        )
    return [list(requests[i : i + cfg.max_batch]) for i in range(0, len(requests), cfg.max_batch)]


# -----------------------------------------------------------------------------
# updates in place while computing: forward hooks, never the weights


class PendingDeltas:
    """Adds ``x Aᵀ Bᵀ`` to the MLP output projection of each layer that has factors, through
    :class:`~hf_knowedit.hooks.LowRankHook` forward hooks (removed on exit), so later layers' keys
    and residuals see the earlier layers' updates while the weights stay untouched."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.arch = get_architecture(model)
        self.hooks: dict[int, LowRankHook] = {}
        self._handles: list[Any] = []

    def add(self, layer: int, B: torch.Tensor, A: torch.Tensor) -> None:
        if layer not in self.hooks:
            path = mlp_out_path(self.arch, layer)
            self.hooks[layer] = module_hook(self.model, path, self.arch.mlp_out_layout, [], owner=threading.get_ident())
            module = get_module(self.model, path)
            self._handles.append(module.register_forward_hook(self.hooks[layer]))
        self.hooks[layer].factors.append((B.float(), A.float()))

    def merged(self, layer: int) -> Factors:
        """All factors of ``layer`` concatenated: ``B = [B_1 ... B_c]``, ``A = [A_1; ...; A_c]``."""
        Bs, As = zip(*self.hooks[layer].factors)
        return torch.cat(Bs, dim=1), torch.cat(As, dim=0)

    def close(self) -> None:
        try:
            remove_hooks(self._handles)
        finally:
            self._handles.clear()

    def __enter__(self) -> PendingDeltas:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# -----------------------------------------------------------------------------
# the MEMIT core shared by MEMIT, AlphaEdit and EMMET


@torch.no_grad()
def block_output_at_subject(
    model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest], layer: int, batch_size: int = 64
) -> torch.Tensor:
    """``h_layer`` (block output) at the subject's last token of each request's plain prompt,
    ``[n, d_model]`` float32."""
    return output_at_subject(model, tokenizer, requests, layer_path(get_architecture(model), layer), batch_size)


def through_post_norm(
    norm: nn.Module, gain: torch.Tensor, eps: float, x: torch.Tensor, change: torch.Tensor
) -> torch.Tensor:
    """The change ``Δx`` of an RMS norm's input ``x`` ``[n, d]`` that moves its output as near as it can to
    ``y + change`` (``[n, d]``) while keeping each row's scale ``mean(x²)``.

    For architectures whose MLP output passes a norm before the residual add (Gemma 2/3, OLMo 2/3, EXAONE 4):
    MEMIT's residual is a change of the block output, but ``ΔW`` changes the norm's input. The norm is
    ``y = g ⊙ x / sqrt(mean(x²) + eps)`` with the gain ``g`` and ``eps`` read from the module through the
    architecture table (:func:`~hf_knowedit.architectures.mlp_post_norm_gain_eps`); ``norm`` itself is run
    on ``x`` to check that form (a norm that computes something else raises
    :class:`~hf_knowedit.errors.UnsupportedArchitectureError`).

    At input scale ``r² = mean(x²)`` the norm's outputs are exactly the ``y' = g ⊙ w`` with
    ``mean(w²) = r² / (r² + eps)``, the input being ``x' = w sqrt(r² + eps)``. The target is replaced by the
    nearest such output (:func:`nearest_on_sphere`), so every output of an input of ``x``'s scale is reached
    exactly, whatever ``r`` is relative to 1 or to ``eps``. Deliberately not used: a target with
    ``m = mean((t / g)²) < 1`` is also the output of ``x' = c t / g``, ``c = sqrt(eps / (1 − m))``, at another
    scale. Unless ``eps`` is comparable to ``r²`` that moves the output's size by ``O(eps / r²)`` for an
    input cancelled towards ``sqrt(eps)`` (a smaller target) or blown up (a larger one): ``ΔW`` would have to
    cancel the MLP output at this key while its other contexts' keys, which the same ``ΔW`` moves differently,
    go through a norm that then magnifies what is left by ``1 / sqrt(eps)``. The part of a target the norm
    cannot give at this scale (its size, where it differs) is logged at debug level and left out.

    Float64 inside, float32 result on ``x``'s device."""
    x = x.double()
    g = gain.to(x.device, torch.float64)
    ms_x = x.pow(2).mean(dim=1, keepdim=True)
    y = g * x / (ms_x + eps).sqrt()
    with torch.no_grad():
        actual = norm(x.float()).double()
    if not torch.allclose(actual, y, rtol=1e-3, atol=1e-3 * float(y.abs().max())):
        raise UnsupportedArchitectureError(
            f"The norm after this architecture's MLP ({type(norm).__name__}) does not compute "
            f"(offset + weight) ⊙ x / sqrt(mean(x²) + eps) with the table's gain offset and eps = {eps:g}; the "
            "MEMIT family cannot map residual changes through it. Edit with ROME, or correct the architecture "
            "table's mlp_post_norm_eps / mlp_post_norm_gain_offset for this model type."
        )
    target = y + change.double()
    radius2 = ms_x / (ms_x + eps)  # mean(w²) of every output at this input scale
    w = nearest_on_sphere(g, target, radius2)
    if logger.isEnabledFor(logging.DEBUG):
        miss = (g * w - target).norm(dim=1) / change.double().norm(dim=1).clamp_min(1e-300)
        logger.debug(
            "post-MLP norm: the nearest outputs at the inputs' scale miss the targets by %.3g (mean), %.3g (max) "
            "of the wanted change",
            float(miss.mean()),
            float(miss.max()),
        )
    return (w * (ms_x + eps).sqrt() - x).float()


def nearest_on_sphere(g: torch.Tensor, t: torch.Tensor, ms: torch.Tensor, iters: int = 100) -> torch.Tensor:
    """``argmin_w ‖g ⊙ w − t‖`` over ``mean(w²) = ms`` (per row): ``w = g t / (g² + μ)`` with ``μ`` found by
    bisection on ``mean(w²) = ms``. Where ``g`` is small the target's coordinates are not blown up (dividing
    ``t`` by ``g`` would let them decide the direction); a reachable target gives ``μ = 0``, ``w = t / g``."""
    g2 = g.pow(2)
    lo = torch.full_like(ms, -float(g2.min()) + 1e-12 * float(g2.max()))
    hi = torch.full_like(ms, float(g2.max()))
    while True:  # widen until mean(w(hi)²) <= ms
        w = g * t / (g2 + hi)
        if bool((w.pow(2).mean(dim=1, keepdim=True) <= ms).all()):
            break
        hi = hi * 4
    for _ in range(iters):
        mid = (lo + hi) / 2
        too_big = (g * t / (g2 + mid)).pow(2).mean(dim=1, keepdim=True) > ms
        lo, hi = torch.where(too_big, mid, lo), torch.where(too_big, hi, mid)
    w = g * t / (g2 + hi)
    return w * (ms / w.pow(2).mean(dim=1, keepdim=True)).sqrt()  # exactly on the sphere


def optimize_z(ctx: EditContext, requests: Sequence[EditRequest], layer: int, templates: Sequence[str]) -> torch.Tensor:
    """MEMIT's target vectors ``z`` at the block output of ``layer``: ``[n, d_model]`` float32."""
    cfg = ctx.config
    n = len(requests)
    with tqdm(
        total=cfg.v_num_grad_steps, desc=f"z for {n} requests", unit="step", leave=False, disable=cfg.serial_targets
    ) as bar:

        def progress(step: int, losses: torch.Tensor) -> None:
            bar.update(1)
            bar.set_postfix(above_stop=int((losses >= cfg.early_stop).sum()), mean_loss=f"{float(losses.mean()):.3f}")

        result = optimize_targets(
            ctx.model,
            ctx.tokenizer,
            list(requests),
            layer,
            cfg,
            site="residual",
            templates=templates,
            batched=not cfg.serial_targets,
            batch_tokens=cfg.target_batch_tokens,
            progress=progress,
        )
    losses = torch.tensor(result.losses)
    logger.info(
        "z for %d requests at layer %d: mean %.1f steps, mean final loss %.3f, %d still above early_stop=%g",
        n,
        layer,
        sum(result.steps_taken) / max(n, 1),
        float(losses.mean()),
        int((losses >= cfg.early_stop).sum()),
        cfg.early_stop,
    )
    z = result.targets
    if cfg.nas:  # NAS (methods/nas.py): the MLP's value v0 + δ anchored to the original model's norm
        reference = reference_norm(ctx.model, ctx.tokenizer, ctx.requests, layer, cfg)
        v0 = mlp_values(ctx.model, ctx.tokenizer, requests, layer, templates[0]).to(z.device)
        z, dropped = anchored_targets(z, result.init, v0, reference)
        logger.info(
            "NAS at layer %d: v* rescaled to ν = %.4g; %d of %d requests above 2ν keep v0 (δ dropped)",
            layer,
            reference,
            int(dropped.sum()),
            n,
        )
    elif cfg.z_to_hidden_norm:
        z = rescale_to_hidden_norm(z, result.init)
    return z.float().cpu()


def spread_updates(
    ctx: EditContext,
    requests: Sequence[EditRequest],
    layers: Sequence[int],
    templates: Sequence[str] | Sequence[Sequence[str]],
    solve: LayerSolver,
    pending: PendingDeltas,
) -> dict[int, torch.Tensor]:
    """Steps 1-2 of MEMIT for one batch: optimise ``z`` at the last layer, then write the residual
    into the layers in ascending order with ``solve``. Each layer's factors are added to
    ``pending`` (so the next layer sees them). Returns each layer's keys ``[n, d_in]``.

    ``templates``: groups of context templates (:func:`hf_knowedit.methods.context.template_groups`;
    a flat list is one group). ``z`` is optimised over all of them once (the reference's
    ``compute_z`` flattens them); keys are averaged per group, then across groups (``compute_ks``)."""
    z_layer = layers[-1]
    z = optimize_z(ctx, requests, z_layer, flatten(templates))
    all_keys: dict[int, torch.Tensor] = {}
    for i, layer in enumerate(layers):
        keys = compute_keys(ctx.model, ctx.tokenizer, list(requests), layer, templates).float().cpu()
        current = block_output_at_subject(ctx.model, ctx.tokenizer, requests, z_layer)
        # the block adds residual_scale · (MLP output) to the stream (Granite's residual_multiplier)
        resid = spread_residual(z - current, i, len(layers)) / residual_scale(ctx.model, pending.arch)
        gate_path = mlp_out_gate_path(pending.arch, layer)
        if gate_path is not None:  # the block scales mlp_out's output by sigmoid(gate) (Qwen2-MoE's shared expert)
            resid = resid / torch.sigmoid(output_at_subject(ctx.model, ctx.tokenizer, requests, gate_path))
        norm_path = mlp_post_norm_path(pending.arch, layer)
        if norm_path is not None:  # ΔW changes the norm's input: map the block-output change through it
            x = output_at_subject(ctx.model, ctx.tokenizer, requests, mlp_out_path(pending.arch, layer))
            norm = get_module(ctx.model, norm_path)
            gain, eps = mlp_post_norm_gain_eps(ctx.model, pending.arch, layer)
            dev = execution_device(norm)
            resid = through_post_norm(norm, gain, eps, x.to(dev), resid.to(dev)).cpu()
        logger.info(
            "MEMIT layer %d: %d keys, mean residual norm %.4g (layer %d of %d)",
            layer,
            len(requests),
            float((z - current).norm(dim=1).mean()),
            i + 1,
            len(layers),
        )
        device = execution_device(get_module(ctx.model, mlp_out_path(pending.arch, layer)))  # where C_l lives
        B, A = solve(i, layer, keys.to(device), resid.to(device))
        pending.add(layer, B, A)
        all_keys[layer] = keys
    return all_keys


def second_moments(ctx: EditContext, layers: Sequence[int]) -> dict[int, Any]:
    """The second moment ``C_l`` of each layer's keys, as ROME computes it (``mom2``, ``mom2_corpus``,
    ``mom2_n_tokens``, ``mom2_dtype``; cached per model and on disk by :mod:`hf_knowedit.methods.statistics`)."""
    return {layer: second_moment_for(ctx.model, ctx.tokenizer, layer, ctx.config) for layer in layers}


def edit_templates(ctx: EditContext) -> list[list[str]]:
    """MEMIT's context templates as groups, ``[["{}"], [five short generated prefixes]]`` by default
    (:func:`hf_knowedit.methods.context.template_groups`; cached per model)."""
    return template_groups(ctx.model, ctx.tokenizer, ctx.config)


# -----------------------------------------------------------------------------
# MEMIT


def prepare(
    ctx: EditContext, default_layers: Callable[[nn.Module, int], list[int]] | None = None
) -> tuple[list[list[EditRequest]], list[int], dict[int, Any], list[list[str]]]:
    """What every MEMIT-family call needs first: the request chunks, the layers (``layers=None``:
    ``default_layers(model, band_size)``, MEMIT's :func:`default_band` unless given), each layer's
    second moment and the context templates (as groups)."""
    cfg = ctx.config
    chunks = check_batch(ctx.requests, cfg)
    layers = resolve_layers(ctx, cfg.band_size, default_layers)
    return chunks, layers, second_moments(ctx, layers), edit_templates(ctx)


def mass_edit(
    ctx: EditContext,
    chunks: Sequence[Sequence[EditRequest]],
    layers: Sequence[int],
    templates: Sequence[str] | Sequence[Sequence[str]],
    solve: LayerSolver,
    on_keys: Callable[[dict[int, torch.Tensor]], None] | None = None,
) -> dict[str, ModuleDelta]:
    """Edit the chunks one after another (each on top of the previous ones, through hooks) with the
    layer solver ``solve``; ``on_keys(keys per layer)`` after each chunk. Returns one
    :class:`ModuleDelta` per layer, exact factors or dense above ``dense_fraction`` of full rank.
    With ``nas``, NAS's reference norm is measured (or read from the cache) first, before any update is hooked in."""
    if getattr(ctx.config, "nas", False):
        reference_norm(ctx.model, ctx.tokenizer, ctx.requests, layers[-1], ctx.config)
    with PendingDeltas(ctx.model) as pending:
        for chunk in chunks:
            keys = spread_updates(ctx, chunk, layers, templates, solve, pending)
            if on_keys is not None:
                on_keys(keys)
    return {
        mlp_out_path(pending.arch, layer): ModuleDelta.from_factors(
            *pending.merged(layer), dense_fraction=ctx.config.dense_fraction
        )
        for layer in layers
    }


def compute(ctx: EditContext) -> MethodResult:
    """MEMIT for ``ctx.requests`` (see the module docstring)."""
    chunks, layers, stats, templates = prepare(ctx)

    def solve(i: int, layer: int, keys: torch.Tensor, resid: torch.Tensor) -> Factors:
        lam = scaled_mom2_weight(keys.shape[1], ctx.config.mom2_update_weight)
        return memit_factors(keys, resid, stats[layer].matrix, lam, cov_solve=cached_inverse(stats[layer]))

    return MethodResult(
        deltas=mass_edit(ctx, chunks, layers, templates, solve),
        layers=layers,
        stats_key={l: s.key for l, s in stats.items()},
    )


register_method("memit", compute, MEMITConfig)
