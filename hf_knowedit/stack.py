"""The stack of active edit sets on a model: merge, unmerge, disable, revert — exactly.

Each touched weight is written as a pure function of its pristine value::

    W = cast(float32(W_base) + Σ ΔW_s  over merged sets s, in stacking order)

so reverting or unmerging any set recomputes the weight from ``W_base`` and gives back,
bit for bit, what an unedited (or less edited) model had, in fp32, bf16 or fp16 alike.
The price is one copy of each touched weight (only touched modules; one copy no matter
how many sets are stacked), kept on the weight's own device.

Sets applied with ``merge=False`` leave the weight alone and add ``x @ Aᵀ @ Bᵀ`` to the
module's output through an ordinary forward hook (:class:`~hf_knowedit.hooks.LowRankHook`).

Also here: :func:`load_edits` (a saved set onto the stack) and :func:`merge_and_unload` (bake every
active set into the weights for good, PEFT's name for it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .architectures import get_module
from .deltas import fingerprint, fingerprints_match
from .editset import EditSet
from .errors import (
    BaseModelMismatchError,
    EditConflictError,
    EditSetNotFoundError,
    InvalidConfigError,
    KnowEditError,
    NonFiniteUpdateError,
)
from .hooks import LowRankHook

logger = logging.getLogger(__name__)

STATE_ATTR = "_hf_knowedit"


@dataclass
class _Active:
    edit_set: EditSet
    merged: bool
    hooks: list[Any] = field(default_factory=list)


@dataclass
class KnowEditState:
    """Everything hf_knowedit keeps on a model instance (one attribute, no globals)."""

    tokenizer: Any = None
    sets: OrderedDict[str, _Active] = field(default_factory=OrderedDict)
    base: dict[str, torch.Tensor] = field(default_factory=dict)
    disabled: int = 0
    history: dict[str, Any] = field(default_factory=dict)  # method state across calls (e.g. AlphaEdit keys)
    counter: int = 0


def get_state(model: nn.Module, create: bool = True) -> KnowEditState | None:
    state = model.__dict__.get(STATE_ATTR)
    if state is None and create:
        state = KnowEditState()
        model.__dict__[STATE_ATTR] = state
    return state


def _weight(model: nn.Module, path: str) -> torch.Tensor:
    return get_module(model, path).weight


def _layout_delta(delta: torch.Tensor, layout: str) -> torch.Tensor:
    return delta.t() if layout == "conv1d" else delta


def _recompute(model: nn.Module, state: KnowEditState, path: str, skip_merged: bool = False) -> None:
    """Write ``W = cast(W_base + Σ merged deltas)`` into the module (or ``W_base`` when none)."""
    base = state.base.get(path)
    if base is None:
        return
    weight = _weight(model, path)
    merged = [a.edit_set for a in state.sets.values() if a.merged and path in a.edit_set.deltas]
    with torch.no_grad():
        if not merged or skip_merged:
            weight.copy_(base)
            if not merged:
                del state.base[path]
            return
        total = base.float()
        for es in merged:
            total = total + _layout_delta(es.deltas[path].delta(base.device), es.layouts.get(path, "linear"))
        weight.copy_(total.to(weight.dtype))


def _check_finite_merge(model: nn.Module, state: KnowEditState, es: EditSet) -> None:
    for path, d in es.deltas.items():
        if not d.is_finite():
            raise NonFiniteUpdateError(
                f"The update for {path} contains NaN/Inf; nothing was written. "
                "Lower the learning rate or clamp, or check the statistics."
            )
        w = _weight(model, path)
        base = state.base.get(path, w)
        if not torch.isfinite(base.float() + _layout_delta(d.delta(w.device), es.layouts.get(path, "linear"))).all():
            raise NonFiniteUpdateError(f"Merging into {path} would give non-finite weights; nothing was written.")


def check_compatible(model: nn.Module, es: EditSet, force: bool = False) -> None:
    """Shapes and base-weight fingerprints of every touched module, before anything is written."""
    for path, d in es.deltas.items():
        try:
            w = _weight(model, path)
        except (AttributeError, KeyError, IndexError, InvalidConfigError) as err:
            raise BaseModelMismatchError(
                f"The edit set touches {path!r}, which this model does not have; it was made for another architecture."
            ) from err
        layout = es.layouts.get(path, "linear")
        want = tuple(_layout_delta(torch.empty(d.shape, device="meta"), layout).shape)
        if tuple(w.shape) != want:
            raise BaseModelMismatchError(
                f"{path}: the edit set expects a weight of shape {want}, the model has "
                f"{tuple(w.shape)}; it was made for another model."
            )
        fp = es.fingerprints.get(path)
        if fp is not None and not fingerprints_match(fp, fingerprint(w)):
            if not force:
                raise BaseModelMismatchError(
                    f"{path}: the base weights differ from those the edit set was computed on (fingerprint "
                    "mismatch). Load it into the base model it was made for (and any edit sets it was stacked "
                    "on, in order), or pass force=True to apply it anyway."
                )
            logger.warning("Applying edit set to %s despite a base-weight fingerprint mismatch (force=True).", path)


def conflict_error(conflicts: list[str]) -> EditConflictError:
    """The error for requests that rewrite facts an active set already rewrote (see :func:`find_conflicts`)."""
    return EditConflictError(
        "This edit rewrites facts an active edit set already rewrote: "
        + "; ".join(conflicts)
        + ". Revert the earlier set, or pass allow_conflicts=True to stack anyway."
    )


def find_conflicts(model: nn.Module, es: EditSet) -> list[str]:
    """Requests of ``es`` that rewrite a fact an active set already rewrote to another target."""
    state = get_state(model, create=False)
    if state is None:
        return []
    out = []
    active = {r.relation_key: (name, r) for name, a in state.sets.items() for r in a.edit_set.requests}
    for r in es.requests:
        hit = active.get(r.relation_key)
        if hit and hit[1].target_new.casefold() != r.target_new.casefold():
            out.append(f"{r.text!r}: {hit[1].target_new!r} (set {hit[0]!r}) vs {r.target_new!r}")
    return out


def push_edit_set(
    model: nn.Module,
    es: EditSet,
    *,
    merge: bool = True,
    name: str | None = None,
    allow_conflicts: bool = False,
    force: bool = False,
) -> EditSet:
    """Activate ``es`` on ``model``: all modules or none. Returns the set with its name."""
    state = get_state(model)
    if name is None:
        state.counter += 1
        name = es.name or f"{es.method}-{state.counter}"
        while name in state.sets:
            state.counter += 1
            name = f"{es.method}-{state.counter}"
    elif name in state.sets:
        raise KnowEditError(
            f"An edit set named {name!r} is already active; pick another name or revert it first. "
            f"Active: {list(state.sets)}"
        )
    conflicts = find_conflicts(model, es)
    if conflicts:
        if not allow_conflicts:
            raise conflict_error(conflicts)
        logger.warning(
            "This edit rewrites facts an active edit set already rewrote (allow_conflicts=True): %s",
            "; ".join(conflicts),
        )
    check_compatible(model, es, force=force)
    if merge:
        _check_finite_merge(model, state, es)
    elif not all(d.is_finite() for d in es.deltas.values()):
        raise NonFiniteUpdateError("The edit set contains NaN/Inf; nothing was applied.")
    es.name = name
    active = _Active(es, merged=merge)
    state.sets[name] = active
    try:
        for path in es.deltas:
            if merge:
                _snapshot(model, state, path)
                _recompute(model, state, path)
            else:
                _install_hooks(model, state, active, path)
    except BaseException:
        _drop(model, state, name)
        raise
    logger.info(
        "Applied edit set %r (%s, %d edits, %s).", name, es.method, len(es.requests), "merged" if merge else "hooked"
    )
    return es


def _snapshot(model: nn.Module, state: KnowEditState, path: str) -> None:
    if path not in state.base:
        state.base[path] = _weight(model, path).detach().clone()


def _install_hooks(model: nn.Module, state: KnowEditState, active: _Active, path: str) -> None:
    d = active.edit_set.deltas[path]
    hook = LowRankHook([(d.B, d.A)], active=lambda: not state.disabled)
    active.hooks.append(get_module(model, path).register_forward_hook(hook))


def _remove_hooks(active: _Active) -> None:
    for h in active.hooks:
        h.remove()
    active.hooks.clear()


def _drop(model: nn.Module, state: KnowEditState, name: str) -> None:
    active = state.sets.pop(name)
    _remove_hooks(active)
    for path in active.edit_set.deltas:
        _recompute(model, state, path)


def _names(state: KnowEditState | None, name: str | None) -> list[str]:
    if state is None or not state.sets:
        if name is None:
            return []
        raise EditSetNotFoundError(f"No edit set named {name!r} is active (none are).")
    if name is None:
        return list(state.sets)
    if name not in state.sets:
        raise EditSetNotFoundError(f"No edit set named {name!r} is active. Please pass one of {list(state.sets)}.")
    return [name]


def revert_edits(model: nn.Module, name: str | None = None) -> list[str]:
    """Remove one edit set (``name``) or all of them, restoring weights bit-exactly.

    Returns the names removed.
    """
    state = get_state(model, create=False)
    names = _names(state, name)
    for n in reversed(names):
        _drop(model, state, n)
    if names:
        logger.info("Reverted edit sets %s.", names)
    return names


def merge_edits(model: nn.Module, name: str | None = None) -> None:
    """Move hooked edit sets into the weights (float32 math, finiteness checked)."""
    state = get_state(model, create=False)
    for n in _names(state, name):
        active = state.sets[n]
        if active.merged:
            continue
        _check_finite_merge(model, state, active.edit_set)
        _remove_hooks(active)
        active.merged = True
        for path in active.edit_set.deltas:
            _snapshot(model, state, path)
            _recompute(model, state, path)


def unmerge_edits(model: nn.Module, name: str | None = None) -> None:
    """Take merged edit sets out of the weights and apply them through hooks instead."""
    state = get_state(model, create=False)
    for n in _names(state, name):
        active = state.sets[n]
        if not active.merged:
            continue
        active.merged = False
        for path in active.edit_set.deltas:
            _recompute(model, state, path)
            _install_hooks(model, state, active, path)


@contextlib.contextmanager
def disable_edits(model: nn.Module) -> Iterator[nn.Module]:
    """``with model.disable_edits(): ...`` runs the base model; edits come back on exit."""
    state = get_state(model, create=False)
    if state is None or not state.sets:
        yield model
        return
    state.disabled += 1
    paths = list(state.base)
    try:
        if state.disabled == 1:
            for path in paths:
                _recompute(model, state, path, skip_merged=True)
        yield model
    finally:
        state.disabled -= 1
        if state.disabled == 0:
            for path in paths:
                _recompute(model, state, path)


@dataclass(frozen=True)
class ActiveEdit:
    """One active edit set as :func:`list_edits` reports it."""

    name: str
    method: str
    edits: int
    layers: tuple[int, ...]
    merged: bool
    modules: tuple[str, ...]

    def __str__(self) -> str:
        return (
            f"{self.name}: {self.method}, {self.edits} edit(s) at layer(s) {list(self.layers)}, "
            f"{'merged' if self.merged else 'hooked'}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "layers": list(self.layers), "modules": list(self.modules)}

    def __getitem__(self, key: str) -> Any:  # list_edits returned dicts before 0.2
        warnings.warn(
            "list_edits() entries are ActiveEdit objects now: use edit.name instead of edit['name'] "
            "(or edit.to_dict()); item access goes away in the next release.",
            FutureWarning,
            stacklevel=2,
        )
        return self.to_dict()[key]


def list_edits(model: nn.Module) -> list[ActiveEdit]:
    """The active edit sets, oldest first (name, method, number of edits, layers, mode, modules)."""
    state = get_state(model, create=False)
    if state is None:
        return []
    return [
        ActiveEdit(
            name=n,
            method=a.edit_set.method,
            edits=len(a.edit_set.requests),
            layers=tuple(a.edit_set.layers),
            merged=a.merged,
            modules=tuple(a.edit_set.deltas),
        )
        for n, a in state.sets.items()
    ]


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Write every active edit set into the weights for good and forget them (PEFT's
    ``merge_and_unload``): the model then is a plain model with the edits baked in, e.g. to save
    with ``save_pretrained`` and serve anywhere. The edit stack, hooks and pristine copies are
    dropped, so the edits can no longer be reverted; other hf_knowedit state (the tokenizer, method
    history) stays. Returns ``model``."""
    state = get_state(model, create=False)
    if state is None or not state.sets:
        return model
    if state.disabled:
        raise KnowEditError("merge_and_unload() inside disable_edits(): leave the block first.")
    merge_edits(model)
    names = list(state.sets)
    for active in state.sets.values():
        _remove_hooks(active)
    state.sets.clear()
    state.base.clear()
    logger.info("Merged and unloaded edit sets %s: they are now part of the weights.", names)
    return model


