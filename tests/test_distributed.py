"""Statistics and evaluation over two processes (``accelerate launch --multi_gpu --num_processes 2`` on a
machine without GPUs: gloo).

The launched script computes a second moment (corpus split across the processes, sums all-reduced,
one process writes the cache entry) and a sharded ``evaluate``; this test then computes both in one
process and compares: the same cache entry (same key, same file name), equal matrices within float
tolerance, identical per-record metrics and aggregates.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_knowedit
from hf_knowedit.methods.statistics import compute_second_moment
from hf_knowedit.moments import StatsCache
from tests.test_evaluation import cf_records
from tests.test_stats import CORPUS
from tests.tiny_models import make_tiny_model

logger = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
EVAL = dict(method="rome", fluency=False, progress=False, layers=[2])
CONFIG = dict(mom2="identity", context_templates=0, v_num_grad_steps=3)

SCRIPT = """
import json, sys, torch
torch.set_num_threads(1)
from hf_knowedit.methods.statistics import compute_second_moment, process_group
from hf_knowedit.evaluation.distributed import evaluate_sharded
from hf_knowedit.moments import StatsCache
from tests.test_distributed import CONFIG, EVAL
from tests.test_evaluation import cf_records
from tests.test_stats import CORPUS
from tests.tiny_models import make_tiny_model

out = sys.argv[1]
model, tok = make_tiny_model("llama")
cache = StatsCache(out + "/stats")
sm = compute_second_moment(model, tok, 1, corpus=CORPUS, n_tokens=300, cache=cache, batch_tokens=64)
rank, world = process_group()
res = evaluate_sharded(model, tok, cf_records(), config=dict(CONFIG), **EVAL)
torch.save({"matrix": sm.matrix, "n": sm.n_tokens, "key": sm.key.filename(), "world": world}, f"{out}/stats{rank}.pt")
with open(f"{out}/eval{rank}.json", "w") as f:
    json.dump({"pre": res.pre, "post": res.post, "records": res.records, "n": res.n_records}, f)
"""


@pytest.mark.slow  # two interpreters importing torch and transformers: ~40 s on two busy cores
def test_two_processes_write_the_single_process_cache_entry_and_gather_identical_evaluations(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_KNOWEDIT_STATS_CACHE=str(tmp_path / "x"))
    # `--multi_gpu` is accelerate's multi-process launcher (torchrun); without a GPU it runs on gloo (`--cpu`
    # alone starts a single process)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(tmp_path)]
    done = subprocess.run(launch, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]

    model, tok = make_tiny_model("llama")
    one = compute_second_moment(model, tok, 1, corpus=CORPUS, n_tokens=300, cache=False, batch_tokens=64)
    files = list((tmp_path / "stats").glob("*.safetensors"))
    assert [f.name for f in files] == [StatsCache(tmp_path / "stats").path(one.key).name]  # the same entry
    for rank in (0, 1):
        got = torch.load(tmp_path / f"stats{rank}.pt")
        assert got["world"] == 2 and got["n"] == one.n_tokens == 300 and got["key"] == one.key.filename()
        assert torch.allclose(got["matrix"], one.matrix, rtol=1e-5, atol=1e-7)
        gap = float((got["matrix"].double() - one.matrix.double()).abs().max() / one.matrix.double().abs().max())
        logger.warning("rank %d: C from 2 processes vs 1, max |difference| / max |C| = %.2e", rank, gap)
        assert not torch.equal(got["matrix"], torch.zeros_like(one.matrix))
    disk = StatsCache(tmp_path / "stats").get(one.key)
    assert torch.allclose(disk.matrix, one.matrix, rtol=1e-5, atol=1e-7)

    want = hf_knowedit.evaluate(model, tok, cf_records(), config=dict(CONFIG), **EVAL)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"eval{rank}.json").read_text())
        assert got["n"] == want.n_records == len(cf_records())
        assert [r["index"] for r in got["records"]] == [r["index"] for r in want.records]
        for part in ("pre", "post"):
            assert getattr(want, part).keys() == got[part].keys()
            for k, v in getattr(want, part).items():
                assert got[part][k] == pytest.approx(v, abs=1e-6), (part, k)
            for a, b in zip(got["records"], want.records):
                for k, v in b[part].items():
                    assert a[part][k] == pytest.approx(v, abs=1e-6), (part, k)
