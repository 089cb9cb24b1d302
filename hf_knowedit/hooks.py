"""Scoped forward hooks, in the spirit of baukit's ``Trace`` / ``TraceDict``.

Every hook is an ordinary ``register_forward_hook`` (so it stacks with accelerate's
dispatch hooks; no ``forward`` is ever replaced) and is removed when the ``with``
block exits, also after an exception.

    >>> with TraceDict(model, ["model.layers.3.mlp.down_proj"], retain_input=True) as td:
    ...     model(**batch)
    >>> keys = td["model.layers.3.mlp.down_proj"].input      # [batch, seq, d_ff]

``edit_output=fn`` replaces a module's output with ``fn(output, path)``; ``stop=True``
ends the forward pass right after the (last) traced module, which makes partial
forwards (statistics, cached prefixes) cheap.

Also here, because they are hooks or hook-like scopes too:

* :class:`LowRankHook`: adds ``x Aᵀ Bᵀ`` to a module's output (hooked edit sets, updates in
  progress inside ROME and MEMIT);
* :class:`PrivateWeights`: a module's output computed with other weights, in one thread only (the
  base model for hf_knowedit's own passes while other threads keep the edited one);
* :func:`frozen`: eval mode (each module's own flag restored) and no parameter gradients;
* :class:`ReplayBlock` and :func:`replaced_blocks`: stand-ins for decoder blocks whose output is
  already known (lower layers during tracing and target optimisation), swapped into the
  ``layers`` ModuleList for one forward and always put back;
* :class:`ModelGate`: lets forwards of other threads run while hf_knowedit computes, and holds
  them back only while an edit switches weights.

**Threads.** Helpers that exist only for hf_knowedit's own computation (``Trace``, a
``LowRankHook`` with an ``owner``, ``PrivateWeights``, ``ReplayBlock``) act only in the thread that made them: a
forward running in another thread at the same time passes through them untouched (a
``ReplayBlock`` runs the real block for it), so serving code never sees them.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import FrameType
from typing import Any

import torch
from torch import nn

from .architectures import EXPERT_LAYOUTS, ArchitectureSpec, get_module
from .errors import NotPicklableError
from .experts import gate_up_of, module_key

#: what to do instead of pickling a model that carries hf_knowedit state
PICKLE_HINT = (
    "This model carries hf_knowedit state (the edit stack, its lock and the forward gate), which cannot be "
    "pickled (pickle, torch.save(model)). Save the weights with model.save_pretrained(...) (after "
    "merge_and_unload() to bake active edits in) and edit sets with EditSet.save_pretrained, or call "
    "hf_knowedit.detach(model) before pickling. copy.deepcopy(model) works: it gives an independent copy."
)

EditFn = Callable[[Any, str], Any]


class StopForward(Exception):
    """Raised by a ``stop=True`` trace to end a forward pass early; swallowed on exit."""


def hidden(output: Any) -> torch.Tensor:
    """The hidden-state tensor of a module output (decoder blocks may return tuples)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def replace_hidden(output: Any, new: torch.Tensor) -> Any:
    """``output`` with its hidden-state tensor replaced by ``new`` (tuple structure kept)."""
    if isinstance(output, tuple):
        return (new,) + tuple(output[1:])
    if isinstance(output, list):
        return [new] + list(output[1:])
    return new


def first_input(args: tuple, kwargs: dict) -> Any:
    if args:
        return args[0]
    for key in ("hidden_states", "input", "x", "input_ids"):
        if key in kwargs:
            return kwargs[key]
    return next(iter(kwargs.values()), None)


def _keep(value: Any, clone: bool, detach: bool) -> Any:
    if isinstance(value, torch.Tensor):
        if detach:
            value = value.detach()
        if clone:
            value = value.clone()
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(_keep(v, clone, detach) for v in value)
    return value