def load_edits(
    model: nn.Module,
    source: EditSet | str | Path,
    name: str | None = None,
    merge: bool = True,
    force: bool = False,
    allow_conflicts: bool = False,
    **hub_kwargs: Any,
) -> EditSet:
    """Apply a saved edit set: an :class:`EditSet`, an adapter directory, or a Hub repo id.

    Shapes and base-weight fingerprints of every touched module are checked first; a mismatch
    raises :class:`~hf_knowedit.errors.BaseModelMismatchError` (``force=True`` applies anyway, with
    a warning). All modules are applied or none; on any error the model is untouched. The loaded
    set then behaves exactly like a freshly applied one (merge, unmerge, disable, revert).

    Args:
        source: an ``EditSet``, a directory written by ``save_pretrained``, or a Hub repo id.
        name: the name under which the set is active (default: the saved name, made unique).
        merge: write into the weights (default) or apply through forward hooks.
        **hub_kwargs: ``revision``, ``token``, ``cache_dir``, ``force_download``, ``local_files_only``.

    >>> model.load_edits("me/angola-edit", revision="v1")
    """
    if isinstance(source, EditSet):
        if hub_kwargs:
            raise TypeError(f"Hub arguments {sorted(hub_kwargs)} make no sense with an EditSet source.")
        es = dataclasses.replace(source)  # the stack names its own copy; the caller's set stays as it is
    else:
        es = EditSet.from_pretrained(source, **hub_kwargs)
    return push_edit_set(model, es, merge=merge, name=name, allow_conflicts=allow_conflicts, force=force)


def get_edit_set(model: nn.Module, name: str) -> EditSet:
    """The active :class:`EditSet` called ``name``."""
    state = get_state(model, create=False)
    return state.sets[_names(state, name)[0]].edit_set
