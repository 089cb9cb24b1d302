"""attach / detach / KnowEditMixin over the whole architecture matrix."""

import pytest
import torch

import hf_knowedit
from hf_knowedit.attach import MODEL_METHODS
from hf_knowedit.errors import KnowEditError, MissingTokenizerError, UnsupportedArchitectureError
from hf_knowedit.hooks import count_forward_hooks
from tests.test_stack import random_set
from tests.tiny_models import TINY_MODEL_TYPES, make_tiny_model, weights


def _files(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_attach_detach_leave_model_and_saved_files_identical(model_type, tmp_path):
    model, tok = make_tiny_model(model_type)
    cls = model.__class__
    forwards = {n: m.forward for n, m in model.named_modules()}
    model.save_pretrained(tmp_path / "before")
    assert hf_knowedit.attach(model, tok) is model
    assert hf_knowedit.attach(model, tok) is model  # twice: no-op
    for name in MODEL_METHODS:
        assert callable(getattr(model, name))
    assert model.__class__ is cls
    assert all(m.forward == forwards[n] for n, m in model.named_modules())
    model.save_pretrained(tmp_path / "attached")
    hf_knowedit.detach(model)
    model.save_pretrained(tmp_path / "after")
    assert _files(tmp_path / "before") == _files(tmp_path / "attached") == _files(tmp_path / "after")
    assert not any(name in model.__dict__ for name in MODEL_METHODS)
    assert model.__class__ is cls and count_forward_hooks(model) == 0


def test_detach_with_active_edits():
    model, tok = make_tiny_model("llama")
    hf_knowedit.attach(model, tok)
    model_state = weights(model)
    from hf_knowedit.stack import push_edit_set

    push_edit_set(model, random_set(model, [1]), merge=False)
    with pytest.raises(KnowEditError, match="revert"):
        hf_knowedit.detach(model)
    edited = weights(model)
    assert all(torch.equal(edited[k], model_state[k]) for k in edited)  # hooked, weights untouched
    hf_knowedit.detach(model, keep_edits=True)  # bake in
    assert count_forward_hooks(model) == 0
    assert not all(torch.equal(model.state_dict()[k], model_state[k]) for k in model_state)


def test_unknown_architecture_leaves_model_untouched():
    model, tok = make_tiny_model("llama")
    model.config.model_type = "my_new_arch"
    before = dict(model.__dict__)
    with pytest.raises(UnsupportedArchitectureError, match="register_architecture"):
        hf_knowedit.attach(model, tok)
    assert model.__dict__.keys() == before.keys()


def test_missing_tokenizer_is_typed():
    model, _ = make_tiny_model("llama")
    hf_knowedit.attach(model)
    with pytest.raises(MissingTokenizerError, match="attach"):
        model.apply_edits({"prompt": "{} is in", "subject": "Bob", "target_new": "Rome"})


def test_mixin_calls_same_core():
    from transformers import LlamaForCausalLM

    class EditableLlama(hf_knowedit.KnowEditMixin, LlamaForCausalLM):
        pass

    base, tok = make_tiny_model("llama")
    model = EditableLlama(base.config)
    model.load_state_dict(base.state_dict())
    model.eval()
    model.set_edit_tokenizer(tok)
    from hf_knowedit.stack import push_edit_set

    push_edit_set(model, random_set(model, [1]), name="x")
    assert [e.name for e in model.list_edits()] == ["x"]
    model.revert_edits()
    assert torch.equal(
        model.state_dict()["model.layers.1.mlp.down_proj.weight"],
        base.state_dict()["model.layers.1.mlp.down_proj.weight"],
    )
