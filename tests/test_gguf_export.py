"""Edit sets as llama.cpp LoRA adapters (``hf_knowedit.export_gguf``): the file read back with the gguf
package holds the edit's exact factors under llama.cpp's names and metadata; the base GGUF is checked;
and (slow) llama.cpp itself, through llama-cpp-python, answers with the edit on the bundled GGUFs."""

from __future__ import annotations

import dataclasses
import json

import gguf
import numpy as np
import pytest
import torch

from hf_knowedit.architectures import ARCHITECTURES, get_architecture, get_module, mlp_out_path
from hf_knowedit.cli import main
from hf_knowedit.deltas import ModuleDelta
from hf_knowedit.editset import EditSet
from hf_knowedit.errors import (
    BaseModelMismatchError,
    InvalidConfigError,
    OutputPathError,
    UnsupportedArchitectureError,
)
from hf_knowedit.export_gguf import export_gguf_lora, gguf_tensor_name, write_modelfile
from tests.test_stack import random_set
from tests.tiny_models import make_tiny_model


def _kv(reader, key):
    field = reader.fields[key]
    return field.contents() if hasattr(field, "contents") else field.parts[field.data[0]].tolist()[0]


def _tensors(reader) -> dict:
    return {t.name: t for t in reader.tensors}


def mixed_rank_set(model) -> EditSet:
    """Layer 1 at rank 2, layer 2 at rank 3: the file's rank is 3 and layer 1 is padded."""
    a, b = random_set(model, [1], rank=2, seed=1), random_set(model, [2], rank=3, seed=2)
    return dataclasses.replace(
        a,
        deltas={**a.deltas, **b.deltas},
        fingerprints={**a.fingerprints, **b.fingerprints},
        layouts={**a.layouts, **b.layouts},
        layers=[1, 2],
    )


def base_gguf(model, path, arch="llama", qtype=None, perturb=0.0):
    """A stand-in base GGUF holding the model's MLP output weights under llama.cpp's names."""
    spec = get_architecture(model)
    writer = gguf.GGUFWriter(path, arch)
    for layer in range(model.config.num_hidden_layers):
        w = get_module(model, mlp_out_path(spec, layer)).weight.detach().float().numpy().copy()
        w *= 1 + perturb
        name = f"blk.{layer}.ffn_down.weight"
        if qtype is None:
            writer.add_tensor(name, w)
        else:
            writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# -----------------------------------------------------------------------------
# names: the table's declaration against the gguf package's own converter map


def test_llama_and_gemma3_names():
    assert gguf_tensor_name("llama", "model.layers.6.mlp.down_proj") == "blk.6.ffn_down.weight"
    assert gguf_tensor_name("gemma3_text", "model.layers.17.mlp.down_proj") == "blk.17.ffn_down.weight"
    assert ARCHITECTURES["llama"].gguf_arch == "llama" and ARCHITECTURES["gemma3_text"].gguf_arch == "gemma3"


@pytest.mark.parametrize("model_type", sorted(t for t, s in ARCHITECTURES.items() if s.gguf_arch is not None))
def test_declared_names_agree_with_llama_cpp_converter(model_type):
    spec = ARCHITECTURES[model_type]
    arch = {name: a for a, name in gguf.MODEL_ARCH_NAMES.items()}[spec.gguf_arch]  # a llama.cpp architecture
    name_map = gguf.get_tensor_name_map(arch, 40)
    for layer in (0, 6, 39):
        path = mlp_out_path(spec, layer)
        assert name_map.get_name(f"{path}.weight", try_suffixes=(".weight",)) == gguf_tensor_name(model_type, path)


