"""hf_knowedit: find where a language model stores a fact, rewrite it in place, and ship
the rewrite as a small adapter that can be shared, loaded, merged and reverted.

    >>> import hf_knowedit
    >>> model = hf_knowedit.attach(model, tokenizer)
    >>> edit = model.apply_edits({"prompt": "{} is located in", "subject": "Angola", "target_new": "Antarctica"})
    >>> model.revert_edits()

Layout (lower layers never import higher ones): ``errors``, ``architectures``, ``hooks``,
``tokens``, ``requests``, ``generation`` → ``deltas``, ``moments`` → ``adapter_files`` →
``editset`` → ``stack`` → ``tracing/``, ``methods/`` → ``editing`` (``apply_edits``) →
``evaluation/`` → ``attach``, ``cli``. See ``docs/design.md``.

The public names below are imported on first use (PEP 562), so ``import hf_knowedit`` and
``hf-knowedit --help`` do not import torch; ``hf_knowedit.apply_edits`` etc. work as usual.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from . import errors
from .version import __version__

#: public name -> the submodule that defines it (imported on first access)
_EXPORTS: dict[str, str] = {
    "ARCHITECTURES": "architectures",
    "ArchitectureSpec": "architectures",
    "get_architecture": "architectures",
    "register_architecture": "architectures",
    "supported_architectures": "architectures",
    "KnowEditMixin": "attach",
    "attach": "attach",
    "detach": "attach",
    "load_gemma3": "_bundled",
    "load_smollm2": "_bundled",
    "ModuleDelta": "deltas",
    "apply_edits": "editing",
    "EditSet": "editset",
    "EvalResult": "evaluation",
    "evaluate": "evaluation",
    "load_records": "evaluation",
    "LifelongResult": "evaluation",
    "run_lifelong": "evaluation",
    "AlphaEditConfig": "methods",
    "EditConfig": "methods",
    "EMMETConfig": "methods",
    "MEMITConfig": "methods",
    "ROMEConfig": "methods",
    "available_methods": "methods",
    "register_method": "methods",
    "compute_second_moment": "methods.statistics",
    "SecondMoment": "moments",
    "StatsCache": "moments",
    "StatsKey": "moments",
    "pull_statistics": "moments",
    "push_statistics": "moments",
    "EditRequest": "requests",
    "ActiveEdit": "stack",
    "disable_edits": "stack",
    "list_edits": "stack",
    "load_edits": "stack",
    "merge_and_unload": "stack",
    "merge_edits": "stack",
    "revert_edits": "stack",
    "unmerge_edits": "stack",
    "TraceConfig": "tracing",
    "TraceResult": "tracing",
    "TraceSummary": "tracing",
    "suggest_layers": "tracing",
    "trace_fact": "tracing",
    "trace_facts": "tracing",
}

__all__ = [
    "ARCHITECTURES",
    "ActiveEdit",
    "AlphaEditConfig",
    "ArchitectureSpec",
    "EMMETConfig",
    "EditConfig",
    "EditRequest",
    "EditSet",
    "EvalResult",
    "KnowEditMixin",
    "LifelongResult",
    "MEMITConfig",
    "ModuleDelta",
    "ROMEConfig",
    "SecondMoment",
    "StatsCache",
    "StatsKey",
    "TraceConfig",
    "TraceResult",
    "TraceSummary",
    "__version__",
    "apply_edits",
    "attach",
    "available_methods",
    "compute_second_moment",
    "detach",
    "disable_edits",
    "errors",
    "evaluate",
    "get_architecture",
    "list_edits",
    "load_edits",
    "load_gemma3",
    "load_records",
    "load_smollm2",
    "merge_and_unload",
    "merge_edits",
    "pull_statistics",
    "push_statistics",
    "register_architecture",
    "register_method",
    "revert_edits",
    "run_lifelong",
    "suggest_layers",
    "supported_architectures",
    "trace_fact",
    "trace_facts",
    "unmerge_edits",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    else:  # a submodule, e.g. hf_knowedit.stack
        try:
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """``hf_knowedit.attach`` is the function, as with an eager ``from .attach import attach``: importing
    the submodule ``hf_knowedit.attach`` (which binds it on the package) keeps the function there."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "attach" and isinstance(value, types.ModuleType):
            value = value.attach
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:  # the same names, eagerly, for type checkers and IDEs
    from .architectures import (
        ARCHITECTURES,
        ArchitectureSpec,
        get_architecture,
        register_architecture,
        supported_architectures,
    )
    from .attach import KnowEditMixin, attach, detach
    from .deltas import ModuleDelta
    from .editing import apply_edits
    from .editset import EditSet
    from .evaluation import EvalResult, LifelongResult, evaluate, load_records, run_lifelong
    from .methods import (
        AlphaEditConfig,
        EditConfig,
        EMMETConfig,
        MEMITConfig,
        ROMEConfig,
        available_methods,
        register_method,
    )
    from .methods.statistics import compute_second_moment
    from .moments import SecondMoment, StatsCache, StatsKey, pull_statistics, push_statistics
    from .requests import EditRequest
    from .stack import (
        ActiveEdit,
        disable_edits,
        list_edits,
        load_edits,
        merge_and_unload,
        merge_edits,
        revert_edits,
        unmerge_edits,
    )
    from .tracing import TraceConfig, TraceResult, TraceSummary, suggest_layers, trace_fact, trace_facts
