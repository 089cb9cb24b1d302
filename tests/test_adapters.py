"""Edit sets as adapters on disk: the PEFT format, round trips, PEFT / transformers interop,
bad input (typed errors, model untouched) and atomic saves."""

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors import safe_open

import hf_knowedit
from hf_knowedit import adapter_files as adapters
from hf_knowedit.architectures import (
    EXPERT_LAYOUTS,
    edited_param,
    from_param,
    get_architecture,
    get_module,
    mlp_out_dims,
    mlp_out_path,
    to_param,
)
from hf_knowedit.deltas import ModuleDelta, fingerprint
from hf_knowedit.editset import EditSet
from hf_knowedit.errors import (
    AdapterFormatError,
    BaseModelMismatchError,
    InvalidArgumentError,
    InvalidConfigError,
)
from hf_knowedit.methods.registry import MethodResult, register_method
from hf_knowedit.requests import EditRequest
from tests.helpers import assert_untouched, logits, snapshot
from tests.test_stack import random_set
from tests.tiny_models import TINY_ROUTED_MOE, TINY_SHARED_MOE, assert_same, make_tiny_model, tiny_config, weights

ADAPTER_FILES = ["README.md", "adapter_config.json", "adapter_model.safetensors", "knowedit_config.json"]


# -- a registered test method: random low-rank deltas at the MLP output of chosen layers -----------


@dataclass
class RandomConfig:
    rank: int = 2
    scale: float = 0.5
    dense_layer: int = -1  # this layer's delta is stored dense


def _random_compute(ctx):
    g = torch.Generator().manual_seed(len(ctx.requests) + 7 * ctx.config.rank)
    layers = ctx.layers if isinstance(ctx.layers, list) else [1, 2]
    deltas = {}
    for layer in layers:
        path = mlp_out_path(ctx.arch, layer)
        d_in, d_out = mlp_out_dims(ctx.model, ctx.arch, layer)
        A = torch.randn(ctx.config.rank, d_in, generator=g) * ctx.config.scale
        B = torch.randn(d_out, ctx.config.rank, generator=g) * ctx.config.scale
        deltas[path] = ModuleDelta.from_dense(B @ A) if layer == ctx.config.dense_layer else ModuleDelta(A=A, B=B)
    state = {"keys": torch.arange(6, dtype=torch.float64).reshape(2, 3)}
    return MethodResult(
        deltas=deltas, layers=list(layers), stats_key={"model": "tiny", "layer": layers[0]}, state=state
    )


register_method("adaptertest", _random_compute, RandomConfig, overwrite=True)

FACTS = [
    {"prompt": "{} is located in", "subject": "Angola", "target_new": "Antarctica", "target_true": "Africa"},
    {"prompt": "The mother tongue of {} is", "subject": "Thomas Mann", "target_new": "Spanish | Catalan"},
]


#: the hybrid stacks (attention mixed with Mamba2 / short-convolution blocks): their MLP projections as LoRA targets
HYBRIDS = ["falcon_h1", "lfm2", "bamba"]


def edited(model_type="gpt2", dtype=torch.float32, seed=0, **kw):
    """A tiny model with one adaptertest edit set applied, and that set."""
    model, tok = make_tiny_model(model_type, seed=seed, dtype=dtype)
    hf_knowedit.attach(model, tok)
    es = model.apply_edits(FACTS, method="adaptertest", **kw)
    return model, tok, es


# -- format ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])  # Conv1D and Linear layouts
def test_format_is_what_peft_writes(model_type, tmp_path):
    from peft import LoraConfig, get_peft_model

    model, tok, es = edited(model_type, layers=[0, 2], rank=3)
    model.revert_edits()
    es.save_pretrained(tmp_path / "ours")
    assert sorted(os.listdir(tmp_path / "ours")) == sorted(ADAPTER_FILES + ["knowedit_state.safetensors"])

    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    paths = sorted(es.deltas)
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["target_modules"] == paths
    assert cfg["rank_pattern"] == cfg["alpha_pattern"] == {p: 3 for p in paths}
    assert cfg["r"] == cfg["lora_alpha"] == 3
    assert cfg["fan_in_fan_out"] == (model_type == "gpt2")

    # The same adapter written by PEFT itself has the same keys, shapes and dtype.
    peft_cfg = LoraConfig(
        r=3, lora_alpha=3, target_modules=paths, fan_in_fan_out=model_type == "gpt2", task_type="CAUSAL_LM"
    )
    fresh, _ = make_tiny_model(model_type)
    get_peft_model(fresh, peft_cfg).save_pretrained(tmp_path / "peft")

    def shapes(d):
        with safe_open(str(d / "adapter_model.safetensors"), "pt") as f:
            return {k: (tuple(f.get_tensor(k).shape), f.get_tensor(k).dtype) for k in f.keys()}

    assert shapes(tmp_path / "ours") == shapes(tmp_path / "peft")
    # ... and PEFT parses our config into the same LoRA settings.
    ours = LoraConfig.from_pretrained(tmp_path / "ours")
    assert (set(ours.target_modules), ours.r, ours.lora_alpha, ours.fan_in_fan_out, ours.rank_pattern) == (
        set(paths),
        3,
        3,
        model_type == "gpt2",
        {p: 3 for p in paths},
    )

    # lora_A / lora_B are A / B exactly (no SVD, float32).
    with safe_open(str(tmp_path / "ours" / "adapter_model.safetensors"), "pt") as f:
        for p, d in es.deltas.items():
            assert torch.equal(f.get_tensor(f"base_model.model.{p}.lora_A.weight"), d.A)
            assert torch.equal(f.get_tensor(f"base_model.model.{p}.lora_B.weight"), d.B)


