"""Routed experts as one linear map: how ROME and the MEMIT family edit a mixture-of-experts block.

A mixture-of-experts block adds to the residual stream, at a token ``x`` routed to the experts ``T(x)``
with weights ``g_e(x)``::

    m(x) = Σ_{e ∈ T(x)} g_e(x) · W_e k_e(x),     k_e(x) = act(G_e x) ⊙ (U_e x)

(``W_e = down_proj[e]``, ``[G_e; U_e] = gate_up_proj[e]``). With the routing held as it is, that is one
linear map ``W = [W_0 … W_{E-1}]`` (``[d, E·I]``) applied to the *routed key*::

    κ(x) = [g_0 k_0(x); …; g_{E-1} k_{E-1}(x)]     (zero in the blocks of experts not routed to)

so ROME and MEMIT edit ``W`` as they edit a dense ``down_proj``: keys are routed keys, the second moment
``C = E[κ κᵀ]`` is taken over the tokens of the statistics corpus as they are routed (its diagonal blocks
are each expert's own keys, weighted by their routing weights; off-diagonal blocks couple experts that
share tokens), and an update ``ΔW = [ΔW_0 … ΔW_{E-1}]`` changes each expert's ``down_proj`` by its block.
A request's key is non-zero only in the experts its subject's last token is routed to; the least-squares
solve spreads the target over them in proportion to what reaches the residual stream, and keeps every
statistics token's output, as MEMIT does for a dense MLP. The routers are not edited: the routing of the
edited layer is unchanged, and later layers' routing changes only as far as their inputs do
(:func:`hf_knowedit.evaluation.routing.routing_change` measures it).

The table's ``mlp_out_layout="experts"`` declares this form: ``mlp_out`` is a module holding
``gate_up_proj [E, 2I, d]`` (gate rows first) and ``down_proj [E, d, I]``, an ``act_fn``, and a forward
``(hidden_states [N, d], top_k_index [N, k], top_k_weights [N, k]) -> [N, d]`` that returns the sum above
(transformers' standard experts module, e.g. Mixtral, Qwen3-MoE, OLMoE). Forms that weight an expert's
input rather than its output (Llama 4) are not of this kind.

``mlp_out_layout="experts_t"`` declares GPT-OSS's form, the same sum with biases and parameters stored
transposed: ``gate_up_proj [E, d, 2I]`` (gate and up columns interleaved), ``gate_up_proj_bias [E, 2I]``,
``down_proj [E, I, d]`` (``W_eᵀ``), ``down_proj_bias [E, d]``, and the module's own gate ``_apply_gate``
(GPT-OSS: a clamped SwiGLU with ``up + 1``)::

    m(x) = Σ_{e ∈ T(x)} g_e(x) · (W_e k_e(x) + b_e),
    k_e(x) = _apply_gate(x @ gate_up_proj[e] + gate_up_proj_bias[e])

The routed key is computed with that ``_apply_gate``, so it is the model's own arithmetic. ``ΔW`` acts on
``κ(x)`` only: the experts' down biases ``b_e`` (their routing-weighted sum ``Σ g_e b_e`` is a part of the
output that no key carries) and the gate / up biases are never edited.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .architectures import EXPERT_LAYOUTS, get_module, read_tensor
from .errors import UnsupportedArchitectureError

__all__ = ["routed_keys", "routing_inputs", "expert_keys", "expert_dims", "module_key", "traced_key", "gate_up_of"]

#: the experts' parameter holding ``[G_e; U_e]`` for every expert ``e``: ``[E, 2I, d]`` (``experts_t``: ``[E, d, 2I]``)
GATE_UP = "gate_up_proj"
#: the experts' parameters a routed key reads, per layout (``experts_t``: the gate / up bias too)
KEY_PARAMS = {"experts": (GATE_UP,), "experts_t": (GATE_UP, "gate_up_proj_bias")}


def routing_inputs(args: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if len(args) < 3:
        raise UnsupportedArchitectureError(
            "a routed experts module must be called as experts(hidden_states, top_k_index, top_k_weights) "
            f"(positionally), but got {len(args)} positional argument(s); this architecture's experts are not of "
            "the form the table's mlp_out_layout='experts' / 'experts_t' declares (hf_knowedit.experts)."
        )
    return args[0], args[1], args[2]


def _expert_keys(experts: nn.Module, layout: str, params: tuple, e: int, x: torch.Tensor) -> torch.Tensor:
    """``k_e(x)`` for the rows ``x`` routed to expert ``e`` (module docstring), in the experts' own arithmetic."""
    if layout == "experts_t":
        gate_up, bias = (p[e].to(x.device) for p in params)
        return experts._apply_gate(x @ gate_up + bias)
    gate, up = F.linear(x, params[0][e].to(x.device)).chunk(2, dim=-1)
    return experts.act_fn(gate) * up


