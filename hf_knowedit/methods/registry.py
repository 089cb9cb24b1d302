"""The method registry: how a knowledge-editing method plugs into :func:`hf_knowedit.apply_edits`.

A method is one module in this package that ends with one :func:`register_method` call (as peft's
``register_peft_method``): a name, a ``compute(ctx) -> MethodResult`` function and a config
dataclass. ``apply_edits`` does what all methods share (requests, config, layers, freezing,
fingerprints, the all-or-nothing push); ``compute`` only computes deltas. Adding a method = one
file here and its name in :data:`BUILTIN` (or ``register_method`` from your own code).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..architectures import ArchitectureSpec
from ..deltas import ModuleDelta
from ..errors import UnknownMethodError
from ..requests import EditRequest
from .config import make_config

Layers = None | str | int | Sequence[int]


@dataclass
class EditContext:
    """What a method's ``compute`` receives."""

    model: nn.Module
    tokenizer: Any
    requests: list[EditRequest]
    config: Any
    layers: Layers
    arch: ArchitectureSpec
    history: dict[str, Any]  # per-model method state (see KnowEditState.history)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodResult:
    """What a method's ``compute`` returns: per-module deltas and the layers it edited."""

    deltas: dict[str, ModuleDelta]
    layers: list[int]
    stats_key: Any = None
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    #: run as the last step of activating the set (e.g. update history); if it raises, the set is not
    #: activated, so it must change nothing before raising (one assignment)
    commit: Callable[[], None] | None = None


@dataclass(frozen=True)
class MethodSpec:
    name: str
    compute: Callable[[EditContext], MethodResult]
    config_cls: type


_METHODS: dict[str, MethodSpec] = {}


def register_method(
    name: str, compute: Callable[[EditContext], MethodResult], config_cls: type, *, overwrite: bool = False
) -> None:
    """Register an editing method under ``name`` (lower case); ``config_cls`` is a dataclass."""
    if not isinstance(name, str) or not name or name != name.lower():
        raise ValueError(f"Method names are non-empty lower case strings, got {name!r}.")
    if name in _METHODS and not overwrite:
        raise ValueError(f"Method {name!r} is already registered; pass overwrite=True to replace it.")
    if not callable(compute) or not dataclasses.is_dataclass(config_cls):
        raise ValueError(f"register_method({name!r}, ...) needs a compute function and a config dataclass.")
    _METHODS[name] = MethodSpec(name, compute, config_cls)


def available_methods() -> list[str]:
    _load_builtin_methods()
    return sorted(_METHODS)


def get_method(name: str) -> MethodSpec:
    _load_builtin_methods()
    key = str(name).lower()
    if key not in _METHODS:
        raise UnknownMethodError(
            f"Unknown editing method {name!r}. Please pass one of {sorted(_METHODS)}, "
            "or register your own with hf_knowedit.register_method(...)."
        )
    return _METHODS[key]


#: the methods shipped with hf_knowedit, imported on first use
BUILTIN = ("rome", "memit", "alphaedit", "emmet", "encore", "rlsedit", "moeedit")


def _load_builtin_methods() -> None:
    for mod in BUILTIN:
        importlib.import_module(f"{__package__}.{mod}")


def resolve_config(spec: MethodSpec, config: Any, overrides: dict[str, Any]) -> Any:
    """A ``spec.config_cls`` instance from ``None``, a dict, or an instance, plus keyword overrides."""
    return make_config(spec.config_cls, config, overrides, spec.name)
