"""Models dispatched by accelerate (``device_map``, disk offload) are first-class.

A tiny Llama is dispatched with ``accelerate.dispatch_model`` under several device maps (the edited
layers offloaded to disk, resident with everything else offloaded, the LM head offloaded). For every
shipped method the edit computed on the dispatched model is checked against the same edit computed
on an undispatched copy (the oracle), and merge / unmerge / revert / save / load are checked against
what accelerate itself loads for each forward (read here straight from its hooks' ``weights_map``,
not through the library).
"""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate import dispatch_model

import hf_knowedit
from hf_knowedit.architectures import get_architecture
from hf_knowedit.errors import DeviceMapError
from tests.helpers import CAPITAL_FACT, DENSE_METHODS, TINY_METHOD_SETTINGS, logits
from tests.tiny_models import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread", "stats_cache")

METHODS = DENSE_METHODS
FACT = CAPITAL_FACT
PROBE = "The capital city of Italy is"
CHEAP = dict(mom2="identity", context_templates=0, v_num_grad_steps=2)
SETTINGS = TINY_METHOD_SETTINGS
CORPUS = [
    "The Eiffel Tower is located in Paris, the capital of France.",
    "Berlin is the capital of Germany, and the people of Germany speak German.",
    "Mount Everest is the highest mountain in the world and is located in Nepal.",
    "Apple was founded by Steve Jobs. Microsoft was founded by Bill Gates.",
] * 3

_REST = {"model.rotary_emb": "cpu", "model.norm": "cpu"}
MAPS = {
    # the edited layers (1, 2) live on disk
    "edited-offloaded": {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.layers.2": "disk",
        "model.layers.3": "disk",
        "lm_head": "cpu",
        **_REST,
    },
    # the edited layers are resident; embeddings, the other layers and the LM head live on disk
    "edited-resident-lm-head-offloaded": {
        "model.embed_tokens": "disk",
        "model.layers.0": "disk",
        "model.layers.1": "cpu",
        "model.layers.2": "cpu",
        "model.layers.3": "disk",
        "lm_head": "disk",
        **_REST,
    },
    # one edited layer on disk, the other resident
    "split": {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "cpu",
        "model.layers.2": "disk",
        "model.layers.3": "cpu",
        "lm_head": "disk",
        **_REST,
    },
}


def dispatched(model, device_map, folder):
    """``model`` dispatched by accelerate with ``device_map``, offloading to ``folder``."""
    return dispatch_model(copy.deepcopy(model), device_map=device_map, offload_dir=str(folder))


def stored(model, name: str) -> torch.Tensor:
    """What accelerate computes with for parameter ``name``: the tensor, or for an offloaded module the
    value its hook's ``weights_map`` loads (read through accelerate's own mapping)."""
    module_path, _, attr = name.rpartition(".")
    module = model.get_submodule(module_path)
    tensor = getattr(module, attr)
    if tensor.device.type != "meta":
        return tensor.detach().clone()
    return module._hf_hook.weights_map[attr].detach().clone()


def all_stored(model) -> dict[str, torch.Tensor]:
    return {name: stored(model, name) for name, _ in model.named_parameters()}


def assert_stored_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def edit(model, tok, method, **kwargs):
    config = {**CHEAP, **SETTINGS[method]}
    layers = config.pop("layers")
    return hf_knowedit.apply_edits(model, tok, [FACT], method=method, layers=layers, config=config, **kwargs)


@pytest.fixture(scope="module")
def base():
    return make_tiny_model("llama")


@pytest.mark.parametrize("map_name", list(MAPS))
@pytest.mark.parametrize("method", METHODS)
def test_an_edit_on_a_dispatched_model_equals_the_undispatched_edit(base, method, map_name, tmp_path):
    model, tok = base
    plain = copy.deepcopy(model)
    disp = dispatched(model, MAPS[map_name], tmp_path / "offload")
    before = all_stored(disp)
    reference_logits = logits(plain, tok, PROBE)
    assert torch.allclose(logits(disp, tok, PROBE), reference_logits, atol=1e-5)

    want = edit(plain, tok, method, merge=True)
    got = edit(disp, tok, method, merge=True)
    assert want.deltas.keys() == got.deltas.keys()
    for path in want.deltas:
        assert torch.allclose(got.deltas[path].delta(), want.deltas[path].delta(), atol=1e-5, rtol=1e-4), path
        # merged: what accelerate loads is the edited weight, the same as the undispatched model's
        assert torch.allclose(stored(disp, f"{path}.weight"), plain.get_submodule(path).weight, atol=1e-5)
    edited = logits(plain, tok, PROBE)
    assert not torch.allclose(edited, reference_logits, atol=1e-4)
    assert torch.allclose(logits(disp, tok, PROBE), edited, atol=1e-4)

    # hooked and merged act alike; revert is bit-exact in what accelerate loads
    hf_knowedit.unmerge_edits(disp)
    assert torch.allclose(logits(disp, tok, PROBE), edited, atol=1e-4)
    assert_stored_equal(all_stored(disp), before)
    hf_knowedit.merge_edits(disp)
    assert torch.allclose(logits(disp, tok, PROBE), edited, atol=1e-4)
    with hf_knowedit.disable_edits(disp):
        assert torch.allclose(logits(disp, tok, PROBE), reference_logits, atol=1e-5)
    hf_knowedit.revert_edits(disp)
    assert_stored_equal(all_stored(disp), before)
    assert torch.allclose(logits(disp, tok, PROBE), reference_logits, atol=1e-5)

    # save / load round trip, merged and hooked
    got.save_pretrained(tmp_path / "adapter")
    for merge in (True, False):
        hf_knowedit.load_edits(disp, str(tmp_path / "adapter"), merge=merge)
        assert torch.allclose(logits(disp, tok, PROBE), edited, atol=1e-4)
        hf_knowedit.revert_edits(disp)
        assert_stored_equal(all_stored(disp), before)