def routed_keys(
    experts: nn.Module,
    hidden: torch.Tensor,
    index: torch.Tensor,
    weights: torch.Tensor,
    gate_up: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
    layout: str = "experts",
) -> torch.Tensor:
    """``κ(x)`` for every row of ``hidden`` ``[N, d]`` (module docstring): ``[N, E·I]`` float32, expert ``e``'s
    block ``g_e(x) · k_e(x)`` where ``e`` is among the row's ``index`` (``[N, k]``, with the weights ``[N, k]``),
    zero elsewhere. Computed with the experts' own activation (``experts_t``: their ``_apply_gate``) and the
    parameters ``layout`` reads (:data:`KEY_PARAMS`; default: the module's own; pass :func:`gate_up_of` where
    accelerate may have offloaded them; a lone tensor is the ``gate_up_proj`` of the ``experts`` layout)."""
    n_experts, inner = expert_dims(experts, gate_up, layout)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    weights = weights.reshape(hidden.shape[0], -1).to(hidden.device)
    keys = torch.zeros(hidden.shape[0], n_experts, inner, dtype=torch.float32, device=hidden.device)
    for e, rows, slot, key in expert_keys(experts, hidden, index, gate_up, layout):
        keys[rows, e] += key.float() * weights[rows, slot, None].float()
    return keys.reshape(hidden.shape[0], n_experts * inner)


def _params(experts: nn.Module, gate_up: Any, layout: str) -> tuple[torch.Tensor, ...]:
    if gate_up is None:
        return tuple(getattr(experts, name) for name in KEY_PARAMS[layout])
    return (gate_up,) if isinstance(gate_up, torch.Tensor) else tuple(gate_up)


def expert_dims(experts: nn.Module, gate_up: Any = None, layout: str = "experts") -> tuple[int, int]:
    """``(E, I)``: the number of experts and their inner size (the key dimension of one expert)."""
    params = _params(experts, gate_up, layout)
    return params[0].shape[0], params[0].shape[2 if layout == "experts_t" else 1] // 2


def expert_keys(
    experts: nn.Module,
    hidden: torch.Tensor,
    index: torch.Tensor,
    gate_up: Any = None,
    layout: str = "experts",
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """For each expert ``e`` some row of ``hidden`` ``[N, d]`` is routed to (``index`` ``[N, k]``):
    ``(e, rows, slots, k_e(hidden[rows]))``, the *un-gated* keys (no routing weight) of the rows routed to ``e``
    (``index[rows, slots] == e``), in the experts' own arithmetic (arguments as :func:`routed_keys`)."""
    params = _params(experts, gate_up, layout)
    n_experts = params[0].shape[0]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    index = index.reshape(hidden.shape[0], -1).to(hidden.device)
    for e in index.unique().tolist():
        if not 0 <= e < n_experts:  # transformers marks dropped slots with index E
            continue
        rows, slot = torch.where(index == e)
        yield e, rows, slot, _expert_keys(experts, layout, params, e, hidden[rows])


def module_key(layout: str, module: nn.Module, args: tuple, gate_up: Any = None) -> Any:
    """The key an edited module ``mlp_out`` acts on in one forward, from its positional ``args``: its input
    (``linear``, ``conv1d``), or the routed keys (``experts``, ``experts_t``: :func:`routed_keys`, with
    ``gate_up``)."""
    if layout in EXPERT_LAYOUTS:
        return routed_keys(module, *routing_inputs(args), gate_up=gate_up, layout=layout)
    return args[0]


def traced_key(layout: str, model: nn.Module, path: str, trace: Any) -> torch.Tensor:
    """The key module ``path`` of ``model`` acted on in a forward a :class:`~hf_knowedit.hooks.Trace` with
    ``retain_input`` saw."""
    if layout not in EXPERT_LAYOUTS:
        return trace.input
    return module_key(layout, get_module(model, path), trace.args, gate_up_of(model, path, layout))


def gate_up_of(model: nn.Module, path: str, layout: str = "experts") -> tuple[torch.Tensor, ...]:
    """The values of the parameters a routed key of the experts module ``path`` reads in ``layout``
    (:data:`KEY_PARAMS`: ``gate_up_proj``, and for ``experts_t`` its bias), also where accelerate offloaded them
    (outside a forward its parameters are then on the meta device: :func:`~hf_knowedit.architectures.read_tensor`)."""
    return tuple(read_tensor(model, f"{path}.{name}") for name in KEY_PARAMS[layout])
