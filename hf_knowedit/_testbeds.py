"""Mixture-of-experts test beds made from a real dense model ("upcycling").

Test infrastructure, not part of the core import path (``import hf_knowedit`` does not import this
module), like :mod:`hf_knowedit._bundled`. :func:`upcycle_moe` turns a dense Llama-architecture model
(the bundled SmolLM2-135M-Instruct) into a transformers mixture-of-experts model that knows what the
dense model knows, so that editing and routing measurements on MoE architectures can be run on real
knowledge without downloading an MoE checkpoint:

* ``"mixtral"``: ``MixtralForCausalLM``. Every routed expert is a copy of the dense MLP (transformers
  5.x fused layout: ``experts.gate_up_proj [E, 2I, H]`` is ``[gate_proj; up_proj]`` stacked per expert,
  ``experts.down_proj [E, H, I]``). Mixtral renormalises the top-k routing weights to sum to 1, so
  identical experts give exactly the dense MLP.
* ``"qwen2_moe"``: ``Qwen2MoeForCausalLM`` with a shared expert. The shared expert is a copy of the
  dense MLP, ``shared_expert_gate`` is zero (``sigmoid(0) = 1/2``), the routed experts are copies with
  ``down_proj`` halved and ``norm_topk_prob=True``; the block's output is ``MLP/2 + MLP/2 = MLP``. The
  attention's q/k/v biases (Qwen2-MoE has them) are zero.

The router of each block is random (seeded) but calibrated on a few sentences of ordinary text
(:data:`CALIBRATION_TEXT`) run through the dense model: its rows are orthonormal random directions in
the space of the block's MLP inputs whitened per dimension (``x / std``), orthogonal to the mean input,
so that the mean token gets equal logits for every expert and the logits of a token have a standard
deviation of about 1. Of 8 seeded draws per block, the one that spreads the calibration tokens' top-k
slots most evenly is kept. ``perturb > 0`` multiplies each routed expert's weights elementwise by
``1 + perturb * noise`` (seeded standard Gaussian noise), so that the experts differ slightly and
routing matters. ``docs/design.md`` ("Mixture-of-experts test bed") has the measurements.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .architectures import get_architecture, get_module, layer_path, model_device, num_layers
from .errors import InvalidConfigError, MissingTokenizerError, UnsupportedArchitectureError
from .hooks import remove_hooks

__all__ = ["KINDS", "CALIBRATION_TEXT", "upcycle_moe"]

KINDS = ("mixtral", "qwen2_moe")
#: router candidates drawn per block; the one spreading the calibration tokens most evenly is kept
ROUTER_DRAWS = 8
#: ordinary sentences whose MLP inputs calibrate the routers (no benchmark data)
CALIBRATION_TEXT = (
    "The history of the city goes back more than a thousand years.",
    "She studied physics at the university and later worked as an engineer.",
    "Football is played by two teams of eleven players on a rectangular field.",
    "The company announced its quarterly results on Tuesday, beating expectations.",
    "Rivers carry water from the mountains to the sea, shaping valleys on the way.",
    "He was born in a small village and moved to the capital when he was twenty.",
    "The recipe calls for two cups of flour, one egg and a pinch of salt.",
    "In 1969 the first humans walked on the Moon during the Apollo 11 mission.",
)
#: the dense model's config fields that change the math, carried over unchanged to both kinds
_CARRIED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "attention_dropout",
    "initializer_range",
)


def _check_dense(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != "llama":
        raise UnsupportedArchitectureError(
            f"upcycle_moe copies a Llama-architecture model (config.model_type 'llama', e.g. the bundled "
            f"SmolLM2: hf_knowedit._bundled.load_smollm2()), got {getattr(config, 'model_type', None)!r}"
        )
    biased = [f for f in ("attention_bias", "mlp_bias") if getattr(config, f, False)]
    if biased or getattr(config, "pretraining_tp", 1) != 1:
        raise UnsupportedArchitectureError(
            f"upcycle_moe copies Llama models without biases and with pretraining_tp=1; this one has "
            f"{', '.join(biased) or 'pretraining_tp=' + str(config.pretraining_tp)}"
        )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim * config.num_attention_heads != config.hidden_size:
        # Qwen2-MoE's attention takes head_dim = hidden_size // num_attention_heads
        raise UnsupportedArchitectureError(
            f"upcycle_moe needs head_dim * num_attention_heads == hidden_size, got {head_dim} * "
            f"{config.num_attention_heads} != {config.hidden_size}"
        )
    return config


def _check_args(kind: Any, n_experts: Any, top_k: Any, perturb: Any, seed: Any) -> None:
    if kind not in KINDS:
        raise InvalidConfigError(f"kind must be one of {KINDS}, got {kind!r}")
    for name, value in (("n_experts", n_experts), ("top_k", top_k), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidConfigError(f"{name} must be an int, got {value!r}")
    if not 1 <= top_k < n_experts:
        raise InvalidConfigError(
            f"need 1 <= top_k < n_experts (a router that picks every expert routes nothing), got "
            f"top_k={top_k}, n_experts={n_experts}"
        )
    if (
        isinstance(perturb, bool)
        or not isinstance(perturb, (int, float))
        or not (math.isfinite(perturb) and perturb >= 0)
    ):
        raise InvalidConfigError(f"perturb must be a finite number >= 0, got {perturb!r}")


def _moe_config(dense: Any, kind: str, n_experts: int, top_k: int) -> Any:
    from transformers import MixtralConfig, Qwen2MoeConfig

    common = {name: getattr(dense, name) for name in _CARRIED}
    common["rope_parameters"] = dict(dense.rope_parameters)
    common["num_experts_per_tok"] = top_k
    if kind == "mixtral":
        return MixtralConfig(
            **common,
            head_dim=dense.hidden_size // dense.num_attention_heads,
            num_local_experts=n_experts,
            sliding_window=None,
            router_jitter_noise=0.0,
        )
    inner = dense.intermediate_size
    return Qwen2MoeConfig(
        **common,
        num_experts=n_experts,
        moe_intermediate_size=inner,
        shared_expert_intermediate_size=inner,
        norm_topk_prob=True,
        use_sliding_window=False,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        qkv_bias=True,
    )


@torch.no_grad()
def _mlp_inputs(model: nn.Module, tokenizer: Any) -> dict[int, torch.Tensor]:
    """Float64 inputs ``[n_tokens, hidden]`` of each block's MLP on :data:`CALIBRATION_TEXT`."""
    spec = get_architecture(model)
    mlps = {i: get_module(model, f"{layer_path(spec, i)}.mlp") for i in range(num_layers(model, spec))}
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in mlps}
    handles = [
        mlp.register_forward_pre_hook(lambda _m, args, i=i: seen[i].append(args[0][0].double().cpu()))
        for i, mlp in mlps.items()
    ]
    try:
        for text in CALIBRATION_TEXT:  # one at a time: no padding to mask out
            ids = tokenizer(text, return_tensors="pt").input_ids.to(model_device(model))
            model(input_ids=ids, use_cache=False)
    finally:
        remove_hooks(handles)
    return {i: torch.cat(rows) for i, rows in seen.items()}


