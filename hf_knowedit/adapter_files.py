"""The adapter file format: PEFT LoRA files that PEFT and transformers load as they are, plus what
only hf_knowedit knows, on disk and on the Hub.

This module works on plain fields (peft keeps its format below the model class the same way): it
writes any object with an edit set's attributes and reads back a dict of them; :class:`EditSet`
builds itself from that dict (:mod:`hf_knowedit.editset`).

A saved edit set is a directory (or a Hub repo) with these files::

    adapter_model.safetensors   PEFT LoRA weights: base_model.model.<module>.lora_A.weight  [r, in]
                                                   base_model.model.<module>.lora_B.weight  [out, r]
    adapter_config.json         PEFT LoraConfig: peft_type LORA, exact target_modules (and
                                target_parameters for routed experts and for Linear modules
                                of peft_target "parameter"), r = the largest rank,
                                rank_pattern, alpha_pattern (alpha = rank, so the scaling is 1),
                                fan_in_fan_out (GPT-2's Conv1D), base_model_name_or_path, revision
    knowedit_config.json        library version, method and its config, layers, the requests,
                                statistics key, per-module layout / dense flag / rank / shape /
                                expert count / base-weight fingerprint, metrics, sha256 of the
                                safetensors files
    knowedit_state.safetensors  method state that travels with the set (only when there is some)
    README.md                   model card

:class:`~hf_knowedit.deltas.ModuleDelta` factors map onto PEFT's exactly, no SVD: ``lora_A = A``,
``lora_B = B``. PEFT's LoRA computes ``x @ Aᵀ @ Bᵀ`` whatever the layout and, with
``fan_in_fan_out``, merges ``(B @ A)ᵀ`` into a Conv1D ``[in, out]`` weight, which is our ``conv1d``
layout. A *dense* delta (``ModuleDelta.dense``, stored when a rank would exceed half the matrix
size) is exact full-rank factors with one identity factor, so it is an ordinary LoRA of rank
``min(in, out)`` that PEFT loads too; ``knowedit_config.json`` flags it.

Routed experts (layout ``experts``, :mod:`hf_knowedit.experts`): the delta ``ΔW = B @ A`` ``[d, E·I]``
of ``down_proj [E, d, I]`` is PEFT's LoRA on that parameter (``target_parameters: ["<path>.down_proj"]``,
PEFT >= 0.19, which reads a 3-D ``[E, out, in]`` parameter as such), saved under the module's keys
``base_model.model.<path>.lora_A.weight`` ``[r·E, I]`` (expert ``e``'s rows ``e·r … e·r + r − 1`` =
``A[:, e·I:(e+1)·I]``) and ``lora_B.weight`` ``[d, r·E]`` (column ``j·E + e`` = ``B[:, j]``, the same ``B``
for every expert): PEFT's update of expert ``e`` is ``B @ A_e``, ours exactly (:func:`to_peft_experts`).
Reading takes ``A`` and ``B`` back bit for bit (:func:`from_peft_experts`); an adapter made by PEFT, whose
experts' ``lora_B`` blocks differ, loads as the exact per-expert delta of rank ``r·E``. ``rank_pattern`` /
``alpha_pattern`` name a parameter only where its rank differs from ``r`` (PEFT 0.21 warns, wrongly, that
such keys match no module, though it applies them). Linear modules and routed experts mix in one adapter.
Experts stored transposed (layout ``experts_t``, GPT-OSS: ``down_proj [E, I, d]`` holds ``W_eᵀ``) are saved
the same way, with the same keys and factors: PEFT reads the module's ``is_transposed`` and then takes the
parameter's last dimension as its output, so ``lora_A`` is again ``[r·E, I]``, ``lora_B`` ``[d, r·E]``, and it adds
``(B @ A_e)ᵀ`` to ``down_proj[e]``: again ``ΔW_e = B @ A_e``.

Linear modules of rows with ``peft_target="parameter"`` in the architecture table (shared experts of the
mixture-of-experts model types whose ``target_modules`` PEFT rewrites under transformers 5;
:class:`~hf_knowedit.architectures.ArchitectureSpec`) are named by their weight, ``target_parameters:
["<path>.weight"]``: PEFT's LoRA on a 2-D parameter is the module's LoRA (same keys ``<path>.lora_A.weight``
``[r, in]`` and ``lora_B.weight`` ``[out, r]``, same update and merge), and PEFT leaves such names where they
are. ``EditSet.peft_targets`` records it per module, ``knowedit_config.json`` as ``modules[path].peft_target``;
reading checks it against ``adapter_config.json`` and takes the factors back bit for bit.

Loading reads JSON and safetensors only: no pickle, no code from a repo, no ``trust_remote_code``.
The Hub token is passed to ``huggingface_hub`` and never written to a file or a log.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCard, ModelCardData, hf_hub_download
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .architectures import EXPERT_LAYOUTS, LAYOUT_PARAM, LAYOUTS, PEFT_TARGETS, edited_param
from .deltas import ModuleDelta
from .errors import AdapterFormatError, InvalidRequestError, KnowEditError
from .moments import StatsKey
from .requests import EditRequest, to_request
from .version import __version__

logger = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
KNOWEDIT_CONFIG = "knowedit_config.json"
STATE_WEIGHTS = "knowedit_state.safetensors"
MODEL_CARD = "README.md"
#: version of the knowedit_config.json layout; a newer one still loads (with a warning)
FORMAT_VERSION = 1
_PREFIX = "base_model.model."
#: the parameter of a routed-experts module that its edits change (PEFT's ``target_parameters`` name it), in
#: both routed-experts layouts
LAYOUT_NAME = LAYOUT_PARAM["experts"]
assert all(LAYOUT_PARAM[layout] == LAYOUT_NAME for layout in EXPERT_LAYOUTS)
#: the parameter of a Linear module that ``target_parameters`` names where the architecture table says
#: ``peft_target="parameter"``
LINEAR_NAME = LAYOUT_PARAM["linear"]
_KNOWN_KEYS = {
    "format",
    "format_version",
    "library",
    "library_version",
    "name",
    "method",
    "config",
    "layers",
    "requests",
    "stats_key",
    "base_model",
    "revision",
    "modules",
    "metrics",
    "state",
    "files",
}
_COMMIT = re.compile(r"[0-9a-f]{40}")
#: facts listed in the model card's table (all of them are in knowedit_config.json)
CARD_MAX_FACTS = 50


# --------------------------------------------------------------------------------------------
# writing


def _expert_count(es: Any, path: str) -> int:
    """``es.num_experts[path]``, checked: the number of routed experts whose blocks ``ΔW``'s columns are."""
    experts, columns = (getattr(es, "num_experts", None) or {}).get(path), es.deltas[path].shape[1]
    if not _is_int(experts, 1) or columns % experts:
        raise AdapterFormatError(
            f"{path} has a routed-experts layout but EditSet.num_experts[{path!r}] is {experts!r}; set it to the "
            f"model's number of routed experts (an int dividing ΔW's {columns} columns) to save the set as an adapter."
        )
    return experts


