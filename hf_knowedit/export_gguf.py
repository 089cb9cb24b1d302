"""Edit sets as llama.cpp LoRA adapters: GGUF files that llama.cpp and what is built on it (Ollama,
LM Studio, llama-cpp-python) load onto a GGUF base model.

Needs the ``gguf`` package (the ``bundled`` extra). The file holds what llama.cpp's adapter loader
(``src/llama-adapter.cpp``) reads:

* ``general.type = "adapter"``, ``general.architecture`` = the table's ``gguf_arch``
  (llama.cpp refuses an adapter whose architecture differs from the model's),
  ``adapter.type = "lora"``, ``adapter.lora.alpha``;
* per edited module, ``blk.{i}.{gguf_mlp_out}.weight.lora_a`` and ``.lora_b`` (the table's
  ``gguf_mlp_out``, e.g. ``blk.6.ffn_down.weight.lora_a`` for ``model.layers.6.mlp.down_proj``).
  As numpy arrays they are :class:`~hf_knowedit.deltas.ModuleDelta`'s factors unchanged:
  ``lora_a = A [r, in]``, ``lora_b = B [out, r]`` (ggml lists dimensions innermost first, so
  llama.cpp sees ``ne = [in, r]`` and ``[r, out]`` against the weight's ``[in, out]``);
* the edit's provenance under ``hf_knowedit.*`` keys (method, base model, the requests as JSON).

llama.cpp adds ``scale · B (A x)`` with ``scale = user_scale · alpha / r`` where ``r`` is the
tensor's rank, and one ``alpha`` holds for the whole file. Modules of lower rank are therefore
padded with zero factors to the file's largest rank ``R`` and ``alpha = R``: the scale is exactly
1 for every module (at the default user scale 1), and ``B @ A`` is the edit's ``ΔW`` bit for bit
in ``f32``. ``f16`` halves the file; each rank-one component is then balanced first
(``‖B[:, j]‖ = ‖A[j]‖``, the same product) so that neither factor under- or overflows.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .architectures import EXPERT_LAYOUTS, ArchitectureSpec, get_architecture
from .deltas import ModuleDelta, matches_weight
from .errors import BaseModelMismatchError, InvalidConfigError, OutputPathError, UnsupportedArchitectureError
from .version import __version__

logger = logging.getLogger(__name__)

__all__ = [
    "LORA_DTYPES",
    "MERGED_TYPES",
    "gguf_tensor_name",
    "export_gguf_lora",
    "merge_to_gguf",
    "write_modelfile",
    "read_base_tensor",
    "rewrite_gguf",
]

#: the factor dtypes an adapter file may hold (``f32``: exact)
LORA_DTYPES = ("f32", "f16")
#: the types an edited tensor of a merged GGUF may be written in (the others keep the base file's)
MERGED_TYPES = ("f32", "f16", "q8_0")
_GENERAL_ARCH = "general.architecture"


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise InvalidConfigError(
            "GGUF export needs the 'gguf' package: pip install 'hf_knowedit[bundled]' (or pip install gguf)."
        ) from None
    return gguf


def _gguf_spec(model: Any) -> ArchitectureSpec:
    spec = get_architecture(model)
    if spec.gguf_arch is None or spec.gguf_mlp_out is None:
        declared = sorted(s.model_type for s in _declared())
        raise UnsupportedArchitectureError(
            f"GGUF export is not declared for model_type {spec.model_type!r}: its architecture table row has no "
            f"llama.cpp names (gguf_arch, gguf_mlp_out). Declared for: {', '.join(declared)}. If llama.cpp supports "
            "the model, register its row with them, e.g. hf_knowedit.register_architecture(dataclasses.replace("
            f"hf_knowedit.get_architecture({spec.model_type!r}), gguf_arch='llama', gguf_mlp_out='ffn_down'), "
            "overwrite=True)."
        )
    return spec


def _declared() -> list[ArchitectureSpec]:
    from .architectures import ARCHITECTURES

    return [s for s in ARCHITECTURES.values() if s.gguf_arch is not None]


def gguf_tensor_name(model: Any, module_path: str) -> str:
    """llama.cpp's name of the weight of ``module_path`` (``model.layers.6.mlp.down_proj`` ->
    ``blk.6.ffn_down.weight``), from the architecture table row of ``model`` (a model, its config or a
    ``model_type``). Only the rows' ``mlp_out`` modules have one; anything else raises
    :class:`~hf_knowedit.errors.UnsupportedArchitectureError`."""
    spec = _gguf_spec(model)
    match = re.fullmatch(rf"{re.escape(spec.layers)}\.(\d+)\.{re.escape(spec.mlp_out)}", module_path)
    if match is None:
        raise UnsupportedArchitectureError(
            f"{module_path!r} is not an MLP output projection of a {spec.model_type!r} model "
            f"({spec.layers}.<i>.{spec.mlp_out}), the only module GGUF export maps to llama.cpp's tensors."
        )
    return f"blk.{int(match.group(1))}.{spec.gguf_mlp_out}.weight"


def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return None
    if hasattr(field, "contents"):
        return field.contents()
    return bytes(field.parts[field.data[0]]).decode("utf-8")  # gguf < 0.11: a string field


def _reader(base_gguf: str | Path) -> Any:
    path = Path(base_gguf).expanduser()
    if not path.is_file():
        raise BaseModelMismatchError(f"No GGUF file at {base_gguf}; pass the base model's .gguf file.")
    try:
        return _gguf().GGUFReader(path)
    except (ValueError, OSError) as err:
        raise BaseModelMismatchError(f"{base_gguf} is not a readable GGUF file ({err}).") from None


def read_base_tensor(reader: Any, name: str) -> np.ndarray:
    """The tensor ``name`` of an open ``GGUFReader``, dequantised to float32 ``[out, in]``."""
    for tensor in reader.tensors:
        if tensor.name == name:
            return np.array(_gguf().quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    raise BaseModelMismatchError(
        f"The base GGUF has no tensor {name!r}; it is not the model the edit was made for (or not the same size)."
    )


def check_base(es: Any, spec: ArchitectureSpec, reader: Any, names: dict[str, str], force: bool = False) -> None:
    """Refuse a base GGUF the edit set was not computed on: another ``general.architecture``, a missing
    tensor or another shape, or (unless ``force``) dequantised weights that fail the edit's fingerprint."""
    arch = _field(reader, _GENERAL_ARCH)
    if arch != spec.gguf_arch:
        raise BaseModelMismatchError(
            f"The base GGUF's general.architecture is {arch!r}, but the edit is for a {spec.model_type!r} model "
            f"({spec.gguf_arch!r} in llama.cpp); pass the GGUF of the model the edit was made on."
        )
    for path, name in names.items():
        weight = read_base_tensor(reader, name)
        want = tuple(es.deltas[path].shape)
        if weight.shape != want:
            raise BaseModelMismatchError(
                f"{name} in the base GGUF has shape {weight.shape}, the edit of {path} needs {want}; "
                "pass the GGUF of the model the edit was made on."
            )
        stored = es.fingerprints.get(path)
        if stored is not None and not force and not matches_weight(stored, torch.from_numpy(weight)):
            raise BaseModelMismatchError(
                f"{name} in the base GGUF is not the weight {path} was edited on (fingerprint mismatch: another "
                "checkpoint, or another quantisation of it). Pass force=True (--force) to export anyway."
            )


