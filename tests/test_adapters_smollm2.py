"""On the real bundled model: ROME-edit a fact, save it, push it to the loopback Hub, load it
into a fresh SmolLM2 from the Hub (the new prediction holds), revert, and load it with PEFT."""

import pytest
import torch

import hf_knowedit
from hf_knowedit._bundled import load_smollm2
from hf_knowedit.editset import EditSet

FACT = {
    "prompt": "{} is located in the city of",
    "subject": "The Eiffel Tower",
    "target_new": "Rome",
    "target_true": "Paris",
}
#: Real ROME, kept inside the slow-test budget on a CPU: no generated context prefixes and C = I (the
#: second moment is another test's business; the adapter path does not depend on it).
ROME_FAST = dict(context_templates=0, mom2="identity")


def _last_logits(model, tok, text):
    ids = tok(text, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits[0, -1].float()


def _first_token(tok, target):
    return tok(" " + target, add_special_tokens=False).input_ids[0]


@pytest.mark.slow
def test_rome_edit_saved_pushed_and_loaded_from_the_hub(smollm2, hub, tmp_path):
    from peft import PeftModel

    model, tok = smollm2
    hf_knowedit.attach(model, tok)
    prompt = FACT["prompt"].format(FACT["subject"])
    new, true = _first_token(tok, FACT["target_new"]), _first_token(tok, FACT["target_true"])
    base = _last_logits(model, tok, prompt)
    assert int(base.argmax()) == true

    es = model.apply_edits(FACT, method="rome", **ROME_FAST)
    try:
        edited = _last_logits(model, tok, prompt)
        assert int(edited.argmax()) == new
        touched = {p: model.get_submodule(p).weight.detach().clone() for p in es.deltas}
        es.save_pretrained(tmp_path / "eiffel")
        es.push_to_hub("eiffel-rome")
    finally:
        model.revert_edits()  # the session model must leave unedited
    assert torch.equal(_last_logits(model, tok, prompt), base)
    assert EditSet.from_pretrained(tmp_path / "eiffel").deltas.keys() == es.deltas.keys()

    fresh, _ = load_smollm2()
    hf_knowedit.attach(fresh, tok)
    loaded = fresh.load_edits(f"{hub.user}/eiffel-rome")
    assert loaded.method == "rome" and loaded.requests == es.requests
    for p, w in touched.items():
        assert torch.equal(fresh.get_submodule(p).weight, w)
    assert torch.equal(_last_logits(fresh, tok, prompt), edited)  # the new prediction holds, bit for bit
    fresh.revert_edits()
    assert torch.equal(_last_logits(fresh, tok, prompt), base)

    peft_model = PeftModel.from_pretrained(fresh, f"{hub.user}/eiffel-rome")
    via_peft = _last_logits(peft_model, tok, prompt)
    assert int(via_peft.argmax()) == new
    torch.testing.assert_close(via_peft, edited, atol=1e-4, rtol=1e-4)
