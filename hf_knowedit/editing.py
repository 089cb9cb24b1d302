"""``apply_edits``: the one entry point of every editing method.

A method is a function ``compute(ctx) -> MethodResult`` registered with
:func:`~hf_knowedit.methods.registry.register_method` (``hf_knowedit/methods/``). This module
does what all methods share: normalising requests, resolving the config and layers,
freezing the model while a method computes, fingerprinting the weights the deltas are
computed on, and activating the result all-or-nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import numbers
from typing import Any

from torch import nn

from .architectures import check_dispatch, get_architecture, num_layers
from .editset import EditSet
from .errors import EditsDisabledError, InvalidConfigError, LayerOutOfRangeError
from .generation import max_positions
from .hooks import frozen
from .methods.context import template_reserve
from .methods.registry import EditContext, Layers, get_method, resolve_config
from .requests import normalize_requests
from .stack import (
    check_flag,
    check_name,
    conflict_error,
    expert_counts,
    find_conflicts,
    model_lock,
    push_edit_set,
    weight_fingerprints,
)
from .tokens import check_request_lengths

logger = logging.getLogger(__name__)


def check_layers(model: nn.Module, layers: Any) -> list[int]:
    """Validate explicit layer indices (negative ones count from the end; NumPy integers are fine)."""
    if not isinstance(layers, (list, tuple, range)) and not hasattr(layers, "tolist"):  # lists, NumPy arrays
        raise InvalidConfigError(f"layers must be a list of ints, 'auto' or None, got {layers!r}.")
    layers = list(layers.tolist() if hasattr(layers, "tolist") else layers)
    if not layers:
        raise InvalidConfigError("layers is empty: pass at least one layer index, 'auto', or None for the default.")
    n = num_layers(model)
    out = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
            raise InvalidConfigError(f"Layer indices must be ints, got {layer!r} ({type(layer).__name__}) in {layers}.")
        if not -n <= int(layer) < n:
            raise LayerOutOfRangeError(f"Layer {int(layer)} is out of range: this model has layers 0..{n - 1}.")
        out.append(int(layer) % n)
    if len(set(out)) != len(out):
        raise LayerOutOfRangeError(f"Layers {layers} repeat an index.")
    return sorted(out)


def apply_edits(
    model: nn.Module,
    tokenizer: Any,
    requests: Any,
    method: str = "rome",
    *,
    config: Any = None,
    layers: Layers = None,
    merge: bool = True,
    name: str | None = None,
    allow_conflicts: bool = False,
    **overrides: Any,
) -> EditSet:
    """Rewrite facts in ``model`` and return the :class:`EditSet` that did it.

    Args:
        requests: an :class:`EditRequest`, a dict, a CounterFact record, or a list of them.
        method: a registered method name (``"rome"``, ``"memit"``, ...).
        config: the method's config dataclass, or a dict of its fields; ``**overrides`` change single fields.
        layers: explicit layer indices, ``"auto"``, or ``None`` for the method's documented default.
        merge: write the deltas into the weights (default) or apply them through forward hooks.
        name: the name under which the set is active (``list_edits`` / ``revert_edits``).
        allow_conflicts: stack even if an active set rewrote the same fact to another target (warns).

    Raises a typed :mod:`hf_knowedit.errors` error on bad input, leaving the weights untouched. The
    whole call holds the model's edit lock; the set and the method's state (e.g. AlphaEdit's history)
    become active together or not at all (:mod:`hf_knowedit.stack`).

    >>> es = model.apply_edits({"prompt": "{} is located in", "subject": "Angola", "target_new": "Antarctica"})
    """
    check_flag("merge", merge), check_flag("allow_conflicts", allow_conflicts), check_name(name)
    spec = get_method(method)
    reqs = normalize_requests(requests)
    config = resolve_config(spec, config, overrides)
    arch = get_architecture(model)
    check_dispatch(model)  # a device_map entry the library cannot honour: refused before any work
    reserve = template_reserve(tokenizer, config)  # a context-template prefix and its ". "
    check_request_lengths(tokenizer, reqs, max_positions(model), reserve=reserve)
    if isinstance(layers, numbers.Integral) and not isinstance(layers, bool):
        layers = [layers]
    if layers is not None and not (isinstance(layers, str) and layers == "auto"):
        layers = check_layers(model, layers)
    with model_lock(model) as state:
        if state.disabled:
            raise EditsDisabledError(
                "apply_edits() inside disable_edits(): edit state cannot change while the base model is "
                "running. Leave the `with model.disable_edits():` block first."
            )
        conflicts = find_conflicts(model, EditSet(deltas={}, requests=reqs, method=spec.name))
        if conflicts and not allow_conflicts:  # fail before the expensive part
            raise conflict_error(conflicts)
        ctx = EditContext(model, tokenizer, reqs, config, layers, arch, state.history)
        with frozen(model):
            result = spec.compute(ctx)
        layouts = {p: arch.mlp_out_layout for p in result.deltas}
        es = EditSet(
            deltas=result.deltas,
            requests=reqs,
            method=spec.name,
            config=dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config),
            layers=list(result.layers),
            fingerprints=weight_fingerprints(model, list(result.deltas), layouts),
            layouts=layouts,
            base_model=getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None),
            revision=getattr(model.config, "_commit_hash", None),
            stats_key=result.stats_key,
            state=result.state,
            num_experts=expert_counts(model, layouts),
            peft_targets={p: arch.peft_target for p in result.deltas if arch.peft_target != "module"},
        )
        return push_edit_set(model, es, merge=merge, name=name, allow_conflicts=allow_conflicts, commit=result.commit)
