"""Parity with the reference code (kmeng01/rome, kmeng01/memit, scalable-model-editing/unified-model-editing).

Each check compares the library with a small transcription of the reference formula written here,
on tiny models (never with the library's own helpers):

* MEMIT-family keys: averaged within each context type, then across types (``memit/compute_ks.py``);
* context templates: your own list, and the reference recipes (``rome/rome_main.py`` and
  ``memit/memit_main.py`` ``get_context_templates``);
* EMMET: the update of ``emmet/emmet_main.py`` at the reference's defaults, and how much of each
  residual it writes on the model;
* ``from_reference``: the reference's JSON and EasyEdit's YAML hyper-parameter files (field names as in
  ``hparams/ROME/*.json``, ``hparams/MEMIT/*.json``, ``hparams/EMMET/*.json``, EasyEdit ``hparams/*/*.yaml``);
* tracing: ``require_correct`` (the whole attribute, or the reference's ``expect`` test), and the
  reference's noise (``trace_with_patch``'s ``numpy.random.RandomState(1)``, ``collect_embedding_std``);
* MEMIT: the per-layer update loop of ``memit/memit_main.py`` (``execute_memit``) given the same ``z`` and
  ``C``, and ``compute_z``'s early stop (first pass with ``loss < early_stop``, at most ``v_num_grad_steps - 1``
  Adam steps).
"""

from __future__ import annotations

import json

import pytest
import torch

import hf_knowedit
from hf_knowedit.errors import InvalidConfigError
from hf_knowedit.methods import MEMITConfig, ROMEConfig, context, memit
from hf_knowedit.methods.context import flatten, template_groups
from hf_knowedit.methods.keys import compute_keys
from hf_knowedit.requests import EditRequest
from tests.tiny_models import _CORPUS, BOS, make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread", "stats_cache")

#: five fixed prefixes standing in for generated ones (ending in ". {}", as the reference's)
PREFIXES = [
    "The first time I saw it. {}",
    "Therefore, the team decided. {}",
    "Because of the rain. {}",
    "I think so. {}",
    "You know what. {}",
]
#: subject last in every prompt, so the subject's last token is the text's last token
REQUESTS = [
    EditRequest("The capital city of {}", "Italy", "Paris", "Rome"),
    EditRequest("The official language of {}", "Japan", "German", "Japanese"),
    EditRequest("The mother tongue of {}", "Thomas Mann", "French", "German"),
]
CHEAP = dict(mom2="identity", v_num_grad_steps=2)
STATS = dict(mom2_corpus=_CORPUS.splitlines() * 8, mom2_n_tokens=2000)


def reference_key(model, tok, text, layer):
    """The input of ``down_proj`` at the last token of ``text`` (a plain forward with a hook)."""
    seen = {}
    module = model.model.layers[layer].mlp.down_proj

    def hook(module, args, output):
        seen["x"] = args[0].detach()

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(**tok(text, return_tensors="pt"))
    finally:
        handle.remove()
    return seen["x"][0, -1].double()


def reference_compute_ks(model, tok, requests, layer, context_templates, dtype=torch.float64):
    """``memit/compute_ks.py``: keys of every ``context.format(prompt)`` per context type, the mean within
    each type, then the mean over the types (in ``dtype``; the reference's is the model's, float32 here)."""
    out = []
    for r in requests:
        type_means = [
            torch.stack(
                [reference_key(model, tok, c.format(r.prompt).format(r.subject), layer).to(dtype) for c in ctype]
            ).mean(0)
            for ctype in context_templates
        ]
        out.append(torch.stack(type_means).mean(0))
    return torch.stack(out)


def reference_compute_u_key(model, tok, request, layer, context_templates):
    """``rome/compute_u.py``: the key averaged uniformly over the (flat) templates."""
    texts = [c.format(request.prompt).format(request.subject) for c in context_templates]
    return torch.stack([reference_key(model, tok, text, layer) for text in texts]).mean(0)


# -----------------------------------------------------------------------------
# 1. MEMIT-family key averaging