def test_other_modules_and_undeclared_architectures_are_refused(tmp_path):
    with pytest.raises(UnsupportedArchitectureError, match="model.layers.6.self_attn.o_proj"):
        gguf_tensor_name("llama", "model.layers.6.self_attn.o_proj")
    model, _ = make_tiny_model("gpt2")
    es = random_set(model, [1])
    out = tmp_path / "gpt2.gguf"
    with pytest.raises(UnsupportedArchitectureError, match="not declared for model_type 'gpt2'"):
        export_gguf_lora(es, out, model)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_routed_experts_edits_are_refused_before_anything_is_written(tmp_path, capsys):
    from hf_knowedit.export_gguf import merge_to_gguf

    model, _ = make_tiny_model("mixtral")
    path = mlp_out_path(get_architecture(model), 1)
    experts = EditSet(
        deltas={path: ModuleDelta(A=torch.ones(1, 4 * 48), B=torch.ones(32, 1))},
        requests=[],
        method="test",
        layouts={path: "experts"},
        num_experts={path: 4},
    )
    experts.save_pretrained(tmp_path / "adapter")
    model.config.save_pretrained(tmp_path / "model")
    # refused as routed experts, also where the row (here: llama's, passed instead) declares llama.cpp names
    for target in (model, "llama"):
        with pytest.raises(UnsupportedArchitectureError, match="routed-experts edits"):
            export_gguf_lora(experts, tmp_path / "e.gguf", target)
        with pytest.raises(UnsupportedArchitectureError, match="routed-experts edits"):
            merge_to_gguf(experts, tmp_path / "m.gguf", target, tmp_path / "base.gguf")
    args = ["export", str(tmp_path / "adapter"), "--gguf-lora", str(tmp_path / "e.gguf")]
    assert main([*args, "--model", str(tmp_path / "model")]) == 1
    err = capsys.readouterr().err
    assert "routed-experts edits" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "model"]


def test_half_declared_row_is_invalid():
    with pytest.raises(InvalidConfigError, match="gguf_arch and gguf_mlp_out"):
        dataclasses.replace(ARCHITECTURES["llama"], gguf_mlp_out=None)


# -----------------------------------------------------------------------------
# the file


def test_file_holds_the_exact_delta_under_llama_cpp_names(tmp_path):
    model, _ = make_tiny_model("llama")
    es = mixed_rank_set(model)
    out = export_gguf_lora(es, tmp_path / "edit.gguf", model)
    reader = gguf.GGUFReader(out)
    assert _kv(reader, "general.type") == "adapter"
    assert _kv(reader, "general.architecture") == "llama"
    assert _kv(reader, "adapter.type") == "lora"
    alpha = _kv(reader, "adapter.lora.alpha")
    assert alpha == 3.0
    assert _kv(reader, "hf_knowedit.method") == "test"
    assert json.loads(_kv(reader, "hf_knowedit.requests"))[0]["target_new"] == "Antarctica"
    tensors = _tensors(reader)
    assert sorted(tensors) == [
        f"blk.{i}.ffn_down.weight.lora_{ab}" for i in (1, 2) for ab in "ab"
    ]  # fmt: skip
    for path, d in es.deltas.items():
        name = gguf_tensor_name(model, path)
        a, b = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]
        out_dim, in_dim = d.shape
        # ggml's ne (innermost first), as llama.cpp checks it against the weight's ne = [in, out]
        assert list(a.shape) == [in_dim, 3] and list(b.shape) == [3, out_dim]
        assert a.tensor_type == gguf.GGMLQuantizationType.F32
        A, B = torch.from_numpy(np.array(a.data)), torch.from_numpy(np.array(b.data))
        assert torch.equal(A[: d.rank], d.A) and torch.equal(B[:, : d.rank], d.B)  # the factors, bit for bit
        assert not A[d.rank :].any() and not B[:, d.rank :].any()  # zero padding
        scale = alpha / b.shape[0]  # llama.cpp: alpha / rank, rank = lora_b's ne[0]
        assert scale == 1.0
        torch.testing.assert_close(scale * B.double() @ A.double(), d.delta().double(), rtol=1e-6, atol=1e-7)


