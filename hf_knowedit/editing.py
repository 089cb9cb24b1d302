"""``apply_edits``: the one entry point of every editing method.

A method is a function ``compute(ctx) -> EditSet-ready pieces`` registered with
:func:`register_method` (ROME in ``rome.py``, MEMIT in ``memit.py``, ...). This module
does what all methods share: normalising requests, resolving the config and layers,
freezing the model while a method computes, fingerprinting the weights the deltas are
computed on, and activating the result all-or-nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

import torch
from torch import nn

from .architectures import ArchitectureSpec, get_architecture, num_layers
from .editset import EditSet, ModuleDelta, fingerprint
from .errors import EditConflictError, InvalidConfigError, LayerOutOfRangeError, UnknownMethodError
from .requests import EditRequest, normalize_requests
from .stack import find_conflicts, get_state, push_edit_set

logger = logging.getLogger(__name__)

Layers = Union[None, str, int, Sequence[int]]


@dataclass
class EditContext:
    """What a method's ``compute`` receives."""

    model: nn.Module
    tokenizer: Any
    requests: List[EditRequest]
    config: Any
    layers: Layers
    arch: ArchitectureSpec
    history: Dict[str, Any]  # per-model method state (see KnowEditState.history)
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodResult:
    """What a method's ``compute`` returns: per-module deltas and the layers it edited."""

    deltas: Dict[str, ModuleDelta]
    layers: List[int]
    stats_key: Any = None
    state: Dict[str, torch.Tensor] = field(default_factory=dict)
    commit: Optional[Callable[[], None]] = None  # run only once the set is active (e.g. update history)


@dataclass(frozen=True)
class MethodSpec:
    name: str
    compute: Callable[[EditContext], MethodResult]
    config_cls: type


_METHODS: Dict[str, MethodSpec] = {}


def register_method(name: str, compute: Callable[[EditContext], MethodResult], config_cls: type,
                    *, overwrite: bool = False) -> None:
    """Register an editing method under ``name`` (lower case)."""
    if not name or name != name.lower():
        raise ValueError(f"Method names are non-empty lower case strings, got {name!r}.")
    if name in _METHODS and not overwrite:
        raise ValueError(f"Method {name!r} is already registered; pass overwrite=True to replace it.")
    _METHODS[name] = MethodSpec(name, compute, config_cls)


def available_methods() -> List[str]:
    _load_builtin_methods()
    return sorted(_METHODS)


def get_method(name: str) -> MethodSpec:
    _load_builtin_methods()
    key = str(name).lower()
    if key not in _METHODS:
        raise UnknownMethodError(f"Unknown editing method {name!r}. Please pass one of {sorted(_METHODS)}, "
                                 "or register your own with hf_knowedit.register_method(...).")
    return _METHODS[key]


_BUILTIN = ("rome", "memit", "alphaedit", "emmet")


def _load_builtin_methods() -> None:
    import importlib

    for mod in _BUILTIN:
        try:
            importlib.import_module(f"hf_knowedit.{mod}")
        except ModuleNotFoundError as err:  # a method module not shipped in this build
            if err.name != f"hf_knowedit.{mod}":
                raise


def resolve_config(spec: MethodSpec, config: Any, overrides: Dict[str, Any]) -> Any:
    """A ``spec.config_cls`` instance from ``None``, a dict, or an instance, plus keyword overrides."""
    if config is None:
        config = spec.config_cls()
    elif isinstance(config, dict):
        config = spec.config_cls(**config)
    elif not isinstance(config, spec.config_cls):
        raise InvalidConfigError(f"config for {spec.name!r} must be a {spec.config_cls.__name__} or a dict, "
                                 f"got {type(config).__name__}.")
    if overrides:
        names = {f.name for f in dataclasses.fields(config)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise InvalidConfigError(f"Unknown option(s) {unknown} for {spec.name!r}; valid: {sorted(names)}.")
        config = dataclasses.replace(config, **overrides)
    return config


def check_layers(model: nn.Module, layers: Sequence[int]) -> List[int]:
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


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients while a method computes; restored afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    training = model.training
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(training)


def apply_edits(model: nn.Module, tokenizer: Any, requests: Any, method: str = "rome", *, config: Any = None,
                layers: Layers = None, merge: bool = True, name: Optional[str] = None,
                allow_conflicts: bool = False, **overrides: Any) -> EditSet:
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
        raise EditConflictError("This edit rewrites facts an active edit set already rewrote: " + "; ".join(conflicts)
                                + ". Revert the earlier set, or pass allow_conflicts=True to stack anyway.")
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
        fingerprints={p: fingerprint(_module_weight(model, p)) for p in result.deltas},
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


def _module_weight(model: nn.Module, path: str) -> torch.Tensor:
    from .architectures import get_module

    return get_module(model, path).weight