def test_sidecar_and_round_trip(tmp_path):
    model, tok, es = edited("llama", layers=[1, 3], dense_layer=3)
    es.metrics = {"efficacy": 1.0, "paraphrase": {"score": 0.5}}
    es.save_pretrained(tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "knowedit_config.json").read_text())
    assert meta["library_version"] == hf_knowedit.__version__ and meta["method"] == "adaptertest"
    assert meta["config"] == {"rank": 2, "scale": 0.5, "dense_layer": 3}
    assert meta["layers"] == [1, 3] and meta["stats_key"] == {"model": "tiny", "layer": 1}
    assert [r["subject"] for r in meta["requests"]] == ["Angola", "Thomas Mann"]
    assert {p: m["dense"] for p, m in meta["modules"].items()} == {p: d.dense for p, d in es.deltas.items()}
    assert sum(m["dense"] for m in meta["modules"].values()) == 1
    card = (tmp_path / "a" / "README.md").read_text()
    assert "3.mlp.down_proj`: 32 (dense)" in card and "marked dense" in card

    back = EditSet.from_pretrained(tmp_path / "a")
    for field in (
        "requests",
        "method",
        "config",
        "layers",
        "fingerprints",
        "layouts",
        "base_model",
        "revision",
        "stats_key",
        "metrics",
        "name",
    ):
        assert getattr(back, field) == getattr(es, field), field
    assert back.deltas.keys() == es.deltas.keys()
    for p, d in es.deltas.items():
        assert torch.equal(back.deltas[p].A, d.A) and torch.equal(back.deltas[p].B, d.B)
        assert back.deltas[p].dense == d.dense
    assert back.state.keys() == {"keys"} and torch.equal(back.state["keys"], es.state["keys"])
    assert back.state["keys"].dtype == torch.float64
    assert not (tmp_path / "a" / "config.json").exists()  # no ModelHubMixin config: not a model repo
    model.revert_edits()


def test_model_card(tmp_path):
    model, tok, es = edited("gpt2")
    model.revert_edits()
    es.base_model, es.metrics = "HuggingFaceTB/SmolLM2-135M-Instruct", {"efficacy": 0.75}
    es.save_pretrained(tmp_path / "a", model_card_kwargs={"repo_id": "me/angola"})
    card = ModelCard.load(tmp_path / "a" / "README.md")
    assert card.data.library_name == "hf_knowedit"
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert {"knowledge-editing", "adaptertest"} <= set(card.data.tags)
    assert "| 1 | Angola | {} is located in | Africa | Antarctica |" in card.text
    assert "| 2 | Thomas Mann | The mother tongue of {} is | – | Spanish \\| Catalan |" in card.text
    assert "| efficacy | 0.75 |" in card.text and "dense" not in card.text
    assert "model.load_edits('me/angola')" in card.text and "PeftModel.from_pretrained(model, 'me/angola')" in card.text
    # a local path is no Hub base_model
    es.base_model = str(tmp_path / "somewhere")
    es.save_pretrained(tmp_path / "b")
    assert ModelCard.load(tmp_path / "b" / "README.md").data.base_model is None


# -- loading behaves like applying ----------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["gpt2", "llama", *HYBRIDS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loaded_set_is_bit_exact_like_a_fresh_one(model_type, dtype, tmp_path):
    model, tok, es = edited(model_type, dtype=dtype, dense_layer=2)
    w_edit = weights(model)
    es.save_pretrained(tmp_path / "a")
    model.revert_edits()
    w0 = weights(model)

    fresh, _ = make_tiny_model(model_type, dtype=dtype)
    hf_knowedit.attach(fresh, tok)
    loaded = fresh.load_edits(tmp_path / "a")
    assert loaded.name == es.name and [e.name for e in fresh.list_edits()] == [es.name]
    assert_same(weights(fresh), w_edit)
    merged = logits(fresh, tok)
    fresh.unmerge_edits()
    assert_same(weights(fresh), w0)
    torch.testing.assert_close(logits(fresh, tok), merged, atol=0.05 if dtype == torch.bfloat16 else 1e-5, rtol=1e-2)
    with fresh.disable_edits():
        assert torch.equal(logits(fresh, tok), logits(model, tok))
    fresh.merge_edits()
    assert_same(weights(fresh), w_edit)
    fresh.revert_edits()
    assert_same(weights(fresh), w0)

    hooked = fresh.load_edits(tmp_path / "a", merge=False, name="hooked")
    assert hooked.name == "hooked" and fresh.list_edits()[0].merged is False
    assert_same(weights(fresh), w0)
    fresh.revert_edits()


def test_load_edits_from_an_edit_set_and_functional_form(tmp_path):
    model, tok, es = edited("llama")
    w_edit = weights(model)
    model.revert_edits()
    other, _ = make_tiny_model("llama")
    loaded = hf_knowedit.load_edits(other, es, name="copy")  # works without attach too
    assert loaded is not es and es.name != "copy" and loaded.name == "copy"
    assert_same(weights(other), w_edit)
    with pytest.raises(TypeError, match="revision"):
        hf_knowedit.load_edits(other, es, revision="main")