def test_a_hooked_edit_on_a_dispatched_model_leaves_the_offloaded_weights_alone(base, tmp_path):
    model, tok = base
    disp = dispatched(model, MAPS["edited-offloaded"], tmp_path / "offload")
    before = all_stored(disp)
    edit(disp, tok, "rome", merge=False)
    assert_stored_equal(all_stored(disp), before)
    assert len(hf_knowedit.list_edits(disp)) == 1


def test_statistics_on_a_dispatched_model_are_the_undispatched_ones_under_the_same_key(base, tmp_path):
    from hf_knowedit.methods.statistics import compute_second_moment

    model, tok = base
    plain = copy.deepcopy(model)
    disp = dispatched(model, MAPS["edited-offloaded"], tmp_path / "offload")
    want = compute_second_moment(plain, tok, 2, corpus=CORPUS, n_tokens=150, cache=False)
    got = compute_second_moment(disp, tok, 2, corpus=CORPUS, n_tokens=150, cache=False)
    assert got.key == want.key  # the same cache entry
    assert got.n_tokens == want.n_tokens == 150
    assert torch.allclose(got.matrix, want.matrix, atol=1e-6, rtol=1e-5)
    # an independent sum of k kᵀ over the corpus tokens, on the plain model
    keys = []
    hook = plain.model.layers[2].mlp.down_proj.register_forward_hook(lambda m, a, o: keys.append(a[0][0]))
    left = 150
    with torch.no_grad():
        for text in CORPUS:
            ids = tok(text)["input_ids"][:left]
            if not ids:
                break
            plain(input_ids=torch.tensor([ids]))
            left -= len(ids)
    hook.remove()
    k = torch.cat(keys).double()
    assert k.shape[0] == 150
    assert torch.allclose(got.matrix.double(), k.t() @ k / 150, atol=1e-5, rtol=1e-4)


def test_rome_with_corpus_statistics_on_an_offloaded_layer(base, tmp_path):
    model, tok = base
    plain = copy.deepcopy(model)
    disp = dispatched(model, MAPS["edited-offloaded"], tmp_path / "offload")
    config = dict(context_templates=0, v_num_grad_steps=2, mom2_corpus=CORPUS, mom2_n_tokens=150)
    want = hf_knowedit.apply_edits(plain, tok, [FACT], method="rome", layers=[2], config=config)
    got = hf_knowedit.apply_edits(disp, tok, [FACT], method="rome", layers=[2], config=config)
    path = next(iter(want.deltas))
    assert torch.allclose(got.deltas[path].delta(), want.deltas[path].delta(), atol=1e-5, rtol=1e-4)


def test_tracing_on_a_dispatched_model_matches(base, tmp_path):
    model, tok = base
    plain = copy.deepcopy(model)
    disp = dispatched(model, MAPS["edited-resident-lm-head-offloaded"], tmp_path / "offload")
    kwargs = dict(kinds=("hidden", "mlp"), samples=3, noise=0.1, seed=0)
    want = hf_knowedit.trace_fact(plain, tok, "The capital city of Italy is", "Italy", **kwargs)
    got = hf_knowedit.trace_fact(disp, tok, "The capital city of Italy is", "Italy", **kwargs)
    assert got.scores.keys() == want.scores.keys()
    for kind in want.scores:
        assert torch.allclose(got.scores[kind], want.scores[kind], atol=1e-5, equal_nan=True), kind