class Trace(contextlib.AbstractContextManager):
    """Hook one module (by dotted path, or the module itself).

    Attributes after the forward pass: ``input`` (first positional input), ``args`` (all positional
    inputs; both with ``retain_input``) and ``output`` (the module's output, after ``edit_output``).
    """

    def __init__(
        self,
        model: nn.Module,
        path: str | nn.Module,
        *,
        retain_input: bool = False,
        retain_output: bool = True,
        clone: bool = False,
        detach: bool = False,
        edit_output: EditFn | None = None,
        stop: bool = False,
    ) -> None:
        module = path if isinstance(path, nn.Module) else get_module(model, path)
        name = path if isinstance(path, str) else type(path).__name__
        self.input: Any = None
        self.args: tuple = ()
        self.output: Any = None

        owner = threading.get_ident()

        def hook(mod: nn.Module, args: tuple, *rest: Any) -> Any:
            if threading.get_ident() != owner:  # another thread's forward: not ours to trace
                return None
            # torch registers a with_kwargs hook in two steps; a forward running in another thread between
            # them calls it as (module, args, output). Only that thread can see the gap, and it returned above.
            kwargs, output = rest if len(rest) == 2 else ({}, rest[0])
            if retain_input:
                self.input = _keep(first_input(args, kwargs), clone, detach)
                self.args = _keep(tuple(args), clone, detach)
            if edit_output is not None:
                output = edit_output(output, name)
            if retain_output:
                self.output = _keep(output, clone, detach)
            if stop:
                raise StopForward()
            return output

        self._handle = module.register_forward_hook(hook, with_kwargs=True)

    def close(self) -> None:
        remove_hooks([self._handle])

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close()
        return exc_type is not None and issubclass(exc_type, StopForward)


class TraceDict(OrderedDict, contextlib.AbstractContextManager):
    """Hook several modules at once; ``td[path]`` is that module's :class:`Trace`.

    With ``stop=True`` the forward pass stops after the last path *in the given order*
    has run (give paths in execution order).
    """

    def __init__(
        self,
        model: nn.Module,
        paths: Iterable[str],
        *,
        retain_input: bool = False,
        retain_output: bool = True,
        clone: bool = False,
        detach: bool = False,
        edit_output: EditFn | None = None,
        stop: bool = False,
    ) -> None:
        super().__init__()
        paths = list(dict.fromkeys(paths))
        try:
            for i, path in enumerate(paths):
                self[path] = Trace(
                    model,
                    path,
                    retain_input=retain_input,
                    retain_output=retain_output,
                    clone=clone,
                    detach=detach,
                    edit_output=edit_output,
                    stop=stop and i == len(paths) - 1,
                )
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        remove_hooks([trace._handle for trace in self.values()])

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close()
        return exc_type is not None and issubclass(exc_type, StopForward)


def remove_hooks(handles: Iterable[Any]) -> None:
    """Remove every hook in ``handles`` (``RemovableHandle``s), also when a removal raises: a failed
    removal is tried once more, the other hooks are removed all the same, and the first error is
    raised at the end. So a helper hook is not left on the model by an error, or an exception raised
    into the thread, while it is taken off."""
    first: BaseException | None = None
    for handle in handles:
        try:
            handle.remove()
        except BaseException as err:  # noqa: BLE001 - raised below, after the other hooks are off
            first = first or err
            with contextlib.suppress(BaseException):
                handle.remove()
    if first is not None:
        raise first


def count_forward_hooks(model: nn.Module) -> int:
    """Number of forward (pre-)hooks registered on any submodule, not counting the :class:`ModelGate`
    that ``attach`` installs (for tests)."""
    hooks = (h for m in model.modules() for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values()))
    return sum(not getattr(h, "is_model_gate", False) for h in hooks)


# -----------------------------------------------------------------------------
# low-rank deltas through hooks


