"""Binding the functional core onto a model instance.

``attach`` puts a few bound methods into the instance's ``__dict__`` and one state
attribute (see :mod:`hf_knowedit.stack`). It never swaps ``model.__class__`` (transformers
writes the class name into saved configs) and never replaces a module's ``forward``
(accelerate relies on it). Every method is a thin call into the functional core, the same
one :class:`KnowEditMixin` calls; the table :data:`MODEL_METHODS` is the single list.
"""

from __future__ import annotations

import functools
import importlib
import types
from collections.abc import Callable
from typing import Any

from torch import nn

from .architectures import get_architecture
from .errors import KnowEditError, MissingTokenizerError
from .stack import forget_state, get_state, merge_and_unload

#: method name -> ("module:function", needs_tokenizer). The function's first argument is the
#: model; when ``needs_tokenizer`` the second is the tokenizer.
MODEL_METHODS: dict[str, tuple[str, bool]] = {
    "apply_edits": ("hf_knowedit.editing:apply_edits", True),
    "revert_edits": ("hf_knowedit.stack:revert_edits", False),
    "merge_edits": ("hf_knowedit.stack:merge_edits", False),
    "unmerge_edits": ("hf_knowedit.stack:unmerge_edits", False),
    "disable_edits": ("hf_knowedit.stack:disable_edits", False),
    "list_edits": ("hf_knowedit.stack:list_edits", False),
    "load_edits": ("hf_knowedit.stack:load_edits", False),
    "trace_fact": ("hf_knowedit.tracing:trace_fact", True),
    "merge_and_unload": ("hf_knowedit.stack:merge_and_unload", False),
}


def _resolve(target: str) -> Callable:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def _tokenizer(model: nn.Module) -> Any:
    state = get_state(model, create=False)
    tok = state.tokenizer if state is not None else None
    if tok is None:
        raise MissingTokenizerError(
            "This model has no tokenizer attached: call hf_knowedit.attach(model, tokenizer) "
            "(or model.set_edit_tokenizer(tokenizer) with KnowEditMixin)."
        )
    return tok


def _make_method(name: str) -> Callable:
    target, needs_tokenizer = MODEL_METHODS[name]
    func = _resolve(target)

    @functools.wraps(func)
    def method(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if needs_tokenizer:
            tok = kwargs.pop("tokenizer", None) or _tokenizer(self)
            return func(self, tok, *args, **kwargs)
        return func(self, *args, **kwargs)

    return method


def is_attached(model: nn.Module) -> bool:
    return all(name in model.__dict__ for name in MODEL_METHODS)


def attach(model: nn.Module, tokenizer: Any = None) -> nn.Module:
    """Give ``model`` the methods ``apply_edits``, ``revert_edits``, ``merge_edits``, ``unmerge_edits``,
    ``disable_edits``, ``list_edits`` (and ``trace_fact``, ``load_edits`` where available).

    Raises :class:`~hf_knowedit.errors.UnsupportedArchitectureError` (model untouched) when
    ``config.model_type`` has no entry in the architecture table. Attaching again is a no-op,
    except that a given tokenizer replaces the stored one.

    >>> model = hf_knowedit.attach(AutoModelForCausalLM.from_pretrained(name), tokenizer)
    >>> model.list_edits()
    []
    """
    get_architecture(model)
    state = get_state(model)
    if tokenizer is not None:
        state.tokenizer = tokenizer
    if is_attached(model):
        return model
    for name in MODEL_METHODS:
        model.__dict__[name] = types.MethodType(_make_method(name), model)
    return model


def detach(model: nn.Module, *, keep_edits: bool = False) -> nn.Module:
    """Undo :func:`attach` exactly.

    With active edit sets this refuses (their history would be lost) unless ``keep_edits=True``,
    which merges every set into the weights for good and forgets how to revert them
    (:func:`~hf_knowedit.stack.merge_and_unload`).
    """
    state = get_state(model, create=False)
    if state is not None and state.sets:
        if not keep_edits:
            raise KnowEditError(
                f"Edit sets {list(state.sets)} are active: revert them first "
                "(model.revert_edits()), or detach(model, keep_edits=True) to bake them in."
            )
        merge_and_unload(model)
    for name in MODEL_METHODS:
        model.__dict__.pop(name, None)
    forget_state(model)
    return model


class KnowEditMixin:
    """For people who write their own model subclasses::

        class MyLlama(KnowEditMixin, LlamaForCausalLM):
            pass

        model = MyLlama.from_pretrained(...)
        model.set_edit_tokenizer(tokenizer)
        model.apply_edits(...)

    The methods are generated from :data:`MODEL_METHODS` and call the same functional core
    as :func:`attach`.
    """

    def set_edit_tokenizer(self, tokenizer: Any) -> None:
        get_state(self).tokenizer = tokenizer  # type: ignore[arg-type]


def _install_mixin_methods() -> None:
    for name in MODEL_METHODS:

        def lazy(self: Any, *args: Any, __name: str = name, **kwargs: Any) -> Any:
            return _make_method(__name)(self, *args, **kwargs)

        lazy.__name__ = name
        lazy.__doc__ = f"See :func:`{MODEL_METHODS[name][0].replace(':', '.')}`."
        setattr(KnowEditMixin, name, lazy)


_install_mixin_methods()
