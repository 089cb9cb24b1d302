"""The stack of active edit sets on a model: merge, unmerge, disable, revert — exactly, and all or nothing.

Each touched weight is a pure function of its pristine value::

    W = cast(float32(W_base) + Σ ΔW_s  over merged sets s, in stacking order)

so reverting or unmerging any set recomputes the weight from ``W_base`` and gives back, bit for bit,
what an unedited (or less edited) model had, in fp32, bf16 or fp16 alike. The price is one copy of
each touched weight (only touched modules; one copy however many sets are stacked), kept on the
weight's own device; and while a call rewrites a weight that holds merged deltas, one more copy of
its current value to roll back to (held for the whole block inside ``disable_edits``). On a model
dispatched by accelerate, a weight offloaded to CPU or disk is read from, and written to, what
accelerate loads for each forward (``architectures.read_tensor`` / ``write_tensor``): the merged
value replaces the loader's entry in CPU memory, the offload files are never written, and the
pristine copy is kept on the CPU. Sets applied with ``merge=False`` leave the weight alone and add
``x Aᵀ Bᵀ`` to the module's output through a forward hook (:class:`~hf_knowedit.hooks.LowRankHook`).

**Guarantees.** Every call that changes edit state (apply, load, revert, merge, unmerge,
``merge_and_unload``, entering and leaving ``disable_edits``, a method's commit) is a transaction:
it first works out the end state — the new weights in their final dtype (checked finite there),
pristine copies, copies of the current weights to roll back to, hooks, the new stack — and only
then switches, allocating nothing more. The switch writes weights, registers and removes hooks,
puts the new stack in place and runs the method's commit last; if any step raises (a failed write
or hook operation, an exception raised into the thread), the steps done are undone from those
copies and the error is raised: weights, hooks (in their order), the stack, pristine copies and
method history are exactly as before. Python signal handlers (Ctrl-C, a SIGTERM or SIGALRM handler
that raises) are held back during the switch and run right after it.

**Threads.** One lock per model serialises the calls that change or borrow the model (edits,
tracing, statistics); a :class:`~hf_knowedit.hooks.ModelGate` on the model's forward lets other
threads keep running forwards meanwhile and holds them back only during the switch, so a serving
thread computes the model before an edit or after it, never halfway and never one of the stand-ins
used while computing. The passes that need the unedited model (statistics, context templates, the
sampled corpus) run under :func:`base_view`, which is the base model in their own thread only.
A forward that Ctrl-C stops leaves no reader behind in the gate.

**generate.** The state replaces ``model.generate`` by one that runs the whole call as one reader of
the gate: every token of one call, the KV cache included, comes from the same weights; a switch
waits for the calls in flight (holding back new forwards meanwhile), so a long generation delays an
edit by up to its own length. (A streamer or logits processor of that call must not wait for another
thread's edit: that edit waits for the call.)

**Copies.** ``copy.deepcopy(model)`` gives an independent model (its own stack, pristine copies,
lock and gate; hooked sets follow the copy's state). Pickling raises
:class:`~hf_knowedit.errors.NotPicklableError`. Copy a model while no other thread edits it.

**disable_edits** runs the base model: merged weights go back to their pristine values and hooked
sets stop acting, for every thread. Inside the block edit state cannot change: apply, load,
revert, merge and unmerge raise :class:`~hf_knowedit.errors.EditsDisabledError`.

**Identity.** A set is identified by the digest of its deltas (:func:`~hf_knowedit.deltas.deltas_digest`);
the same set cannot be active twice, in any mode.

Also here: :func:`load_edits` (a saved set onto the stack) and :func:`merge_and_unload` (bake every
active set into the weights for good, PEFT's name for it).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import os
import signal
import threading
import types
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .architectures import (
    EXPERT_LAYOUTS,
    LAYOUT_PARAM,
    LAYOUTS,
    PEFT_TARGETS,
    check_dispatch,
    edited_param,
    from_param,
    get_module,
    read_tensor,
    saved_tensor,
    stage_tensor,
    to_param,
    write_tensor,
)
from .deltas import ModuleDelta, deltas_digest, fingerprint, matches_weight
from .editset import EditSet
from .errors import (
    BaseModelMismatchError,
    EditConflictError,
    EditsDisabledError,
    EditSetNotFoundError,
    InvalidArgumentError,
    InvalidConfigError,
    KnowEditError,
    NonFiniteUpdateError,
    NotPicklableError,
)
from .hooks import PICKLE_HINT, LowRankHook, ModelGate, PrivateWeights, module_hook, remove_hooks
from .requests import EditRequest

logger = logging.getLogger(__name__)

STATE_ATTR = "_hf_knowedit"
_CREATE = threading.Lock()


@dataclass
class _Active:
    edit_set: EditSet
    merged: bool
    digest: str
    hooks: list[Any] = field(default_factory=list)


@dataclass
class KnowEditState:
    """Everything hf_knowedit keeps on a model instance (one attribute, no globals).

    ``copy.deepcopy(model)`` gives an independent model: its own copy of this state (stack, pristine
    copies, history, tokenizer), its own lock and gate, and hooked sets that follow the copy's state.
    Pickling raises :class:`~hf_knowedit.errors.NotPicklableError` (the lock and the gate cannot travel)."""

    tokenizer: Any = None
    sets: OrderedDict[str, _Active] = field(default_factory=OrderedDict)
    base: dict[str, torch.Tensor] = field(default_factory=dict)
    disabled: int = 0
    history: dict[str, Any] = field(default_factory=dict)  # method state across calls (e.g. AlphaEdit keys)
    counter: int = 0
    lock: Any = field(default_factory=threading.RLock, repr=False)
    gate: ModelGate = field(default_factory=ModelGate, repr=False)
    viewing: set[int] = field(default_factory=set, repr=False)  # threads inside base_view

    def hooks_active(self) -> bool:
        """Whether hooked sets act in the calling thread (not inside disable_edits, nor its base_view)."""
        return not self.disabled and threading.get_ident() not in self.viewing

    def __deepcopy__(self, memo: dict[int, Any]) -> KnowEditState:
        new = memo[id(self)] = KnowEditState.__new__(KnowEditState)
        for f in dataclasses.fields(self):
            if f.name == "lock":
                new.lock = threading.RLock()
            elif f.name == "viewing":
                new.viewing = set()
            else:
                setattr(new, f.name, copy.deepcopy(getattr(self, f.name), memo))
        return new

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise NotPicklableError(PICKLE_HINT)


def get_state(model: nn.Module, create: bool = True) -> KnowEditState | None:
    """The state on ``model`` (created, with the forward gate and the gated ``generate``, if ``create``)."""
    state = model.__dict__.get(STATE_ATTR)
    if state is None and create:
        with _CREATE:
            state = model.__dict__.get(STATE_ATTR)
            if state is None:
                state = KnowEditState()
                state.gate.install(model)
                if callable(getattr(type(model), "generate", None)) and "generate" not in model.__dict__:
                    model.__dict__["generate"] = types.MethodType(_gated_generate(type(model).generate), model)
                model.__dict__[STATE_ATTR] = state
    return state


def _gated_generate(generate: Callable) -> Callable:
    """``generate`` as one reader of the model's gate: every token of one call comes from the same weights
    (a switch waits for calls in flight)."""

    @functools.wraps(generate)
    def gated(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        state = self.__dict__.get(STATE_ATTR)
        if state is None:
            return generate(self, *args, **kwargs)
        return state.gate.run_as_reader(generate, self, *args, **kwargs)

    gated.is_model_gate = True  # type: ignore[attr-defined]
    return gated


def forget_state(model: nn.Module) -> None:
    """Remove everything hf_knowedit keeps on ``model`` (its state attribute, forward gate and gated ``generate``)."""
    state = model.__dict__.pop(STATE_ATTR, None)
    if state is not None:
        state.gate.remove()
    if getattr(model.__dict__.get("generate"), "is_model_gate", False):
        del model.__dict__["generate"]


@contextlib.contextmanager
def model_lock(model: nn.Module) -> Iterator[KnowEditState]:
    """Hold ``model``'s edit lock (re-entrant): no other thread edits, traces or reverts meanwhile.
    Forwards of other threads still run (see the module docstring)."""
    state = get_state(model)
    with state.lock:
        yield state


def locked(func: Callable) -> Callable:
    """Run ``func(model, ...)`` holding ``model``'s edit lock (for calls that borrow the model: tracing,
    statistics, which swap in stand-ins and change training flags while they run)."""

    @functools.wraps(func)
    def wrapper(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        with model_lock(model):
            return func(model, *args, **kwargs)

    return wrapper


@contextlib.contextmanager
def _uninterrupted() -> Iterator[None]:
    """Hold back Python signal handlers until the block is done: Ctrl-C's KeyboardInterrupt, and any
    handler a program installed (a SIGTERM or SIGALRM handler that raises). A signal that arrives
    meanwhile runs its handler right after the block. Signal handlers run only in the main thread,
    so elsewhere there is nothing to hold back."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[tuple[int, Any]] = []
    held: dict[int, Callable] = {}
    try:
        for sig in signal.valid_signals():
            handler = signal.getsignal(sig)
            if callable(handler):  # a Python handler (SIG_DFL, SIG_IGN and C handlers are not called here)
                held[sig] = handler
                signal.signal(sig, lambda signum, frame: received.append((signum, frame)))
        yield
    finally:
        for sig, handler in held.items():
            signal.signal(sig, handler)
        for signum, frame in received:
            held[signum](signum, frame)


