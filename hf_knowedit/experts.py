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
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .architectures import get_module, read_tensor
from .errors import UnsupportedArchitectureError

__all__ = ["routed_keys", "module_key", "traced_key", "gate_up_of"]

#: the experts' parameter holding ``[G_e; U_e]`` for every expert ``e``: ``[E, 2I, d]``
GATE_UP = "gate_up_proj"


def _inputs(args: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if len(args) < 3:
        raise UnsupportedArchitectureError(
            "a routed experts module must be called as experts(hidden_states, top_k_index, top_k_weights) "
            f"(positionally), but got {len(args)} positional argument(s); this architecture's experts are not of "
            "the form the table's mlp_out_layout='experts' declares (hf_knowedit.experts)."
        )
    return args[0], args[1], args[2]


def routed_keys(
    experts: nn.Module,
    hidden: torch.Tensor,
    index: torch.Tensor,
    weights: torch.Tensor,
    gate_up: torch.Tensor | None = None,
) -> torch.Tensor:
    """``κ(x)`` for every row of ``hidden`` ``[N, d]`` (module docstring): ``[N, E·I]`` float32, expert ``e``'s
    block ``g_e(x) · act(G_e x) ⊙ (U_e x)`` where ``e`` is among the row's ``index`` (``[N, k]``, with the
    weights ``[N, k]``), zero elsewhere. Computed with the experts' own activation and ``gate_up`` (default:
    their ``gate_up_proj``; pass :func:`gate_up_of` where accelerate may have offloaded it)."""
    gate_up = getattr(experts, GATE_UP) if gate_up is None else gate_up
    n_experts, two_inner, _ = gate_up.shape
    inner = two_inner // 2
    hidden = hidden.reshape(-1, hidden.shape[-1])
    index = index.reshape(hidden.shape[0], -1).to(hidden.device)
    weights = weights.reshape(hidden.shape[0], -1).to(hidden.device)
    keys = torch.zeros(hidden.shape[0], n_experts, inner, dtype=torch.float32, device=hidden.device)
    for e in index.unique().tolist():
        if not 0 <= e < n_experts:  # transformers marks dropped slots with index E
            continue
        rows, slot = torch.where(index == e)
        gate, up = F.linear(hidden[rows], gate_up[e].to(hidden.device)).chunk(2, dim=-1)
        key = experts.act_fn(gate) * up
        keys[rows, e] += key.float() * weights[rows, slot, None].float()
    return keys.reshape(hidden.shape[0], n_experts * inner)


def module_key(layout: str, module: nn.Module, args: tuple, gate_up: torch.Tensor | None = None) -> Any:
    """The key an edited module ``mlp_out`` acts on in one forward, from its positional ``args``: its input
    (``linear``, ``conv1d``), or the routed keys (``experts``: :func:`routed_keys`, with ``gate_up``)."""
    if layout == "experts":
        return routed_keys(module, *_inputs(args), gate_up=gate_up)
    return args[0]


def traced_key(layout: str, model: nn.Module, path: str, trace: Any) -> torch.Tensor:
    """The key module ``path`` of ``model`` acted on in a forward a :class:`~hf_knowedit.hooks.Trace` with
    ``retain_input`` saw."""
    if layout != "experts":
        return trace.input
    return module_key(layout, get_module(model, path), trace.args, gate_up_of(model, path))


def gate_up_of(model: nn.Module, path: str) -> torch.Tensor:
    """The ``gate_up_proj`` values of the experts module ``path``, also where accelerate offloaded it (outside
    a forward its parameters are then on the meta device: :func:`~hf_knowedit.architectures.read_tensor`)."""
    return read_tensor(model, f"{path}.{GATE_UP}")