# -- PEFT and transformers interop ------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["gpt2", "llama", *HYBRIDS, *TINY_ROUTED_MOE, *TINY_SHARED_MOE])
def test_peft_and_transformers_give_the_same_logits(model_type, tmp_path):
    from peft import PeftModel

    model, tok, es = edited(model_type, dense_layer=1, layers=[1, 3])
    ours = logits(model, tok)
    es.save_pretrained(tmp_path / "a")
    with model.disable_edits():
        base = logits(model, tok)
    assert not torch.allclose(ours, base, atol=1e-3)
    model.revert_edits()

    fresh, _ = make_tiny_model(model_type)
    hf_knowedit.attach(fresh, tok).load_edits(str(tmp_path / "a"))
    torch.testing.assert_close(logits(fresh, tok), ours, atol=1e-5, rtol=1e-5)
    hooked, _ = make_tiny_model(model_type)
    hf_knowedit.load_edits(hooked, str(tmp_path / "a"), merge=False)
    torch.testing.assert_close(logits(hooked, tok), ours, atol=1e-5, rtol=1e-5)

    peft_model = PeftModel.from_pretrained(make_tiny_model(model_type)[0], str(tmp_path / "a"))
    torch.testing.assert_close(logits(peft_model, tok), ours, atol=1e-5, rtol=1e-5)
    # merging in PEFT gives the same weights we compute (up to float rounding)
    merged = peft_model.merge_and_unload()
    for p in es.deltas:
        name = edited_param(p, es.layouts[p])
        torch.testing.assert_close(merged.get_parameter(name), fresh.get_parameter(name), atol=1e-6, rtol=1e-6)

    tf_model, _ = make_tiny_model(model_type)
    tf_model.load_adapter(str(tmp_path / "a"))
    torch.testing.assert_close(logits(tf_model, tok), ours, atol=1e-5, rtol=1e-5)


def refused_untouched(model_type: str, folder, match: str, name: str) -> None:
    """Loading the damaged adapter ``folder`` into a fresh ``model_type`` raises an ``AdapterFormatError``
    matching ``match`` and leaves the model and the files as they were."""
    bad = _files(folder)
    fresh, _ = make_tiny_model(model_type)
    before = snapshot(fresh)
    with pytest.raises(AdapterFormatError, match=match):
        hf_knowedit.load_edits(fresh, folder)
    assert_untouched(fresh, before)
    assert _files(folder) == bad, name


# -- routed experts: PEFT's LoRA on the experts' 3-D down_proj (target_parameters) -------------------

EXPERTS = "model.layers.1.mlp.experts"  # the tiny Mixtral's experts module at layer 1: down_proj [4, 32, 48]


def _files(directory: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(directory.iterdir())}


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])  # down_proj [E, d, I]; transposed, [E, I, d]
def test_experts_format_is_what_peft_writes_and_reads_back_bit_exactly(model_type, tmp_path):
    from peft import LoraConfig, get_peft_model

    model, tok, es = edited(model_type, layers=[1, 2], rank=3)
    model.revert_edits()
    es.save_pretrained(tmp_path / "ours")
    paths = sorted(es.deltas)
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == [] and cfg["target_parameters"] == [f"{p}.down_proj" for p in paths]
    assert cfg["r"] == cfg["lora_alpha"] == 3 and cfg["rank_pattern"] == cfg["alpha_pattern"] == {}
    meta = json.loads((tmp_path / "ours" / "knowedit_config.json").read_text())
    assert {p: (m["layout"], m["num_experts"], m["shape"]) for p, m in meta["modules"].items()} == {
        p: (get_architecture(model).mlp_out_layout, 4, [32, 4 * 48]) for p in paths
    }

    # PEFT's own adapter on the same parameters has the same keys, shapes and dtype, and the same config
    peft_cfg = LoraConfig(r=3, lora_alpha=3, target_modules=[], target_parameters=cfg["target_parameters"])
    get_peft_model(make_tiny_model(model_type)[0], peft_cfg).save_pretrained(tmp_path / "peft")

    def shapes(d):
        with safe_open(str(d / "adapter_model.safetensors"), "pt") as f:
            return {k: (tuple(f.get_tensor(k).shape), f.get_tensor(k).dtype) for k in f.keys()}

    assert shapes(tmp_path / "ours") == shapes(tmp_path / "peft")
    ours = LoraConfig.from_pretrained(tmp_path / "ours")
    assert (ours.target_parameters, ours.r, ours.lora_alpha) == (cfg["target_parameters"], 3, 3)

    # expert e's rows of lora_A are its columns of A; every expert's lora_B block is B (column j·E + e = B[:, j])
    with safe_open(str(tmp_path / "ours" / "adapter_model.safetensors"), "pt") as f:
        for p, d in es.deltas.items():
            lora_a, lora_b = (
                f.get_tensor(f"base_model.model.{p}.lora_A.weight"),
                f.get_tensor(f"base_model.model.{p}.lora_B.weight"),
            )
            for e in range(4):
                assert torch.equal(lora_a[3 * e : 3 * e + 3], d.A[:, 48 * e : 48 * (e + 1)])
                assert torch.equal(lora_b[:, e::4], d.B)
    back = EditSet.from_pretrained(tmp_path / "ours")
    assert back.num_experts == {p: 4 for p in paths} and back.layouts == es.layouts
    for p, d in es.deltas.items():
        assert torch.equal(back.deltas[p].A, d.A) and torch.equal(back.deltas[p].B, d.B)