def _weight(model: nn.Module, path: str, layout: str = "linear") -> torch.Tensor:
    """The parameter of module ``path`` that holds the edited matrix in ``layout`` (:data:`LAYOUT_PARAM`)."""
    return getattr(get_module(model, path), LAYOUT_PARAM[layout])


def _param_shape(delta_shape: tuple, layout: str, shape: tuple) -> tuple | None:
    """The shape of the parameter a delta of ``delta_shape`` ``(out, in)`` changes in ``layout``, given the
    model's parameter ``shape`` (an experts layout takes its expert count from it); None if none fits."""
    out, d_in = delta_shape
    if layout == "conv1d":
        return (d_in, out)
    if layout in EXPERT_LAYOUTS:
        experts = shape[0] if len(shape) == 3 else 0
        if not experts or d_in % experts:
            return None
        return (experts, out, d_in // experts) if layout == "experts" else (experts, d_in // experts, out)
    return (out, d_in)


# -----------------------------------------------------------------------------
# the transaction: plan the end state, check it, then switch


@dataclass
class _Plan:
    """Everything one call changes, made before anything changes: the switch allocates no tensor.

    ``writes``: parameter name -> (new weight, current weight), both staged for ``write_tensor``; the
    current one is what a failed switch writes back. ``sets`` / ``base``: the new stack and pristine
    copies (None: they stay as they are). ``hook``: hooks to register (the set that owns them, the
    module, the hook); ``unhook``: hooks to remove (handle, hook, the order of its module's hooks)."""

    writes: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    sets: OrderedDict[str, _Active] | None = None
    base: dict[str, torch.Tensor] | None = None
    hook: list[tuple[_Active, nn.Module, LowRankHook]] = field(default_factory=list)
    unhook: list[tuple[Any, Callable, tuple[int, ...]]] = field(default_factory=list)

    def inverse(self) -> _Plan:
        """The plan that writes the current weights back (of a plan that changes weights only)."""
        return _Plan({name: (old, new) for name, (new, old) in self.writes.items()})


def _current(state: KnowEditState) -> OrderedDict[str, tuple[EditSet, bool, str]]:
    return OrderedDict((n, (a.edit_set, a.merged, a.digest)) for n, a in state.sets.items())


def _merged_now(state: KnowEditState, path: str) -> bool:
    """Whether the weight at ``path`` holds a merged delta now (else it equals its pristine value)."""
    return not state.disabled and any(a.merged and path in a.edit_set.deltas for a in state.sets.values())


def _plan(model: nn.Module, state: KnowEditState, sets: OrderedDict[str, tuple[EditSet, bool, str]],
          *, base_only: bool = False) -> _Plan:  # fmt: skip
    """Work out weights, pristine copies, the new stack and its hooks for the stack ``sets``; nothing
    is changed. Only modules of sets that come, go or change mode are recomputed. ``base_only``: the
    pristine weights of the merged modules, nothing else (``disable_edits``)."""
    plan = _Plan()
    before = _current(state)

    def same(stack: OrderedDict, name: str, es: EditSet, merged: bool) -> bool:
        return name in stack and stack[name][0] is es and stack[name][1] == merged

    changed = [es for n, (es, m, _) in sets.items() if not same(before, n, es, m)]
    changed += [es for n, (es, m, _) in before.items() if not same(sets, n, es, m)]
    paths = set(state.base) if base_only else {p for es in changed for p in es.deltas}
    base = dict(state.base)
    with torch.no_grad():
        for path in sorted(paths):
            layout = _layout_of(state, sets, path)
            name = edited_param(path, layout)
            merged = [] if base_only else [es for es, m, _ in sets.values() if m and path in es.deltas]
            pristine = base.get(path)
            if pristine is None:
                if not merged:
                    continue  # untouched now and after
                pristine = base[path] = read_tensor(model, name).detach().clone()
            new = pristine
            if merged:
                total = pristine.float()
                for es in merged:
                    delta = es.deltas[path].delta(pristine.device)
                    total = total + to_param(delta, es.layouts.get(path, "linear"), pristine.shape)
                dtype = _weight(model, path, layout).dtype
                new = total.to(dtype)
                if not torch.isfinite(new).all():
                    raise NonFiniteUpdateError(
                        f"Merging into {path} would give non-finite weights in {str(dtype).removeprefix('torch.')}; "
                        "nothing was written. The update is too large for this dtype: lower the learning rate or "
                        "clamp, check the statistics, or apply it hooked (merge=False) to a float32 model."
                    )
            elif not base_only:
                del base[path]  # no merged set touches it any more
            now = saved_tensor(model, name, None if _merged_now(state, path) else pristine)
            plan.writes[name] = (stage_tensor(model, name, new), now)
    if base_only:
        return plan
    plan.sets, plan.base = OrderedDict(), base
    for name, (es, merged, digest) in sets.items():
        kept = _kept(state, name, es, merged)
        active = plan.sets[name] = _Active(es, merged, digest, list(state.sets[name].hooks) if kept else [])
        if not merged and not kept:
            for p, d in es.deltas.items():
                hook = module_hook(model, p, es.layouts.get(p, "linear"), [(d.B, d.A)], active=state.hooks_active)
                plan.hook.append((active, get_module(model, p), hook))
    for name, old in state.sets.items():
        if not (name in sets and _kept(state, name, *sets[name][:2])):
            for handle in old.hooks:
                hooks = handle.hooks_dict_ref()
                if hooks is not None and handle.id in hooks:
                    plan.unhook.append((handle, hooks[handle.id], tuple(hooks)))
    return plan


def _kept(state: KnowEditState, name: str, es: EditSet, merged: bool) -> bool:
    """Whether set ``name`` stays hooked as it is (its hooks are kept)."""
    old = state.sets.get(name)
    return old is not None and old.edit_set is es and not old.merged and not merged


def _put_back(handle: Any, hook: Callable, order: tuple[int, ...]) -> None:
    """Undo ``handle.remove()``: the hook back on its module, the module's hooks in their old ``order``."""
    hooks = handle.hooks_dict_ref()
    if hooks is None:
        return
    hooks.setdefault(handle.id, hook)
    for key in order:
        if key in hooks:
            hooks.move_to_end(key)


def _switch(model: nn.Module, state: KnowEditState, plan: _Plan, commit: Callable[[], None] | None = None) -> None:
    """Make ``plan`` the model's state, whole or not at all.

    In order: write the weights, register the new hooks, remove the old ones, put the new stack and
    pristine copies in place, and last ``commit`` (a method's state update, e.g. AlphaEdit's history,
    which must change nothing if it raises). The plan made every tensor, so no step allocates one.
    An exception at any step (a failed write, hook registration or removal, a failing ``commit``, an
    exception raised into the thread from outside) undoes the steps done so far, in reverse: weights
    are written back from the plan's copies of their current values (nothing is allocated), hooks
    are put back in their order, stack and pristine copies restored; then it is raised again.
    Python signal handlers are held back meanwhile (:func:`_uninterrupted`), so Ctrl-C or a SIGTERM
    handler that raises stops neither the switch nor its undoing halfway: it is raised right after."""
    undo: list[Callable[[], None]] = []
    with state.gate.switching(), _uninterrupted(), torch.no_grad():
        try:
            for name, (new, old) in plan.writes.items():
                undo.append(functools.partial(write_tensor, model, name, old, staged=True))
                write_tensor(model, name, new, staged=True)
            for active, module, hook in plan.hook:
                handle = module.register_forward_hook(hook)
                undo.append(handle.remove)
                active.hooks.append(handle)
            for handle, hook, order in plan.unhook:
                undo.append(functools.partial(_put_back, handle, hook, order))
                handle.remove()
            if plan.sets is not None:
                undo.append(functools.partial(_restore_stack, state, state.sets, state.base))
                state.sets, state.base = plan.sets, plan.base
            if commit is not None:
                commit()
        except BaseException:
            for step in reversed(undo):
                try:
                    step()
                except BaseException:  # noqa: BLE001 - undo the other steps; the first error is raised
                    logger.exception("Undoing a failed edit-state switch failed at one step.")
            raise


def _restore_stack(state: KnowEditState, sets: OrderedDict[str, _Active], base: dict[str, torch.Tensor]) -> None:
    state.sets, state.base = sets, base


def _not_disabled(state: KnowEditState, what: str) -> None:
    if state.disabled:
        raise EditsDisabledError(
            f"{what} inside disable_edits(): edit state cannot change while the base model is running. "
            "Leave the `with model.disable_edits():` block first."
        )


def transaction(model: nn.Module, change: Callable[[OrderedDict], OrderedDict], what: str,
                commit: Callable[[], None] | None = None) -> None:  # fmt: skip
    """Apply ``change(current stack) -> new stack`` to ``model`` as one transaction (see the module
    docstring); ``commit`` runs last, once everything else has switched."""
    with model_lock(model) as state:
        _not_disabled(state, what)
        plan = _plan(model, state, change(_current(state)))
        _switch(model, state, plan, commit)


def effective_weight(model: nn.Module, path: str, layout: str = "linear") -> torch.Tensor:
    """The weight ``path`` acts with, in float32 and in the parameter's own arrangement (``layout``:
    :data:`~hf_knowedit.architectures.LAYOUTS`): the module's parameter plus the deltas of the hooked sets
    on it (what an edit computed now depends on, and what a loaded set is checked against)."""
    total = read_tensor(model, edited_param(path, layout)).detach().float()
    state = get_state(model, create=False)
    for active in state.sets.values() if state is not None else ():
        d = active.edit_set.deltas.get(path)
        if d is not None and not active.merged:
            total = total + to_param(d.delta(total.device), active.edit_set.layouts.get(path, "linear"), total.shape)
    return total


def _layout_of(state: KnowEditState, sets: Any, path: str) -> str:
    """How module ``path`` stores its edited matrix, as the edit sets touching it (now or planned) record."""
    for es in [a.edit_set for a in state.sets.values()] + [entry[0] for entry in sets.values()]:
        if path in es.deltas:
            return es.layouts.get(path, "linear")
    return "linear"


def _fingerprinted(weight: torch.Tensor, layout: str) -> torch.Tensor:
    """What a fingerprint of ``weight`` is taken of: the parameter itself, or for routed experts the matrix
    ``[out, E·I]`` it holds (a fingerprint sketches a 2-D matrix)."""
    return from_param(weight, layout) if layout in EXPERT_LAYOUTS else weight


def check_compatible(model: nn.Module, es: EditSet, force: bool = False) -> None:
    """Shapes and fingerprints of the effective weights of every touched module, before anything is written."""
    for path, d in es.deltas.items():
        layout = es.layouts.get(path, "linear")
        try:
            w = _weight(model, path, layout)
        except (AttributeError, KeyError, IndexError, InvalidConfigError) as err:
            raise BaseModelMismatchError(
                f"The edit set touches {path!r}, which this model does not have; it was made for another architecture."
            ) from err
        experts = es.num_experts.get(path) if layout in EXPERT_LAYOUTS else None
        if experts is not None and (w.dim() != 3 or w.shape[0] != experts):
            have = f"{w.shape[0]} experts" if w.dim() == 3 else f"a weight of shape {tuple(w.shape)}"
            raise BaseModelMismatchError(
                f"{path}: the edit set changes {experts} routed experts, the model has {have}; it was made for "
                "another model."
            )
        want = _param_shape(tuple(d.shape), layout, tuple(w.shape))
        if tuple(w.shape) != want:
            raise BaseModelMismatchError(
                f"{path}: the edit set expects a weight of shape {want}, the model has "
                f"{tuple(w.shape)}; it was made for another model."
            )
        fp = es.fingerprints.get(path)
        acting = _fingerprinted(effective_weight(model, path, layout), layout)
        if fp is not None and not matches_weight(fp, acting, w.dtype):
            if not force:
                raise BaseModelMismatchError(
                    f"{path}: the weights differ from those the edit set was computed on (fingerprint "
                    "mismatch). Load it into the base model it was made for (and any edit sets it was stacked "
                    "on, in order), or pass force=True to apply it anyway."
                )
            logger.warning("Applying edit set to %s despite a base-weight fingerprint mismatch (force=True).", path)


def expert_counts(model: nn.Module, layouts: dict[str, str]) -> dict[str, int]:
    """The number of routed experts of every routed-experts module (:data:`EXPERT_LAYOUTS`) in ``layouts`` (recorded
    in a new edit set)."""
    return {p: int(_weight(model, p, layout).shape[0]) for p, layout in layouts.items() if layout in EXPERT_LAYOUTS}


def weight_fingerprints(
    model: nn.Module, paths: list[str], layouts: dict[str, str] | None = None
) -> dict[str, dict[str, Any]]:
    """Fingerprints of the effective weights at ``paths`` (recorded in a new edit set; ``layouts``: path ->
    layout, default ``"linear"``)."""
    layouts = layouts or {}
    out = {}
    for p in paths:
        layout = layouts.get(p, "linear")
        acting = _fingerprinted(effective_weight(model, p, layout), layout)
        out[p] = fingerprint(acting, _weight(model, p, layout).dtype)
    return out


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


#: keyword arguments ``load_edits`` passes on to the Hub
HUB_ARGUMENTS = frozenset({"revision", "token", "cache_dir", "force_download", "local_files_only"})


def check_edit_set(es: Any) -> None:
    """Refuse what is not a well-formed edit set (hand-built ones included) before anything is planned."""
    if not isinstance(es, EditSet):
        raise InvalidArgumentError(f"Expected an EditSet, got {type(es).__name__}.")
    if not isinstance(es.deltas, dict) or not es.deltas:
        raise InvalidArgumentError("EditSet.deltas must be a non-empty dict of module path -> ModuleDelta.")
    if not isinstance(es.num_experts, dict) or not set(es.num_experts) <= set(es.deltas):
        raise InvalidArgumentError("EditSet.num_experts must be a dict keyed by module paths of EditSet.deltas.")
    if not isinstance(es.peft_targets, dict) or not set(es.peft_targets) <= set(es.deltas):
        raise InvalidArgumentError("EditSet.peft_targets must be a dict keyed by module paths of EditSet.deltas.")
    for path, d in es.deltas.items():
        if not isinstance(path, str) or not isinstance(d, ModuleDelta):
            raise InvalidArgumentError(f"EditSet.deltas[{path!r}] must be a ModuleDelta keyed by a module path.")
        if es.layouts.get(path, "linear") not in LAYOUTS:
            raise InvalidArgumentError(f"EditSet.layouts[{path!r}] must be one of {LAYOUTS}.")
        experts = es.num_experts.get(path)
        if experts is not None and (
            es.layouts.get(path) not in EXPERT_LAYOUTS
            or isinstance(experts, bool)
            or not isinstance(experts, int)
            or experts < 1
            or d.shape[1] % experts
        ):
            raise InvalidArgumentError(
                f"EditSet.num_experts[{path!r}] must be the expert count (an int >= 1 dividing ΔW's {d.shape[1]} "
                f"columns) of a module of layout 'experts' or 'experts_t'; got {experts!r} for layout "
                f"{es.layouts.get(path)!r}."
            )
        target = es.peft_targets.get(path, "module")
        if target not in PEFT_TARGETS or (target != "module" and es.layouts.get(path, "linear") != "linear"):
            raise InvalidArgumentError(
                f"EditSet.peft_targets[{path!r}] must be one of {PEFT_TARGETS} ('parameter' only for layout "
                f"'linear'); got {target!r} for layout {es.layouts.get(path, 'linear')!r}."
            )
        fp = es.fingerprints.get(path)
        if fp is not None and not (isinstance(fp, dict) and {"shape", "sha256", "sketch"} <= set(fp)):
            raise InvalidArgumentError(f"EditSet.fingerprints[{path!r}] is not a fingerprint (shape, sha256, sketch).")
    if not all(isinstance(r, EditRequest) for r in es.requests):
        raise InvalidArgumentError("EditSet.requests must be EditRequest objects (hf_knowedit.requests.to_request).")


def check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgumentError(f"{name} must be True or False, got {value!r}.")
    return value


def check_name(name: Any) -> str | None:
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise InvalidArgumentError(f"name must be a non-empty string or None, got {name!r}.")
    return name


def push_edit_set(
    model: nn.Module,
    es: EditSet,
    *,
    merge: bool = True,
    name: str | None = None,
    allow_conflicts: bool = False,
    force: bool = False,
    commit: Callable[[], None] | None = None,
) -> EditSet:
    """Activate ``es`` on ``model`` as one transaction: all modules or none, and ``commit`` (a method's
    state update, e.g. AlphaEdit's history) with it. Returns the set, named."""
    check_edit_set(es)
    check_flag("merge", merge), check_flag("allow_conflicts", allow_conflicts), check_flag("force", force)
    check_name(name)
    with model_lock(model) as state:
        _not_disabled(state, "Applying an edit set")
        counter = state.counter
        if name is None:
            counter += 1
            name = es.name if es.name and es.name not in state.sets else f"{es.method}-{counter}"
            while name in state.sets:
                counter += 1
                name = f"{es.method}-{counter}"
        elif name in state.sets:
            raise KnowEditError(
                f"An edit set named {name!r} is already active; pick another name or revert it first. "
                f"Active: {list(state.sets)}"
            )
        digest = deltas_digest(es.deltas, es.layouts)
        twin = next((n for n, a in state.sets.items() if a.digest == digest), None)
        if twin is not None:
            raise EditConflictError(
                f"This edit set is already active as {twin!r} ({'merged' if state.sets[twin].merged else 'hooked'}); "
                "the same change cannot be applied twice. Revert it first to apply it again."
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
        check_dispatch(model, [edited_param(p, es.layouts.get(p, "linear")) for p in es.deltas])
        for path, d in es.deltas.items():
            dtype = _weight(model, path, es.layouts.get(path, "linear")).dtype
            if not d.is_finite() or (not merge and not torch.isfinite(d.delta().to(dtype)).all()):
                raise NonFiniteUpdateError(
                    f"The update for {path} is not finite in {str(dtype).removeprefix('torch.')}; nothing was "
                    "applied. Lower the learning rate or clamp, or check the statistics."
                )
        stack = _current(state)
        stack[name] = (es, merge, digest)
        plan = _plan(model, state, stack)

        def activate() -> None:
            if commit is not None:
                commit()
            state.counter = counter
            es.name = name

        _switch(model, state, plan, activate)
    logger.info(
        "Applied edit set %r (%s, %d edits, %s).", name, es.method, len(es.requests), "merged" if merge else "hooked"
    )
    return es


def _names(state: KnowEditState | None, name: str | None) -> list[str]:
    if name is not None and not isinstance(name, str):
        raise InvalidArgumentError(f"name must be the name of an active edit set (a string) or None, got {name!r}.")
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
    """Remove one edit set (``name``) or all of them, restoring weights bit-exactly; all or nothing.

    Returns the names removed.
    """
    with model_lock(model) as state:
        names = _names(state, name)
        if not names:
            return []
        transaction(model, lambda s: OrderedDict((n, v) for n, v in s.items() if n not in names), "Reverting")
    logger.info("Reverted edit sets %s.", names)
    return names


def _set_merged(model: nn.Module, name: str | None, merged: bool, what: str) -> None:
    with model_lock(model) as state:
        names = _names(state, name)
        if all(state.sets[n].merged is merged for n in names):
            return
        transaction(
            model,
            lambda s: OrderedDict((n, (es, merged if n in names else m, dg)) for n, (es, m, dg) in s.items()),
            what,
        )


def merge_edits(model: nn.Module, name: str | None = None) -> None:
    """Move hooked edit sets into the weights (float32 math, finiteness checked in the weights' dtype)."""
    _set_merged(model, name, True, "Merging")


def unmerge_edits(model: nn.Module, name: str | None = None) -> None:
    """Take merged edit sets out of the weights and apply them through hooks instead."""
    _set_merged(model, name, False, "Unmerging")


@contextlib.contextmanager
def disable_edits(model: nn.Module) -> Iterator[nn.Module]:
    """``with model.disable_edits(): ...`` runs the base model, in every thread; edits come back on exit.

    Edit state cannot change inside the block (:class:`~hf_knowedit.errors.EditsDisabledError`), and
    other threads' edits wait until it ends. Both switches are planned on entry: leaving writes back
    copies of the edited weights made then, so it allocates nothing and cannot run out of memory.
    Should leaving fail all the same, it is undone and tried once more, and the error is raised."""
    with model_lock(model) as state:
        if state.disabled:  # nested: the base model runs already
            state.disabled += 1
            try:
                yield model
            finally:
                state.disabled -= 1
            return
        enter = _plan(model, state, _current(state), base_only=True)
        leave = enter.inverse()
        _switch(model, state, enter, lambda: setattr(state, "disabled", state.disabled + 1))
        try:
            yield model
        finally:
            try:
                _switch(model, state, leave, lambda: setattr(state, "disabled", state.disabled - 1))
            except BaseException:
                _switch(model, state, leave, lambda: setattr(state, "disabled", state.disabled - 1))
                raise


@contextlib.contextmanager
def base_view(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model *in the calling thread only* for the duration; every other thread keeps the
    edited model (what hf_knowedit's own passes use: statistics, context templates, the sampled corpus).

    In this thread, hooked sets stop acting and each module with merged sets computes with its pristine
    weight (:class:`~hf_knowedit.hooks.PrivateWeights`, the module's own ``forward`` on a private copy),
    so outputs are bit for bit those of ``disable_edits``, and nothing any other thread sees changes.
    Holds the model lock: edit state cannot change meanwhile (other threads' edits wait)."""
    with model_lock(model) as state:
        me = threading.get_ident()
        if state.disabled or me in state.viewing or not state.sets:  # already the base model here
            yield model
            return
        handles = []
        state.viewing.add(me)
        try:
            for path in sorted(state.base):
                module = get_module(model, path)
                params = {
                    n: p if p is None else read_tensor(model, f"{path}.{n}") for n, p in module._parameters.items()
                }
                params[LAYOUT_PARAM[_layout_of(state, {}, path)]] = state.base[path]
                hook = PrivateWeights(params)
                handles.append(module.register_forward_hook(hook, with_kwargs=True, prepend=True))
            yield model
        finally:
            try:
                remove_hooks(handles)
            finally:
                state.viewing.discard(me)


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
        for n, a in list(state.sets.items())
    ]


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Write every active edit set into the weights for good and forget them (PEFT's
    ``merge_and_unload``): the model then is a plain model with the edits baked in, e.g. to save
    with ``save_pretrained`` and serve anywhere. The edit stack, hooks and pristine copies are
    dropped, so the edits can no longer be reverted; other hf_knowedit state (the tokenizer, method
    history) stays. One transaction, like every stack change. Returns ``model``."""
    with model_lock(model) as state:
        _not_disabled(state, "merge_and_unload()")
        if not state.sets:
            return model
        names = list(state.sets)
        plan = _plan(model, state, OrderedDict((n, (es, True, d)) for n, (es, _, d) in _current(state).items()))
        plan.sets, plan.base = OrderedDict(), {}  # pristine copies go with the last step
        _switch(model, state, plan)
    logger.info("Merged and unloaded edit sets %s: they are now part of the weights.", names)
    return model


def load_edits(
    model: nn.Module,
    source: EditSet | str | os.PathLike,
    name: str | None = None,
    merge: bool = True,
    force: bool = False,
    allow_conflicts: bool = False,
    **hub_kwargs: Any,
) -> EditSet:
    """Apply a saved edit set: an :class:`EditSet`, an adapter directory, or a Hub repo id.

    Shapes and fingerprints of the weights of every touched module are checked first; a mismatch
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
    check_flag("merge", merge), check_flag("allow_conflicts", allow_conflicts), check_flag("force", force)
    check_name(name)
    unknown = sorted(set(hub_kwargs) - HUB_ARGUMENTS)
    if unknown:
        raise InvalidArgumentError(
            f"load_edits() got unknown argument(s) {unknown}; Hub arguments are {sorted(HUB_ARGUMENTS)}."
        )
    if isinstance(source, EditSet):
        if hub_kwargs:
            raise InvalidArgumentError(f"Hub arguments {sorted(hub_kwargs)} make no sense with an EditSet source.")
        es = dataclasses.replace(source)  # the stack names its own copy; the caller's set stays as it is
    elif isinstance(source, (str, os.PathLike)):
        es = EditSet.from_pretrained(source, **hub_kwargs)
    else:
        raise InvalidArgumentError(
            f"load_edits needs an EditSet, an adapter directory or a Hub repo id such as 'user/my-edit'; "
            f"got {type(source).__name__} {source!r}."
        )
    return push_edit_set(model, es, merge=merge, name=name, allow_conflicts=allow_conflicts, force=force)


def get_edit_set(model: nn.Module, name: str) -> EditSet:
    """The active :class:`EditSet` called ``name``."""
    state = get_state(model, create=False)
    return state.sets[_names(state, name)[0]].edit_set
