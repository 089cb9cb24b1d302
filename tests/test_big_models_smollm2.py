"""Big-model settings on the real bundled model: half its layers offloaded to disk, and bfloat16."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from accelerate import dispatch_model

import hf_knowedit
from hf_knowedit import ROMEConfig
from hf_knowedit._bundled import load_smollm2
from tests.test_rome_smollm2 import scores
from tests.tiny_models import assert_same, weights

logger = logging.getLogger(__name__)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread", "stats_cache")
def test_rome_at_a_disk_offloaded_layer_gives_the_undispatched_update(smollm2, data_path, stats_corpus, tmp_path):
    model, tok = smollm2
    record = json.loads((data_path / "counterfact_500.json").read_text())[0]
    n = model.config.num_hidden_layers
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{i}": "cpu" if i < n // 2 else "disk" for i in range(n)})
    fresh, _ = load_smollm2()  # not a deepcopy: the session model carries hf_knowedit state (locks) once edited
    disp = dispatch_model(fresh, device_map=device_map, offload_dir=str(tmp_path / "offload"))
    layer = n // 2 + 2  # offloaded
    assert disp.model.layers[layer].mlp.down_proj.weight.device.type == "meta"
    config = ROMEConfig(mom2_corpus=stats_corpus, mom2_n_tokens=5_000, context_templates=0)
    want = hf_knowedit.apply_edits(model, tok, record, "rome", config=config, layers=[layer])
    hf_knowedit.revert_edits(model)
    got = hf_knowedit.apply_edits(disp, tok, record, "rome", config=config, layers=[layer])
    path = next(iter(want.deltas))
    a, b = got.deltas[path].delta(), want.deltas[path].delta()
    logger.warning(
        "SmolLM2 ROME at offloaded layer %d: relative difference %.2e", layer, float((a - b).norm() / b.norm())
    )
    assert torch.allclose(a, b, rtol=1e-3, atol=1e-5 * float(b.abs().max()))
    assert scores(disp, tok, record)["ES"]


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread", "stats_cache")
def test_bf16_rome_on_ten_counterfact_records(smollm2, data_path, stats_corpus):
    model, tok = load_smollm2(dtype=torch.bfloat16)
    cases = json.loads((data_path / "counterfact_500.json").read_text())[:10]
    config = ROMEConfig(mom2_corpus=stats_corpus, mom2_n_tokens=5_000, context_templates=2)
    base = weights(model)
    before, after = [], []
    for record in cases:
        before.append(scores(model, tok, record))
        es = hf_knowedit.apply_edits(model, tok, record, "rome", config=config)
        assert all(d.A.dtype == torch.float32 for d in es.deltas.values())
        after.append(scores(model, tok, record))
        hf_knowedit.revert_edits(model)
    assert_same(weights(model), base)  # revert bit-exact in bf16
    mean = {k: (100 * sum(s[k] for s in before) / 10, 100 * sum(s[k] for s in after) / 10) for k in ("ES", "PS", "NS")}
    logger.warning("SmolLM2 bf16 ROME, 10 records (unedited -> edited): %s", mean)
    assert mean["ES"][1] >= 90
    assert mean["PS"][1] > mean["PS"][0]
    assert mean["NS"][1] >= mean["NS"][0] - 10
