"""``mom2_preserve``: texts whose keys are added to ``C`` (``C + w · E_p[k kᵀ]``), for every method that reads
``C`` through the statistics module, joint or per expert."""

from __future__ import annotations

import pytest
import torch

import hf_knowedit
from hf_knowedit.architectures import get_architecture, mlp_out_path
from hf_knowedit.errors import InvalidConfigError
from hf_knowedit.hooks import Trace
from hf_knowedit.methods.moeedit import MoEEditConfig
from hf_knowedit.methods.statistics import (
    compute_expert_moments,
    compute_second_moment,
    corpus_tokens,
    expert_moments_for,
    second_moment_for,
)
from tests.tiny_models import make_tiny_model

CORPUS = [f"Text number {i} talks about rivers, mountains and the towns between them." for i in range(30)]
PRESERVE = [
    "The Eiffel Tower is located in Paris.",
    "Danielle Darrieux's mother tongue is French.",
    "Toko Yasuda plays the guitar.",
    "The capital of Norway is Oslo.",
]
FACT = {"prompt": "{} is located in the city of", "subject": "The Colosseum", "target_new": "Berlin"}


def test_second_moment_with_preserved_texts_is_c_plus_w_times_their_mean_key_outer_product(stats_cache):
    model, tok = make_tiny_model("llama")
    layer = 1
    base = hf_knowedit.MEMITConfig(mom2_corpus=CORPUS, mom2_n_tokens=300)
    cfg = hf_knowedit.MEMITConfig(mom2_corpus=CORPUS, mom2_n_tokens=300, mom2_preserve=PRESERVE, mom2_preserve_weight=7)
    c = second_moment_for(model, tok, layer, base)
    got = second_moment_for(model, tok, layer, cfg)
    # the preserved part written out: the input of the MLP's output projection at every token of every text
    rows = []
    for text in PRESERVE:
        with Trace(model, mlp_out_path(get_architecture(model), layer), retain_input=True) as tr:
            with torch.no_grad():
                model(**tok(text, return_tensors="pt"))
        rows.append(tr.input[0].double())
    keys = torch.cat(rows)
    assert keys.shape[0] == corpus_tokens(tok, PRESERVE)
    expected = c.matrix.double() + 7 * keys.T @ keys / keys.shape[0]
    torch.testing.assert_close(got.matrix.double(), expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
    assert got.n_tokens == c.n_tokens + keys.shape[0]
    assert got.key.corpus.startswith(c.key.corpus) and "7 x preserve[" in got.key.corpus and got.key != c.key
    assert not got.is_identity
    # no preserved texts: C itself
    assert second_moment_for(model, tok, layer, base).key == c.key


def test_preserved_keys_are_added_per_expert(stats_cache):
    model, tok = make_tiny_model("mixtral")
    cfg = MoEEditConfig(mom2_corpus=CORPUS, mom2_n_tokens=400, mom2_preserve=PRESERVE)
    got = expert_moments_for(model, tok, 1, cfg)
    plain = compute_expert_moments(model, tok, 1, corpus=CORPUS, n_tokens=400)
    kept = compute_expert_moments(model, tok, 1, corpus=PRESERVE, n_tokens=corpus_tokens(tok, PRESERVE))
    assert len(got) == len(plain) == 4
    for g, p, k in zip(got, plain, kept):
        torch.testing.assert_close(g.matrix, p.matrix + 10.0 * k.matrix)
        assert g.n_tokens == p.n_tokens + k.n_tokens and g.key.module == p.key.module


def test_memit_changes_the_preserved_texts_outputs_less(stats_cache):
    """The point of the option: with the preserved texts' keys weighted into C, the update moves the MLP output
    on those texts less (here by at least half), and the edit still takes."""
    moved = {}
    for preserve in (None, PRESERVE):
        model, tok = make_tiny_model("llama")
        layer = 2
        path = mlp_out_path(get_architecture(model), layer)

        def outputs():
            outs = []
            for text in PRESERVE:
                with Trace(model, path) as tr:
                    with torch.no_grad():
                        model(**tok(text, return_tensors="pt"))
                outs.append(tr.output[0].clone())
            return torch.cat(outs)

        before = outputs()
        cfg = dict(
            mom2_corpus=CORPUS,
            mom2_n_tokens=300,
            context_templates=0,
            mom2_preserve=preserve,
            mom2_preserve_weight=1000.0,
        )
        es = hf_knowedit.apply_edits(model, tok, [FACT], method="memit", layers=[layer], config=cfg)
        moved[preserve is not None] = float((outputs() - before).norm() / before.norm())
        assert es.stats_key[layer].n_tokens > (300 if preserve else 0)
    assert moved[True] < 0.5 * moved[False], moved


def test_the_sidecar_describes_the_preserved_texts_without_copying_them(stats_cache, tmp_path):
    model, tok = make_tiny_model("llama")
    es = hf_knowedit.apply_edits(
        model,
        tok,
        [FACT],
        method="rome",
        layers=[1],
        config=dict(mom2_corpus=CORPUS, mom2_n_tokens=300, context_templates=0, mom2_preserve=PRESERVE),
    )
    es.save_pretrained(tmp_path / "edit")
    text = (tmp_path / "edit" / "knowedit_config.json").read_text()
    assert "<4 texts; see stats_key>" in text and "Eiffel" not in text and "preserve[" in text


@pytest.mark.parametrize(
    "value, weight",
    [("The Eiffel Tower is in Paris.", 10.0), ([], 10.0), (["ok", ""], 10.0), (["ok", 3], 10.0), (["ok"], 0.0)],
)
def test_bad_preserve_options_are_typed_errors(value, weight):
    with pytest.raises(InvalidConfigError, match="mom2_preserve"):
        hf_knowedit.MEMITConfig(mom2_preserve=value, mom2_preserve_weight=weight)


def test_identity_statistics_take_preserved_texts_too(stats_cache):
    model, tok = make_tiny_model("llama")
    got = second_moment_for(model, tok, 1, hf_knowedit.ROMEConfig(mom2="identity", mom2_preserve=PRESERVE))
    kept = compute_second_moment(model, tok, 1, corpus=PRESERVE, n_tokens=corpus_tokens(tok, PRESERVE))
    eye = torch.eye(got.d_in, dtype=got.matrix.dtype)
    torch.testing.assert_close(got.matrix, eye + 10.0 * kept.matrix.to(got.matrix.dtype))
    assert not got.is_identity


def test_the_sum_is_built_once_per_key_so_its_factor_is_reused(stats_cache):
    model, tok = make_tiny_model("llama")
    cfg = hf_knowedit.MEMITConfig(mom2_corpus=CORPUS, mom2_n_tokens=300, mom2_preserve=PRESERVE)
    first = second_moment_for(model, tok, 1, cfg)
    assert second_moment_for(model, tok, 1, cfg) is first
    other = second_moment_for(model, tok, 1, hf_knowedit.MEMITConfig(**{**vars(cfg), "mom2_preserve_weight": 3.0}))
    assert other is not first and other.key != first.key
