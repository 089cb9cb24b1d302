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
"""

from . import errors
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
from .evaluation import EvalResult, evaluate, load_records
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
from .version import __version__

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
    "load_records",
    "merge_and_unload",
    "merge_edits",
    "pull_statistics",
    "push_statistics",
    "register_architecture",
    "register_method",
    "revert_edits",
    "suggest_layers",
    "supported_architectures",
    "trace_fact",
    "trace_facts",
    "unmerge_edits",
]
