"""The bundled-model loader (no GGUF here: a tiny model stands in for a converted checkpoint) and the
model-scaled strength of the v*/z optimisation (Adam's rate, the "will likely not take" warning)."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from hf_knowedit import _bundled
from hf_knowedit.errors import InvalidConfigError
from hf_knowedit.methods.memit import MEMITConfig
from hf_knowedit.methods.rome import ROMEConfig
from hf_knowedit.methods.targets import optimize_targets, step_size, warn_unfinished
from hf_knowedit.requests import EditRequest
from tests.tiny_models import make_tiny_model

REQUEST = EditRequest("The capital city of {}", "Italy", "Paris")

pytestmark = pytest.mark.usefixtures("one_thread")


def test_unknown_bundled_model_names_the_choices():
    with pytest.raises(InvalidConfigError, match="gemma3.*smollm2"):
        _bundled.load_bundled("llama-7b")


def test_missing_package_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_KNOWEDIT_CACHE", str(tmp_path))
    fake = dataclasses.replace(_bundled.MODELS["gemma3"], key="fake", package="no_such_pkg_xyz", install="pip x")
    monkeypatch.setitem(_bundled.MODELS, "fake", fake)
    assert not _bundled.is_available("fake")
    with pytest.raises(ModuleNotFoundError, match="no_such_pkg_xyz.*pip x"):
        _bundled.load_bundled("fake")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_a_converted_checkpoint_loads_offline_named_after_its_source(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_KNOWEDIT_CACHE", str(tmp_path))
    fake = dataclasses.replace(_bundled.MODELS["smollm2"], key="fake", package="no_such_pkg_xyz", name="org/tiny")
    monkeypatch.setitem(_bundled.MODELS, "fake", fake)
    model, tok = make_tiny_model("gemma3_text")
    model.save_pretrained(_bundled.converted_dir("fake"))
    tok.save_pretrained(_bundled.converted_dir("fake"))
    assert _bundled.converted_dir("fake") == tmp_path / fake.converted
    assert _bundled.is_available("fake")  # converted: the package is no longer needed
    loaded, _ = _bundled.load_bundled("fake")
    assert loaded.name_or_path == "org/tiny" and not loaded.training
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_step_size_is_relative_to_the_site_unless_given():
    init = torch.tensor([[3.0, 4.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    rms = torch.tensor([(25 / 4) ** 0.5, 1.0])  # sqrt(mean(x²)) per row, by hand
    torch.testing.assert_close(step_size(ROMEConfig(), init), 0.5 * rms)
    torch.testing.assert_close(step_size(MEMITConfig(), init), 0.1 * rms)
    torch.testing.assert_close(step_size(ROMEConfig(v_lr_relative=2.0), init), 2.0 * rms)
    assert step_size(ROMEConfig(v_lr=0.3), init) == 0.3  # the reference's absolute rate


@pytest.mark.parametrize("site", ["mlp", "residual"])
def test_first_adam_step_moves_each_coordinate_by_the_scaled_rate(site):
    # Adam's first update is lr · g / (|g| + eps): every coordinate moves by the rate
    model, tok = make_tiny_model("llama")
    free = dict(site=site, v_num_grad_steps=2, early_stop=0.0, clamp_norm_factor=1e6, v_weight_decay=0.0)
    res = optimize_targets(model, tok, [REQUEST], 1, ROMEConfig(v_lr_relative=0.25), **free)
    rate = 0.25 * res.init[0].pow(2).mean().sqrt()
    moved = res.deltas[0].abs()
    torch.testing.assert_close(moved[moved > 0], rate.expand(int((moved > 0).sum())), rtol=1e-3, atol=0)
    fixed = optimize_targets(model, tok, [REQUEST], 1, ROMEConfig(v_lr=0.02), **free)
    moved = fixed.deltas[0].abs()
    torch.testing.assert_close(moved[moved > 0], torch.full_like(moved[moved > 0], 0.02), rtol=1e-3, atol=0)


def test_an_optimisation_ending_far_above_early_stop_warns_with_the_request(caplog):
    model, tok = make_tiny_model("llama")
    with caplog.at_level(logging.WARNING, logger="hf_knowedit.methods.targets"):
        res = optimize_targets(model, tok, [REQUEST], 1, ROMEConfig(v_num_grad_steps=1))
    assert res.losses[0] > 1.0  # one forward pass, no step: the random model is far from "Paris"
    [record] = [r for r in caplog.records if "will likely not take" in r.getMessage()]
    assert "The capital city of Italy" in record.getMessage() and "Paris" in record.getMessage()
    assert f"{res.losses[0]:.3f}" in record.getMessage()


@pytest.mark.parametrize(
    "loss,early_stop,warns", [(0.9, 0.05, False), (1.1, 0.05, True), (0.4, 0.0, False), (0.6, 0.0, True)]
)
def test_warning_bound_is_twenty_times_early_stop_at_least_half(caplog, loss, early_stop, warns):
    with caplog.at_level(logging.WARNING, logger="hf_knowedit.methods.targets"):
        warn_unfinished([REQUEST], [loss], [3], early_stop)
    assert any("will likely not take" in r.getMessage() for r in caplog.records) == warns