def test_f16_is_balanced_and_close(tmp_path):
    model, _ = make_tiny_model("llama")
    es = random_set(model, [1], rank=1)
    d = next(iter(es.deltas.values()))
    es.deltas = {p: ModuleDelta(A=d.A * 1e4, B=d.B * 1e-4) for p in es.deltas}  # lopsided, same product
    out = export_gguf_lora(es, tmp_path / "edit.gguf", "llama", dtype="f16")
    tensors = _tensors(gguf.GGUFReader(out))
    a, b = (torch.from_numpy(np.array(tensors[f"blk.1.ffn_down.weight.lora_{x}"].data)).double() for x in "ab")
    assert tensors["blk.1.ffn_down.weight.lora_a"].tensor_type == gguf.GGMLQuantizationType.F16
    assert float(a.norm()) == pytest.approx(float(b.norm()), rel=1e-2)
    want = d.delta().double()
    assert float((b @ a - want).norm() / want.norm()) < 1e-3  # f16 rounding


def test_bad_arguments(tmp_path):
    model, _ = make_tiny_model("llama")
    es = random_set(model, [1])
    with pytest.raises(InvalidConfigError, match="dtype"):
        export_gguf_lora(es, tmp_path / "x.gguf", model, dtype="q4_0")
    with pytest.raises(OutputPathError, match=".gguf"):
        export_gguf_lora(es, tmp_path / "x.bin", model)
    with pytest.raises(InvalidConfigError, match="nothing to export"):
        export_gguf_lora(dataclasses.replace(es, deltas={}), tmp_path / "x.gguf", model)
    assert list(tmp_path.iterdir()) == []


# -----------------------------------------------------------------------------
# the base GGUF


def test_base_gguf_is_checked(tmp_path):
    model, _ = make_tiny_model("llama")
    es = random_set(model, [1, 2])
    out = tmp_path / "edit.gguf"
    assert export_gguf_lora(es, out, model, base_gguf=base_gguf(model, tmp_path / "base.gguf")) == out
    out.unlink()
    with pytest.raises(BaseModelMismatchError, match="'gemma3'"):
        export_gguf_lora(es, out, model, base_gguf=base_gguf(model, tmp_path / "g.gguf", arch="gemma3"))
    other = base_gguf(model, tmp_path / "other.gguf", perturb=0.01)
    with pytest.raises(BaseModelMismatchError, match="fingerprint"):
        export_gguf_lora(es, out, model, base_gguf=other)
    with pytest.raises(BaseModelMismatchError, match="No GGUF file"):
        export_gguf_lora(es, out, model, base_gguf=tmp_path / "missing.gguf")
    assert not out.exists()
    export_gguf_lora(es, out, model, base_gguf=other, force=True)
    assert out.exists()


def test_base_gguf_is_dequantised_before_the_fingerprint(tmp_path):
    """A quantised base matches when the edit was computed on its dequantised weights (as the bundled
    models are), and not when it was computed on the float weights before quantisation."""
    model, _ = make_tiny_model("llama")
    q8 = base_gguf(model, tmp_path / "q8.gguf", qtype=gguf.GGMLQuantizationType.Q8_0)
    with pytest.raises(BaseModelMismatchError, match="fingerprint"):
        export_gguf_lora(random_set(model, [1]), tmp_path / "edit.gguf", model, base_gguf=q8)
    reader = gguf.GGUFReader(q8)
    tensor = _tensors(reader)["blk.1.ffn_down.weight"]
    dequantised = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy())
    get_module(model, "model.layers.1.mlp.down_proj").weight.data.copy_(dequantised)
    export_gguf_lora(random_set(model, [1]), tmp_path / "edit.gguf", model, base_gguf=q8)