def _router(x: torch.Tensor, n_experts: int, top_k: int, generator: torch.Generator) -> torch.Tensor:
    """Float64 router weight ``[n_experts, hidden]`` for MLP inputs ``x`` (see the module doc)."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    u = mean / std
    u = u / u.norm()
    best, best_share = None, -1.0
    for _ in range(ROUTER_DRAWS):
        a = torch.randn(x.shape[1], n_experts, generator=generator, dtype=torch.float64)
        q, _ = torch.linalg.qr(a - torch.outer(u, u @ a))  # orthonormal columns, orthogonal to u
        weight = q.T / std
        chosen = (x @ weight.T).topk(top_k, dim=-1).indices
        share = torch.bincount(chosen.flatten(), minlength=n_experts).min().item() / chosen.numel()
        if share > best_share:
            best, best_share = weight, share
    return best


def _noisy(t: torch.Tensor, perturb: float, generator: torch.Generator) -> torch.Tensor:
    """``t * (1 + perturb * noise)``, noise standard Gaussian (``t`` itself when ``perturb == 0``)."""
    if perturb == 0:
        return t
    return t * (1 + perturb * torch.randn(t.shape, generator=generator, dtype=t.dtype))


def _moe_state_dict(
    dense: nn.Module, kind: str, n_experts: int, top_k: int, perturb: float, routers: dict[int, torch.Tensor], generator
) -> dict[str, torch.Tensor]:
    """The MoE model's weights (float32, CPU), named as in its ``state_dict``."""
    dense_weights = {name: t.detach().float().cpu() for name, t in dense.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for name, t in dense_weights.items():
        parts = name.split(".")
        if ".mlp." not in name:  # embeddings, norms, attention, LM head: unchanged
            out[name] = t
            if kind == "qwen2_moe" and parts[-2] in ("q_proj", "k_proj", "v_proj"):
                out[name.replace(".weight", ".bias")] = torch.zeros(t.shape[0])
            continue
        if parts[-2] != "down_proj":  # gate_proj / up_proj: handled with their block's down_proj
            continue
        block = name[: name.index(".mlp.")]
        gate, up = (dense_weights[f"{block}.mlp.{p}.weight"] for p in ("gate_proj", "up_proj"))
        down = t if kind == "mixtral" else t / 2  # Qwen2-MoE: the shared expert gives the other half
        gate_up = torch.cat([gate, up])  # [2I, H]: gate rows first, as the fused experts split it
        out[f"{block}.mlp.experts.gate_up_proj"] = torch.stack(
            [_noisy(gate_up, perturb, generator) for _ in range(n_experts)]
        )
        out[f"{block}.mlp.experts.down_proj"] = torch.stack(
            [_noisy(down, perturb, generator) for _ in range(n_experts)]
        )
        out[f"{block}.mlp.gate.weight"] = routers[int(parts[parts.index("layers") + 1])].float()
        if kind == "qwen2_moe":
            out[f"{block}.mlp.shared_expert.gate_proj.weight"] = gate
            out[f"{block}.mlp.shared_expert.up_proj.weight"] = up
            out[f"{block}.mlp.shared_expert.down_proj.weight"] = t
            out[f"{block}.mlp.shared_expert_gate.weight"] = torch.zeros(1, t.shape[0])
    return out


def upcycle_moe(
    dense_model: nn.Module,
    kind: str,
    n_experts: int = 4,
    top_k: int = 2,
    perturb: float = 0.0,
    seed: int = 0,
    *,
    tokenizer: Any = None,
) -> nn.Module:
    """A transformers mixture-of-experts model (``kind``: ``"mixtral"`` or ``"qwen2_moe"``) holding the
    weights of ``dense_model``, a Llama-architecture ``*ForCausalLM`` (see the module doc for how).

    With ``perturb=0`` it computes what ``dense_model`` computes (up to float rounding) for any routing.
    ``n_experts`` routed experts per block, ``top_k`` of them per token; ``seed`` draws the routers and
    the perturbation noise. ``tokenizer`` (required): ``dense_model``'s, to run :data:`CALIBRATION_TEXT`
    for the routers.

    Returns a new model in eval mode, on ``dense_model``'s device and in its dtype, sharing no storage with
    it, with ``config._name_or_path`` naming the dense model and the construction. ``dense_model`` is left
    as it was. Bad arguments raise :class:`~hf_knowedit.errors.InvalidConfigError`, a model other than a
    bias-free Llama :class:`~hf_knowedit.errors.UnsupportedArchitectureError`, no tokenizer
    :class:`~hf_knowedit.errors.MissingTokenizerError`.
    """
    from transformers import MixtralForCausalLM, Qwen2MoeForCausalLM
    from transformers.initialization import no_init_weights

    dense = _check_dense(dense_model)
    _check_args(kind, n_experts, top_k, perturb, seed)
    if tokenizer is None:
        raise MissingTokenizerError(
            "upcycle_moe needs the dense model's tokenizer (tokenizer=...) to calibrate the routers"
        )
    param = next(dense_model.parameters())
    generator = torch.Generator().manual_seed(seed)

    inputs = _mlp_inputs(dense_model, tokenizer)
    routers = {i: _router(x, n_experts, top_k, generator) for i, x in sorted(inputs.items())}
    weights = _moe_state_dict(dense_model, kind, n_experts, top_k, float(perturb), routers, generator)

    config = _moe_config(dense, kind, n_experts, top_k)
    cls = MixtralForCausalLM if kind == "mixtral" else Qwen2MoeForCausalLM
    with no_init_weights():  # every weight is set from ``weights`` below
        model = cls._from_config(config, dtype=param.dtype, attn_implementation=dense._attn_implementation)
    model.to(param.device)
    model.load_state_dict({k: v.to(param.dtype) for k, v in weights.items()}, strict=True)
    if dense.tie_word_embeddings:
        model.tie_weights()

    base = dense._name_or_path or type(dense_model).__name__
    name = f"{base} upcycled to {kind} ({n_experts} experts, top-{top_k}, perturb={perturb:g}, seed={seed})"
    model.config._name_or_path = name
    model.name_or_path = name
    model.eval()
    return model