def test_experts_and_linear_modules_in_one_adapter(tmp_path):
    from peft import PeftModel

    model, tok, es = edited("mixtral", layers=[1], rank=2)
    model.revert_edits()
    g = torch.Generator().manual_seed(3)
    attn = "model.layers.2.self_attn.o_proj"
    es.deltas[attn] = ModuleDelta(A=torch.randn(3, 32, generator=g), B=torch.randn(32, 3, generator=g))
    es.layouts[attn] = "linear"
    es.save_pretrained(tmp_path / "mixed")
    cfg = json.loads((tmp_path / "mixed" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == [attn] and cfg["target_parameters"] == [f"{EXPERTS}.down_proj"]
    assert cfg["r"] == 3 and cfg["rank_pattern"] == {attn: 3, f"{EXPERTS}.down_proj": 2}  # PEFT applies both

    ours, _ = make_tiny_model("mixtral")
    hf_knowedit.load_edits(ours, tmp_path / "mixed", merge=False)
    want = logits(ours, tok)
    assert not torch.allclose(want, logits(make_tiny_model("mixtral")[0], tok), atol=1e-3)
    peft_model = PeftModel.from_pretrained(make_tiny_model("mixtral")[0], str(tmp_path / "mixed"))
    torch.testing.assert_close(logits(peft_model, tok), want, atol=1e-5, rtol=1e-5)
    tf_model, _ = make_tiny_model("mixtral")
    tf_model.load_adapter(str(tmp_path / "mixed"))
    torch.testing.assert_close(logits(tf_model, tok), want, atol=1e-5, rtol=1e-5)
    back = EditSet.from_pretrained(tmp_path / "mixed")
    assert back.layouts == es.layouts and back.num_experts == {EXPERTS: 4}
    assert all(torch.equal(back.deltas[p].A, d.A) and torch.equal(back.deltas[p].B, d.B) for p, d in es.deltas.items())


def test_an_adapter_peft_made_on_the_experts_loads_with_peft_logits(tmp_path):
    """A PEFT LoRA on an experts parameter with random factors (each expert its own lora_B block, scaling
    lora_alpha / r = 3), given a minimal knowedit_config.json: hf_knowedit loads it as the exact per-expert
    delta of rank r·E, hooked and merged, and gives PEFT's logits."""
    from peft import LoraConfig, PeftModel, get_peft_model

    peft_cfg = LoraConfig(
        r=2, lora_alpha=6, target_modules=[], target_parameters=[f"{EXPERTS}.down_proj"], init_lora_weights=False
    )
    get_peft_model(make_tiny_model("mixtral", seed=5)[0], peft_cfg).save_pretrained(tmp_path / "peft")
    (tmp_path / "peft" / "knowedit_config.json").write_text(json.dumps({"modules": {EXPERTS: {"layout": "experts"}}}))

    peft_model, tok = make_tiny_model("mixtral")
    peft_model = PeftModel.from_pretrained(peft_model, str(tmp_path / "peft"))
    want = logits(peft_model, tok)
    assert not torch.allclose(want, logits(make_tiny_model("mixtral")[0], tok), atol=1e-3)

    es = EditSet.from_pretrained(tmp_path / "peft")
    assert es.num_experts == {EXPERTS: 4} and es.deltas[EXPERTS].rank == 2 * 4 and es.layouts == {EXPERTS: "experts"}
    delta = peft_model.base_model.model.get_submodule(EXPERTS).get_delta_weight("default")  # [E, d, I]
    torch.testing.assert_close(to_param(es.deltas[EXPERTS].delta(), "experts", (4, 32, 48)), delta, atol=1e-6, rtol=0)
    for merge in (False, True):
        model, _ = make_tiny_model("mixtral")
        hf_knowedit.load_edits(model, tmp_path / "peft", merge=merge)
        torch.testing.assert_close(logits(model, tok), want, atol=1e-5, rtol=1e-5)


def test_truncated_experts_set_is_the_peft_adapter_of_its_factors(tmp_path):
    from peft import PeftModel

    model, tok, es = edited("mixtral", layers=[1], rank=3)
    model.revert_edits()
    small = es.truncate(1)
    assert small.num_experts == es.num_experts and small.deltas[EXPERTS].rank == 1
    small.save_pretrained(tmp_path / "r1")
    hooked, _ = make_tiny_model("mixtral")
    hf_knowedit.load_edits(hooked, small, merge=False)
    peft_model = PeftModel.from_pretrained(make_tiny_model("mixtral")[0], str(tmp_path / "r1"))
    torch.testing.assert_close(logits(peft_model, tok), logits(hooked, tok), atol=1e-5, rtol=1e-5)


def test_wrong_expert_count_and_inconsistent_experts_files_are_refused(tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok, es = edited("mixtral", layers=[1])
    model.revert_edits()
    good = tmp_path / "good"
    es.save_pretrained(good)
    files = _files(good)

    # 8 experts of 24: the same [32, 192] matrix, another split; refused even with force=True
    torch.manual_seed(0)
    eight = AutoModelForCausalLM.from_config(
        tiny_config("mixtral", num_experts=8, num_local_experts=8, intermediate_size=24)
    ).eval()
    assert from_param(eight.get_parameter(f"{EXPERTS}.down_proj"), "experts").shape == es.deltas[EXPERTS].shape
    before = snapshot(eight)
    for force in (False, True):
        with pytest.raises(BaseModelMismatchError, match="4 routed experts, the model has 8 experts"):
            hf_knowedit.load_edits(eight, good, force=force)
        assert_untouched(eight, before)
    assert _files(good) == files
    fresh, _ = make_tiny_model("mixtral")
    before = snapshot(fresh)
    for count in (5, 2.0):  # not a divisor of ΔW's 192 columns; not an int
        with pytest.raises(InvalidArgumentError, match="num_experts"):
            hf_knowedit.load_edits(fresh, dataclasses.replace(es, num_experts={EXPERTS: count}))
        assert_untouched(fresh, before)

    def broken(name, edit):
        d = _copy(good, tmp_path / name)
        edit(d)
        return d

    def meta(**changes):
        return lambda d: _rewrite_json(
            d / "knowedit_config.json",
            modules={
                EXPERTS: {**json.loads((good / "knowedit_config.json").read_text())["modules"][EXPERTS], **changes}
            },
        )

    def peft_cfg(**changes):
        return lambda d: _rewrite_json(d / "adapter_config.json", **changes)

    def one_expert_b_changed(d):
        key = f"base_model.model.{EXPERTS}.lora_B.weight"
        with safe_open(str(d / "adapter_model.safetensors"), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        tensors[key][:, 2] += 1.0  # expert 2's column of rank 0
        from safetensors.torch import save_file

        save_file(tensors, str(d / "adapter_model.safetensors"))
        _rewrite_json(d / "knowedit_config.json", files={})  # so that only the content is wrong, not the hash

    for name, edit, match in [
        ("count", meta(num_experts=8), "routed experts"),
        ("shape", meta(shape=[32, 96]), "routed experts"),
        ("rank", meta(rank=1), "rank-1"),
        ("blocks", one_expert_b_changed, "lora_B blocks differ"),
        ("gate", peft_cfg(target_parameters=[f"{EXPERTS}.gate_up_proj"]), "'down_proj' parameter and"),
        ("as_module", peft_cfg(target_modules=[EXPERTS], target_parameters=[]), "do not name the modules"),
        ("fan_in", peft_cfg(fan_in_fan_out=True), "fan_in_fan_out"),
        ("layout", meta(layout="linear"), "do not name the modules"),
    ]:
        d = broken(name, edit)
        refused_untouched("mixtral", d, match, name)

    # an experts set that does not know its expert count cannot be written
    es.num_experts = {}
    with pytest.raises(AdapterFormatError, match="num_experts"):
        es.save_pretrained(tmp_path / "no-count")
    assert not (tmp_path / "no-count").exists()


# -- shared experts of model types whose targets PEFT rewrites: LoRA on the Linear's weight (target_parameters) --

SHARED = "model.layers.1.mlp.shared_experts.down_proj"  # the tiny DeepSeek-V2's shared expert at layer 1: [32, 96]


def test_peft_keeps_every_rows_adapter_targets_as_written():
    """For every row of the table, PEFT's conversion of adapter configs for transformers 5 (run by
    ``PeftModel.from_pretrained`` and ``model.load_adapter`` before any module is wrapped) leaves the targets of
    hf_knowedit's adapter as written: rows whose ``mlp_out`` PEFT would retarget declare ``peft_target="parameter"``."""
    from types import SimpleNamespace

    from peft import LoraConfig
    from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers as convert

    for model_type, spec in hf_knowedit.ARCHITECTURES.items():
        path = f"{spec.layers}.1.{spec.mlp_out}"
        es = EditSet(
            deltas={path: ModuleDelta(A=torch.ones(1, 4), B=torch.ones(4, 1))},
            requests=[],
            method="x",
            layouts={path: spec.mlp_out_layout},
            num_experts={path: 2} if spec.mlp_out_layout in EXPERT_LAYOUTS else {},
            peft_targets={path: spec.peft_target},
        )
        cfg = adapters.adapter_config(es)
        peft_cfg = LoraConfig(**{k: cfg[k] for k in ("r", "lora_alpha", "target_modules", "rank_pattern")})
        peft_cfg.target_parameters = cfg.get("target_parameters")
        convert(peft_cfg, SimpleNamespace(config=SimpleNamespace(model_type=model_type)), None)
        assert sorted(peft_cfg.target_modules or []) == cfg["target_modules"], model_type
        assert sorted(peft_cfg.target_parameters or []) == cfg.get("target_parameters", []), model_type


def test_parameter_targeted_linear_format_is_what_peft_writes_and_reads_back_bit_exactly(tmp_path):
    from peft import LoraConfig, get_peft_model

    model, tok, es = edited("deepseek_v2", layers=[1, 2], rank=3)
    model.revert_edits()
    paths = sorted(es.deltas)
    assert es.peft_targets == {p: "parameter" for p in paths} and set(es.layouts.values()) == {"linear"}
    es.save_pretrained(tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == [] and cfg["target_parameters"] == [f"{p}.weight" for p in paths]
    assert cfg["r"] == cfg["lora_alpha"] == 3 and cfg["rank_pattern"] == cfg["alpha_pattern"] == {}
    meta = json.loads((tmp_path / "ours" / "knowedit_config.json").read_text())
    assert {p: (m["layout"], m["peft_target"]) for p, m in meta["modules"].items()} == {
        p: ("linear", "parameter") for p in paths
    }

    # PEFT's own adapter on the same parameters has the same keys (the module's), shapes and dtype
    peft_cfg = LoraConfig(r=3, lora_alpha=3, target_modules=[], target_parameters=cfg["target_parameters"])
    get_peft_model(make_tiny_model("deepseek_v2")[0], peft_cfg).save_pretrained(tmp_path / "peft")

    def shapes(d):
        with safe_open(str(d / "adapter_model.safetensors"), "pt") as f:
            return {k: (tuple(f.get_tensor(k).shape), f.get_tensor(k).dtype) for k in f.keys()}

    assert shapes(tmp_path / "ours") == shapes(tmp_path / "peft")
    assert set(shapes(tmp_path / "ours")) == {f"base_model.model.{p}.lora_{ab}.weight" for p in paths for ab in "AB"}
    with safe_open(str(tmp_path / "ours" / "adapter_model.safetensors"), "pt") as f:  # lora_A = A, lora_B = B
        for p, d in es.deltas.items():
            assert torch.equal(f.get_tensor(f"base_model.model.{p}.lora_A.weight"), d.A)
            assert torch.equal(f.get_tensor(f"base_model.model.{p}.lora_B.weight"), d.B)

    back = EditSet.from_pretrained(tmp_path / "ours")
    assert back.peft_targets == es.peft_targets and back.layouts == es.layouts
    for p, d in es.deltas.items():
        assert torch.equal(back.deltas[p].A, d.A) and torch.equal(back.deltas[p].B, d.B)
    back.save_pretrained(tmp_path / "again")
    assert _files(tmp_path / "again") == _files(tmp_path / "ours")


def test_damaged_parameter_targeted_files_are_refused_and_leave_everything_as_it_was(tmp_path):
    model, tok, es = edited("deepseek_v2", layers=[1])
    model.revert_edits()
    good = tmp_path / "good"
    es.save_pretrained(good)
    entry = json.loads((good / "knowedit_config.json").read_text())["modules"][SHARED]

    def meta(**changes):
        return lambda d: _rewrite_json(d / "knowedit_config.json", modules={SHARED: {**entry, **changes}})

    def peft_cfg(**changes):
        return lambda d: _rewrite_json(d / "adapter_config.json", **changes)

    for name, edit, match in [
        ("no_target", meta(peft_target="module"), "do not name the modules"),
        ("value", meta(peft_target="weight"), "peft_target"),
        ("conv1d", meta(layout="conv1d"), "only a 'linear' module is named by its weight"),
        ("bias", peft_cfg(target_parameters=[f"{SHARED}.bias"]), "'weight' only"),
        ("as_module", peft_cfg(target_modules=[SHARED], target_parameters=[]), "do not name the modules"),
        ("fan_in", peft_cfg(fan_in_fan_out=True), "fan_in_fan_out"),
    ]:
        d = _copy(good, tmp_path / name)
        edit(d)
        refused_untouched("deepseek_v2", d, match, name)

    # an edit set naming a module's weight where no Linear is: refused on load and on save, nothing written
    fresh, _ = make_tiny_model("deepseek_v2")
    before = snapshot(fresh)
    for targets, layouts in [({SHARED: "weight"}, es.layouts), (es.peft_targets, {SHARED: "conv1d"})]:
        wrong = dataclasses.replace(es, peft_targets=targets, layouts=layouts)
        with pytest.raises(InvalidArgumentError, match="peft_targets"):
            hf_knowedit.load_edits(fresh, wrong)
        assert_untouched(fresh, before)
        with pytest.raises(AdapterFormatError, match="peft_targets"):
            wrong.save_pretrained(tmp_path / "wrong")
        assert not (tmp_path / "wrong").exists()
    with pytest.raises(InvalidConfigError, match="peft_target"):
        dataclasses.replace(hf_knowedit.ARCHITECTURES["gpt2"], peft_target="parameter")


# -- bad input: typed errors, model untouched -------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    model, tok, es = edited("llama")
    es.save_pretrained(tmp_path / "good")
    model.revert_edits()
    return model, tmp_path / "good"


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _rewrite_json(path: Path, **changes):
    obj = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            obj.pop(k, None)
        else:
            obj[k] = v
    path.write_text(json.dumps(obj))


def test_not_an_adapter_and_missing_files(saved, tmp_path):
    model, good = saved
    before = snapshot(model)
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("hello")
    for bad, match in [
        (tmp_path / "empty", "not an adapter"),
        (tmp_path / "other", "not an adapter"),
        (tmp_path / "nope", "No adapter directory"),
        (good / "adapter_config.json", "No adapter dir"),
        ("./relative/missing/dir", "No adapter directory"),
    ]:
        with pytest.raises(AdapterFormatError, match=match):
            model.load_edits(bad)
    for name in ("adapter_model.safetensors", "knowedit_config.json", "adapter_config.json"):
        d = _copy(good, tmp_path / f"no-{name}")
        (d / name).unlink()
        with pytest.raises(AdapterFormatError, match=name if name != "knowedit_config.json" else "PEFT adapter"):
            model.load_edits(d)
    pickled = _copy(good, tmp_path / "pickled")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(AdapterFormatError, match="pickle"):
        model.load_edits(pickled)
    assert_untouched(model, before)


def test_corrupted_truncated_and_inconsistent_files(saved, tmp_path):
    model, good = saved
    before = snapshot(model)
    size = (good / "adapter_model.safetensors").stat().st_size

    flipped = _copy(good, tmp_path / "flipped")
    data = bytearray((flipped / "adapter_model.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (flipped / "adapter_model.safetensors").write_bytes(bytes(data))
    truncated = _copy(good, tmp_path / "truncated")
    (truncated / "adapter_model.safetensors").write_bytes(
        (good / "adapter_model.safetensors").read_bytes()[: size // 2]
    )
    for d in (flipped, truncated):
        with pytest.raises(AdapterFormatError, match="corrupted or truncated"):
            model.load_edits(d)
    # without the recorded checksum, safetensors itself refuses the truncated file
    _rewrite_json(truncated / "knowedit_config.json", files=None)
    with pytest.raises(AdapterFormatError, match="not a readable safetensors"):
        model.load_edits(truncated)
    garbage = _copy(good, tmp_path / "garbage")
    (garbage / "knowedit_config.json").write_text("{not json")
    with pytest.raises(AdapterFormatError, match="not valid JSON"):
        model.load_edits(garbage)

    # factors whose shapes disagree with the configs
    reshaped = _copy(good, tmp_path / "reshaped")
    cfg = json.loads((reshaped / "adapter_config.json").read_text())
    _rewrite_json(reshaped / "adapter_config.json", rank_pattern={p: 5 for p in cfg["target_modules"]})
    with pytest.raises(AdapterFormatError, match="rank-5"):
        model.load_edits(reshaped)
    retargeted = _copy(good, tmp_path / "retargeted")
    _rewrite_json(retargeted / "adapter_config.json", target_modules=["model.layers.0.mlp.down_proj"])
    with pytest.raises(AdapterFormatError, match="target_modules"):
        model.load_edits(retargeted)
    assert_untouched(model, before)


def test_newer_version_loads_with_a_warning(saved, tmp_path, caplog):
    model, good = saved
    newer = _copy(good, tmp_path / "newer")
    _rewrite_json(newer / "knowedit_config.json", format_version=99, hologram={"x": 1}, library_version="9.0")
    with caplog.at_level(logging.WARNING, logger="hf_knowedit.adapter_files"):
        es = model.load_edits(newer)
    assert "newer hf_knowedit" in caplog.text and "hologram" in caplog.text
    assert es.method == "adaptertest" and len(model.list_edits()) == 1
    model.revert_edits()


def test_other_base_model_and_shape_mismatch(saved, tmp_path, caplog):
    model, good = saved
    other, tok = make_tiny_model("llama", seed=1)  # same shapes, other weights
    hf_knowedit.attach(other, tok)
    w_other = snapshot(other)
    with pytest.raises(BaseModelMismatchError, match="fingerprint"):
        other.load_edits(good)
    assert_untouched(other, w_other)
    with caplog.at_level(logging.WARNING):
        other.load_edits(good, force=True)
    assert "force=True" in caplog.text
    other.revert_edits()
    assert_same(weights(other), w_other.weights)

    gpt2, tok2 = make_tiny_model("gpt2")  # other architecture: modules that do not exist
    hf_knowedit.attach(gpt2, tok2)
    w_gpt2 = snapshot(gpt2)
    with pytest.raises(BaseModelMismatchError, match="does not have"):
        gpt2.load_edits(good)
    assert_untouched(gpt2, w_gpt2)

    # same module names, other shape: a llama with a wider MLP
    from transformers import AutoModelForCausalLM

    wide = AutoModelForCausalLM.from_config(tiny_config("llama", intermediate_size=64))
    hf_knowedit.attach(wide, tok)
    w_wide = snapshot(wide)
    with pytest.raises(BaseModelMismatchError, match="shape"):
        wide.load_edits(good, force=True)
    assert_untouched(wide, w_wide)


def test_mixed_layouts_cannot_be_one_peft_adapter(tmp_path):
    model, _ = make_tiny_model("llama")
    es = random_set(model, [1, 2])
    es.layouts[next(iter(es.layouts))] = "conv1d"
    with pytest.raises(AdapterFormatError, match="fan_in_fan_out"):
        es.save_pretrained(tmp_path / "mixed")
    assert not (tmp_path / "mixed").exists()


# -- atomic saves ----------------------------------------------------------------------------------


def _leftovers(parent: Path, name: str):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


@pytest.mark.parametrize("where", ["sidecar", "model_card"])
def test_failed_save_leaves_nothing_half_written(tmp_path, monkeypatch, where):
    model, _ = make_tiny_model("gpt2")
    es = random_set(model, [1, 2])
    calls = []

    def boom(*args, **kwargs):
        calls.append(args)
        raise OSError("disk full (injected)")

    if where == "sidecar":  # after adapter_model.safetensors and adapter_config.json are written
        real = adapters._write_json
        monkeypatch.setattr(
            adapters,
            "_write_json",
            lambda path, obj: boom() if path.name == "knowedit_config.json" else real(path, obj),
        )
    else:  # after every adapter file is written
        monkeypatch.setattr(adapters, "model_card", boom)
    with pytest.raises(OSError, match="injected"):
        es.save_pretrained(tmp_path / "new")
    assert not (tmp_path / "new").exists() and _leftovers(tmp_path, "new") == []

    # an existing adapter survives a failed re-save byte for byte
    monkeypatch.undo()
    es.save_pretrained(tmp_path / "old")
    before = {f.name: f.read_bytes() for f in (tmp_path / "old").iterdir()}
    monkeypatch.setattr(adapters, "model_card", boom)
    with pytest.raises(OSError, match="injected"):
        random_set(model, [3], seed=5).save_pretrained(tmp_path / "old")
    assert {f.name: f.read_bytes() for f in (tmp_path / "old").iterdir()} == before
    assert _leftovers(tmp_path, "old") == [] and calls


def test_resave_replaces_whole_and_refuses_foreign_directories(tmp_path):
    model, _ = make_tiny_model("llama")
    es = random_set(model, [1, 2])
    es.state = {"k": torch.ones(2)}
    es.save_pretrained(tmp_path / "a")
    assert (tmp_path / "a" / "knowedit_state.safetensors").exists()
    small = random_set(model, [3], seed=4)
    small.save_pretrained(tmp_path / "a")
    assert sorted(os.listdir(tmp_path / "a")) == ADAPTER_FILES  # the stale state file is gone
    assert list(EditSet.from_pretrained(tmp_path / "a").deltas) == list(small.deltas)
    assert _leftovers(tmp_path, "a") == []

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(AdapterFormatError, match="non-empty directory"):
        es.save_pretrained(tmp_path / "mine")
    assert os.listdir(tmp_path / "mine") == ["thesis.tex"]
    (tmp_path / "empty").mkdir()
    es.save_pretrained(tmp_path / "empty")
    assert sorted(os.listdir(tmp_path / "empty"))[0] == "README.md"


def test_edit_set_keeps_dataclass_behaviour():
    model, _ = make_tiny_model("llama")
    es = random_set(model, [1])
    assert es._hub_mixin_config is None  # ModelHubMixin's init-kwargs capture is off
    req = EditRequest("{} is in", "X", "Y")
    es2 = EditSet(deltas={}, requests=[req], method="m", config={"a": 1})
    assert es2.config == {"a": 1} and es2._hub_mixin_config is None and len(es2) == 1
    assert (
        fingerprint(get_module(model, mlp_out_path(get_architecture(model), 1)).weight)
        == es.fingerprints[mlp_out_path(get_architecture(model), 1)]
    )


def test_lora_alpha_other_than_rank_is_honoured_like_peft(saved, tmp_path):
    model, good = saved
    scaled = _copy(good, tmp_path / "scaled")
    cfg = json.loads((scaled / "adapter_config.json").read_text())
    _rewrite_json(scaled / "adapter_config.json", alpha_pattern={p: 3 * r for p, r in cfg["rank_pattern"].items()})
    plain, tripled = EditSet.from_pretrained(good), EditSet.from_pretrained(scaled)
    for p, d in plain.deltas.items():
        assert torch.equal(tripled.deltas[p].A, d.A)
        torch.testing.assert_close(tripled.deltas[p].B, 3 * d.B)
    _rewrite_json(scaled / "adapter_config.json", alpha_pattern={p: float("inf") for p in cfg["rank_pattern"]})
    with pytest.raises(AdapterFormatError, match="invalid"):
        EditSet.from_pretrained(scaled)


def test_statistics_keys_round_trip(tmp_path):
    from hf_knowedit.moments import StatsKey

    model, _ = make_tiny_model("llama")
    es = random_set(model, [1, 2])
    keys = {layer: StatsKey("tiny@abc", layer, p, "wikitext", 1000, "float32") for layer, p in zip([1, 2], es.deltas)}
    for i, stats_key in enumerate((keys[1], keys)):
        es.stats_key = stats_key
        es.save_pretrained(tmp_path / str(i))
        assert EditSet.from_pretrained(tmp_path / str(i)).stats_key == stats_key


def test_corpus_texts_are_described_not_copied(tmp_path):
    from tests.test_stack import random_set
    from tests.tiny_models import make_tiny_model

    model, _ = make_tiny_model("llama")
    es = random_set(model, [1])
    es.config = {"mom2_corpus": ["a long text"] * 1000, "steps": 20}
    es.save_pretrained(tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "knowedit_config.json").read_text())["config"]
    assert saved["steps"] == 20
    assert saved["mom2_corpus"] == "<list of 1000 texts; see stats_key>"
    assert (tmp_path / "a" / "knowedit_config.json").stat().st_size < 20_000


def test_a_mistyped_path_under_a_local_folder_is_missing_not_a_hub_id(saved, tmp_path, monkeypatch):
    """``edits/eifel`` with a local ``edits/`` folder is a typo of a local path: reported at once as a
    missing directory, never sent to the Hub (where it would retry, then blame the connection)."""
    from hf_knowedit import adapter_files

    model, good = saved
    before = snapshot(model)
    (tmp_path / "edits").mkdir()
    monkeypatch.chdir(tmp_path)

    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub was asked for a local-looking path")

    monkeypatch.setattr(adapter_files, "hf_hub_download", no_hub)
    with pytest.raises(AdapterFormatError, match="No adapter directory at 'edits/eifel'"):
        model.load_edits("edits/eifel")
    assert adapter_files.looks_local("edits/eifel")
    assert not adapter_files.looks_local("someone/eifel")  # no such local folder: a Hub repo id
    assert_untouched(model, before)
