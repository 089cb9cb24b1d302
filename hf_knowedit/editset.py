"""Edit sets: what an editing call produced — exact low-rank factors per module
(:class:`~hf_knowedit.deltas.ModuleDelta`, whose docstring gives the orientation and storage), the
facts, the method and its config — saved, loaded and shared as PEFT-compatible adapters
(:mod:`hf_knowedit.adapter_files`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCard, ModelHubMixin
from huggingface_hub.utils import validate_hf_hub_args

from . import adapter_files
from .deltas import ModuleDelta
from .requests import EditRequest


@dataclass
class EditSet(ModelHubMixin, library_name="hf_knowedit", tags=["knowledge-editing"], pipeline_tag="text-generation"):
    """The result of one ``apply_edits`` call (or one loaded adapter).

    Saved, loaded and shared as a PEFT-compatible LoRA adapter through huggingface_hub's
    ``ModelHubMixin`` (see :mod:`hf_knowedit.adapter_files` for the format)::

        es.save_pretrained("angola-edit")                       # atomic
        es.push_to_hub("me/angola-edit")                        # every standard Hub argument
        es = EditSet.from_pretrained("me/angola-edit", revision="v1")

    Attributes:
        deltas: module path -> :class:`ModuleDelta`.
        requests: the edited facts.
        method: e.g. ``"rome"``; ``config``: the method's hyper-parameters as a dict.
        layers: the edited layer indices.
        fingerprints: module path -> :func:`fingerprint` of the weights the deltas were computed on.
        layouts: module path -> ``"linear"`` / ``"conv1d"`` / ``"experts"`` / ``"experts_t"`` (how the weight
            stores ``ΔW``).
        base_model: name or path of the base model, and ``revision`` if known.
        stats_key: identity of the second-moment statistics used, if any.
        metrics: evaluation results, when available.
        state: method state that must travel with the set (e.g. AlphaEdit's accumulated keys).
        name: the name under which the set is active on a model.
        num_experts: module path -> the number of routed experts ``E`` of a routed-experts module (its
            ``ΔW [d, E·I]`` is ``E`` blocks of ``I`` columns, one per expert); checked against the model on load,
            needed to save the set as an adapter.
        peft_targets: module path -> ``"parameter"`` for a ``"linear"`` module that the adapter names by its
            ``weight`` in PEFT's ``target_parameters`` (the architecture table's ``peft_target``, recorded when
            the edit is made); the other modules are named in ``target_modules``.
    """

    deltas: dict[str, ModuleDelta]
    requests: list[EditRequest]
    method: str
    config: dict[str, Any] = field(default_factory=dict)
    layers: list[int] = field(default_factory=list)
    fingerprints: dict[str, dict[str, Any]] = field(default_factory=dict)
    layouts: dict[str, str] = field(default_factory=dict)
    base_model: str | None = None
    revision: str | None = None
    stats_key: Any | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    name: str | None = None
    num_experts: dict[str, int] = field(default_factory=dict)
    peft_targets: dict[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:
        ranks = {m.split(".")[-3] if m.count(".") >= 3 else m: d.rank for m, d in self.deltas.items()}
        return (
            f"EditSet(name={self.name!r}, method={self.method!r}, edits={len(self.requests)}, "
            f"layers={self.layers}, ranks={ranks})"
        )

    def __len__(self) -> int:
        return len(self.requests)

    def truncate(self, rank: int) -> EditSet:
        """A new edit set whose every module delta is its best rank-``rank`` approximation (SVD in float64
        from the factors, :meth:`ModuleDelta.truncate`), e.g. to fit a serving engine's maximum LoRA rank.

        Modules of rank at most ``rank`` are copied unchanged. The new set's ``metrics["truncation"]``
        records the rank asked for, each module's rank before and after, and its relative error
        ``‖ΔW − ΔW_r‖_F / ‖ΔW‖_F`` (``relative_error``; ``max_relative_error`` over modules). Requests,
        fingerprints, config and method state are the same, so it loads onto the same base model.

        >>> small = es.truncate(64); small.metrics["truncation"]["max_relative_error"]
        """
        deltas: dict[str, ModuleDelta] = {}
        errors: dict[str, float] = {}
        for path, d in self.deltas.items():
            deltas[path], errors[path] = d.truncate(rank)
        info = {
            "rank": int(rank),
            "ranks_before": {p: d.rank for p, d in sorted(self.deltas.items())},
            "ranks_after": {p: d.rank for p, d in sorted(deltas.items())},
            "relative_error": dict(sorted(errors.items())),
            "max_relative_error": max(errors.values(), default=0.0),
        }
        return dataclasses.replace(
            self,
            deltas=deltas,
            metrics={**self.metrics, "truncation": info},
            state=dict(self.state),
            name=f"{self.name}-r{int(rank)}" if self.name else None,
        )

    def save_gguf_lora(
        self,
        path: str | Path,
        model: Any,
        *,
        base_gguf: str | Path | None = None,
        dtype: str = "f32",
        force: bool = False,
    ) -> Path:
        """Write this set as a llama.cpp LoRA adapter (``.gguf``) for llama.cpp, Ollama, LM Studio and
        llama-cpp-python; ``model`` (the model, its config or ``model_type``) selects llama.cpp's tensor
        names from the architecture table. With ``base_gguf`` the base file is checked first. See
        :func:`hf_knowedit.export_gguf.export_gguf_lora` (needs the ``gguf`` package).

        >>> es.save_gguf_lora("angola.gguf", model, base_gguf="SmolLM2-135M-Instruct.Q4_1.gguf")
        """
        from .export_gguf import export_gguf_lora

        return export_gguf_lora(self, path, model, base_gguf=base_gguf, dtype=dtype, force=force)

    # -- Hub / disk (ModelHubMixin); the format lives in hf_knowedit.adapter_files ------------

    def __new__(cls, *args: Any, **kwargs: Any) -> EditSet:
        # ModelHubMixin.__new__ would capture the JSON-able init arguments as a config and write
        # them to config.json, which transformers would take for a model config. An edit set's
        # configuration is its adapter files, so that machinery is skipped.
        return object.__new__(cls)

    def save_pretrained(
        self,
        save_directory: str | Path,
        *,
        config: dict | None = None,
        repo_id: str | None = None,
        push_to_hub: bool = False,
        model_card_kwargs: dict[str, Any] | None = None,
        **push_to_hub_kwargs: Any,
    ) -> Path | str:
        """Write the adapter into ``save_directory`` atomically (a temporary directory beside it, then
        a rename: a failure leaves no half-written adapter), and push it if ``push_to_hub``.

        Arguments as in :meth:`huggingface_hub.ModelHubMixin.save_pretrained`. Returns the directory
        (a ``Path``), or with ``push_to_hub`` the commit URL as the mixin does.
        """
        with adapter_files.atomic_directory(save_directory) as tmp:
            super().save_pretrained(tmp, config=config, model_card_kwargs=model_card_kwargs)
        if push_to_hub:
            return self.push_to_hub(
                repo_id=repo_id or Path(save_directory).name,
                config=config,
                model_card_kwargs=model_card_kwargs,
                **push_to_hub_kwargs,
            )
        return Path(save_directory)

    def push_to_hub(self, repo_id: str, *, model_card_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> str:
        """Save into a temporary directory and upload it as one commit (arguments as in
        :meth:`huggingface_hub.ModelHubMixin.push_to_hub`); the model card names ``repo_id``."""
        card_kwargs = {"repo_id": repo_id, **(model_card_kwargs or {})}
        return super().push_to_hub(repo_id, model_card_kwargs=card_kwargs, **kwargs)

    def _save_pretrained(self, save_directory: Path) -> None:
        adapter_files.write_adapter(self, save_directory)

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        tags = self._hub_mixin_info.model_card_data.tags or []
        return adapter_files.model_card(self, *args, tags=tags, **kwargs)

    @classmethod
    @validate_hf_hub_args
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        force_download: bool = False,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        revision: str | None = None,
        **model_kwargs: Any,
    ) -> EditSet:
        """Read an edit set from a directory or a Hub repo (arguments as in
        :meth:`huggingface_hub.ModelHubMixin.from_pretrained`). Safetensors and JSON only.

        Unlike the mixin's default this does not look for a ``config.json`` first (an adapter has
        none, and the lookup fails offline); everything else is the mixin's contract.
        """
        return cls._from_pretrained(
            model_id=pretrained_model_name_or_path,
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
            token=token,
            **model_kwargs,
        )

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        **model_kwargs: Any,
    ) -> EditSet:
        if model_kwargs:
            raise TypeError(f"EditSet.from_pretrained() got unexpected keyword arguments {sorted(model_kwargs)}.")
        directory = adapter_files.fetch_adapter(
            model_id,
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
            token=token,
        )
        return cls(**adapter_files.read_adapter(directory))