def _padded(d: ModuleDelta, rank: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    A, B = d.A.detach().float().cpu(), d.B.detach().float().cpu()
    if dtype == "f16":
        norm_a, norm_b = A.double().norm(dim=1), B.double().norm(dim=0)
        both = (norm_a > 0) & (norm_b > 0)
        s = torch.where(both, (norm_b / norm_a.clamp_min(1e-300)).sqrt(), torch.ones_like(norm_a))
        A, B = (A.double() * s[:, None]).float(), (B.double() / s[None, :]).float()
    A = torch.cat([A, A.new_zeros(rank - A.shape[0], A.shape[1])], dim=0)
    B = torch.cat([B, B.new_zeros(B.shape[0], rank - B.shape[1])], dim=1)
    np_dtype = np.float32 if dtype == "f32" else np.float16
    a, b = A.numpy().astype(np_dtype), B.numpy().astype(np_dtype)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise InvalidConfigError(f"The factors do not fit in {dtype} (they overflow); export with dtype='f32'.")
    return np.ascontiguousarray(a), np.ascontiguousarray(b)


def _atomic_write(path: Path, write: Any) -> None:
    """``write(tmp)`` into a temporary file beside ``path``, then rename it onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _output(path: str | Path) -> Path:
    out = Path(path).expanduser().absolute()
    if out.is_dir():
        raise OutputPathError(f"{path} is a directory; pass a file name such as edit.gguf.")
    if out.suffix.lower() != ".gguf":
        raise OutputPathError(f"{path}: the file name must end in .gguf.")
    return out


def _provenance(writer: Any, es: Any) -> None:
    writer.add_string("hf_knowedit.version", __version__)
    writer.add_string("hf_knowedit.method", str(es.method))
    if es.base_model:
        writer.add_string("hf_knowedit.base_model", str(es.base_model))
    writer.add_string("hf_knowedit.requests", json.dumps([r.to_dict() for r in es.requests], ensure_ascii=False))


def _start(es: Any, model: Any, path: str | Path, choice: tuple[str, str, tuple], what: str) -> tuple:
    """The checks both exports make before reading anything: ``choice = (name, value, allowed)`` is valid
    and ``es`` changes some module. Returns ``(gguf module, architecture row, output path)``."""
    name, value, allowed = choice
    if value not in allowed:
        raise InvalidConfigError(f"{name} must be one of {allowed}, got {value!r}.")
    if not es.deltas:
        raise InvalidConfigError(f"The edit set changes no module; there is nothing to {what}.")
    experts = sorted(p for p in es.deltas if es.layouts.get(p, "linear") in EXPERT_LAYOUTS)
    if experts:
        raise UnsupportedArchitectureError(
            f"GGUF export of routed-experts edits is not supported ({', '.join(experts)}): llama.cpp keeps a "
            "mixture-of-experts layer's experts in one 3-D tensor, which this export does not map. Merge the edit "
            "instead (hf-knowedit apply ADAPTER --merge-to DIR) and convert the merged checkpoint with llama.cpp's "
            "convert_hf_to_gguf.py."
        )
    return _gguf(), _gguf_spec(model), _output(path)


def export_gguf_lora(
    es: Any,
    path: str | Path,
    model: Any,
    *,
    base_gguf: str | Path | None = None,
    dtype: str = "f32",
    force: bool = False,
) -> Path:
    """Write ``es`` as a llama.cpp LoRA adapter file (see the module docstring for the layout).

    Args:
        es: the :class:`~hf_knowedit.editset.EditSet`.
        path: the ``.gguf`` file to write (atomically: a failure leaves no half-written file).
        model: the edited model, its config, or its ``config.model_type``: selects the architecture
            table row whose ``gguf_arch`` / ``gguf_mlp_out`` name llama.cpp's tensors.
        base_gguf: the base model's GGUF. When given it is checked first (architecture, tensor names
            and shapes, and the dequantised weights against the edit's fingerprints, so that an edit
            is not exported for weights it was not computed on; ``force=True`` skips the fingerprint).
        dtype: ``"f32"`` (exact) or ``"f16"``.

    Raises :class:`~hf_knowedit.errors.UnsupportedArchitectureError` when the row declares no
    llama.cpp names, a module is not its ``mlp_out``, or the set edits routed experts (layout
    ``experts`` or ``experts_t``); ``BaseModelMismatchError`` for a wrong base; ``InvalidConfigError`` for an unknown
    dtype or an empty edit set. Returns the path written.
    """
    gguf, spec, out = _start(es, model, path, ("dtype", dtype, LORA_DTYPES), "export")
    names = {p: gguf_tensor_name(spec.model_type, p) for p in sorted(es.deltas)}
    if base_gguf is not None:
        check_base(es, spec, _reader(base_gguf), names, force=force)
    rank = max(d.rank for d in es.deltas.values())
    factors = {p: _padded(es.deltas[p], rank, dtype) for p in names}

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, spec.gguf_arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(rank))
        writer.add_name(es.name or f"hf_knowedit {es.method} edit")
        _provenance(writer, es)
        for p, name in names.items():
            a, b = factors[p]
            writer.add_tensor(f"{name}.lora_a", a)
            writer.add_tensor(f"{name}.lora_b", b)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    _atomic_write(out, write)
    logger.info("Wrote the llama.cpp LoRA adapter %s (%d tensor pair(s), rank %d, %s).", out, len(names), rank, dtype)
    return out


def rewrite_gguf(reader: Any, path: Path, arch: str, replace: Any, add_keys: Any = None) -> None:
    """Write a copy of the GGUF open in ``reader`` to ``path``: every metadata key (then ``add_keys(writer)``)
    and every tensor, where ``replace(tensor)`` returns None to copy it as it is, or ``(array, raw_dtype)``
    for a new value (``raw_dtype`` None for float arrays, the quantisation type for quantised bytes)."""
    gguf = _gguf()
    if not all(hasattr(f, "contents") for f in reader.fields.values()):
        raise InvalidConfigError("Rewriting a GGUF needs gguf >= 0.11: pip install -U gguf.")
    writer = gguf.GGUFWriter(path, arch)
    writer.data_alignment = reader.alignment  # general.alignment, when the base sets one, is copied below
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == _GENERAL_ARCH:
            continue  # the header's own fields, and the one the writer sets
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub_type)
    if add_keys is not None:
        add_keys(writer)
    for tensor in reader.tensors:
        new = replace(tensor)
        if new is None:
            writer.add_tensor(tensor.name, tensor.data, raw_shape=tensor.data.shape, raw_dtype=tensor.tensor_type)
        else:
            writer.add_tensor(tensor.name, new[0], raw_dtype=new[1])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def merge_to_gguf(
    es: Any,
    path: str | Path,
    model: Any,
    base_gguf: str | Path,
    *,
    type: str = "f16",
    force: bool = False,
) -> Path:
    """Write a copy of ``base_gguf`` whose edited weights are ``W + ΔW``: every metadata key and every other
    tensor copied as it is (same quantisation), each edited tensor dequantised, updated in float32 and
    written as ``type`` (``f32``, ``f16`` or ``q8_0``; how edits fare when the edited tensors are re-quantised
    to the base's 4-bit type is measured in ``docs/results/quantised_edits.md``). The edit's provenance and
    requests go under ``hf_knowedit.*`` keys.

    The base is checked first as in :func:`export_gguf_lora` (``force=True`` skips the fingerprint);
    the file is written atomically. Needs gguf >= 0.11 (to read metadata values)."""
    gguf, spec, out = _start(es, model, path, ("type", type, MERGED_TYPES), "merge")
    if Path(base_gguf).expanduser().absolute() == out:
        raise OutputPathError(f"{path} is the base GGUF itself; write the merged model to another file.")
    names = {gguf_tensor_name(spec.model_type, p): p for p in sorted(es.deltas)}
    reader = _reader(base_gguf)
    check_base(es, spec, reader, {p: n for n, p in names.items()}, force=force)
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0}[type]  # fmt: skip

    def edited(name: str) -> np.ndarray:
        weight = read_base_tensor(reader, name)
        new = (torch.from_numpy(weight).double() + es.deltas[names[name]].delta().double()).float().numpy()
        if type == "f32":
            return new
        if type == "f16":
            return new.astype(np.float16)
        return gguf.quants.quantize(new, qtype)

    def replace(tensor: Any) -> tuple[np.ndarray, Any] | None:
        if tensor.name not in names:
            return None
        return edited(tensor.name), qtype if type == "q8_0" else None

    _atomic_write(out, lambda tmp: rewrite_gguf(reader, tmp, spec.gguf_arch, replace, lambda w: _provenance(w, es)))
    logger.info("Wrote the merged GGUF %s (%d edited tensor(s) as %s).", out, len(names), type)
    return out


def write_modelfile(adapter: str | Path | None, base_gguf: str | Path, path: str | Path | None = None) -> Path:
    """An Ollama ``Modelfile``: ``FROM`` the base GGUF and ``ADAPTER`` the exported adapter (absolute paths),
    by default beside the adapter as ``<adapter name>.Modelfile``; for a merged GGUF (``adapter=None``)
    ``FROM`` it alone, beside it. ``ollama create NAME -f`` it."""
    base = Path(base_gguf).expanduser().absolute()
    where = Path(adapter).expanduser().absolute() if adapter is not None else base
    target = Path(path).expanduser().absolute() if path is not None else where.with_suffix(".Modelfile")
    lines = [f"# Ollama: ollama create <name> -f {target.name}", f"FROM {base}"]
    if adapter is not None:
        lines += [f"ADAPTER {where}"]
    _atomic_write(target, lambda tmp: tmp.write_text("\n".join(lines) + "\n", encoding="utf-8"))
    return target
