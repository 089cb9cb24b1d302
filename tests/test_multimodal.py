"""Multimodal wrappers around a text decoder (``*ForConditionalGeneration``: Gemma 3 4B-27B, Mistral Small 3,
Qwen2.5-VL, Qwen3-VL, LLaVA, LLaVA-NeXT), beyond the table-wide checks (``tests/test_architectures.py``) and
the behaviour matrix: the adapter names the wrapper's own modules, so PEFT and transformers load it into the
class a user loaded; the vision tower is never touched; decoder settings come from ``text_config``.

The slow test puts the bundled Gemma-3-270M text weights into a ``Gemma3ForConditionalGeneration`` with a
small random vision tower: logits, ROME and MEMIT deltas and ES / PS / NS are those of the text model."""

from __future__ import annotations

import pytest
import torch

import hf_knowedit
from hf_knowedit.architectures import decoder_config, get_architecture, get_module
from hf_knowedit.generation import max_positions
from hf_knowedit.methods.memory import model_shape
from tests.helpers import logits
from tests.test_adapters import edited
from tests.tiny_models import HEADS, MAX_POSITIONS, TINY_WRAPPERS, make_tiny_model, weights

WRAPPERS = sorted(TINY_WRAPPERS)


def vision(state: dict[str, torch.Tensor], spec) -> dict[str, torch.Tensor]:
    """The entries of a state dict outside the text decoder and the LM head (vision tower, projector)."""
    return {k: v for k, v in state.items() if not k.startswith((spec.backbone + ".", spec.lm_head + "."))}


@pytest.mark.parametrize("model_type", WRAPPERS)
def test_an_adapter_of_a_wrapper_loads_into_the_wrapper_with_peft_and_transformers(model_type, tmp_path):
    from peft import PeftModel

    model, tok, es = edited(model_type, layers=[1, 3], dense_layer=1)
    spec = get_architecture(model)
    assert all(p.startswith(f"{spec.layers}.") for p in es.deltas)  # the wrapper's own module names
    ours = logits(model, tok)
    es.save_pretrained(tmp_path / "a")
    with model.disable_edits():
        assert not torch.allclose(ours, logits(model, tok), atol=1e-3)
    model.revert_edits()

    base = weights(make_tiny_model(model_type)[0])
    peft_model = PeftModel.from_pretrained(make_tiny_model(model_type)[0], str(tmp_path / "a"))
    torch.testing.assert_close(logits(peft_model, tok), ours, atol=1e-5, rtol=1e-5)
    merged = peft_model.merge_and_unload()
    assert all(torch.equal(v, base[k]) for k, v in vision(merged.state_dict(), spec).items())

    tf_model, _ = make_tiny_model(model_type)
    tf_model.load_adapter(str(tmp_path / "a"))
    torch.testing.assert_close(logits(tf_model, tok), ours, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", WRAPPERS)
def test_edits_leave_the_vision_tower_untouched(model_type):
    model, tok = make_tiny_model(model_type)
    spec = get_architecture(model)
    before = vision(weights(model), spec)
    assert any("vision" in k or "visual" in k for k in before)
    hf_knowedit.apply_edits(
        model,
        tok,
        {"prompt": "The capital city of {}", "subject": "Italy", "target_new": "Paris"},
        "memit",
        layers=[1, 2],
        mom2="identity",
        context_templates=0,
        v_num_grad_steps=2,
    )
    after = vision(weights(model), spec)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    hf_knowedit.revert_edits(model)


@pytest.mark.parametrize("model_type", WRAPPERS)
def test_decoder_settings_are_read_from_the_text_config(model_type):
    model, _ = make_tiny_model(model_type)
    text = decoder_config(model)
    assert text is model.config.text_config and not hasattr(model.config, "num_attention_heads")
    shape = model_shape(model, 1)
    assert shape["heads"] == HEADS and shape["vocab"] == text.vocab_size == get_module(model, "lm_head").out_features
    assert max_positions(model) == MAX_POSITIONS


# -----------------------------------------------------------------------------
# real weights: Gemma-3-270M inside Gemma3ForConditionalGeneration


@pytest.fixture(scope="module")
def gemma3_wrapped(gemma3):
    """The bundled Gemma-3-270M text model and the same weights in a ``Gemma3ForConditionalGeneration`` with a
    one-layer random SigLIP vision tower (float32, eval mode)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    text, tok = gemma3
    vision_config = SiglipVisionConfig(
        hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    config = Gemma3Config(text_config=text.config.to_dict(), vision_config=vision_config, mm_tokens_per_image=4)
    torch.manual_seed(0)
    wrapper = Gemma3ForConditionalGeneration(config).eval()
    wrapper.model.language_model.load_state_dict(text.model.state_dict())
    with torch.no_grad():
        wrapper.lm_head.weight.copy_(text.lm_head.weight)
    return text, wrapper, tok


def same_deltas(a, b) -> None:
    """Two edit sets (text model, wrapper) write the same deltas into the same blocks: max relative
    difference ≤ 1e-5."""
    strip = "model.language_model."
    assert sorted(p.replace(strip, "model.") for p in b.deltas) == sorted(a.deltas)
    for path, delta in b.deltas.items():
        mine, theirs = delta.delta(), a.deltas[path.replace(strip, "model.")].delta()
        assert float((mine - theirs).abs().max() / theirs.abs().max()) <= 1e-5, path


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread", "stats_cache")
def test_gemma3_text_weights_in_the_wrapper_edit_and_score_as_the_text_model(gemma3_wrapped, data_path, stats_corpus):
    text, wrapper, tok = gemma3_wrapped
    assert get_architecture(wrapper).model_type == "gemma3"
    for prompt in ("The Eiffel Tower is located in the city of", "Danielle Darrieux's mother tongue is"):
        torch.testing.assert_close(logits(wrapper, tok, prompt), logits(text, tok, prompt), rtol=1e-5, atol=1e-5)

    records = hf_knowedit.load_records(data_path / "counterfact_500.json", limit=3)
    rome = hf_knowedit.ROMEConfig(mom2_corpus=stats_corpus, mom2_n_tokens=5_000, context_templates=0)
    memit = hf_knowedit.MEMITConfig(
        mom2_corpus=stats_corpus, mom2_n_tokens=5_000, context_templates=0, v_num_grad_steps=10
    )
    base = weights(wrapper)
    sets = {}
    for name, model in (("text", text), ("wrapper", wrapper)):
        sets[name, "rome"] = hf_knowedit.apply_edits(model, tok, records[0].request, "rome", config=rome)
        hf_knowedit.revert_edits(model)
        sets[name, "memit"] = hf_knowedit.apply_edits(model, tok, [r.request for r in records], "memit", config=memit)
        hf_knowedit.revert_edits(model)
    same_deltas(sets["text", "rome"], sets["wrapper", "rome"])
    same_deltas(sets["text", "memit"], sets["wrapper", "memit"])
    assert all(torch.equal(v, base[k]) for k, v in weights(wrapper).items())

    scores = {
        name: hf_knowedit.evaluate(model, tok, records, method="rome", fluency=False, progress=False, config=rome)
        for name, model in (("text", text), ("wrapper", wrapper))
    }
    for part in ("pre", "post"):
        mine, theirs = getattr(scores["wrapper"], part), getattr(scores["text"], part)
        for metric in ("ES", "PS", "NS"):
            assert mine[metric] == pytest.approx(theirs[metric], abs=1e-6), (part, metric, mine, theirs)