class LowRankHook:
    """A forward hook adding ``Σ x Aᵢᵀ Bᵢᵀ`` over its ``factors`` ``[(B [out, r], A [r, in]), ...]`` to a
    module's output, computed in float32 and cast to the output's dtype; factors are copied to the
    input's device once (threads making their first forward on a device at the same time may each
    copy them; each factor still acts once). ``active()`` (if given) is asked on every call; False
    leaves the output alone.

    ``factors`` may grow while the hook is registered (MEMIT adds each layer's update as it goes).
    ``owner=threading.get_ident()`` makes it act only in that thread (updates in progress inside a
    method); without it, it acts in every thread (hooked edit sets). ``layout``: the module's
    ``mlp_out_layout``; for routed experts (``"experts"``, ``"experts_t"``) the factors act on the routed keys
    (:mod:`hf_knowedit.experts`), not on the first input, computed with ``gate_up()`` where given (an offloaded
    module's ``gate_up_proj`` and, for ``"experts_t"``, its bias: :func:`hf_knowedit.experts.gate_up_of`).

        >>> handle = module.register_forward_hook(LowRankHook([(B, A)]))
    """

    def __init__(
        self,
        factors: Sequence[tuple[torch.Tensor, torch.Tensor]],
        active: Callable[[], bool] | None = None,
        owner: int | None = None,
        layout: str = "linear",
        gate_up: Callable[[], tuple[torch.Tensor, ...]] | None = None,
    ) -> None:
        self.factors: list[tuple[torch.Tensor, torch.Tensor]] = list(factors)
        self.layout = layout
        self.gate_up = gate_up
        self.active = active
        self.owner = owner
        self._on: dict[Any, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def _factors_on(self, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        cached = self._on.get(device, [])
        if len(cached) < len(self.factors):
            # copy on write, never append: threads here at once each build a whole list, and one is kept
            cached = cached + [(B.to(device), A.to(device)) for B, A in self.factors[len(cached) :]]
            self._on[device] = cached
        return cached

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if self.owner is not None and threading.get_ident() != self.owner:
            return None
        if self.active is not None and not self.active():
            return None
        x = module_key(self.layout, module, args, None if self.gate_up is None else self.gate_up())
        x = x.to(output.device).float()  # under accelerate the input may still be on the previous device
        extra = sum((x @ A.t()) @ B.t() for B, A in self._factors_on(x.device))
        return output + extra.to(output.dtype)


def module_hook(
    model: nn.Module, path: str, layout: str, factors: Sequence[tuple[torch.Tensor, torch.Tensor]], **kwargs: Any
) -> LowRankHook:
    """A :class:`LowRankHook` for module ``path`` of ``model`` stored in ``layout`` (routed experts read their
    ``gate_up_proj`` through :func:`~hf_knowedit.experts.gate_up_of`, so an offloaded module works). The reader is a
    ``functools.partial`` over ``model``, not a closure: a ``copy.deepcopy`` of the model gives its hook a reader of
    the copy's parameters."""
    gate_up = functools.partial(gate_up_of, model, path, layout) if layout in EXPERT_LAYOUTS else None
    return LowRankHook(factors, layout=layout, gate_up=gate_up, **kwargs)


class PrivateWeights:
    """A forward hook that, in the thread that made it, replaces a module's output with what the module's
    own ``forward`` computes with ``params`` (name -> tensor) in place of its parameters. It runs that
    ``forward`` on a shallow copy of the module, so the module itself, and every other thread's forward,
    never see those values. Register it with ``with_kwargs=True``.

        >>> module.register_forward_hook(PrivateWeights({"weight": W0, "bias": b}), with_kwargs=True, prepend=True)
    """

    def __init__(self, params: dict[str, torch.Tensor | None]) -> None:
        self.params = params
        self.owner = threading.get_ident()

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if threading.get_ident() != self.owner:
            return None
        device = hidden(output).device  # under accelerate the inputs may still be on the previous device
        view = copy.copy(module)
        view.__dict__["_parameters"] = {n: None if t is None else t.to(device) for n, t in self.params.items()}
        args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
        return type(module).forward(view, *args, **kwargs)


# -----------------------------------------------------------------------------
# eval-mode scope


@contextlib.contextmanager
def frozen(model: nn.Module, *, params: bool = True) -> Iterator[nn.Module]:
    """Eval mode (no dropout) and, with ``params``, no parameter gradients, for the duration; afterwards
    every module gets back its own ``training`` flag and every parameter its ``requires_grad``."""
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()] if params else []
    try:
        for p, _ in grads:
            p.requires_grad_(False)
        model.eval()
        yield model
    finally:
        for p, flag in grads:
            p.requires_grad_(flag)
        for m, flag in modes:
            m.training = flag


# -----------------------------------------------------------------------------
# replaying blocks whose output is known


class ReplayBlock(nn.Module):
    """Stands in for a decoder block: returns ``output(*args, **kwargs)`` instead of computing.

    Attribute lookups it cannot answer go to the original block (models read e.g. ``layer_idx`` or
    ``attention_type`` off their blocks); the original is not registered as a submodule. Called
    from another thread than the one that made it, it runs the original block.
    """

    def __init__(self, original: nn.Module, output: Callable[..., Any]) -> None:
        super().__init__()
        self.__dict__["_original"] = original
        self.__dict__["_output"] = output
        self.__dict__["_owner"] = threading.get_ident()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() != self._owner:
            return self._original(*args, **kwargs)
        return self._output(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_original"], name)


@contextlib.contextmanager
def replaced_blocks(model: nn.Module, spec: ArchitectureSpec, stubs: dict[int, nn.Module]) -> Iterator[None]:
    """Put ``stubs[i]`` in place of decoder block ``i`` (in the ``spec.layers`` ModuleList) for the
    duration; the original blocks are always put back. No ``forward`` is replaced."""
    if not stubs:
        yield
        return
    blocks = get_module(model, spec.layers)
    originals = {i: blocks[i] for i in stubs}
    try:
        for i, stub in stubs.items():
            blocks[i] = stub
        yield
    finally:
        for i, block in originals.items():
            blocks[i] = block


# -----------------------------------------------------------------------------
# forwards of other threads while an edit switches weights


class ModelGate:
    """A reader-writer gate on one model's forward.

    Installed on the root module by :meth:`install` (a forward pre-hook and an always-called forward
    hook): every forward is a *reader*. :meth:`switching` is the *writer*: it waits until forwards
    of other threads have finished, holds new ones back while weights and hooks switch (a few
    tensor copies), then lets them go. The switching thread's own forwards pass. So a forward
    running in another thread computes the model before a switch or after it, never halfway.
    Writers are preferred: a waiting switch holds back new forwards.

    A reader is remembered by the frame that called the pre-hook (the module's call), so a forward
    that ends without the exit hook (torch calls ``always_call`` hooks for an ``Exception`` only, not
    for ``KeyboardInterrupt`` or ``SystemExit``) is recognised as over: its frame is no longer on its
    thread's stack. A waiting switch looks every :data:`POLL` seconds; the thread's next forward
    looks too.
    """

    #: seconds between a waiting switch's checks for forwards that ended without the exit hook
    POLL = 0.05

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers: dict[int, list[FrameType]] = {}  # thread -> frames of the forwards it is inside
        self._writer: int | None = None
        self._depth = 0
        self._waiting = 0
        self._handles: list[Any] = []

    def install(self, model: nn.Module) -> None:
        self._handles = [
            model.register_forward_pre_hook(self._pre_hook),
            model.register_forward_hook(self._post_hook, always_call=True),
        ]

    # bound methods, not closures, so that a deep copy of the model gets hooks bound to the copy's gate
    def _pre_hook(self, module: nn.Module, args: Any) -> None:
        self._enter(sys._getframe(1))

    def _post_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        self._leave()

    _pre_hook.is_model_gate = _post_hook.is_model_gate = True  # type: ignore[attr-defined]

    def run_as_reader(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` as one reader (a whole ``generate``): no switch happens while it runs,
        and the forwards it makes in this thread pass."""
        self._enter(sys._getframe())
        try:
            return fn(*args, **kwargs)
        finally:
            self._leave()

    def __deepcopy__(self, memo: dict[int, Any]) -> ModelGate:
        """A fresh gate (no readers, no writer) whose handles remove the copied model's hooks."""
        new = memo[id(self)] = ModelGate()
        new._handles = copy.deepcopy(self._handles, memo)
        return new

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise NotPicklableError(PICKLE_HINT)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _prune(self, thread: int, top: FrameType | None) -> None:
        """Forget ``thread``'s readers whose frame is not on the stack that ``top`` starts (under the lock)."""
        live = set()
        while top is not None:
            live.add(id(top))
            top = top.f_back
        frames = [f for f in self._readers.get(thread, ()) if id(f) in live]
        if frames:
            self._readers[thread] = frames
        else:
            self._readers.pop(thread, None)

    def _enter(self, frame: FrameType) -> None:
        me = threading.get_ident()
        with self._cond:
            if me in self._readers:  # a forward inside a forward, or one interrupted earlier
                self._prune(me, frame.f_back)
            if self._writer != me and me not in self._readers:
                while self._writer is not None or self._waiting:
                    self._cond.wait()
            self._readers.setdefault(me, []).append(frame)

    def _leave(self) -> None:
        me = threading.get_ident()
        with self._cond:
            frames = self._readers.get(me)
            if frames:
                frames.pop()
            if not frames:
                self._readers.pop(me, None)
            self._cond.notify_all()

    def _others_reading(self, me: int) -> bool:
        stacks = sys._current_frames()
        for thread in [t for t in self._readers if t != me]:
            self._prune(thread, stacks.get(thread))
        return any(t != me for t in self._readers)

    @contextlib.contextmanager
    def switching(self) -> Iterator[None]:
        """Hold back forwards of other threads for the duration (re-entrant)."""
        me = threading.get_ident()
        with self._cond:
            if self._writer != me:
                self._waiting += 1
                try:
                    while self._writer is not None or self._others_reading(me):
                        self._cond.wait(self.POLL)
                finally:
                    self._waiting -= 1
                self._writer = me
            self._depth += 1
        try:
            yield
        finally:
            with self._cond:
                self._depth -= 1
                if self._depth == 0:
                    self._writer = None
                self._cond.notify_all()
