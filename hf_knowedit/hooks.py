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
* :func:`frozen`: eval mode (each module's own flag restored) and no parameter gradients;
* :class:`ReplayBlock` and :func:`replaced_blocks`: stand-ins for decoder blocks whose output is
  already known (lower layers during tracing and target optimisation), swapped into the
  ``layers`` ModuleList for one forward and always put back;
* :class:`ModelGate`: lets forwards of other threads run while hf_knowedit computes, and holds
  them back only while an edit switches weights.

**Threads.** Helpers that exist only for hf_knowedit's own computation (``Trace``, a
``LowRankHook`` with an ``owner``, ``ReplayBlock``) act only in the thread that made them: a
forward running in another thread at the same time passes through them untouched (a
``ReplayBlock`` runs the real block for it), so serving code never sees them.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .architectures import ArchitectureSpec, get_module

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

    Attributes after the forward pass: ``input`` (first positional input) and
    ``output`` (the module's output, after ``edit_output``).
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
    input's device once. ``active()`` (if given) is asked on every call; False leaves the output alone.

    ``factors`` may grow while the hook is registered (MEMIT adds each layer's update as it goes).
    ``owner=threading.get_ident()`` makes it act only in that thread (updates in progress inside a
    method); without it, it acts in every thread (hooked edit sets).

        >>> handle = module.register_forward_hook(LowRankHook([(B, A)]))
    """

    def __init__(
        self,
        factors: Sequence[tuple[torch.Tensor, torch.Tensor]],
        active: Callable[[], bool] | None = None,
        owner: int | None = None,
    ) -> None:
        self.factors: list[tuple[torch.Tensor, torch.Tensor]] = list(factors)
        self.active = active
        self.owner = owner
        self._on: dict[Any, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def _factors_on(self, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        cached = self._on.setdefault(device, [])
        for B, A in self.factors[len(cached) :]:
            cached.append((B.to(device), A.to(device)))
        return cached

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if self.owner is not None and threading.get_ident() != self.owner:
            return None
        if self.active is not None and not self.active():
            return None
        x = args[0].to(output.device).float()  # under accelerate the input may still be on the previous device
        extra = sum((x @ A.t()) @ B.t() for B, A in self._factors_on(x.device))
        return output + extra.to(output.dtype)


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
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers: dict[int, int] = {}
        self._writer: int | None = None
        self._depth = 0
        self._waiting = 0
        self._handles: list[Any] = []

    def install(self, model: nn.Module) -> None:
        def enter(module: nn.Module, args: Any) -> None:
            self._enter()

        def leave(module: nn.Module, args: Any, output: Any) -> None:
            self._leave()

        enter.is_model_gate = leave.is_model_gate = True  # type: ignore[attr-defined]
        self._handles = [
            model.register_forward_pre_hook(enter),
            model.register_forward_hook(leave, always_call=True),
        ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _enter(self) -> None:
        me = threading.get_ident()
        with self._cond:
            if self._writer != me and not self._readers.get(me):
                while self._writer is not None or self._waiting:
                    self._cond.wait()
            self._readers[me] = self._readers.get(me, 0) + 1

    def _leave(self) -> None:
        me = threading.get_ident()
        with self._cond:
            count = self._readers.get(me, 0) - 1
            if count > 0:
                self._readers[me] = count
            else:
                self._readers.pop(me, None)
            self._cond.notify_all()

    @contextlib.contextmanager
    def switching(self) -> Iterator[None]:
        """Hold back forwards of other threads for the duration (re-entrant)."""
        me = threading.get_ident()
        with self._cond:
            if self._writer != me:
                self._waiting += 1
                try:
                    while self._writer is not None or any(t != me for t in self._readers):
                        self._cond.wait()
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
