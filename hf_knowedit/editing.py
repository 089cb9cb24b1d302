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
from collections.abc import Sequence
from typing import Any

from torch import nn

from .architectures import get_architecture, get_module, num_layers
from .deltas import fingerprint
from .editset import EditSet
from .errors import InvalidConfigError, LayerOutOfRangeError
from .hooks import frozen
from .methods.registry import EditContext, Layers, get_method, resolve_config
from .requests import normalize_requests
from .stack import conflict_error, find_conflicts, get_state, push_edit_set

logger = logging.getLogger(__name__)


def check_layers(model: nn.Module, layers: Sequence[int]) -> list[int]:
    """Validate explicit layer indices (negative ones count from the end)."""
    n = num_layers(model)
    out = []
    for layer in layers:
        if not isinstance(layer, int) or isinstance(layer, bool) or not -n <= layer < n:
            raise LayerOutOfRangeError(f"Layer {layer!r} is out of range: this model has layers 0..{n - 1}.")
        out.append(layer % n)
    if len(set(out)) != len(out):
        raise LayerOutOfRangeError(f"Layers {list(layers)} repeat an index.")
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

    Raises a typed :mod:`hf_knowedit.errors` error on bad input, leaving the weights untouched.

    >>> es = model.apply_edits({"prompt": "{} is located in", "subject": "Angola", "target_new": "Antarctica"})
    """
    spec = get_method(method)
    reqs = normalize_requests(requests)
    config = resolve_config(spec, config, overrides)
    arch = get_architecture(model)
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if layers is not None and not isinstance(layers, str):
        layers = check_layers(model, layers)
    elif isinstance(layers, str) and layers != "auto":
        raise InvalidConfigError(f"layers must be a list of ints, 'auto' or None, got {layers!r}.")
    probe = EditSet(deltas={}, requests=reqs, method=spec.name)
    conflicts = find_conflicts(model, probe)
    if conflicts and not allow_conflicts:  # fail before the expensive part
        raise conflict_error(conflicts)
    state = get_state(model)
    ctx = EditContext(model, tokenizer, reqs, config, layers, arch, state.history)
    with frozen(model):
        result = spec.compute(ctx)
    es = EditSet(
        deltas=result.deltas,
        requests=reqs,
        method=spec.name,
        config=dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config),
        layers=list(result.layers),
        fingerprints={p: fingerprint(get_module(model, p).weight) for p in result.deltas},
        layouts={p: arch.mlp_out_layout for p in result.deltas},
        base_model=getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None),
        revision=getattr(model.config, "_commit_hash", None),
        stats_key=result.stats_key,
        state=result.state,
    )
    push_edit_set(model, es, merge=merge, name=name, allow_conflicts=allow_conflicts)
    if result.commit is not None:
        result.commit()
    return es
