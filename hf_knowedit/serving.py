"""What serving engines need from an edit set, checked before deploying it.

vLLM (``vllm serve BASE --enable-lora --lora-modules NAME=DIR``) reads PEFT's ``adapter_config.json`` with its
own ``PEFTHelper`` (``vllm/lora/peft_helper.py``): ``r``, ``lora_alpha`` and ``target_modules`` are required;
``modules_to_save`` and DoRA are refused; the scaling is ``lora_alpha / r`` for every module (``rank_pattern``
and ``alpha_pattern`` are not read). hf_knowedit's files set ``lora_alpha = r`` = the largest module rank and
pad nothing, so every module is scaled by 1 there too. The adapter's ``r`` must not exceed
``--max-lora-rank``, which takes only the values of ``MaxLoRARanks`` in ``vllm/config/lora.py`` and
defaults to 16. vLLM loads LoRA only on the module names its model class lists as LoRA modules; for the
Llama, Mistral, Qwen2/3, Gemma 2/3 and Phi-3 families the MLP output projection ``down_proj`` is one.
Adapters that name a module by its parameter (PEFT's ``target_parameters``: the routed experts' 3-D
``down_proj``, and the shared experts PEFT itself would retarget, :mod:`hf_knowedit.adapter_files`) are
outside what ``PEFTHelper`` reads (``target_modules``); such an edit is served merged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .architectures import EXPERT_LAYOUTS

#: ``--max-lora-rank`` values vLLM accepts (``MaxLoRARanks``, ``vllm/config/lora.py``) and its default
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16
#: module names vLLM's Llama-family model classes take LoRA on, of those hf_knowedit edits
VLLM_KNOWN_LORA_MODULES = frozenset({"down_proj"})


@dataclass(frozen=True)
class VLLMCheck:
    """Whether vLLM serves an edit set as a LoRA adapter, and with which flags.

    ``rank``: the adapter's ``r`` (its largest module rank). ``max_lora_rank``: the smallest value vLLM
    accepts that holds it, ``None`` when none does. ``modules``: the last names of the edited modules.
    ``by_parameter``: the edited modules the adapter names by their parameter (``target_parameters``)."""

    rank: int
    max_lora_rank: int | None
    modules: tuple[str, ...]
    by_parameter: tuple[str, ...] = ()

    @property
    def fits(self) -> bool:
        """Whether vLLM loads it as a LoRA adapter: a rank it accepts, every module named in ``target_modules``."""
        return self.max_lora_rank is not None and not self.by_parameter

    def advice(self, source: str = "ADAPTER") -> str:
        """One paragraph a user can act on: the flags that load it, or how to make it fit."""
        if self.by_parameter:
            return (
                f"vLLM: does not load as a LoRA: {', '.join(self.by_parameter)} "
                f"{'is' if len(self.by_parameter) == 1 else 'are'} named by parameter (PEFT target_parameters: "
                "routed experts, or a shared expert PEFT would retarget), which vLLM's PEFT reader does not take. "
                f"Merge it (hf-knowedit apply {source} --merge-to DIR) and serve the merged checkpoint."
            )
        if self.max_lora_rank is None:
            cap = VLLM_MAX_LORA_RANKS[-1]
            return (
                f"vLLM: does not load as a LoRA: rank {self.rank} exceeds vLLM's largest --max-lora-rank {cap}. "
                f"Truncate it (hf-knowedit truncate {source} --rank {cap} --out DIR; the error is reported per "
                f"module) or merge it (hf-knowedit apply {source} --merge-to DIR; no rank limit)."
            )
        flag = (
            "the default --max-lora-rank 16 holds it"
            if self.max_lora_rank <= VLLM_DEFAULT_MAX_LORA_RANK
            else f"needs --max-lora-rank {self.max_lora_rank} (the default is 16)"
        )
        text = (
            f"vLLM: loads with --enable-lora; rank {self.rank}: {flag}. "
            f"vllm serve BASE --enable-lora --max-lora-rank {self.max_lora_rank} --lora-modules edit={source}"
        )
        unknown = sorted(set(self.modules) - VLLM_KNOWN_LORA_MODULES)
        if unknown:
            text += (
                f". Edited modules {', '.join(unknown)}: check that vLLM's class for this architecture takes LoRA "
                "on them (its supported LoRA modules), or merge the edit instead."
            )
        return text


def check_vllm(es: Any) -> VLLMCheck:
    """:class:`VLLMCheck` of an :class:`~hf_knowedit.editset.EditSet` (from its module ranks and names)."""
    rank = max(d.rank for d in es.deltas.values())
    fitting = [r for r in VLLM_MAX_LORA_RANKS if r >= rank]
    modules = tuple(sorted({path.rsplit(".", 1)[-1] for path in es.deltas}))
    layouts, targets = getattr(es, "layouts", {}), getattr(es, "peft_targets", {})
    by_parameter = tuple(
        sorted(p for p in es.deltas if layouts.get(p) in EXPERT_LAYOUTS or targets.get(p) == "parameter")
    )
    return VLLMCheck(rank, fitting[0] if fitting else None, modules, by_parameter)