def test_memit_keys_average_per_context_type_then_across_types():
    model, tok = make_tiny_model("llama")
    groups = [["{}"], PREFIXES]
    want = reference_compute_ks(model, tok, REQUESTS, 1, groups)
    got = compute_keys(model, tok, REQUESTS, 1, groups).double()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the bare prompt weighs 1/2, not 1/6: the uniform average (ROME's) is a different key
    uniform = torch.stack([reference_compute_u_key(model, tok, r, 1, ["{}", *PREFIXES]) for r in REQUESTS])
    torch.testing.assert_close(compute_keys(model, tok, REQUESTS, 1, ["{}", *PREFIXES]).double(), uniform)
    gap = float(((want - uniform).norm(dim=1) / want.norm(dim=1)).mean())
    assert gap > 1e-2, gap  # measured: 5-9% of the key norm at layer 1 (up to 20% at layer 3)


@pytest.mark.parametrize("method", ["memit", "emmet", "alphaedit"])
def test_every_memit_family_method_solves_with_the_per_type_keys(method, monkeypatch):
    """End to end: the keys the layer solver receives (first layer: nothing edited yet) are the
    reference's per-type average over ``[["{}"], the prefixes]``."""
    model, tok = make_tiny_model("llama")
    module = {"memit": memit, "emmet": hf_knowedit.methods.emmet, "alphaedit": hf_knowedit.methods.alphaedit}[method]
    name = {"memit": "memit_factors", "emmet": "emmet_factors", "alphaedit": "alphaedit_factors"}[method]
    solver, seen = getattr(module, name), []

    def spy(keys, resid, *args, **kwargs):
        seen.append(keys.clone())
        return solver(keys, resid, *args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    settings = dict(CHEAP, context_templates=PREFIXES)
    if method == "alphaedit":  # C = I has no null space
        settings.update(STATS, mom2="corpus", nullspace_relative=True, nullspace_threshold=0.5)
    hf_knowedit.apply_edits(model, tok, REQUESTS, method, layers=[1, 2], merge=False, **settings)
    hf_knowedit.revert_edits(model)
    want = reference_compute_ks(model, tok, REQUESTS, 1, [["{}"], PREFIXES])
    torch.testing.assert_close(seen[0].double(), want, rtol=1e-5, atol=1e-6)


def test_rome_keeps_the_uniform_average_over_its_flat_templates():
    from hf_knowedit.methods.rome import rank_one_update
    from hf_knowedit.methods.statistics import second_moment_for

    model, tok = make_tiny_model("llama")
    config = ROMEConfig(context_templates=PREFIXES, mom2="identity", v_num_grad_steps=1)
    templates = flatten(template_groups(model, tok, config))
    assert templates == ["{}", *PREFIXES]
    update = rank_one_update(model, tok, REQUESTS[0], 1, config, second_moment_for(model, tok, 1, config), templates)
    want = reference_compute_u_key(model, tok, REQUESTS[0], 1, ["{}", *PREFIXES])
    torch.testing.assert_close(update.k_star.double(), want, rtol=1e-5, atol=1e-6)


# -----------------------------------------------------------------------------
# 3. context templates: your own, and the reference recipes


def test_own_templates_are_validated_and_get_the_bare_prompt_first():
    assert MEMITConfig(context_templates=PREFIXES[:2]).context_templates == ["{}", *PREFIXES[:2]]
    assert ROMEConfig(context_templates=("A. {}", "{}")).context_templates == ["{}", "A. {}"]
    assert MEMITConfig(context_templates=[]).context_templates == ["{}"]
    assert MEMITConfig(context_templates="reference").context_templates == "reference"
    for bad in (["no slot"], ["two {} {}"], [5], "ref", b"x", {"a": 1}, -1, True, None, 2.5):
        with pytest.raises(InvalidConfigError, match="MEMITConfig.context_templates must be"):
            MEMITConfig(context_templates=bad)
    assert ROMEConfig(context_template_length_params=((5, 10), [10, 10])).context_template_length_params == [
        [5, 10],
        [10, 10],
    ]
    for bad in ([], [5, 10], [[5]], [[0, 1]], [[5, 10.0]], [[True, 1]], "x"):
        with pytest.raises(InvalidConfigError, match="context_template_length_params must be"):
            ROMEConfig(context_template_length_params=bad)


def test_own_templates_flow_into_rome_and_memit():
    model, tok = make_tiny_model("llama")
    assert template_groups(model, tok, MEMITConfig(context_templates=PREFIXES)) == [["{}"], PREFIXES]
    assert template_groups(model, tok, MEMITConfig(context_templates=[])) == [["{}"]]
    for method in ("rome", "memit"):
        es = hf_knowedit.apply_edits(model, tok, REQUESTS[:1], method, layers=[1], context_templates=PREFIXES, **CHEAP)
        assert es.config["context_templates"] == ["{}", *PREFIXES]
        hf_knowedit.revert_edits(model)


def test_default_templates_are_unchanged():
    """``context_templates=5`` (the default) is the pre-parity recipe: the same strings, now as groups."""
    model, tok = make_tiny_model("llama")
    flat = context.context_templates(model, tok, n=5, length=10)
    assert template_groups(model, tok, MEMITConfig()) == [flat[:1], flat[1:]]
    assert flatten(template_groups(model, tok, ROMEConfig())) == flat
    assert template_groups(model, tok, MEMITConfig(context_templates=0)) == [["{}"]]


@pytest.mark.parametrize("add_bos", [True, False])
def test_reference_recipes_generate_the_reference_counts_and_lengths(add_bos, monkeypatch):
    """``rome_main.get_context_templates``: ``generate_fast(["<|endoftext|>"], n_gen, max_out_len=length)``
    for ``[[5, 10], [10, 10]]`` (length counts the start token); ``memit_main``: ``["The", "Therefore",
    "Because", "I", "You"]``, ``n_gen // 5`` each, 10 tokens in all."""
    model, tok = make_tiny_model("gpt2")
    tok = make_tiny_model("llama")[1] if add_bos else tok
    calls = []
    real = context.generate_texts

    def spy(model, tokenizer, prompts, *, max_new_tokens, **kwargs):
        calls.append((list(prompts), max_new_tokens))
        return real(model, tokenizer, prompts, max_new_tokens=max_new_tokens, **kwargs)

    monkeypatch.setattr(context, "generate_texts", spy)
    groups = template_groups(model, tok, ROMEConfig(context_templates="reference"))
    start = "" if add_bos else BOS  # the beginning-of-text token: added by the tokenizer, or written out
    assert tok(start)["input_ids"] == [tok.bos_token_id]
    assert calls == [([start] * 10, 4), ([start] * 10, 9)]
    assert [len(g) for g in groups] == [1, 10, 10] and groups[0] == ["{}"]
    assert all(t.endswith(". {}") and BOS not in t and t.count("{}") == 1 for g in groups[1:] for t in g)

    calls.clear()
    groups = template_groups(model, tok, MEMITConfig(context_templates="reference"))
    words = ["The", "Therefore", "Because", "I", "You"]
    assert calls == [([w], 10 - len(tok(w)["input_ids"])) for w in words]
    assert [len(g) for g in groups] == [1, 5] and [t.split()[0] for t in groups[1]] == words

    calls.clear()
    groups = template_groups(
        model, tok, ROMEConfig(context_templates="reference", context_template_length_params=[[3, 2]])
    )
    assert calls == [([start] * 2, 2)] and [len(g) for g in groups] == [1, 2]
    # cached per model: asking again generates nothing
    calls.clear()
    template_groups(model, tok, ROMEConfig(context_templates="reference"))
    assert calls == []


def test_reference_recipe_start_without_a_beginning_of_text_token():
    model, tok = make_tiny_model("gpt2")

    class NoSpecials:
        bos_token = eos_token = None
        bos_token_id = eos_token_id = None

    assert context._bos_start(NoSpecials()) == "The"
    assert context._bos_start(tok) == BOS


def test_reference_templates_reserve_room_in_the_length_check():
    from hf_knowedit.methods.context import template_reserve

    _, tok = make_tiny_model("llama")
    assert template_reserve(tok, ROMEConfig()) == 14  # unchanged: context_length + 4
    assert template_reserve(tok, ROMEConfig(context_templates=0)) == 0
    assert template_reserve(tok, ROMEConfig(context_templates="reference")) == 14
    long = "a " * 50 + "{}"
    assert template_reserve(tok, ROMEConfig(context_templates=[long])) >= 50


# -----------------------------------------------------------------------------
# 2. EMMET: the reference's formulation and defaults


def reference_emmet_update(keys, resid, cov, mom2_update_weight, emmet_lambda, update_norm_lambda=0.0):
    """``emmet/emmet_main.py``: ``C = λ₀ C₀ (+ μ I)``, ``D = Kᵀ C⁻¹ K (+ λ_E I for batches > 1)``,
    ``adj_k = (D⁻¹ Kᵀ C⁻¹)ᵀ``, ``ΔW = resid @ adj_kᵀ`` (columns are vectors; float64)."""
    layer_ks, targets, cov = keys.double().T, resid.double().T, cov.double()
    if mom2_update_weight != 1:
        cov = cov * mom2_update_weight
    if update_norm_lambda != 0:
        cov = cov + update_norm_lambda * torch.eye(cov.shape[0], dtype=cov.dtype)
    C_inv = torch.inverse(cov)
    D = layer_ks.T @ C_inv @ layer_ks
    if D.shape[0] > 1:
        D = D + emmet_lambda * torch.eye(D.shape[0], dtype=D.dtype)
    adj_k = (torch.inverse(D) @ layer_ks.T @ C_inv).T
    return targets @ adj_k.T  # [d_out, d_in]


def emmet_run(monkeypatch, **overrides):
    """An EMMET edit of REQUESTS on the tiny Llama without context templates (so the key the layer
    sees on the bare prompt is the solved one): the edit set, what the solver received, ``z`` and the
    block output at the subject's last token before and after."""
    from hf_knowedit.methods import emmet

    model, tok = make_tiny_model("llama")
    seen, zs = [], []
    solver, optimize_z = emmet.emmet_factors, memit.optimize_z

    def spy_solver(keys, resid, cov, weight, **kwargs):
        seen.append(dict(keys=keys.clone(), resid=resid.clone(), cov=cov.clone(), weight=weight, **kwargs))
        return solver(keys, resid, cov, weight, **kwargs)

    def spy_z(ctx, requests, layer, templates):
        zs.append((layer, optimize_z(ctx, requests, layer, templates)))
        return zs[-1][1]

    monkeypatch.setattr(emmet, "emmet_factors", spy_solver)
    monkeypatch.setattr(memit, "optimize_z", spy_z)
    es = hf_knowedit.apply_edits(
        model, tok, REQUESTS, "emmet", context_templates=0, v_num_grad_steps=5, **STATS, **overrides
    )
    z_layer, z = zs[0]
    after = memit.block_output_at_subject(model, tok, REQUESTS, z_layer)
    hf_knowedit.revert_edits(model)
    before = memit.block_output_at_subject(model, tok, REQUESTS, z_layer)
    written = 1 - (z - after).norm(dim=1) / (z - before).norm(dim=1)
    return es, seen, written


def test_emmet_defaults_are_the_reference_one_layer_and_lambda0():
    from hf_knowedit.methods.emmet import EMMETConfig
    from hf_knowedit.methods.rome import default_layer

    cfg = EMMETConfig()
    assert (cfg.band_size, cfg.mom2_update_weight, cfg.emmet_lambda, cfg.update_norm_lambda) == (1, 1.0, 0.1, 0.0)
    model, _ = make_tiny_model("llama")
    assert hf_knowedit.methods.emmet.default_layers(model, 1) == [default_layer(model)] == [1]


def test_emmet_at_its_defaults_writes_each_residual_almost_entirely(monkeypatch):
    """The edit set is the reference's update on the keys / residuals the solver got, and on the model the
    block output at the edited layer moves to ``z``: 100 % with ``emmet_lambda=0``, ≈ 99.9 % with the
    default ridge on this 96-dimensional key space (it was ≈ 92-94 % at the pre-parity λ₀)."""
    es, seen, written = emmet_run(monkeypatch)
    assert es.layers == [1] and len(seen) == 1
    s = seen[0]
    assert s["weight"] == 1.0 and s["emmet_lambda"] == 0.1
    want = reference_emmet_update(s["keys"], s["resid"], s["cov"], 1.0, 0.1)
    (delta,) = es.deltas.values()
    torch.testing.assert_close(delta.delta().double(), want, rtol=1e-4, atol=1e-6)
    # what the reference update writes for each edited key, and what the model shows
    predicted = 1 - (s["resid"].double() - s["keys"].double() @ want.T).norm(dim=1) / s["resid"].double().norm(dim=1)
    torch.testing.assert_close(written.double(), predicted, rtol=0, atol=1e-4)
    assert bool(((written > 0.998) & (written < 1)).all()), written

    _, _, exact = emmet_run(monkeypatch, emmet_lambda=0.0)
    torch.testing.assert_close(exact, torch.ones(3), rtol=0, atol=1e-4)

    _, _, old = emmet_run(monkeypatch, mom2_update_weight=None)  # the pre-parity λ₀ = 15000 d_in / 16384
    assert bool((old < 0.96).all()), old


# -----------------------------------------------------------------------------
# 5. tracing: require_correct checks the whole attribute


def greedy(model, tok, prompt, n):
    """``n`` greedily generated token ids after ``prompt`` (transformers' own ``generate``)."""
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


def attribute_for(tok, prompt, ids):
    """The text whose tokens after ``prompt + " "`` are exactly ``ids``, or None."""
    text = tok.decode(ids).strip()
    return text if tok(prompt + " " + text)["input_ids"] == tok(prompt)["input_ids"] + list(ids) else None


def test_require_correct_skips_a_fact_whose_second_token_is_wrong():
    from hf_knowedit.tracing import trace_facts

    model, tok = make_tiny_model("llama")
    prompt, subject = "Michael Jordan plays", "Michael Jordan"  # greedy: " mot" "du" on this tiny model
    first, second = greedy(model, tok, prompt, 2)
    right = attribute_for(tok, prompt, [first, second])
    wrong = next(a for x in range(3, len(tok)) if x != second for a in [attribute_for(tok, prompt, [first, x])] if a)
    single = attribute_for(tok, prompt, [first])
    assert right and wrong and single and tok.decode([first]).strip() == single
    facts = [(prompt, subject, right), (prompt, subject, wrong), (prompt, subject, single)]
    settings = dict(kinds=("mlp",), samples=2, window=2, progress=False, keep_results=True)

    summary = trace_facts(model, tok, facts, **settings)  # the whole attribute, greedily
    assert (summary.n_facts, summary.n_skipped) == (2, 1)
    # the reference's expect test: the top-1 token's text is the attribute (one-token attributes only)
    summary = trace_facts(model, tok, facts, require_correct="reference", **settings)
    assert (summary.n_facts, summary.n_skipped) == (1, 2)
    assert trace_facts(model, tok, facts, require_correct=False, **settings).n_facts == 3
    with pytest.raises(hf_knowedit.errors.TraceError, match="require_correct"):
        trace_facts(model, tok, facts, require_correct="yes", **settings)


# -----------------------------------------------------------------------------
# 6. tracing: the reference's noise


def find_token_range(tok, token_ids, substring):
    """``experiments/causal_trace.py``: the token range whose decoded text covers ``substring``."""
    toks = [tok.decode([t]) for t in token_ids]
    char_loc = "".join(toks).index(substring)
    loc, start, end = 0, None, None
    for i, t in enumerate(toks):
        loc += len(t)
        if start is None and loc > char_loc:
            start = i
        if end is None and loc >= char_loc + len(substring):
            end = i + 1
            break
    return start, end


def reference_trace(model, tok, prompt, subject, noise, samples, answer_t, states_to_patch=()):
    """``trace_with_patch``: ``samples + 1`` rows (row 0 clean), noise on rows 1.. of the subject's embeddings
    from ``numpy.random.RandomState(1)``, restored states copied from row 0; p(answer) averaged over rows 1.."""
    import numpy

    ids = tok.encode(prompt)
    b, e = find_token_range(tok, ids, subject)
    inp = torch.tensor([ids] * (samples + 1))
    prng = numpy.random.RandomState(1)
    layers = model.model.layers

    def corrupt(module, args, x):
        x[1:, b:e] += noise * torch.from_numpy(prng.randn(x.shape[0] - 1, e - b, x.shape[2]))
        return x

    def restore(t):
        def hook(module, args, out):
            h = out[0] if isinstance(out, tuple) else out
            h[1:, t] = h[0, t]
            return out

        return hook

    handles = [model.model.embed_tokens.register_forward_hook(corrupt)]
    handles += [layers[layer].register_forward_hook(restore(t)) for layer, t in states_to_patch]
    try:
        with torch.no_grad():
            logits = model(input_ids=inp).logits
    finally:
        for h in handles:
            h.remove()
    return float(torch.softmax(logits[1:, -1, :], dim=1).mean(dim=0)[answer_t]), (b, e)


def test_reference_rng_draws_the_reference_noise_and_gives_its_scores():
    import numpy

    from hf_knowedit.tracing.engine import CausalTracer

    model, tok = make_tiny_model("llama")
    prompt, subject, level, samples = "The mother tongue of Thomas Mann is", "Thomas Mann", 0.5, 3
    tracer = CausalTracer(model, tok, prompt, subject, rng="reference", noise=level, samples=samples)
    b, e = find_token_range(tok, tok.encode(prompt), subject)
    assert tracer.subject_range == (b, e)
    want = level * torch.from_numpy(numpy.random.RandomState(1).randn(samples, e - b, 32))
    assert tracer.corruption.noise.dtype == torch.float64
    assert torch.equal(tracer.corruption.noise, want)
    # the corrupted run and a restored cell, as the reference computes them
    answer = tracer.answer_ids[0]
    low, _ = reference_trace(model, tok, prompt, subject, level, samples, answer)
    assert abs(tracer.corrupted_prob - low) <= 1e-5 * low
    cell, _ = reference_trace(model, tok, prompt, subject, level, samples, answer, [(1, e - 1)])
    got = float(tracer.score([[("hidden", 1, e - 1)]])[0])
    assert abs(got - cell) <= 1e-5 * cell
    # the default generator is torch's, unchanged
    default = CausalTracer(model, tok, prompt, subject, noise=level, samples=samples)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(default.corruption.noise, torch.randn(samples, e - b, 32, generator=g) * level)


def test_reference_noise_level_is_collect_embedding_std_over_every_fact_subject():
    from hf_knowedit.tracing import TraceConfig, trace_facts
    from hf_knowedit.tracing.corruption import embedding_noise_level

    model, tok = make_tiny_model("llama")
    facts = [
        ("The mother tongue of Thomas Mann is", "Thomas Mann"),
        ("Thomas Mann was born in", "Thomas Mann"),
        ("Apple was founded by", "Apple"),
    ]

    def collect_embedding_std(subjects):  # experiments/causal_trace.py
        rows = [model.model.embed_tokens(torch.tensor([tok.encode(s)]))[0] for s in subjects]
        return torch.cat(rows).std().item()

    with torch.no_grad():
        want = 3 * collect_embedding_std([s for _, s in facts])
    plain = embedding_noise_level(model, tok, ["Thomas Mann", "Apple"])  # the default: no BOS, each subject once
    assert embedding_noise_level(model, tok, [s for _, s in facts], reference=True) == pytest.approx(want, rel=1e-6)
    summary = trace_facts(model, tok, facts, rng="reference", kinds=("mlp",), samples=2, window=2, progress=False)
    assert summary.settings["noise"] == pytest.approx(want, rel=1e-6) and summary.settings["rng"] == "reference"
    assert want != pytest.approx(plain, rel=1e-3)
    assert "rng" not in trace_facts(model, tok, facts, kinds=("mlp",), samples=2, window=2, progress=False).settings
    with pytest.raises(hf_knowedit.errors.TraceError, match="seed"):
        TraceConfig(rng="reference", seed=3)
    with pytest.raises(hf_knowedit.errors.TraceError, match="rng must be"):
        TraceConfig(rng="numpy")
    TraceConfig(rng="reference", corruption="str", seed=3)  # no noise: the seed picks the swapped subjects


# -----------------------------------------------------------------------------
# 4. from_reference: the reference's JSON, EasyEdit's YAML

ROME_GPT2_XL_JSON = """{
    "layers": [17],
    "fact_token": "subject_last",
    "v_num_grad_steps": 20,
    "v_lr": 5e-1,
    "v_loss_layer": 47,
    "v_weight_decay": 0.5,
    "clamp_norm_factor": 4,
    "kl_factor": 0.0625,
    "mom2_adjustment": true,
    "context_template_length_params": [[5, 10], [10, 10]],
    "rewrite_module_tmp": "transformer.h.{}.mlp.c_proj",
    "layer_module_tmp": "transformer.h.{}",
    "mlp_module_tmp": "transformer.h.{}.mlp",
    "attn_module_tmp": "transformer.h.{}.attn",
    "ln_f_module": "transformer.ln_f",
    "lm_head_module": "transformer.wte",
    "mom2_dataset": "wikipedia",
    "mom2_n_samples": 100000,
    "mom2_dtype": "float32"
}"""
MEMIT_GPTJ_JSON = """{
    "layers": [3, 4, 5, 6, 7, 8],
    "clamp_norm_factor": 0.75,
    "layer_selection": "all",
    "fact_token": "subject_last",
    "v_num_grad_steps": 25,
    "v_lr": 5e-1,
    "v_loss_layer": 27,
    "v_weight_decay": 0.5,
    "kl_factor": 0.0625,
    "mom2_adjustment": true,
    "mom2_update_weight": 15000,
    "rewrite_module_tmp": "transformer.h.{}.mlp.fc_out",
    "layer_module_tmp": "transformer.h.{}",
    "mlp_module_tmp": "transformer.h.{}.mlp",
    "attn_module_tmp": "transformer.h.{}.attn",
    "ln_f_module": "transformer.ln_f",
    "lm_head_module": "lm_head",
    "mom2_dataset": "wikipedia",
    "mom2_n_samples": 100000,
    "mom2_dtype": "float32"
}"""
EMMET_GPT2_XL_JSON = """{
    "layers": [17], "clamp_norm_factor": 0.75, "layer_selection": "all", "fact_token": "subject_last",
    "v_num_grad_steps": 20, "v_lr": 5e-1, "v_loss_layer": 47, "v_weight_decay": 0.5, "kl_factor": 0.0625,
    "mom2_adjustment": true, "mom2_update_weight": 1000, "rewrite_module_tmp": "transformer.h.{}.mlp.c_proj",
    "mom2_dataset": "wikipedia", "mom2_n_samples": 100000, "mom2_dtype": "float32",
    "calculate_objective_value": false, "update_norm_lambda": 0, "emmet_lambda": 0.1,
    "prob_cutoff": 0, "norm_control": 0
}"""
EASYEDIT_ROME_LLAMA_YAML = """alg_name: "ROME"
model_name: "./hugging_cache/llama-2-7b"
stats_dir: "./data/stats"
device: 1
layers: [5]
fact_token: "subject_last"
v_num_grad_steps: 25
v_lr: 5e-1
v_loss_layer: 31
v_weight_decay: 1e-3
clamp_norm_factor: 4
kl_factor: 0.0625
mom2_adjustment: false
context_template_length_params: [[5, 10], [10, 10]]
rewrite_module_tmp: "model.layers.{}.mlp.down_proj"
layer_module_tmp: "model.layers.{}"
mlp_module_tmp: "model.layers.{}.mlp"
attn_module_tmp: "model.layers.{}.self_attn"
ln_f_module: "model.norm"
lm_head_module: "lm_head"
mom2_dataset: "wikipedia"
mom2_n_samples: 100000
mom2_dtype: "float32"
"""
EASYEDIT_ALPHAEDIT_YAML = """alg_name: "AlphaEdit"
model_name: "./hugging_cache/llama-3-8b"
P_loc: "./null_space_project.pt"
device: 0
layers: [4, 5, 6, 7, 8]
clamp_norm_factor: 0.75
layer_selection: "all"
fact_token: "subject_last"
v_num_grad_steps: 25
v_lr: 1e-1
v_loss_layer: 31
v_weight_decay: 0.5
kl_factor: 0.0625
mom2_adjustment: true
mom2_update_weight: 15000
mom2_dataset: "wikipedia"
mom2_n_samples: 100000
mom2_dtype: "float32"
nullspace_threshold: 2e-2
L2: 10
"""
MODULE_PATHS = {"rewrite_module_tmp", "layer_module_tmp", "mlp_module_tmp", "attn_module_tmp", "ln_f_module"}


def test_from_reference_reads_the_reference_rome_and_memit_json(tmp_path):
    from hf_knowedit.methods import ReferenceConfig

    path = tmp_path / "gpt2-xl.json"
    path.write_text(ROME_GPT2_XL_JSON)
    ref = ROMEConfig.from_reference(path)
    assert isinstance(ref, ReferenceConfig) and ref.layers == [17] and ref.source == str(path)
    c = ref.config
    assert (c.v_num_grad_steps, c.v_lr, c.v_weight_decay, c.clamp_norm_factor, c.kl_factor) == (20, 0.5, 0.5, 4, 0.0625)
    assert (c.mom2, c.mom2_dtype, c.context_templates) == ("corpus", "float32", "reference")
    assert c.context_template_length_params == [[5, 10], [10, 10]]
    assert MODULE_PATHS | {"lm_head_module", "mom2_n_samples", "mom2_dataset", "v_loss_layer"} <= set(ref.ignored)
    assert {"v_lr", "mom2_adjustment", "layers", "fact_token", "context_template_length_params"} <= set(ref.mapped)
    assert "original_implementation=True" in ref.ignored["(original_implementation)"]
    assert "| `v_lr` | `v_lr` = 0.5 |" in ref.table()
    # the same file as text and as a dict; overrides apply last
    assert ROMEConfig.from_reference(ROME_GPT2_XL_JSON).config == c
    assert ROMEConfig.from_reference(json.loads(ROME_GPT2_XL_JSON), v_lr=0.1).config.v_lr == 0.1

    ref = MEMITConfig.from_reference(MEMIT_GPTJ_JSON)
    assert ref.layers == [3, 4, 5, 6, 7, 8]
    c = ref.config
    assert (c.mom2_update_weight, c.clamp_norm_factor, c.v_num_grad_steps, c.context_templates) == (
        15000,
        0.75,
        25,
        "reference",
    )
    assert ref.mapped["layer_selection"].startswith("every given layer")
    # a field this method does not use
    assert "no counterpart" in ROMEConfig.from_reference(MEMIT_GPTJ_JSON).ignored["mom2_update_weight"]


def test_from_reference_reads_emmet_json_and_easyedit_yaml(tmp_path):
    from hf_knowedit.methods.alphaedit import AlphaEditConfig
    from hf_knowedit.methods.emmet import EMMETConfig

    ref = EMMETConfig.from_reference(EMMET_GPT2_XL_JSON)
    c = ref.config
    assert (c.mom2_update_weight, c.emmet_lambda, c.update_norm_lambda, ref.layers) == (1000, 0.1, 0, [17])
    assert {"calculate_objective_value", "prob_cutoff", "norm_control"} <= set(ref.ignored)

    pytest.importorskip("yaml")
    path = tmp_path / "llama-7b.yaml"
    path.write_text(EASYEDIT_ROME_LLAMA_YAML)
    ref = ROMEConfig.from_reference(path)
    c = ref.config
    # YAML 1.1 reads 5e-1 and 1e-3 as strings: they come back as numbers
    assert (c.v_lr, c.v_weight_decay, c.v_num_grad_steps, c.mom2, ref.layers) == (0.5, 1e-3, 25, "identity", [5])
    assert {"alg_name", "model_name", "stats_dir", "device"} <= set(ref.ignored)
    assert ROMEConfig.from_reference(EASYEDIT_ROME_LLAMA_YAML).config == c

    ref = AlphaEditConfig.from_reference(EASYEDIT_ALPHAEDIT_YAML)
    c = ref.config
    assert (c.nullspace_threshold, c.l2, c.v_lr, ref.layers) == (0.02, 10, 0.1, [4, 5, 6, 7, 8])
    assert ref.mapped["L2"] == "`l2` = 10" and "no counterpart" in ref.ignored["mom2_update_weight"]
    assert "P_loc" in ref.ignored


def test_from_reference_refuses_bad_files(tmp_path):
    with pytest.raises(InvalidConfigError, match=r"ROMEConfig.from_reference.*ROMEConfig.v_lr must be"):
        ROMEConfig.from_reference({"v_lr": -1})
    with pytest.raises(InvalidConfigError, match="no file"):
        ROMEConfig.from_reference(tmp_path / "missing.json")
    with pytest.raises(InvalidConfigError, match="not a mapping"):
        ROMEConfig.from_reference("[1, 2]\n")
    with pytest.raises(InvalidConfigError, match="layers"):
        ROMEConfig.from_reference({"layers": ["5"]})
    with pytest.raises(InvalidConfigError, match="takes a path"):
        ROMEConfig.from_reference(5)
    ref = ROMEConfig.from_reference({"fact_token": "last", "layer_selection": "random", "stepz": 1})
    assert {"fact_token", "layer_selection", "stepz"} <= set(ref.ignored)


def test_a_reference_config_edits_a_model():
    model, tok = make_tiny_model("llama")
    ref = MEMITConfig.from_reference(MEMIT_GPTJ_JSON, mom2="identity", v_num_grad_steps=2)
    es = hf_knowedit.apply_edits(model, tok, REQUESTS[:1], "memit", config=ref.config, layers=[1, 2])
    assert es.config["mom2_update_weight"] == 15000 and es.config["context_templates"] == "reference"
    hf_knowedit.revert_edits(model)


# -----------------------------------------------------------------------------
# 7. MEMIT: the per-layer update loop and z's early stop

#: REQUESTS and three more, the subject last in each prompt
MEMIT_REQUESTS = [
    *REQUESTS,
    EditRequest("The author of this book is {}", "William Shakespeare", "Picasso", "Shakespeare"),
    EditRequest("The company that developed Windows is {}", "Microsoft", "Google", "Microsoft"),
    EditRequest("The river that flows through Brazil is the {}", "Amazon River", "Nile", "Amazon"),
]


def reference_block_output(model, tok, text, layer):
    """The output of block ``layer`` at the last token of ``text`` (a plain forward with a hook)."""
    seen = {}

    def hook(module, args, output):
        seen["h"] = (output[0] if isinstance(output, tuple) else output).detach()

    handle = model.model.layers[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(**tok(text, return_tensors="pt"))
    finally:
        handle.remove()
    return seen["h"][0, -1]


def reference_execute_memit(model, tok, requests, layers, zs, covs, mom2_update_weight, context_templates, solve_dtype):
    """``memit/memit_main.py`` ``execute_memit`` after the ``z`` (``zs``: ``[d_model, n]`` float32, columns are
    requests). For each layer in ascending order, on the model edited so far: ``layer_ks = compute_ks(...).T``
    (float32), ``cur_zs`` the block output of the last layer at the subject's last token,
    ``targets = zs - cur_zs`` (float32); in ``solve_dtype`` (the reference's: float64)
    ``adj_k = solve(λ C + K Kᵀ, K)``, ``resid = targets / (len(layers) - i)``, ``upd = resid @ adj_kᵀ``; the
    weight becomes ``original + upd.float()`` in place. The weights are restored at the end; returns each
    layer's ``upd`` (``[d_out, d_in]``, float64)."""
    weights = {layer: model.model.layers[layer].mlp.down_proj.weight for layer in layers}
    originals = {layer: w.detach().clone() for layer, w in weights.items()}
    deltas = {}
    try:
        for i, layer in enumerate(layers):
            layer_ks = reference_compute_ks(model, tok, requests, layer, context_templates, torch.float32).T
            cur_zs = torch.stack([reference_block_output(model, tok, r.text, layers[-1]) for r in requests], 1)
            targets = zs - cur_zs
            layer_ks, targets = layer_ks.to(solve_dtype), targets.to(solve_dtype)
            adj_k = torch.linalg.solve(
                mom2_update_weight * covs[layer].to(solve_dtype) + layer_ks @ layer_ks.T, layer_ks
            )
            resid = targets / (len(layers) - i)
            upd_matrix = resid @ adj_k.T
            with torch.no_grad():
                weights[layer][...] = originals[layer] + upd_matrix.float()
            deltas[layer] = upd_matrix.double()
    finally:
        with torch.no_grad():
            for layer, w in weights.items():
                w[...] = originals[layer]
    return deltas


@pytest.mark.parametrize("through_cholesky", [True, False])
def test_memit_layer_updates_are_the_reference_loop_given_the_same_z_and_c(through_cholesky, monkeypatch):
    """MEMIT's ``ΔW`` per layer equals ``execute_memit``'s (transcribed above) for the same ``z``, ``C`` and
    λ, to float32 rounding: keys recomputed on the model edited so far, residual ``z − h`` shared by the
    layers left, solve in float64. Both of the library's solves: through ``C``'s cached Cholesky factor
    (Woodbury) and with ``λC + KKᵀ`` formed.

    ``z`` is ``h + ½‖h‖ u`` (``u`` a fixed random direction): with ``z`` close to ``h`` the residual
    ``z − h`` divides the forward's rounding of ``h`` by ``‖z − h‖ / ‖h‖`` (the optimised ``z`` of this model
    is 3.5 % away: 2e-6), which would hide a float32 step. C from 150 tokens (condition ≈ 2.6e3) and λ = 1
    (``λC + KKᵀ``: ≈ 2.8e4) make one visible. Measured: 2.8-6.9e-7 here; the library's solve in float32:
    3.5-4.1e-6 through the factor, 0.8-1.1e-4 formed (the reference's in float32: 0.9-1.4e-4); without the
    division by the layers left, or keys and residual not recomputed after each layer: 60-200 %."""
    model, tok = make_tiny_model("llama")
    layers, requests, mom2_update_weight = [0, 1, 2], MEMIT_REQUESTS, 1.0
    h = memit.block_output_at_subject(model, tok, requests, layers[-1])
    u = torch.randn(h.shape, generator=torch.Generator().manual_seed(0))
    z = h + 0.5 * h.norm(dim=1, keepdim=True) * u / u.norm(dim=1, keepdim=True)
    seen, solver = {}, memit.memit_factors

    def spy(keys, resid, cov, weight, **kwargs):
        assert (kwargs["cov_solve"] is not None) == through_cholesky
        seen[len(seen)] = (cov.clone(), weight)
        return solver(keys, resid, cov, weight, **kwargs)

    monkeypatch.setattr(memit, "memit_factors", spy)
    monkeypatch.setattr(memit, "optimize_z", lambda *args: z.clone())
    if not through_cholesky:
        monkeypatch.setattr(memit, "cached_inverse", lambda moment: None)
    es = hf_knowedit.apply_edits(
        model, tok, requests, "memit", layers=layers, merge=False, context_templates=PREFIXES,
        mom2_update_weight=mom2_update_weight, **dict(STATS, mom2_n_tokens=150),  # C's condition ≈ 2.6e3
    )  # fmt: skip
    got = {layer: d.delta().double() for layer, d in zip(layers, es.deltas.values())}
    hf_knowedit.revert_edits(model)
    covs = {layer: seen[i][0] for i, layer in enumerate(layers)}
    assert all(seen[i][1] == mom2_update_weight for i in seen)
    args = (model, tok, requests, layers, z.T.float(), covs, mom2_update_weight, [["{}"], PREFIXES])
    want = reference_execute_memit(*args, solve_dtype=torch.float64)
    float32_solve = reference_execute_memit(*args, solve_dtype=torch.float32)

    def gap(a, b):
        return [float((a[layer] - b[layer]).norm() / b[layer].norm()) for layer in layers]

    assert max(gap(got, want)) < 1.5e-6, gap(got, want)
    assert min(gap(float32_solve, want)) > 1e-5, gap(float32_solve, want)  # the tolerance sees a float32 solve


def test_z_stops_at_the_first_pass_below_early_stop_as_compute_z():
    """``compute_z``: each pass computes the loss, stops if ``loss < early_stop`` (strictly), else takes an Adam
    step unless it is the last of ``v_num_grad_steps`` passes. So a run stops after as many steps as passes
    came before the first loss below the threshold, with the ``z`` of an unstopped run of that many steps."""
    from hf_knowedit.methods.targets import optimize_targets

    model, tok = make_tiny_model("llama")
    n_passes = 8
    kw = dict(site="residual", templates=["{}", *PREFIXES[:2]], v_weight_decay=0.0, clamp_norm_factor=1e4)
    trace = []
    free = optimize_targets(
        model, tok, REQUESTS[:1], 2, v_num_grad_steps=n_passes, early_stop=0.0,
        progress=lambda it, losses: trace.append(float(losses[0])), **kw,
    )  # fmt: skip
    assert free.steps_taken == [n_passes - 1] and len(trace) == n_passes
    assert len(set(trace)) == n_passes  # every threshold below picks a different pass
    for threshold in [*trace, max(trace) * 2]:
        steps = next((it for it, loss in enumerate(trace) if loss < threshold), n_passes - 1)
        run = optimize_targets(model, tok, REQUESTS[:1], 2, v_num_grad_steps=n_passes, early_stop=threshold, **kw)
        assert run.steps_taken == [steps], (threshold, trace)
        assert run.losses == [trace[steps]]
        unstopped = optimize_targets(model, tok, REQUESTS[:1], 2, v_num_grad_steps=steps + 1, early_stop=0.0, **kw)
        assert torch.equal(run.targets, unstopped.targets)