def _as_parameter(layout: str, peft_target: str | None) -> bool:
    """Whether PEFT's config names a module of ``layout`` by its parameter (``target_parameters``): routed experts
    always, a Linear module where ``EditSet.peft_targets`` says ``"parameter"``."""
    return layout in EXPERT_LAYOUTS or peft_target == "parameter"


def _peft_target(path: str, layout: str, peft_target: str | None = None) -> str:
    """What PEFT's config names for module ``path``: the module (``target_modules``), or the parameter holding
    ``W`` (``target_parameters``): ``<path>.down_proj`` for routed experts, ``<path>.weight`` for a Linear
    module of ``peft_target`` ``"parameter"``."""
    return edited_param(path, layout) if _as_parameter(layout, peft_target) else path


def _peft_targets(es: Any, layouts: dict[str, str]) -> dict[str, str]:
    """``es.peft_targets``, checked: module path -> ``"parameter"`` for Linear modules named by their weight."""
    targets = dict(getattr(es, "peft_targets", None) or {})
    for path, target in targets.items():
        if path not in layouts or target not in PEFT_TARGETS or (target != "module" and layouts[path] != "linear"):
            raise AdapterFormatError(
                f"EditSet.peft_targets[{path!r}] is {target!r}; it must be one of {PEFT_TARGETS} for a module of "
                f"the set ('parameter' only for layout 'linear'). Make the edit again, or fix the field, to save it."
            )
    return {p: t for p, t in targets.items() if t != "module"}


