"""``benchmarks/bench_gpu.py --vllm``: where it cannot run it says why and writes nothing; its transformers
side generates greedily."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_gpu  # noqa: E402
from tests.tiny_models import make_tiny_model  # noqa: E402

ARGS = argparse.Namespace(vllm_edits=2, vllm_tokens=4)


def test_vllm_case_says_why_it_was_not_run(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench_gpu.vllm_case(ARGS, tmp_path, tmp_path) == {
        "case": "vllm",
        "not run": "no GPU (torch.cuda.is_available() is False)",
    }
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "vllm" else object())
    assert bench_gpu.vllm_case(ARGS, tmp_path, tmp_path)["not run"] == "the vllm package is not installed"
    assert list(tmp_path.iterdir()) == []


def test_vllm_flag_exits_cleanly_and_writes_no_table_without_a_gpu(tmp_path):
    out = tmp_path / "vllm.md"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--vllm", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},  # no GPU, even on a machine that has one
    )
    assert proc.returncode == 0, proc.stderr
    assert "not run: no GPU" in proc.stderr and not out.exists()


def test_hf_continuations_are_the_greedy_tokens_after_the_prompt():
    model, tok = make_tiny_model("llama")
    prompts = ["The Eiffel Tower is in", "Paris is the capital of"]
    got = bench_gpu._hf_continuations(model, tok, prompts, 3)
    for prompt, text in zip(prompts, got):
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=3, do_sample=False, min_new_tokens=3)
        want = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        assert text == " ".join(want.split())