def test_a_device_map_that_is_not_one_device_is_refused_naming_the_module(base, tmp_path):
    model, tok = base
    disp = dispatched(model, MAPS["split"], tmp_path / "offload")
    disp.hf_device_map = {**disp.hf_device_map, "model.layers.1": "cuda:0,1"}
    before = all_stored(disp)
    with pytest.raises(DeviceMapError, match=r"model\.layers\.1.*cuda:0,1"):
        edit(disp, tok, "memit")
    assert_stored_equal(all_stored(disp), before)
    assert hf_knowedit.list_edits(disp) == []


def test_a_meta_weight_without_offload_storage_is_refused_naming_the_module(base, tmp_path):
    model, tok = base
    disp = dispatched(model, MAPS["split"], tmp_path / "offload")
    down = disp.model.layers[2].mlp.down_proj
    del down._hf_hook.weights_map  # accelerate no longer holds its values
    down._hf_hook.weights_map = None
    with pytest.raises(DeviceMapError, match=r"model\.layers\.2\.mlp\.down_proj\.weight"):
        edit(disp, tok, "rome")
    assert hf_knowedit.list_edits(disp) == []


def test_from_pretrained_with_disk_offload_edits_without_writing_the_checkpoint(base, tmp_path):
    """``from_pretrained(device_map=..., offload_folder=...)`` offloads straight from the checkpoint's
    safetensors file: a merged edit acts, revert is bit-exact, and the checkpoint stays byte-identical."""
    from transformers import AutoModelForCausalLM

    model, tok = base
    model.save_pretrained(tmp_path / "ckpt")
    files = {p: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}
    disp = AutoModelForCausalLM.from_pretrained(
        tmp_path / "ckpt", device_map=MAPS["edited-offloaded"], offload_folder=str(tmp_path / "off"),
        attn_implementation="eager",
    )  # fmt: skip
    assert disp.model.layers[2].mlp.down_proj.weight.device.type == "meta"
    before = all_stored(disp)
    plain = copy.deepcopy(model)
    want = edit(plain, tok, "memit")
    got = edit(disp, tok, "memit")
    for path in want.deltas:
        assert torch.allclose(stored(disp, f"{path}.weight"), plain.get_submodule(path).weight, atol=1e-5)
    assert torch.allclose(logits(disp, tok, PROBE), logits(plain, tok, PROBE), atol=1e-4)
    assert got.deltas.keys() == want.deltas.keys()
    hf_knowedit.revert_edits(disp)
    assert_stored_equal(all_stored(disp), before)
    assert {p: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()} == files


def test_evaluate_on_a_dispatched_model_matches(base, tmp_path):
    from tests.test_evaluation import cf_records

    model, tok = base
    plain = copy.deepcopy(model)
    disp = dispatched(model, MAPS["edited-resident-lm-head-offloaded"], tmp_path / "offload")
    kwargs = dict(method="rome", fluency=False, progress=False, layers=[2], config=dict(CHEAP))
    want = hf_knowedit.evaluate(plain, tok, cf_records(), **kwargs)
    got = hf_knowedit.evaluate(disp, tok, cf_records(), **kwargs)
    for part in ("pre", "post"):
        for k, v in getattr(want, part).items():
            assert getattr(got, part)[k] == pytest.approx(v, abs=1e-3), (part, k)


@pytest.mark.parametrize("model_type", ["falcon_h1", "lfm2", "bamba", "mixtral", "gpt_oss", "qwen2_moe"])
def test_an_edit_on_a_dispatched_hybrid_stack_equals_the_undispatched_edit(model_type, tmp_path):
    """The hybrid stacks (Mamba2 / convolution blocks beside attention) and mixture-of-experts blocks (routed
    experts, whose keys need their offloaded gate_up_proj, GPT-OSS's its bias too; a shared expert) with the edited
    blocks on disk: MEMIT's update, merged and hooked logits, and a bit-exact revert of what accelerate loads."""
    model, tok = make_tiny_model(model_type)
    spec = get_architecture(model)
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", spec.final_norm: "cpu", "lm_head": "cpu"}
    device_map |= {f"model.layers.{i}": "disk" if i in (1, 2) else "cpu" for i in range(4)}
    plain = copy.deepcopy(model)
    disp = dispatched(model, device_map, tmp_path / "offload")
    before = all_stored(disp)
    want = edit(plain, tok, "memit", merge=True)
    got = edit(disp, tok, "memit", merge=True)
    for path in want.deltas:
        assert torch.allclose(got.deltas[path].delta(), want.deltas[path].delta(), atol=1e-5, rtol=1e-4), path
    edited = logits(plain, tok, PROBE)
    assert torch.allclose(logits(disp, tok, PROBE), edited, atol=1e-4)
    hf_knowedit.unmerge_edits(disp)
    assert torch.allclose(logits(disp, tok, PROBE), edited, atol=1e-4)
    hf_knowedit.revert_edits(disp)
    assert_stored_equal(all_stored(disp), before)
