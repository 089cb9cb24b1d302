"""``hf-knowedit show --vllm``: whether vLLM serves an edit set as a LoRA, and with which flags."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from hf_knowedit.serving import VLLM_MAX_LORA_RANKS, check_vllm


def edit_set(ranks: dict[str, int]):
    return SimpleNamespace(deltas={path: SimpleNamespace(rank=r) for path, r in ranks.items()})


@pytest.mark.parametrize(
    "ranks, max_lora_rank",
    [
        ({"model.layers.6.mlp.down_proj": 1}, 1),  # ROME
        ({"model.layers.4.mlp.down_proj": 9, "model.layers.5.mlp.down_proj": 16}, 16),
        ({"model.layers.4.mlp.down_proj": 100}, 128),  # 100 MEMIT edits
        ({"model.layers.4.mlp.down_proj": 300}, 320),
        ({"model.layers.4.mlp.down_proj": 512}, 512),
        ({"model.layers.4.mlp.down_proj": 576}, None),  # a dense SmolLM2 module
    ],
)
def test_the_smallest_max_lora_rank_vllm_accepts_that_holds_the_adapter(ranks, max_lora_rank):
    check = check_vllm(edit_set(ranks))
    assert check.max_lora_rank == max_lora_rank and check.rank == max(ranks.values())
    assert check.fits == (max_lora_rank is not None)
    assert max_lora_rank is None or max_lora_rank in VLLM_MAX_LORA_RANKS


def test_advice_gives_the_flags_or_the_way_to_fit():
    assert "the default --max-lora-rank 16 holds it" in check_vllm(edit_set({"a.down_proj": 1})).advice("e")
    big = check_vllm(edit_set({"a.down_proj": 100})).advice("edits/cf100")
    assert "--max-lora-rank 128" in big and "--lora-modules edit=edits/cf100" in big and "default is 16" in big
    dense = check_vllm(edit_set({"a.down_proj": 576})).advice("edits/x")
    assert "hf-knowedit truncate edits/x --rank 512" in dense and "--merge-to" in dense
    gpt2 = check_vllm(edit_set({"transformer.h.3.mlp.c_proj": 1})).advice()
    assert "c_proj" in gpt2 and "check that vLLM" in gpt2


def test_modules_named_by_parameter_are_served_merged():
    experts = SimpleNamespace(
        deltas={"model.layers.1.mlp.experts": SimpleNamespace(rank=1)},
        layouts={"model.layers.1.mlp.experts": "experts"},
        peft_targets={},
    )
    shared = SimpleNamespace(
        deltas={"model.layers.1.mlp.shared_experts.down_proj": SimpleNamespace(rank=1)},
        layouts={"model.layers.1.mlp.shared_experts.down_proj": "linear"},
        peft_targets={"model.layers.1.mlp.shared_experts.down_proj": "parameter"},
    )
    for es in (experts, shared):
        check = check_vllm(es)
        assert check.max_lora_rank == 1 and not check.fits
        advice = check.advice("edits/moe")
        assert "target_parameters" in advice and "hf-knowedit apply edits/moe --merge-to" in advice
    plain = SimpleNamespace(deltas=shared.deltas, layouts=shared.layouts, peft_targets={})
    assert check_vllm(plain).fits
