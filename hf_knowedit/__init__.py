"""hf_knowedit: find where a language model stores a fact, rewrite it in place, and ship
the rewrite as a small adapter that can be shared, loaded, merged and reverted.

    >>> import hf_knowedit
    >>> model = hf_knowedit.attach(model, tokenizer)
    >>> edit = model.apply_edits({"prompt": "{} is located in", "subject": "Angola", "target_new": "Antarctica"})
    >>> model.revert_edits()
"""

from . import errors
from .architectures import (ARCHITECTURES, ArchitectureSpec, get_architecture, register_architecture,
                            supported_architectures)
from .attach import KnowEditMixin, attach, detach
from .editing import apply_edits, available_methods, register_method
from .editset import EditSet, ModuleDelta
from .evaluation import EvalResult, evaluate, load_records
from .context import context_templates
from .requests import EditRequest
from .rome import ROMEConfig
from .memit import MEMITConfig
from .alphaedit import AlphaEditConfig
from .emmet import EMMETConfig
from .stack import disable_edits, list_edits, merge_edits, revert_edits, unmerge_edits
from .stats import StatsCache, compute_second_moment
from .tracing import TraceResult, suggest_layers, trace_fact, trace_facts
from .version import __version__

__all__ = [
    "ARCHITECTURES", "ArchitectureSpec", "EditRequest", "EditSet", "KnowEditMixin", "ModuleDelta", "__version__",
    "apply_edits", "attach", "available_methods", "detach", "disable_edits", "errors", "get_architecture",
    "list_edits", "merge_edits", "register_architecture", "register_method", "revert_edits",
    "supported_architectures", "unmerge_edits",
    "ROMEConfig", "StatsCache", "compute_second_moment", "context_templates",
    "EvalResult", "evaluate", "load_records",
    "TraceResult", "suggest_layers", "trace_fact", "trace_facts",
    "MEMITConfig", "AlphaEditConfig", "EMMETConfig",
]