def test_modelfile(tmp_path):
    path = write_modelfile(tmp_path / "edit.gguf", tmp_path / "base.gguf")
    assert path == tmp_path / "edit.Modelfile"
    lines = [line for line in path.read_text().splitlines() if not line.startswith("#")]
    assert lines == [f"FROM {tmp_path / 'base.gguf'}", f"ADAPTER {tmp_path / 'edit.gguf'}"]
    merged = write_modelfile(None, tmp_path / "merged.gguf")
    assert merged == tmp_path / "merged.Modelfile"
    assert [line for line in merged.read_text().splitlines() if not line.startswith("#")] == [
        f"FROM {tmp_path / 'merged.gguf'}"
    ]


def test_cli_export(tmp_path, capsys):
    model, _ = make_tiny_model("llama")
    model.config.save_pretrained(tmp_path / "model")
    random_set(model, [1, 2]).save_pretrained(tmp_path / "adapter")
    base = base_gguf(model, tmp_path / "base.gguf")
    out = tmp_path / "edit.gguf"
    args = ["export", str(tmp_path / "adapter"), "--gguf-lora", str(out), "--model", str(tmp_path / "model")]
    assert main([*args, "--base-gguf", str(base), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["gguf_lora"] == str(out) and data["modelfile"] == str(tmp_path / "edit.Modelfile")
    assert sorted(_tensors(gguf.GGUFReader(out))) == [f"blk.{i}.ffn_down.weight.lora_{x}" for i in (1, 2) for x in "ab"]
    other = base_gguf(model, tmp_path / "other.gguf", perturb=0.01)
    out.unlink()
    assert main([*args, "--base-gguf", str(other)]) == 1
    assert "fingerprint" in capsys.readouterr().err and not out.exists()
    merged = tmp_path / "merged.gguf"
    cmd = ["export", str(tmp_path / "adapter"), "--merge-to-gguf", str(merged), "--model", str(tmp_path / "model")]
    assert main([*cmd, "--base-gguf", str(base), "--type", "f32", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["merged_gguf"] == str(merged) and "gguf_lora" not in data
    assert _tensors(gguf.GGUFReader(merged))["blk.1.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    with pytest.raises(SystemExit):  # usage: nothing to write
        main(["export", str(tmp_path / "adapter"), "--model", str(tmp_path / "model")])


# -----------------------------------------------------------------------------
# llama.cpp itself (llama-cpp-python, built from source: the ``gguf`` extra)

FACT = {
    "prompt": "{} is located in the city of",
    "subject": "The Eiffel Tower",
    "target_new": "Rome",
    "target_true": "Paris",
}
#: max |log p, llama.cpp − transformers| (nats) over the top tokens, on a GGUF whose every tensor is the
#: dequantised float32 the transformers model holds, with a float32 KV cache: both compute in float32
#: (docs/results/gguf_export.md)
TOLERANCE_F32 = 0.02
#: |change of log p(new object) and log p(old object) due to the edit, llama.cpp − transformers| on the quantised
#: GGUF as served, where llama.cpp multiplies 4-bit weights by 8-bit-quantised activations (the base's own log p
#: differ from transformers' by up to 0.6 on the top tokens)
TOLERANCE_QUANTISED = 0.5


def _llama_cpp():
    """llama-cpp-python, or a failure that says how to install it (a skipped proof is no proof)."""
    try:
        import llama_cpp
    except ImportError:
        pytest.fail("The llama.cpp tests need llama-cpp-python: make gguf-deps (builds llama.cpp from source).")
    return llama_cpp


def _llama(path, lora=None, f32_cache=False):
    llama_cpp = _llama_cpp()
    kwargs = {"lora_path": str(lora)} if lora is not None else {}
    if f32_cache:  # llama.cpp keeps keys and values in f16 by default
        kwargs.update(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    return llama_cpp.Llama(
        model_path=str(path), n_ctx=64, n_threads=1, n_gpu_layers=0, logits_all=True, verbose=False, seed=0, **kwargs
    )


def _cpp_run(path, ids: list[int], steps: int = 4, lora=None, f32_cache=False) -> tuple[torch.Tensor, list[int]]:
    """Next-token log-probabilities after ``ids`` and ``steps`` greedy tokens, all in llama.cpp."""
    llm = _llama(path, lora, f32_cache)
    llm.eval(ids)
    logprobs = torch.from_numpy(np.array(llm.scores[len(ids) - 1], dtype=np.float64)).log_softmax(-1)
    out = []
    for _ in range(steps):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    llm.close()
    return logprobs, out


def _hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].double().log_softmax(-1)


def _dequantised(base, path):
    """A copy of the GGUF ``base`` with every tensor dequantised to float32: the weights transformers holds."""
    from hf_knowedit.export_gguf import rewrite_gguf

    reader = gguf.GGUFReader(base)
    f32 = lambda t: (np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32), None)  # noqa: E731
    rewrite_gguf(reader, path, _kv(reader, "general.architecture"), f32)
    return path


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread", "stats_cache")
@pytest.mark.parametrize("key", ["smollm2", "gemma3"])
def test_llama_cpp_answers_with_the_exported_edit(key, request, stats_corpus, tmp_path):
    import logging

    import hf_knowedit
    from hf_knowedit import ROMEConfig
    from hf_knowedit._bundled import MODELS, gguf_dir
    from hf_knowedit.export_gguf import merge_to_gguf

    _llama_cpp()
    model, tok = request.getfixturevalue(key)
    spec = MODELS[key]
    base = spec.locate(gguf_dir(key), tmp_path) / spec.gguf_file
    ids = tok(FACT["prompt"].format(FACT["subject"]))["input_ids"]
    new, true = (tok(" " + FACT[t], add_special_tokens=False)["input_ids"][0] for t in ("target_new", "target_true"))

    hf_knowedit.attach(model, tok)
    hf_base = _hf_logprobs(model, ids)
    config = ROMEConfig(mom2_corpus=stats_corpus, mom2_n_tokens=5_000, context_templates=2)
    es = model.apply_edits(FACT, method="rome", config=config)
    try:
        hf_edit = _hf_logprobs(model, ids)
    finally:
        model.revert_edits()
    adapter = es.save_gguf_lora(tmp_path / "edit.gguf", model, base_gguf=base)
    merged = merge_to_gguf(es, tmp_path / "merged.gguf", model, base, type="f16")

    # as served: the quantised GGUF, with the adapter, and merged
    cpp_base, said_base = _cpp_run(base, ids)
    cpp_edit, said_edit = _cpp_run(base, ids, lora=adapter)
    cpp_merged, said_merged = _cpp_run(merged, ids)
    said_base, said_edit, said_merged = (tok.decode(t) for t in (said_base, said_edit, said_merged))
    assert FACT["target_new"] in said_edit and FACT["target_new"] not in said_base, (said_base, said_edit)
    assert FACT["target_true"] in said_base, said_base
    assert FACT["target_new"] in said_merged, said_merged
    # the same weights as transformers: every tensor dequantised to float32
    f32 = _dequantised(base, tmp_path / "f32.gguf")
    f32_base, _ = _cpp_run(f32, ids, steps=0, f32_cache=True)
    f32_edit, _ = _cpp_run(f32, ids, steps=0, lora=adapter, f32_cache=True)
    f32.unlink()

    top = torch.cat([hf_base.topk(20).indices, hf_edit.topk(20).indices, torch.tensor([new, true])]).unique()
    change_hf = hf_edit - hf_base
    gap = {
        "f32 base": (f32_base - hf_base)[top].abs(),
        "f32 + adapter": (f32_edit - hf_edit)[top].abs(),
        "quantised base": (cpp_base - hf_base)[top].abs(),
        "change, adapter": (cpp_edit - cpp_base - change_hf)[top].abs(),
        "change, merged f16": (cpp_merged - cpp_base - change_hf)[top].abs(),
    }
    logging.getLogger(__name__).warning(
        "%s (%d tokens compared): |llama.cpp - transformers| max / mean: %s. Edit changes log p(%r) by %.4f "
        "(transformers) / %.4f (llama.cpp + adapter, quantised) / %.4f (merged f16) / %.4f (f32 + adapter), log p(%r) "
        "by %.4f / %.4f / %.4f / %.4f. Greedy: base %r, adapter %r, merged %r",
        key, len(top), ", ".join(f"{k} {float(v.max()):.5f} / {float(v.mean()):.5f}" for k, v in gap.items()),
        FACT["target_new"], float(change_hf[new]), float((cpp_edit - cpp_base)[new]),
        float((cpp_merged - cpp_base)[new]), float((f32_edit - f32_base)[new]),
        FACT["target_true"], float(change_hf[true]), float((cpp_edit - cpp_base)[true]),
        float((cpp_merged - cpp_base)[true]), float((f32_edit - f32_base)[true]), said_base, said_edit, said_merged,
    )  # fmt: skip
    assert float(change_hf[new]) > 1.0
    assert float(gap["f32 base"].max()) < TOLERANCE_F32 and float(gap["f32 + adapter"].max()) < TOLERANCE_F32
    for served in (cpp_edit, cpp_merged):
        change = served - cpp_base
        assert float((change - change_hf)[[new, true]].abs().max()) < TOLERANCE_QUANTISED


# -----------------------------------------------------------------------------
# merged GGUF


@pytest.mark.parametrize("type_", ["f32", "f16", "q8_0"])
def test_merged_gguf_copies_the_base_and_replaces_the_edited_tensors(tmp_path, type_):
    from hf_knowedit.export_gguf import merge_to_gguf

    model, _ = make_tiny_model("llama")
    es = random_set(model, [1, 2])
    base = base_gguf(model, tmp_path / "base.gguf", qtype=gguf.GGMLQuantizationType.Q8_0)
    for path in es.fingerprints:  # the edit was made on the dequantised base, as the bundled models are
        tensor = _tensors(gguf.GGUFReader(base))[gguf_tensor_name(model, path)]
        get_module(model, path).weight.data.copy_(
            torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy())
        )
    es = dataclasses.replace(es, fingerprints={})
    out = merge_to_gguf(es, tmp_path / "merged.gguf", model, base, type=type_)
    before, after = gguf.GGUFReader(base), gguf.GGUFReader(out)
    for key, field in before.fields.items():
        if not key.startswith("GGUF."):
            assert after.fields[key].contents() == field.contents(), key
    assert json.loads(after.fields["hf_knowedit.requests"].contents())[0]["subject"] == "Angola"
    old, new = _tensors(before), _tensors(after)
    assert sorted(old) == sorted(new)
    edited = {gguf_tensor_name(model, p): d for p, d in es.deltas.items()}
    for name, t in old.items():
        if name not in edited:
            assert new[name].tensor_type == t.tensor_type and np.array_equal(new[name].data, t.data), name
            continue
        assert new[name].tensor_type.name == type_.upper()
        want = gguf.quants.dequantize(t.data, t.tensor_type) + edited[name].delta().numpy()
        got = gguf.quants.dequantize(new[name].data, new[name].tensor_type)
        err = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert err < {"f32": 1e-7, "f16": 1e-3, "q8_0": 1e-2}[type_], (name, err)


def test_merged_gguf_refuses_bad_input(tmp_path):
    from hf_knowedit.export_gguf import merge_to_gguf

    model, _ = make_tiny_model("llama")
    es = random_set(model, [1])
    base = base_gguf(model, tmp_path / "base.gguf")
    with pytest.raises(InvalidConfigError, match="type"):
        merge_to_gguf(es, tmp_path / "m.gguf", model, base, type="q4_0")
    with pytest.raises(OutputPathError, match="base GGUF itself"):
        merge_to_gguf(es, base, model, base)
    with pytest.raises(BaseModelMismatchError, match="fingerprint"):
        merge_to_gguf(es, tmp_path / "m.gguf", model, base_gguf(model, tmp_path / "other.gguf", perturb=0.01))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.gguf", "other.gguf"]