def adapter_config(es: Any) -> dict[str, Any]:
    """PEFT's ``adapter_config.json`` for ``es``: one rank and ``lora_alpha = rank`` per module (routed experts:
    per parameter, written only where it differs from ``r``; see the module docstring)."""
    layouts = {p: es.layouts.get(p, "linear") for p in es.deltas}
    targets = _peft_targets(es, layouts)
    if "conv1d" in layouts.values() and len(set(layouts.values())) > 1:
        raise AdapterFormatError(
            "This edit set mixes Conv1D modules with Linear or routed-experts ones, which one PEFT adapter cannot "
            "express (fan_in_fan_out is global, and PEFT's LoRA on parameters refuses it); save the modules of "
            "each layout as separate edit sets."
        )
    experts = sorted(p for p, layout in layouts.items() if layout in EXPERT_LAYOUTS)
    for path in experts:
        _expert_count(es, path)
    ranks = {p: d.rank for p, d in es.deltas.items()}
    r = max(ranks.values(), default=1)
    named = {p: _peft_target(p, layouts[p], targets.get(p)) for p in es.deltas}
    params = {p for p in es.deltas if _as_parameter(layouts[p], targets.get(p))}
    pattern = {named[p]: k for p, k in ranks.items() if p not in params or k != r}
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": es.base_model,
        "revision": es.revision,
        "inference_mode": True,
        "r": r,
        "lora_alpha": r,
        "target_modules": sorted(named[p] for p in es.deltas if p not in params),
    }
    if params:
        config["target_parameters"] = sorted(named[p] for p in params)
    return config | {
        "rank_pattern": dict(sorted(pattern.items())),
        "alpha_pattern": dict(sorted(pattern.items())),
        "fan_in_fan_out": set(layouts.values()) == {"conv1d"},
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def to_peft_experts(A: torch.Tensor, B: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's factors of ``ΔW = B @ A`` (``[d, E·I]``) on a routed-experts parameter ``[E, d, I]``:
    ``lora_A [r·E, I]`` whose rows ``e·r … e·r + r − 1`` are expert ``e``'s columns ``A[:, e·I:(e+1)·I]``, and
    ``lora_B [d, r·E]`` whose column ``j·E + e`` is ``B[:, j]`` for every ``e``. Exact (no arithmetic)."""
    r = A.shape[0]
    return A.reshape(r, experts, -1).transpose(0, 1).reshape(experts * r, -1), B.repeat_interleave(experts, dim=1)


def from_peft_experts(lora_a: torch.Tensor, lora_b: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``(A, B, shared)`` with ``B @ A = [B_0 A_0 … B_{E-1} A_{E-1}]`` for PEFT's factors of rank ``r`` per expert
    (``lora_A [r·E, I]``, ``lora_B [d, r·E]``; :func:`to_peft_experts`). Where every expert's ``B_e`` is the same
    (``shared``: hf_knowedit writes them so) they are the rank-``r`` ``A [r, E·I]``, ``B = B_e`` that
    :func:`to_peft_experts` wrote, bit for bit; otherwise the exact rank-``r·E`` factors ``[B_0 … B_{E-1}]`` and
    ``blockdiag(A_0, …, A_{E-1})``."""
    experts = lora_a.shape[0] // r
    a = lora_a.reshape(experts, r, -1)  # [E, r, I]
    b = lora_b.reshape(lora_b.shape[0], r, experts)  # [d, r, E]
    if all(torch.equal(b[..., e], b[..., 0]) for e in range(1, experts)):
        return a.transpose(0, 1).reshape(r, -1).contiguous(), b[..., 0].contiguous(), True
    return torch.block_diag(*a), b.permute(0, 2, 1).reshape(lora_b.shape[0], -1).contiguous(), False


def adapter_tensors(es: Any) -> dict[str, torch.Tensor]:
    """PEFT state-dict keys -> float32 CPU factors (``lora_A = A``, ``lora_B = B``; routed experts:
    :func:`to_peft_experts`). The keys name the module, for routed experts too."""
    out = {}
    for path, d in sorted(es.deltas.items()):
        A, B = d.A.detach().float().cpu(), d.B.detach().float().cpu()
        if es.layouts.get(path, "linear") in EXPERT_LAYOUTS:
            A, B = to_peft_experts(A, B, _expert_count(es, path))
        out[f"{_PREFIX}{path}.lora_A.weight"] = A.contiguous().clone()
        out[f"{_PREFIX}{path}.lora_B.weight"] = B.contiguous().clone()
    return out


def _encode(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if callable(getattr(obj, "to_dict", None)):
        return obj.to_dict()
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (tuple, set)):
        return list(obj)
    return str(obj)


def _portable_config(config: dict[str, Any]) -> dict[str, Any]:
    """The method config as saved: a corpus given as texts is described, not copied (the statistics key
    already identifies it), so a sidecar stays small."""
    out = dict(config)
    corpus = out.get("mom2_corpus")
    if corpus is not None and not isinstance(corpus, str):
        try:
            out["mom2_corpus"] = f"<{type(corpus).__name__} of {len(corpus)} texts; see stats_key>"
        except TypeError:
            out["mom2_corpus"] = f"<{type(corpus).__name__}; see stats_key>"
    if out.get("mom2_preserve") is not None:
        out["mom2_preserve"] = f"<{len(out['mom2_preserve'])} texts; see stats_key>"
    return out


def _jsonable(value: Any) -> Any:
    """``value`` as plain JSON data (dataclasses such as ``StatsKey`` become dicts, at any depth)."""
    return json.loads(json.dumps(_encode(value) if dataclasses.is_dataclass(value) else value, default=_encode))


def _stats_key(value: Any) -> Any:
    """Saved statistics keys back as :class:`~hf_knowedit.moments.StatsKey` (one, or a dict of them)."""
    names = {f.name for f in dataclasses.fields(StatsKey)}
    if isinstance(value, dict) and set(value) == names:
        return StatsKey(**value)
    if isinstance(value, dict) and value and all(isinstance(v, dict) and set(v) == names for v in value.values()):
        return {int(k) if re.fullmatch("[0-9]+", k) else k: StatsKey(**v) for k, v in value.items()}  # JSON keys: str
    return value


def _module_entry(es: Any, path: str) -> dict[str, Any]:
    d, layout = es.deltas[path], es.layouts.get(path, "linear")
    entry = {"layout": layout, "dense": bool(d.dense), "rank": d.rank, "shape": list(d.shape)}
    if layout in EXPERT_LAYOUTS:
        entry["num_experts"] = _expert_count(es, path)
    if (getattr(es, "peft_targets", None) or {}).get(path, "module") != "module":
        entry["peft_target"] = es.peft_targets[path]
    return entry | {"fingerprint": es.fingerprints.get(path)}


def knowedit_config(es: Any, files: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """What only hf_knowedit knows about ``es`` (the content of ``knowedit_config.json``)."""
    return {
        "format": "hf_knowedit-adapter",
        "format_version": FORMAT_VERSION,
        "library": "hf_knowedit",
        "library_version": __version__,
        "name": es.name,
        "method": es.method,
        "config": _jsonable(_portable_config(es.config)),
        "layers": [int(x) for x in es.layers],
        "requests": [_jsonable(r.to_dict()) for r in es.requests],
        "stats_key": _jsonable(es.stats_key),
        "base_model": es.base_model,
        "revision": es.revision,
        "modules": {p: _module_entry(es, p) for p in sorted(es.deltas)},
        "metrics": _jsonable(es.metrics),
        "state": STATE_WEIGHTS if es.state else None,
        "files": files or {},
    }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def write_adapter(es: Any, directory: str | Path) -> None:
    """Write the adapter files (not the model card) into an existing directory.

    Not atomic by itself: :meth:`EditSet.save_pretrained` calls it inside :func:`atomic_directory`.
    """
    directory = Path(directory)
    peft_config = adapter_config(es)  # validates before anything is written
    save_file(adapter_tensors(es), str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    files = {ADAPTER_WEIGHTS: {"sha256": _sha256(directory / ADAPTER_WEIGHTS)}}
    if es.state:
        state = {k: v.detach().cpu().contiguous().clone() for k, v in es.state.items()}
        save_file(state, str(directory / STATE_WEIGHTS), metadata={"format": "pt"})
        files[STATE_WEIGHTS] = {"sha256": _sha256(directory / STATE_WEIGHTS)}
    _write_json(directory / ADAPTER_CONFIG, peft_config)
    _write_json(directory / KNOWEDIT_CONFIG, knowedit_config(es, files))


def _is_adapter_dir(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).exists() or (path / KNOWEDIT_CONFIG).exists()


#: ``.<target>.tmp-<pid>-<random>`` (a save in progress) / ``.<target>.old-<pid>-<random>`` (the adapter
#: it replaces, for the instant of the swap); ``<pid>`` is the writer's process id
_SCRATCH = r"\.{name}\.(?P<kind>tmp|old)-(?P<pid>[0-9]+)-[a-z0-9_]+"


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` may still run (when in doubt: yes, so its files are left alone)."""
    if pid == os.getpid():
        return True
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it runs, as another user
        return True
    return True


def clean_stale_temporaries(target: str | Path) -> list[Path]:
    """Remove what killed saves into ``target`` left beside it: ``.tmp-`` directories of processes that no
    longer run, and their ``.old-`` copies; returns what was removed. If a save died between its two
    renames (the target is gone, its ``.old-`` copy is there), the copy is put back instead.

    Call it holding the directory's lock (:func:`atomic_directory` does).
    """
    target = Path(target).expanduser().absolute()
    pattern = re.compile(_SCRATCH.format(name=re.escape(target.name)))
    removed = []
    try:
        entries = sorted(target.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or _pid_alive(int(match["pid"])):
            continue
        if match["kind"] == "old" and not os.path.lexists(target):
            os.rename(entry, target)
            logger.warning("Restored %s from %s, left by a save that was killed mid-swap.", target, entry.name)
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
        logger.info("Removed %s, left by a killed save (process %s).", entry, match["pid"])
    return removed


try:  # advisory locks; where fcntl is missing (Windows), saves are serialised within one process only
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX
    fcntl = None  # type: ignore[assignment]
_PROCESS_LOCK = threading.Lock()


@contextlib.contextmanager
def directory_lock(target: str | Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``target`` (``fcntl.flock`` on ``.<target>.lock`` beside it).

    The lock file is removed on release; a waiter that then holds a lock on a removed file takes a new
    one, so the lock stays exclusive and no lock file is left behind.
    """
    target = Path(target).expanduser().absolute()
    if fcntl is None:  # pragma: no cover - not on POSIX
        with _PROCESS_LOCK:
            yield
        return
    path = target.parent / f".{target.name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as err:  # a file system without flock: go on unlocked rather than fail
            os.close(fd)
            logger.warning("Cannot lock %s (%s); saving without a lock.", path, err)
            yield
            return
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder before us removed this file: lock the new one
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def _check_target(target: Path, replaceable: Callable[[Path], bool] | None = None, what: str = "adapter") -> None:
    if target.exists() and not target.is_dir():
        raise AdapterFormatError(f"{target} is a file; pass a directory to save the {what} into.")
    if target.is_dir() and any(target.iterdir()) and not (replaceable or _is_adapter_dir)(target):
        raise AdapterFormatError(
            f"{target} is a non-empty directory that holds no {what}; saving would replace its "
            f"files. Pass a new or empty directory, or an earlier {what}'s directory."
        )


def _umask() -> int:
    """The process umask, read without changing it (``os.umask`` would, for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


@contextlib.contextmanager
def atomic_directory(
    target: str | Path, *, replaceable: Callable[[Path], bool] | None = None, what: str = "adapter"
) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``target``; on success it replaces ``target`` by
    rename, on failure it is deleted and ``target`` is left as it was.

    ``target`` may be absent, empty, or an earlier adapter (replaced whole). A non-empty directory
    that is not an adapter is refused: replacing it would delete its files. ``replaceable(path)``
    decides instead what else may be replaced (e.g. an earlier merged checkpoint; ``what`` names it
    in errors).

    Safe against killed and concurrent writers: the temporary directory is named with the writer's
    process id, and temporaries of processes that no longer run are removed (or, for a save killed
    between its two renames, the previous adapter is put back); the swap itself holds an advisory lock
    (:func:`directory_lock`), so concurrent saves into one directory end with one complete adapter,
    the last one swapped in.
    """
    target = Path(target).expanduser().absolute()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise AdapterFormatError(f"Cannot create {target.parent} ({err}); pass a directory you can write to.") from err
    with directory_lock(target):  # checked under the lock: another writer may be swapping the target right now
        _check_target(target, replaceable, what)
        clean_stale_temporaries(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the adapter gets ordinary permissions
    try:
        yield tmp
        with directory_lock(target):
            clean_stale_temporaries(target)
            _check_target(target, replaceable, what)
            if target.is_dir() and any(target.iterdir()):
                old = target.parent / f".{target.name}.old-{os.getpid()}-{tmp.name.rsplit('-', 1)[-1]}"
                os.rename(target, old)
                try:
                    os.rename(tmp, target)
                except BaseException:
                    os.rename(old, target)
                    raise
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)  # onto nothing or an empty directory
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_adapter(es: Any, directory: str | Path, **model_card_kwargs: Any) -> Path:
    """``es.save_pretrained(directory)``; returns the directory."""
    es.save_pretrained(directory, model_card_kwargs=model_card_kwargs or None)
    return Path(directory)


# --------------------------------------------------------------------------------------------
# model card


def _cell(value: Any) -> str:
    text = "" if value is None else " ".join(str(value).split())
    return text.replace("|", "\\|") or "–"


def _is_repo_id(name: str | None) -> bool:
    return bool(name) and not os.path.isabs(name) and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None


def model_card(
    es: Any,
    *,
    tags: Sequence[str] = (),
    repo_id: str | None = None,
    title: str | None = None,
    description: str | None = None,
    license: str | None = None,
) -> ModelCard:
    """The ``README.md`` of a saved edit set: metadata (``base_model``, ``library_name: hf_knowedit``,
    tags), the edited facts, evaluation results and how to load it. Keyword arguments come from
    ``save_pretrained(..., model_card_kwargs=...)``."""
    base = es.base_model if _is_repo_id(es.base_model) else None
    tags = sorted({"knowledge-editing", es.method, "lora", "peft", *tags})
    data = ModelCardData(
        base_model=base, library_name="hf_knowedit", tags=tags, license=license, pipeline_tag="text-generation"
    )
    n = len(es.requests)
    where = repo_id or "path/or/repo-id"
    base_name = es.base_model or "the base model"
    default_title = f"{es.method.upper()} edit of {es.base_model or 'a causal LM'}: {n} fact(s)"
    revision = f" (revision `{es.revision}`)" if es.revision else ""
    ranks = ", ".join(f"`{p}`: {d.rank}{' (dense)' if d.dense else ''}" for p, d in sorted(es.deltas.items()))
    lines = [
        f"# {title or default_title}",
        "",
        description
        or (
            f"A knowledge edit made with hf_knowedit: "
            f"`{es.method}` rewrote {n} fact(s) in `{base_name}`{revision} by changing layer(s) "
            f"{', '.join(map(str, es.layers)) or '–'}."
        ),
        "",
        "It is a PEFT LoRA adapter (scaling 1, ranks: " + (ranks or "–") + ") plus `knowedit_config.json`, which "
        "records the edited facts, the method's configuration and fingerprints of the base weights the edit was "
        "computed on: hf_knowedit refuses to apply it to other weights."
        + (
            " Modules marked dense hold their update exactly as full-rank factors (one of them the identity)."
            if any(d.dense for d in es.deltas.values())
            else ""
        )
        + (
            " Routed-experts modules are a LoRA on their `down_proj` parameter (PEFT's `target_parameters`; "
            "PEFT >= 0.19), one rank-r update per expert."
            if es.num_experts
            else ""
        )
        + (
            " Shared-expert modules are a LoRA on their `weight` parameter (PEFT's `target_parameters`), which "
            "PEFT's conversion of mixture-of-experts targets under transformers 5 leaves in place."
            if any(t == "parameter" for t in (getattr(es, "peft_targets", None) or {}).values())
            else ""
        ),
        "",
        "## Edited facts",
        "",
        "| # | Subject | Prompt | Old object | New object |",
        "|---|---|---|---|---|",
    ]
    for i, r in enumerate(es.requests[:CARD_MAX_FACTS]):
        lines.append(
            f"| {i + 1} | {_cell(r.subject)} | {_cell(r.prompt)} | {_cell(r.target_true)} | {_cell(r.target_new)} |"
        )
    if n > CARD_MAX_FACTS:
        lines.append(f"\n… and {n - CARD_MAX_FACTS} more; `knowedit_config.json` lists all of them.")
    if es.metrics:
        lines += ["", "## Evaluation", "", "| Metric | Value |", "|---|---|"]
        lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in sorted(_flat(es.metrics).items())]
    lines += [
        "",
        "## How to load",
        "",
        "With hf_knowedit (checks the base weights, merges; `revert_edits()` restores them bit for bit):",
        "",
        "```python",
        "import hf_knowedit",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f"model = AutoModelForCausalLM.from_pretrained({repr(es.base_model or 'base_model_id')})",
        "model = hf_knowedit.attach(model, AutoTokenizer.from_pretrained(model.name_or_path))",
        f"model.load_edits({where!r})",
        "model.revert_edits()",
        "```",
        "",
        "With PEFT or transformers:",
        "",
        "```python",
        "from peft import PeftModel",
        "",
        f"peft_model = PeftModel.from_pretrained(model, {where!r})  # or model.load_adapter({where!r})",
        "```",
        "",
        "## Files",
        "",
        "| File | Content |",
        "|---|---|",
        f"| `{ADAPTER_WEIGHTS}` | LoRA factors (`lora_A` = key side, `lora_B` = value side), float32 |",
        f"| `{ADAPTER_CONFIG}` | PEFT `LoraConfig` |",
        f"| `{KNOWEDIT_CONFIG}` | method, config, layers, requests, statistics key, fingerprints, metrics |",
    ]
    if es.state:
        lines.append(f"| `{STATE_WEIGHTS}` | method state carried with the edit set |")
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = round(v, 4) if isinstance(v, float) else v
    return out


# --------------------------------------------------------------------------------------------
# reading


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        why = "nested too deeply" if isinstance(err, RecursionError) else err
        raise AdapterFormatError(f"{path} is not valid JSON ({why}); save or download the adapter again.") from None
    if not isinstance(obj, dict):
        raise AdapterFormatError(f"{path} should hold a JSON object; save or download the adapter again.")
    return obj


def _read_safetensors(path: Path, sha256: str | None) -> dict[str, torch.Tensor]:
    if sha256 is not None and _sha256(path) != sha256:
        raise AdapterFormatError(
            f"{path} is corrupted or truncated: its sha256 differs from the one recorded in "
            f"{KNOWEDIT_CONFIG}. Save or download the adapter again."
        )
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFormatError(
            f"{path} is not a readable safetensors file ({err}); it may be corrupted or "
            "truncated. Save or download the adapter again."
        ) from err


def _check_files(directory: Path) -> None:
    if not directory.is_dir():
        raise AdapterFormatError(
            f"No adapter directory at {directory}. Pass a directory written by "
            "EditSet.save_pretrained, or a Hub repo id."
        )
    if not _is_adapter_dir(directory):
        raise AdapterFormatError(
            f"{directory} is not an adapter directory (it has neither {ADAPTER_CONFIG} nor "
            f"{KNOWEDIT_CONFIG}). Pass a directory written by EditSet.save_pretrained."
        )
    if not (directory / ADAPTER_WEIGHTS).is_file() and (directory / "adapter_model.bin").is_file():
        raise AdapterFormatError(
            f"{directory} holds its weights as a pickle (adapter_model.bin), which hf_knowedit "
            "never loads; re-save the adapter with safetensors."
        )
    if (directory / ADAPTER_CONFIG).is_file() and not (directory / KNOWEDIT_CONFIG).is_file():
        raise AdapterFormatError(
            f"{directory} is a PEFT adapter without {KNOWEDIT_CONFIG}, so not an hf_knowedit "
            "edit set (no fingerprints to check it against the base model). Load it with "
            "peft.PeftModel.from_pretrained instead."
        )
    missing = [n for n in (ADAPTER_CONFIG, KNOWEDIT_CONFIG, ADAPTER_WEIGHTS) if not (directory / n).is_file()]
    if missing:
        raise AdapterFormatError(f"{directory} is missing {', '.join(missing)}; save or download the adapter again.")


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """A module's entry in ``rank_pattern`` / ``alpha_pattern``. Our files name modules exactly, so the
    lookup is exact: keys are never used as regular expressions (a hostile key could make one run for
    ever), and :func:`_check_peft` refuses keys that are not target modules."""
    return (patterns or {}).get(module, default)


# -- the schema of the two JSON files -----------------------------------------------------------

_MODULE_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _show(value: Any, limit: int = 80) -> str:
    text = json.dumps(value) if _jsonish(value) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _jsonish(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=True)
    except (TypeError, ValueError, RecursionError):
        return False
    return True


def _invalid(path: Path, field: str, want: str, value: Any) -> AdapterFormatError:
    return AdapterFormatError(
        f"{path}: field {field!r} is invalid: it must be {want}, got {_show(value)}. The file was edited or "
        "damaged; save the adapter again (EditSet.save_pretrained) or download it again."
    )


def _is_int(value: Any, least: int | None = None) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and (least is None or value >= least)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _optional(obj: dict[str, Any], key: str, check: Any, path: Path, want: str, field: str | None = None) -> Any:
    """``obj[key]`` if absent, ``None`` or ``check(value)``; else the error for ``field``."""
    value = obj.get(key)
    if value is not None and not check(value):
        raise _invalid(path, field or key, want + " or null", value)
    return value


def _check_module_name(path: Path, field: str, name: Any) -> None:
    if (
        not isinstance(name, str)
        or not _MODULE_NAME.fullmatch(name)
        or any(p.startswith("__") for p in name.split("."))
    ):
        raise _invalid(path, field, "a module name such as 'model.layers.3.mlp.down_proj'", name)


def _check_peft(peft: dict[str, Any], path: Path) -> None:
    """The fields of ``adapter_config.json`` that :func:`read_adapter` reads, by type."""
    peft_type = peft.get("peft_type")
    if not isinstance(peft_type, str):
        raise _invalid(path, "peft_type", "the string 'LORA'", peft_type)
    for key in ("use_dora", "use_rslora", "fan_in_fan_out"):
        _optional(peft, key, lambda v: isinstance(v, bool), path, "true or false")
    if peft_type != "LORA" or peft.get("use_dora") or peft.get("use_rslora"):
        raise AdapterFormatError(
            f"{path} is not a plain LoRA config (peft_type {peft_type!r}, use_dora/use_rslora); "
            "hf_knowedit cannot read it."
        )
    if not _is_int(peft.get("r"), 1):
        raise _invalid(path, "r", "an int >= 1", peft.get("r"))
    _optional(peft, "lora_alpha", _is_number, path, "a finite number")
    params = _optional(peft, "target_parameters", lambda v: isinstance(v, list), path, "a list of parameter names")
    for i, name in enumerate(params or []):
        _check_module_name(path, f"target_parameters[{i}]", name)
        if name.rpartition(".")[2] not in (LAYOUT_NAME, LINEAR_NAME):
            raise AdapterFormatError(
                f"{path}: target_parameters[{i}] is {_show(name)}; hf_knowedit reads LoRA on the routed experts' "
                f"{LAYOUT_NAME!r} parameter and on a Linear module's {LINEAR_NAME!r} only (what its edits change). "
                "Load this adapter with peft.PeftModel.from_pretrained instead."
            )
    targets = peft.get("target_modules")
    if targets is None and params:
        targets = []  # only parameters are targeted
    if not isinstance(targets, list):
        raise _invalid(path, "target_modules", "a list of module names", targets)
    for i, name in enumerate(targets):
        _check_module_name(path, f"target_modules[{i}]", name)
    named = targets + list(params or [])
    if len(set(named)) != len(named):
        raise _invalid(path, "target_modules", "a list of distinct module names", targets)
    for key, check, want in (
        ("rank_pattern", lambda v: _is_int(v, 1), "an int >= 1"),
        ("alpha_pattern", _is_number, "a finite number"),
    ):
        patterns = _optional(peft, key, lambda v: isinstance(v, dict), path, "an object {module name: value}")
        for name, value in (patterns or {}).items():
            if name not in named:
                raise AdapterFormatError(
                    f"{path}: field {key!r} is invalid: its key {_show(name)} is not one of target_modules or "
                    "target_parameters. "
                    "hf_knowedit's adapters name every module exactly (keys are never regular expressions); "
                    "save the adapter again (EditSet.save_pretrained) or download it again."
                )
            if not check(value):
                raise _invalid(path, f"{key}[{name!r}]", want, value)
    for key in ("base_model_name_or_path", "revision"):
        _optional(peft, key, lambda v: isinstance(v, str), path, "a string")


def _check_fingerprint(path: Path, field: str, fp: Any) -> None:
    want = "null or an object with shape [ints], sha256 (hex), sketch [numbers] and optional version (int), dtype"
    if fp is None:
        return
    if (
        not isinstance(fp, dict)
        or ("version" in fp and not _is_int(fp["version"], 1))
        or ("dtype" in fp and not isinstance(fp["dtype"], str))
        or not isinstance(fp.get("shape"), list)
        or not all(_is_int(x, 0) for x in fp["shape"])
        or not isinstance(fp.get("sha256"), str)
        or not isinstance(fp.get("sketch"), list)
        or not fp["sketch"]
        or not all(_is_number(x) for x in fp["sketch"])
    ):
        raise _invalid(path, field, want, fp)


def _check_meta(meta: dict[str, Any], path: Path) -> None:
    """The fields of ``knowedit_config.json`` that :func:`read_adapter` reads, by type."""
    _optional(meta, "format_version", _is_int, path, "an int")
    for key in ("method", "name", "base_model", "revision"):
        _optional(meta, key, lambda v: isinstance(v, str), path, "a string")
    for key in ("config", "metrics"):
        _optional(meta, key, lambda v: isinstance(v, dict), path, "an object")
    layers = _optional(meta, "layers", lambda v: isinstance(v, list), path, "a list of layer indices (ints)")
    for i, layer in enumerate(layers or []):
        if not _is_int(layer, 0):
            raise _invalid(path, f"layers[{i}]", "a layer index (an int >= 0)", layer)
    requests = _optional(meta, "requests", lambda v: isinstance(v, list), path, "a list of request objects")
    for i, item in enumerate(requests or []):
        if not isinstance(item, dict):
            raise _invalid(path, f"requests[{i}]", "an object with prompt, subject, target_new", item)
    state = meta.get("state")
    if state not in (None, "", STATE_WEIGHTS):
        raise _invalid(path, "state", f"{STATE_WEIGHTS!r} or null", state)
    files = _optional(meta, "files", lambda v: isinstance(v, dict), path, "an object {file name: {sha256: ...}}")
    for name, info in (files or {}).items():
        sha = info.get("sha256") if isinstance(info, dict) else None
        if not isinstance(info, dict) or (sha is not None and not (isinstance(sha, str) and _SHA256.fullmatch(sha))):
            raise _invalid(path, f"files[{name!r}]", "an object {sha256: 64 hex digits}", info)
    modules = meta.get("modules")
    if not isinstance(modules, dict):
        raise _invalid(path, "modules", "an object {module name: {layout, dense, rank, shape, fingerprint}}", modules)
    for name, info in modules.items():
        _check_module_name(path, "modules", name)
        field = f"modules[{name!r}]"
        if not isinstance(info, dict):
            raise _invalid(path, field, "an object {layout, dense, rank, shape, fingerprint}", info)
        _optional(info, "layout", lambda v: v in LAYOUTS, path, " or ".join(map(repr, LAYOUTS)), f"{field}.layout")
        _optional(info, "num_experts", lambda v: _is_int(v, 1), path, "an int >= 1", f"{field}.num_experts")
        _optional(
            info,
            "peft_target",
            lambda v: v in PEFT_TARGETS,
            path,
            " or ".join(map(repr, PEFT_TARGETS)),
            f"{field}.peft_target",
        )
        layout = info.get("layout") or "linear"
        if info.get("peft_target", "module") != "module" and layout != "linear":
            want = f"'module' for layout {layout!r} (only a 'linear' module is named by its weight)"
            raise _invalid(path, f"{field}.peft_target", want, info["peft_target"])
        _optional(info, "dense", lambda v: isinstance(v, bool), path, "true or false", f"{field}.dense")
        _optional(info, "rank", lambda v: _is_int(v, 1), path, "an int >= 1", f"{field}.rank")
        _optional(
            info,
            "shape",
            lambda v: isinstance(v, list) and len(v) == 2 and all(_is_int(x, 1) for x in v),
            path,
            "[out, in] (two ints >= 1)",
            f"{field}.shape",
        )
        _check_fingerprint(path, f"{field}.fingerprint", info.get("fingerprint"))


def read_adapter(directory: str | Path) -> dict[str, Any]:
    """The fields of the edit set saved in ``directory`` (``EditSet(**fields)`` rebuilds it); typed
    errors for anything that is not one.

    Raises :class:`~hf_knowedit.errors.AdapterFormatError` for a directory that is not an adapter,
    a missing file, invalid JSON, a field of either JSON file with the wrong type or value (the
    message names the file and the field), a corrupted or truncated safetensors file, or factors whose
    shapes disagree with the configs. A ``knowedit_config.json`` from a newer hf_knowedit (unknown
    keys) loads with a warning.
    """
    directory = Path(directory)
    _check_files(directory)
    peft_path, meta_path = directory / ADAPTER_CONFIG, directory / KNOWEDIT_CONFIG
    peft = _read_json(peft_path)
    meta = _read_json(meta_path)
    _check_peft(peft, peft_path)
    _check_meta(meta, meta_path)
    unknown = sorted(set(meta) - _KNOWN_KEYS)
    version = meta.get("format_version")
    version = FORMAT_VERSION if version is None else version
    if unknown or version > FORMAT_VERSION:
        logger.warning(
            "%s (written by hf_knowedit %s, format %s) has fields this hf_knowedit (%s) does not know; it ignores "
            "%s. If a newer hf_knowedit wrote them, upgrade to use them.",
            meta_path,
            meta.get("library_version"),
            version,
            __version__,
            unknown or "nothing it knows of",
        )
    files = meta.get("files") or {}
    tensors = _read_safetensors(directory / ADAPTER_WEIGHTS, (files.get(ADAPTER_WEIGHTS) or {}).get("sha256"))
    modules = meta["modules"]
    params = peft.get("target_parameters") or []
    layouts = {p: (info.get("layout") or "linear") for p, info in modules.items()}
    peft_targets = {p: info["peft_target"] for p, info in modules.items() if info.get("peft_target") == "parameter"}
    named = {p: _peft_target(p, layout, peft_targets.get(p)) for p, layout in layouts.items()}
    as_params = {p for p, layout in layouts.items() if _as_parameter(layout, peft_targets.get(p))}
    if sorted(peft.get("target_modules") or []) != sorted(n for p, n in named.items() if p not in as_params) or (
        sorted(params) != sorted(n for p, n in named.items() if p in as_params)
    ):
        raise AdapterFormatError(
            f"target_modules ({peft.get('target_modules')}) and target_parameters ({params}) in {ADAPTER_CONFIG} "
            f"do not name the modules in {KNOWEDIT_CONFIG} ({sorted(modules)}; routed experts by their "
            f"'{LAYOUT_NAME}' parameter, modules with peft_target 'parameter' by their '{LINEAR_NAME}', the "
            "others by module); save the adapter again."
        )
    if params and peft.get("fan_in_fan_out"):
        raise AdapterFormatError(
            f"{ADAPTER_CONFIG} sets fan_in_fan_out and targets parameters, which PEFT refuses; save the adapter again."
        )
    expected = {f"{_PREFIX}{p}.lora_{ab}.weight" for p in modules for ab in "AB"}
    if set(tensors) != expected:
        raise AdapterFormatError(
            f"{ADAPTER_WEIGHTS} holds {sorted(set(tensors) - expected) or 'no extra'} keys and "
            f"lacks {sorted(expected - set(tensors)) or 'none'}; save the adapter again."
        )
    deltas, fingerprints, num_experts = {}, {}, {}
    for path, info in modules.items():
        A, B = tensors[f"{_PREFIX}{path}.lora_A.weight"], tensors[f"{_PREFIX}{path}.lora_B.weight"]
        layout = layouts[path]
        r = _pattern_value(peft.get("rank_pattern"), named[path], peft["r"])
        alpha = _pattern_value(peft.get("alpha_pattern"), named[path], peft.get("lora_alpha", r))
        alpha = r if alpha is None else alpha
        if not (A.is_floating_point() and B.is_floating_point()):
            raise AdapterFormatError(
                f"{path}: lora_A / lora_B hold {A.dtype} / {B.dtype}, not floating-point numbers; "
                "save the adapter again."
            )
        if layout in EXPERT_LAYOUTS:
            A, B, dense, num_experts[path] = _experts_factors(path, A, B, r, info)
        else:
            _check_factors(path, A, B, r, info)
            dense = bool(info.get("dense", False))
            if bool(peft.get("fan_in_fan_out")) != (layout == "conv1d"):
                raise AdapterFormatError(
                    f"{path}: layout {layout!r} disagrees with fan_in_fan_out="
                    f"{peft.get('fan_in_fan_out')} in {ADAPTER_CONFIG}; save the adapter again."
                )
        if alpha != r:  # not written by us, but PEFT would scale by alpha / r
            B = (B.double() * (alpha / r)).float()
        deltas[path] = ModuleDelta(A=A, B=B, dense=dense)
        if info.get("fingerprint") is not None:
            fingerprints[path] = info["fingerprint"]
    state: dict[str, torch.Tensor] = {}
    if meta.get("state"):
        state_path = directory / STATE_WEIGHTS
        if not state_path.is_file():
            raise AdapterFormatError(f"{directory} is missing {STATE_WEIGHTS}; save or download the adapter again.")
        state = _read_safetensors(state_path, (files.get(STATE_WEIGHTS) or {}).get("sha256"))
    base_model = meta["base_model"] if "base_model" in meta else peft.get("base_model_name_or_path")
    return dict(
        deltas=deltas,
        requests=_requests(meta.get("requests") or [], meta_path),
        method=meta.get("method") or "unknown",
        config=dict(meta.get("config") or {}),
        layers=list(meta.get("layers") or []),
        fingerprints=fingerprints,
        layouts=layouts,
        base_model=base_model,
        revision=meta["revision"] if "revision" in meta else peft.get("revision"),
        stats_key=_stats_key(meta.get("stats_key")),
        metrics=dict(meta.get("metrics") or {}),
        state=state,
        name=meta.get("name"),
        num_experts=num_experts,
        peft_targets=peft_targets,
    )


def _inconsistent(path: str, A: torch.Tensor, B: torch.Tensor, what: str) -> AdapterFormatError:
    return AdapterFormatError(
        f"{path}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} do not form {what}; the adapter files are "
        "inconsistent. Save it again."
    )


def _check_factors(path: str, A: torch.Tensor, B: torch.Tensor, r: int, info: dict[str, Any]) -> None:
    """``A [r, in]``, ``B [out, r]`` of the shape and rank ``knowedit_config.json`` records."""
    shape = info.get("shape")
    if (
        A.dim() != 2
        or B.dim() != 2
        or A.shape[0] != r
        or B.shape[1] != r
        or (shape is not None and [B.shape[0], A.shape[1]] != list(shape))
        or info.get("rank", r) != r
    ):
        what = f"a rank-{r} update of shape {shape} (rank {info.get('rank', r)} in {KNOWEDIT_CONFIG})"
        raise _inconsistent(path, A, B, what)


def _experts_factors(
    path: str, A: torch.Tensor, B: torch.Tensor, r: int, info: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor, bool, int]:
    """Our ``(A, B, dense, E)`` from PEFT's factors of a routed-experts parameter (``lora_A [r·E, I]``,
    ``lora_B [d, r·E]``; :func:`from_peft_experts`), checked against ``knowedit_config.json``'s expert count,
    shape and rank. An adapter whose experts' ``lora_B`` blocks differ (made by PEFT, not by hf_knowedit) loads
    as the exact rank-``r·E`` per-expert delta when ``knowedit_config.json`` records no rank for it."""
    experts = A.shape[0] // r if A.dim() == 2 else 0
    shape, want = info.get("shape"), info.get("num_experts", experts)
    if (
        A.dim() != 2
        or B.dim() != 2
        or experts < 1
        or A.shape[0] != r * experts
        or B.shape[1] != A.shape[0]
        or want != experts
        or (shape is not None and [B.shape[0], experts * A.shape[1]] != list(shape))
    ):
        what = (
            f"rank-{r} factors of {want} routed experts (lora_A [{r}·E, I], lora_B [d, {r}·E]) of a "
            f"[d, E·I] update of shape {shape}"
        )
        raise _inconsistent(path, A, B, what)
    if info.get("rank", r) != r:
        raise _inconsistent(path, A, B, f"the rank-{info['rank']} edit {KNOWEDIT_CONFIG} records (rank_pattern: {r})")
    A, B, shared = from_peft_experts(A, B, r)
    if not shared and "rank" in info:
        raise AdapterFormatError(
            f"{path}: the experts' lora_B blocks differ, which hf_knowedit never writes (every expert's block is "
            f"the edit's B), yet {KNOWEDIT_CONFIG} records an hf_knowedit edit of rank {info['rank']}; the adapter "
            "files are inconsistent. Save it again."
        )
    return A, B, bool(info.get("dense", False)) and shared, experts


def _requests(items: list[dict[str, Any]], path: Path) -> list[EditRequest]:
    names = [f.name for f in dataclasses.fields(EditRequest)]
    out = []
    for i, item in enumerate(items):
        missing = [n for n in ("prompt", "subject", "target_new") if n not in item]
        try:
            if missing:
                raise InvalidRequestError(f"it lacks {', '.join(missing)}")
            out.append(to_request(EditRequest(**{k: item[k] for k in names if k in item})))
        except KnowEditError as err:
            raise AdapterFormatError(
                f"{path}: field 'requests[{i}]' is invalid ({err}). The file was edited or damaged; save the "
                "adapter again (EditSet.save_pretrained) or download it again."
            ) from None
    return out


def looks_local(source: str) -> bool:
    """Whether ``source`` reads as a local path rather than a Hub repo id: absolute, starting with ``.``
    or ``~``, more than one ``/``, the OS's own separator, or a first component that is a folder here
    (``edits/eifel`` when ``edits/`` exists). Such a path that does not exist is reported as missing,
    without asking the Hub."""
    if (
        os.path.isabs(source)
        or source.startswith((".", "~"))
        or source.count("/") > 1
        or (os.sep != "/" and os.sep in source)
    ):
        return True
    head, sep, _ = source.partition("/")
    return bool(sep) and os.path.isdir(head)


def fetch_adapter(
    source: str | Path,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> Path:
    """A local directory holding the adapter: ``source`` itself, or the Hub snapshot it names.

    Downloads exactly the adapter's files (never code, never pickles) with ``hf_hub_download``, all at
    the commit the first one resolved to; missing repos, revisions and files raise huggingface_hub's
    own errors (``RepositoryNotFoundError``, ``RevisionNotFoundError``, ``EntryNotFoundError``).
    """
    if not isinstance(source, (str, os.PathLike)):
        raise AdapterFormatError(
            f"An adapter source must be a directory path or a Hub repo id (a string), got "
            f"{type(source).__name__}: {repr(source)[:80]}."
        )
    source = os.fspath(source)
    if os.path.isdir(source):
        if revision is not None:
            logger.warning("revision=%r is ignored: %s is a local directory.", revision, source)
        return Path(source)
    if os.path.exists(source) or looks_local(source):
        raise AdapterFormatError(
            f"No adapter directory at {source!r}. Pass a directory written by "
            "EditSet.save_pretrained, or a Hub repo id such as 'user/my-edit'."
        )
    try:
        validate_repo_id(source)
    except HFValidationError as err:
        raise AdapterFormatError(
            f"{source!r} is neither an adapter directory nor a valid Hub repo id ({err}). Pass a directory "
            "written by EditSet.save_pretrained, or a repo id such as 'user/my-edit'."
        ) from None
    kw = dict(
        repo_id=source,
        cache_dir=cache_dir,
        force_download=force_download,
        local_files_only=local_files_only,
        token=token,
    )
    first = Path(hf_hub_download(filename=ADAPTER_CONFIG, revision=revision, **kw))
    commit = first.parent.name if _COMMIT.fullmatch(first.parent.name) else revision
    meta_path = Path(hf_hub_download(filename=KNOWEDIT_CONFIG, revision=commit, **kw))
    hf_hub_download(filename=ADAPTER_WEIGHTS, revision=commit, **kw)
    try:
        has_state = bool(json.loads(meta_path.read_text(encoding="utf-8")).get("state"))
    except (ValueError, AttributeError, RecursionError):
        has_state = False  # read_adapter reports the broken config
    if has_state:
        hf_hub_download(filename=STATE_WEIGHTS, revision=commit, **kw)
    logger.info("Fetched edit set %s at commit %s.", source, commit)
    return first.parent
