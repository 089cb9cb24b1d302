"""NAMET's position noise in the v*/z objective (``v_position_noise``,
:func:`hf_knowedit.methods.targets.position_noise`):
the authors' ``compute_z`` left-pads a request's rows to the longest and adds δ at the subject-last index of the
unpadded row, so δ lands ``L_max − len(row)`` tokens early (on padding, i.e. nowhere, when that is before the row)."""

from __future__ import annotations

import pytest
import torch

import hf_knowedit
from hf_knowedit.architectures import get_architecture, layer_path
from hf_knowedit.errors import InvalidConfigError
from hf_knowedit.hooks import Trace, hidden
from hf_knowedit.methods.memit import MEMITConfig
from hf_knowedit.methods.targets import KL_PROMPT, _build, optimize_targets
from hf_knowedit.requests import EditRequest
from tests.helpers import assert_untouched, snapshot
from tests.tiny_models import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

REQUEST = EditRequest("{} is located in", "Eiffel Tower", "Rome", "Paris")
# rows of different lengths: the bare prompt, two prefixes one and three tokens apart (the tiny tokenizer
# spells characters), and the essence prompt
TEMPLATES = ["{}", "Yes. {}", "Yes, ok. {}"]


def test_delta_goes_as_many_tokens_early_as_the_row_is_short():
    _, tok = make_tiny_model("llama")
    plain = _build(tok, REQUEST, TEMPLATES, [KL_PROMPT])
    noisy = _build(tok, REQUEST, TEMPLATES, [KL_PROMPT], noise=True)
    assert noisy.rows == plain.rows and noisy.targets == plain.targets  # the prompts themselves are the same
    assert plain.lookups == plain.subjects and plain.weights == [1.0] * len(plain.rows)
    longest = max(len(r) for r in plain.rows)
    for row, subject, at, weight in zip(plain.rows, plain.subjects, noisy.lookups, noisy.weights):
        early = subject - (longest - len(row))  # the authors' index, read in the unpadded row
        assert weight == (1.0 if early >= 0 else 0.0)
        assert at == (early if early >= 0 else 0)
    assert noisy.weights[2] == 1.0 and noisy.lookups[2] == noisy.subjects[2]  # the longest row: at the subject
    assert noisy.weights[-1] == 0.0  # the short essence prompt: δ on padding, so its KL term stays 0
    assert 0 < noisy.lookups[1] < noisy.subjects[1]  # a row a little shorter: δ on an earlier real token


def _block_output(model, ids: list[int], layer: int) -> torch.Tensor:
    with torch.no_grad(), Trace(model, layer_path(get_architecture(model), layer), retain_output=True) as tr:
        model(input_ids=torch.tensor([ids]))
    return hidden(tr.output)[0].float()


def test_the_target_adds_the_mean_shift_between_where_delta_goes_and_the_subject():
    model, tok = make_tiny_model("llama")
    built = _build(tok, REQUEST, TEMPLATES, [KL_PROMPT], noise=True)
    # one forward pass, no Adam step: δ = 0, so the target is init + the noise term alone
    res = optimize_targets(
        model,
        tok,
        [REQUEST],
        1,
        MEMITConfig(v_num_grad_steps=1, v_position_noise=True),
        site="residual",
        templates=TEMPLATES,
    )
    shifts = []
    for r in range(1, len(TEMPLATES)):  # the prefixed rows δ reaches (not the bare prompt, not the essence)
        if built.weights[r]:
            h = _block_output(model, built.rows[r], 1)
            shifts.append(h[built.lookups[r]] - h[built.subjects[r]])
    assert len(shifts) == 2 and shifts[0].norm() > 0
    init = _block_output(model, built.rows[0], 1)[built.subjects[0]]
    torch.testing.assert_close(res.init[0], init, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(res.targets[0], init + torch.stack(shifts).mean(0), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("site", ["residual", "mlp"])
def test_it_changes_the_targets_and_is_off_by_default(site):
    model, tok = make_tiny_model("llama")

    def run(templates, **kw):
        cfg = MEMITConfig(v_num_grad_steps=3, v_lr=0.5, **kw)
        return optimize_targets(model, tok, [REQUEST], 1, cfg, site=site, templates=templates).targets

    default = run(TEMPLATES)
    assert torch.equal(default, run(TEMPLATES, v_position_noise=False))
    assert not torch.allclose(default, run(TEMPLATES, v_position_noise=True), atol=1e-4)
    # rows of one length (no essence prompt shorter than them here) move nothing: the same arithmetic
    same = ["Yes. {}"]
    cfg = MEMITConfig(v_num_grad_steps=3, v_lr=0.5, v_position_noise=True)
    noisy = optimize_targets(model, tok, [REQUEST], 1, cfg, site=site, templates=same, kl_prompts=())
    plain = optimize_targets(
        model, tok, [REQUEST], 1, cfg.__class__(v_num_grad_steps=3, v_lr=0.5), site=site, templates=same, kl_prompts=()
    )
    assert torch.equal(noisy.targets, plain.targets)


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_a_bad_value_is_refused_before_anything_is_touched(bad):
    model, tok = make_tiny_model("llama")
    with pytest.raises(InvalidConfigError, match="v_position_noise"):
        MEMITConfig(v_position_noise=bad)
    before = snapshot(model)
    with pytest.raises(InvalidConfigError, match="v_position_noise"):
        hf_knowedit.apply_edits(
            model, tok, [REQUEST], method="memit", layers=[1], config=dict(mom2="identity", v_position_noise=bad)
        )
    assert_untouched(model, before)
