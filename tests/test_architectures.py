"""The architecture table against real (tiny, random) transformers models."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import types

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_knowedit.architectures import (
    ARCHITECTURES,
    EXPERT_LAYOUTS,
    LAYOUT_PARAM,
    attention_layers,
    attn_out_path,
    config_setting,
    decoder_config,
    from_param,
    get_architecture,
    get_module,
    layer_path,
    lm_logits,
    mlp_out_dims,
    mlp_out_gate_path,
    mlp_out_path,
    num_layers,
    register_architecture,
    residual_scale,
    supported_architectures,
)
from hf_knowedit.errors import (
    InvalidConfigError,
    KnowEditError,
    LayerOutOfRangeError,
    UnsupportedArchitectureError,
)
from hf_knowedit.experts import module_key

try:
    from tiny_models import HIDDEN, LAYERS, TINY_MLP_INNER, TINY_MODEL_TYPES, TINY_WRAPPERS, make_tiny_model
except ImportError:  # tests/ imported as a package
    from tests.tiny_models import HIDDEN, LAYERS, TINY_MLP_INNER, TINY_MODEL_TYPES, TINY_WRAPPERS, make_tiny_model

PROMPT = "The Eiffel Tower is located in the city of"
#: the blocks with attention of the tiny hybrid stacks whose other blocks have none (tests/tiny_models.py)
HYBRID_ATTENTION = {"lfm2": [1, 3], "bamba": [1, 3], "qwen3_next": [1, 3], "granitemoehybrid": [1, 3]}


@functools.cache
def _tiny(model_type: str):
    """Built once per type; tests below must not modify the model (or must restore it)."""
    return make_tiny_model(model_type)


def _ids(tok) -> torch.Tensor:
    return tok(PROMPT, return_tensors="pt")["input_ids"]


# -----------------------------------------------------------------------------
# the table as a whole


def test_table_covers_enough_dense_models():
    assert len(ARCHITECTURES) >= 18
    assert supported_architectures() == sorted(ARCHITECTURES)
    assert set(TINY_MODEL_TYPES) == set(ARCHITECTURES), "every table entry needs a tiny model in tests"
    for name, spec in ARCHITECTURES.items():
        assert spec.model_type == name


# -----------------------------------------------------------------------------
# per model type


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_entry_resolves(model_type):
    model, _ = _tiny(model_type)
    spec = get_architecture(model)
    assert spec.model_type == model.config.model_type == model_type
    assert get_architecture(model.config) is spec
    assert get_architecture(model_type) is spec


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_named_modules_exist(model_type):
    model, _ = _tiny(model_type)
    spec = get_architecture(model)
    names = dict(model.named_modules())

    backbone = get_module(model, spec.backbone)
    if model_type in TINY_WRAPPERS:  # the text decoder inside the wrapper's base model, beside its vision tower
        assert spec.text_config == "text_config" and backbone is model.base_model.language_model
        assert decoder_config(model) is model.config.text_config is backbone.config
        vision = [n for n in names if n.startswith(("model.vision_tower.", "model.visual."))]
        assert vision and not any(n.startswith(spec.backbone + ".") for n in vision)  # the tower is outside it
    else:
        # Llama4ForCausalLM's base_model_prefix ("language_model") names no attribute: base_model is the model
        base = model.model if model.base_model is model else model.base_model
        assert backbone is base and decoder_config(model) is model.config
    for path in (spec.layers, spec.embed, spec.final_norm):
        assert path in names and path.startswith(spec.backbone + "."), path

    layers = get_module(model, spec.layers)
    assert isinstance(layers, nn.ModuleList)
    assert len(layers) == num_layers(model) == num_layers(model, spec) == LAYERS

    embed = get_module(model, spec.embed)
    assert isinstance(embed, nn.Embedding) and embed is model.get_input_embeddings()
    assert embed.num_embeddings == decoder_config(model).vocab_size
    lm_head = get_module(model, spec.lm_head)
    assert lm_head is model.get_output_embeddings()
    assert isinstance(get_module(model, spec.final_norm), nn.Module)

    # routed experts: a module holding 3-D expert weights (tests/test_experts.py checks their form)
    layout_class = {"linear": nn.Linear, "conv1d": Conv1D, "experts": nn.Module, "experts_t": nn.Module}[
        spec.mlp_out_layout
    ]
    attention = attention_layers(model, spec)
    assert attention == HYBRID_ATTENTION.get(model_type, list(range(LAYERS)))
    for i in range(len(layers)):
        assert get_module(model, layer_path(spec, i)) is layers[i]
        assert mlp_out_path(spec, i) in names
        assert (attn_out_path(spec, i) in names) == (i in attention)
        assert isinstance(get_module(model, mlp_out_path(spec, i)), layout_class)
        if spec.mlp_out_layout in EXPERT_LAYOUTS:
            assert get_module(model, mlp_out_path(spec, i)).down_proj.dim() == 3
        assert get_module(layers[i], spec.mlp_out) is get_module(model, mlp_out_path(spec, i))
        if i in attention:
            assert get_module(layers[i], spec.attn_out) is get_module(model, attn_out_path(spec, i))


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_mlp_out_dims(model_type):
    model, _ = _tiny(model_type)
    spec = get_architecture(model)
    for i in range(num_layers(model)):
        d_in, d_out = mlp_out_dims(model, spec, i)
        assert (d_in, d_out) == (TINY_MLP_INNER[model_type], HIDDEN)
        assert d_in != d_out  # the tiny models are shaped so that a transposed layout is caught
    with pytest.raises(LayerOutOfRangeError):
        mlp_out_dims(model, spec, num_layers(model))


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_lm_logits_of_the_backbone_reproduce_the_models_logits(model_type):
    """``lm_logits(backbone(ids))`` is the model's own logits: its head, logit scale or divisor and soft-cap."""
    model, tok = _tiny(model_type)
    spec = get_architecture(model)
    config = decoder_config(model)
    ids = _ids(tok)
    backbone, lm_head = get_module(model, spec.backbone), get_module(model, spec.lm_head)
    final_norm = get_module(model, spec.final_norm)

    seen = {}
    handle = final_norm.register_forward_hook(lambda m, i, o: seen.__setitem__("norm", o))
    cap_before = getattr(config, spec.logit_softcap) if spec.logit_softcap else None
    try:
        if spec.logit_softcap:  # a small cap, so that forgetting it would be visible
            assert hasattr(config, spec.logit_softcap)
            setattr(config, spec.logit_softcap, 0.5)
        with torch.no_grad():
            logits = model(input_ids=ids).logits
            hidden = backbone(input_ids=ids)[0]
            head = lm_head(hidden)
            mine = lm_logits(model, spec, hidden)
    finally:
        handle.remove()
        if spec.logit_softcap:
            setattr(config, spec.logit_softcap, cap_before)

    # the backbone's output is the final norm's output
    torch.testing.assert_close(seen["norm"], hidden, rtol=0, atol=0)
    if spec.logit_softcap or spec.logit_scale or spec.logit_divisor:  # the tiny configs make each one bite
        assert not torch.allclose(head, logits, atol=1e-4)
    else:
        torch.testing.assert_close(head, logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mine, logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_type", [t for t in TINY_MODEL_TYPES if ARCHITECTURES[t].mlp_post_norm is None])
def test_residual_scale_is_how_the_block_adds_its_mlp_output(model_type):
    """A change ``u`` of ``mlp_out``'s output moves the block's output by ``residual_scale · u`` (models
    without a post-MLP norm; with one, ``methods/memit.py`` maps changes through it: tests/test_post_norm.py),
    times ``sigmoid(mlp_out_gate(x))`` per token where the table declares that gate (Qwen2-MoE)."""
    model, tok = _tiny(model_type)
    spec = get_architecture(model)
    ids = _ids(tok)
    u = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(0))
    block = get_module(model, layer_path(spec, 1))
    outputs, gates = [], []
    handles = [
        block.register_forward_hook(lambda m, a, o: outputs.append((o[0] if isinstance(o, tuple) else o).clone()))
    ]
    gate_path = mlp_out_gate_path(spec, 1)
    if gate_path is not None:
        handles.append(get_module(model, gate_path).register_forward_hook(lambda m, a, o: gates.append(o.clone())))
    try:
        with torch.no_grad():
            model(input_ids=ids)
            with hooked(get_module(model, mlp_out_path(spec, 1)), lambda m, a, o: o + u):
                model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    clean, moved = (h.reshape(-1, HIDDEN) for h in outputs)
    scale = residual_scale(model, spec)
    # falcon_h1: mlp_multipliers[1]
    assert scale == {"granite": 0.5, "granitemoe": 0.5, "granitemoehybrid": 0.5, "falcon_h1": 0.5}.get(model_type, 1.0)
    if gate_path is not None:
        assert model_type in ("qwen2_moe", "qwen3_next") and len(gates) == 2
        scale = scale * torch.sigmoid(gates[0].reshape(-1, 1))
        assert not torch.allclose(scale, torch.ones_like(scale), atol=0.1)  # the gate does scale
    torch.testing.assert_close(moved - clean, (scale * u).expand_as(clean), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_hooks_on_mlp_out_and_attn_out(model_type):
    model, tok = _tiny(model_type)
    spec = get_architecture(model)
    ids = _ids(tok)
    d_in, d_out = mlp_out_dims(model, spec, 0)
    mlp_out = get_module(model, mlp_out_path(spec, 0))
    attn_out = get_module(model, attn_out_path(spec, attention_layers(model, spec)[0]))
    seen = {}

    def on_mlp(module, args, output):  # clone: Falcon adds the attention output to it in place
        key = module_key(spec.mlp_out_layout, module, args)  # routed experts: the routing-weighted keys
        seen["k"], seen["v"], seen["args"] = key.detach().clone(), output.detach().clone(), args

    def on_attn(module, args, output):
        seen["attn"] = output[0] if isinstance(output, tuple) else output

    handles = [mlp_out.register_forward_hook(on_mlp), attn_out.register_forward_hook(on_attn)]
    try:
        with torch.no_grad():
            clean = model(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()

    k, v = seen["k"], seen["v"]
    assert k.shape[-1] == d_in and v.shape[-1] == d_out == HIDDEN
    assert k.shape[:-1] == v.shape[:-1]
    assert k.shape[:-1].numel() == ids.numel()  # one key per token (OPT flattens batch and time)
    assert seen["attn"].shape[-1] == HIDDEN

    # the declared layout reproduces the module: v = k W^T + b, W read from the parameter as the layout says
    # (linear: the weight; conv1d: its transpose; experts: [W_0 … W_{E-1}] from down_proj [E, d, I]; experts_t:
    # from down_proj [E, I, d], plus the experts' down biases Σ_e g_e b_e, which no key carries)
    weight = from_param(getattr(mlp_out, LAYOUT_PARAM[spec.mlp_out_layout]), spec.mlp_out_layout)
    expected = k.to(weight.dtype) @ weight.T
    if getattr(mlp_out, "bias", None) is not None:
        expected = expected + mlp_out.bias
    if spec.mlp_out_layout == "experts_t":
        _, index, gates = seen["args"]
        routed_bias = (gates[..., None] * mlp_out.down_proj_bias[index]).sum(-2)
        assert routed_bias.norm() > 0.1 * v.norm()  # the tiny model's biases bite
        expected = expected + routed_bias
    torch.testing.assert_close(expected, v, rtol=1e-5, atol=1e-6)

    # the module is on the forward path: changing its output changes the logits
    handle = mlp_out.register_forward_hook(lambda m, a, o: o + 1.0)
    try:
        with torch.no_grad():
            edited = model(input_ids=ids).logits
    finally:
        handle.remove()
    assert not torch.allclose(clean, edited)


@contextlib.contextmanager
def hooked(module, hook):
    """Keeps ``hook`` on ``module``'s forward output while open."""
    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def test_decoder_config_names_a_missing_text_config():
    wrapper = types.SimpleNamespace(config=types.SimpleNamespace(model_type="gemma3"))
    with pytest.raises(InvalidConfigError, match="text_config"):
        decoder_config(wrapper)


# -----------------------------------------------------------------------------
# errors and registration


def test_unknown_model_type_raises():
    fake = types.SimpleNamespace(config=types.SimpleNamespace(model_type="not_a_real_model"))
    with pytest.raises(UnsupportedArchitectureError) as info:
        get_architecture(fake)
    message = str(info.value)
    assert "not_a_real_model" in message
    assert "register_architecture" in message and "ArchitectureSpec(" in message
    assert "llama" in message and "gpt2" in message  # lists the supported types
    assert isinstance(info.value, KnowEditError) and isinstance(info.value, KeyError)
    with pytest.raises(UnsupportedArchitectureError):
        get_architecture(fake.config)
    with pytest.raises(UnsupportedArchitectureError):
        get_architecture(types.SimpleNamespace())  # no model_type at all


def test_register_architecture_round_trip():
    base = get_architecture("llama")
    spec = dataclasses.replace(base, model_type="my_test_llama")
    assert "my_test_llama" not in ARCHITECTURES
    try:
        assert register_architecture(spec) is spec
        assert get_architecture("my_test_llama") is spec
        assert get_architecture(types.SimpleNamespace(model_type="my_test_llama")) is spec
        assert "my_test_llama" in supported_architectures()
        with pytest.raises(ValueError, match="already registered"):
            register_architecture(dataclasses.replace(spec, lm_head="other_head"))
        assert get_architecture("my_test_llama") is spec
        replacement = dataclasses.replace(spec, lm_head="other_head")
        register_architecture(replacement, overwrite=True)
        assert get_architecture("my_test_llama") is replacement
    finally:
        ARCHITECTURES.pop("my_test_llama", None)
    with pytest.raises(UnsupportedArchitectureError):
        get_architecture("my_test_llama")


@pytest.mark.parametrize(
    "field, value",
    [
        ("mlp_out_layout", "conv2d"),
        ("mlp_out_layout", "Linear"),
        ("layers", "model..layers"),
        ("mlp_out", ""),
        ("lm_head", None),
        ("model_type", ""),
        ("logit_softcap", "final logit"),
        ("text_config", "text.config"),
        ("logit_scale", 0.0625),
        ("logit_divisor", "logits scaling"),
        ("residual_multiplier", ""),
        ("residual_multiplier", "mlp_multipliers[-1]"),
        ("logit_scale", "lm_head_multiplier[0"),
        ("text_config", "text_configs[0]"),  # only the multiplier columns take an index
        ("logit_softcap", "final_logit_softcapping[0]"),
        ("prefix_cache", "yes"),
        ("mlp_post_norm_eps", "variance epsilon"),
        ("mlp_post_norm_gain_offset", "1 + weight"),
        ("mlp_post_norm_gain_offset", float("nan")),
    ],
)
def test_bad_spec_field_is_named(field, value):
    with pytest.raises(ValueError, match=field) as info:
        fields = {"model_type": "bad_spec", field: value}
        register_architecture(dataclasses.replace(get_architecture("llama"), **fields))
    assert isinstance(info.value, InvalidConfigError)
    assert "bad_spec" not in ARCHITECTURES


def test_a_multiplier_column_reads_an_entry_of_a_list_setting():
    """``"name[i]"`` reads ``config.name[i]`` (Falcon-H1's ``mlp_multipliers[1]``); an entry the list lacks is a
    typed error naming the column, an unset attribute none."""
    model, _ = _tiny("falcon_h1")
    spec = get_architecture(model)
    assert model.config.mlp_multipliers == [1.5, 0.5]
    assert config_setting(model, spec, "residual_multiplier") == residual_scale(model, spec) == 0.5
    assert (
        config_setting(
            model, dataclasses.replace(spec, residual_multiplier="mlp_multipliers[0]"), "residual_multiplier"
        )
        == 1.5
    )
    with pytest.raises(InvalidConfigError, match=r"residual_multiplier.*mlp_multipliers\[2\]"):
        config_setting(
            model, dataclasses.replace(spec, residual_multiplier="mlp_multipliers[2]"), "residual_multiplier"
        )
    with pytest.raises(InvalidConfigError, match="lm_head_multiplier"):
        config_setting(model, dataclasses.replace(spec, logit_scale="lm_head_multiplier[0]"), "logit_scale")
    assert config_setting(model, dataclasses.replace(spec, logit_divisor="not_set[3]"), "logit_divisor") is None


def test_attention_layers_of_a_model_without_its_attn_out_name_the_path():
    model, _ = _tiny("llama")
    with pytest.raises(InvalidConfigError, match="not_there"):
        attention_layers(model, dataclasses.replace(get_architecture(model), attn_out="self_attn.not_there"))


def test_paths_and_missing_modules():
    spec = get_architecture("llama")
    assert layer_path(spec, 3) == "model.layers.3"
    assert mlp_out_path(spec, 3) == "model.layers.3.mlp.down_proj"
    assert attn_out_path(spec, 0) == "model.layers.0.self_attn.o_proj"
    assert mlp_out_path(get_architecture("opt"), 1) == "model.decoder.layers.1.fc2"
    with pytest.raises(LayerOutOfRangeError):
        layer_path(spec, -1)

    model, _ = _tiny("llama")
    assert get_module(model, "") is model
    with pytest.raises(InvalidConfigError, match="model.layers.9"):
        get_module(model, "model.layers.9.mlp")
    with pytest.raises(InvalidConfigError, match="down_proj"):
        get_module(model, "model.layers.0.mlp.not_there")
