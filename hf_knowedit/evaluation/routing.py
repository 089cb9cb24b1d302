"""Routing stability of mixture-of-experts models: which experts each token is sent to, before and after an edit.

An edit writes into ``mlp_out`` (a dense MLP, or an MoE block's shared expert), never into the routed
experts; but it changes the hidden states of later blocks, and so possibly which experts their routers
choose. :func:`routing_snapshot` records, for every MoE block (the architecture table's ``experts``
column), the top-k expert indices of every token of some texts; :func:`routing_change` compares two
snapshots of the same texts::

    before = routing_snapshot(model, tok, texts)
    hf_knowedit.apply_edits(model, tok, requests, "memit")
    change = routing_change(before, routing_snapshot(model, tok, texts))
    change.fraction, change.per_layer

The decisions are read where the model makes them: a forward pre-hook on each block's routed-experts
module, whose forward receives ``(hidden_states, top_k_index, top_k_weights)`` positionally
(transformers 5.x Mixtral, Qwen2-MoE and their descendants).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..architectures import experts_path, get_architecture, get_module, model_device, num_layers
from ..errors import InvalidConfigError, UnsupportedArchitectureError
from ..hooks import remove_hooks
from ..tokens import check_text, pad_batch, pad_id

__all__ = ["RoutingSnapshot", "RoutingChange", "routing_snapshot", "routing_change"]


@dataclass(frozen=True)
class RoutingSnapshot:
    """The routing of some texts through a mixture-of-experts model.

    Attributes:
        texts: the texts, in order.
        token_ids: each text's token ids (every token is routed; there is no padding here).
        experts: per MoE block index, a ``[n_tokens, top_k]`` int64 CPU tensor: row ``t`` holds the experts
            chosen for token ``t`` of the texts concatenated in order, sorted ascending (the order of the
            top-k does not matter, only the set).
    """

    texts: tuple[str, ...]
    token_ids: tuple[tuple[int, ...], ...]
    experts: dict[int, torch.Tensor]

    @property
    def n_tokens(self) -> int:
        return sum(len(ids) for ids in self.token_ids)


@dataclass(frozen=True)
class RoutingChange:
    """How much routing changed between two snapshots of the same texts.

    Attributes:
        fraction: the fraction of (token, MoE block) pairs whose set of top-k experts changed, over all
            MoE blocks (the mean of ``per_layer``).
        per_layer: per MoE block index, the fraction of tokens whose set of top-k experts changed.
        n_tokens: the number of tokens compared in each block.
    """

    fraction: float
    per_layer: dict[int, float]
    n_tokens: int


def _experts_modules(model: nn.Module) -> dict[int, nn.Module]:
    spec = get_architecture(model)  # raises UnsupportedArchitectureError for an unregistered model_type
    if spec.experts is None:
        raise UnsupportedArchitectureError(
            f"The architecture table has no routed experts for {spec.model_type!r} (a dense model): routing is "
            "measured on mixture-of-experts models only. For a mixture-of-experts model of your own, register "
            "its spec with experts='<path of the routed experts module in a block>' (register_architecture)."
        )
    found = {}
    for layer in range(num_layers(model, spec)):
        try:
            found[layer] = get_module(model, experts_path(spec, layer))
        except InvalidConfigError:  # a dense block of a partly sparse model (e.g. Qwen2-MoE mlp_only_layers)
            continue
    if not found:
        raise UnsupportedArchitectureError(
            f"No block of this {spec.model_type!r} model has a module at {spec.experts!r}, where the architecture "
            "table says the routed experts are; correct the table's experts column (register_architecture)."
        )
    return found


def _check_texts(texts: Any, batch_size: Any) -> tuple[str, ...]:
    if isinstance(texts, str) or not isinstance(texts, Sequence) or not texts:
        raise InvalidConfigError(f"texts must be a non-empty list of strings, got {type(texts).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidConfigError(f"batch_size must be a positive int, got {batch_size!r}")
    return tuple(check_text(t, "text") for t in texts)


@torch.no_grad()
def routing_snapshot(model: nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int = 8) -> RoutingSnapshot:
    """The top-k experts every token of ``texts`` is routed to, in every MoE block of ``model``.

    Texts are tokenized with ``tokenizer`` (its special tokens included) and run in right-padded batches of
    ``batch_size``; padded positions are dropped. Only forward pre-hooks are added, and they are removed
    again, also when the forward raises. The model's weights and mode are left as they are.

    Raises :class:`~hf_knowedit.errors.UnsupportedArchitectureError` for a model without routed experts in
    the architecture table, :class:`~hf_knowedit.errors.InvalidConfigError` for no texts, a text without tokens
    or a bad ``batch_size``, :class:`~hf_knowedit.errors.InvalidRequestError` for a text that is not a string.
    """
    texts = _check_texts(texts, batch_size)
    modules = _experts_modules(model)
    token_ids = []
    for text in texts:
        ids = tuple(tokenizer(text, add_special_tokens=True)["input_ids"])
        if not ids:
            raise InvalidConfigError(f"text {text!r} tokenizes to nothing; routing needs at least one token")
        token_ids.append(ids)
    captured: dict[int, list[torch.Tensor]] = {layer: [] for layer in modules}
    current: dict[str, torch.Tensor] = {}  # the attention mask of the batch being run, flattened

    def hook(layer: int):
        def record(_module: nn.Module, args: tuple) -> None:
            top_k_index = args[1]  # (hidden_states, top_k_index, top_k_weights)
            rows = top_k_index.reshape(current["mask"].numel(), -1)[current["mask"]]
            captured[layer].append(rows.sort(dim=-1).values.cpu())

        return record

    handles = [module.register_forward_pre_hook(hook(layer)) for layer, module in modules.items()]
    try:
        device = model_device(model)
        for start in range(0, len(token_ids), batch_size):
            ids, mask, positions, _ = pad_batch(
                token_ids[start : start + batch_size], pad=pad_id(tokenizer), device=device
            )
            current["mask"] = mask.bool().reshape(-1)
            model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
    finally:
        remove_hooks(handles)
    experts = {layer: torch.cat(rows).to(torch.int64) for layer, rows in captured.items()}
    return RoutingSnapshot(texts=texts, token_ids=tuple(token_ids), experts=experts)


def routing_change(before: RoutingSnapshot, after: RoutingSnapshot) -> RoutingChange:
    """The fraction of tokens whose set of top-k experts differs between two snapshots of the same texts,
    per MoE block and over all of them (:class:`RoutingChange`). Identical routing gives 0.

    Snapshots of different texts, tokens or MoE blocks raise :class:`~hf_knowedit.errors.InvalidConfigError`.
    """
    for name, snap in (("before", before), ("after", after)):
        if not isinstance(snap, RoutingSnapshot):
            raise InvalidConfigError(
                f"{name} must be a RoutingSnapshot (routing_snapshot(...)), got {type(snap).__name__}"
            )
    if before.texts != after.texts or before.token_ids != after.token_ids:
        raise InvalidConfigError(
            "The two routing snapshots are of different texts (or tokenizations); take both with the same "
            "texts and tokenizer to compare them."
        )
    if before.experts.keys() != after.experts.keys():
        raise InvalidConfigError(
            f"The two routing snapshots have different MoE blocks ({sorted(before.experts)} vs "
            f"{sorted(after.experts)}); compare snapshots of the same model."
        )
    per_layer = {}
    for layer, a in before.experts.items():
        b = after.experts[layer]
        changed = torch.ones(a.shape[0], dtype=torch.bool) if a.shape != b.shape else (a != b).any(dim=-1)
        per_layer[layer] = changed.double().mean().item()
    fraction = sum(per_layer.values()) / len(per_layer)
    return RoutingChange(fraction=fraction, per_layer=per_layer, n_tokens=before.n_tokens)
