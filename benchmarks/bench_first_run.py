"""A new user's first edit: how fast the default statistics corpus is sampled, whether it gives the same
second moment ``C`` as before, and how long the README's first edit takes on an empty statistics cache.

Three measurements on the bundled SmolLM2-135M-Instruct (float32), each against a baseline in the same run:

1. **Sampling speed.** The library's sampler (:func:`~hf_knowedit.methods.statistics.sampled_corpus`: one
   seeded generator per text, batches of whole 48-text blocks up to a 1 GiB KV cache) against (a) a plain
   forward over the same tokens (full model, no cache, same rows: the target is a ratio ≥ 0.5) and (b) the
   previous sampler (one global seed, batches of 64 texts).
2. **Same C within noise.** ``C`` at the default ROME layer from ``--c-tokens`` tokens of the new sampler
   (seeds 0 and 1) and of the previous sampler (seed 0): the relative Frobenius distance between samplers is
   compared with the distance between two seeds of the same sampler (the noise).
3. **The README's first edit**, in a fresh process with empty statistics and corpus caches (the converted
   model is reused): the Python snippet with library defaults, and ``hf-knowedit edit`` with its defaults.
   Target: under 3 minutes each on a 2-core CPU.

Run it alone: timings under load mean nothing (the load average is printed with the table).

    python benchmarks/bench_first_run.py --out docs/results/first_run.md
    python benchmarks/bench_first_run.py --texts 48 --c-tokens 4000 --no-first-edit   # quick look
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchlib import ROOT, machine_info, rows_table, write_markdown

README_EDIT = (
    "import hf_knowedit\n"
    "model, tokenizer = hf_knowedit.load_smollm2()\n"
    "hf_knowedit.attach(model, tokenizer)\n"
    "edit = model.apply_edits({'prompt': '{} is located in', 'subject': 'Angola', 'target_new': 'Antarctica'})\n"
)
CLI_EDIT = [
    "-m",
    "hf_knowedit",
    "edit",
    "--prompt",
    "{} is located in",
    "--subject",
    "Angola",
    "--target",
    "Antarctica",
]


def plain_forward_rate(model: Any, tok: Any, texts: list[str], batch_rows: int) -> float:
    """Tokens/s of full forwards (no cache) over ``texts``, ``batch_rows`` rows at a time, right-padded."""
    from hf_knowedit.architectures import model_device
    from hf_knowedit.tokens import pad_batch

    rows = [tok(t)["input_ids"] for t in texts]
    done, t0 = 0, time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(rows), batch_rows):
            ids, mask, _, _ = pad_batch(rows[i : i + batch_rows], 0, "right", model_device(model))
            model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
            done += int(mask.sum())
    return done / (time.perf_counter() - t0)


def previous_sampler(model: Any, tok: Any, n_texts: int, seed: int, length: int) -> list[str]:
    """The sampler before row seeds: one global seed, every start ``ceil(n / 12)`` times, batches of 64."""
    from hf_knowedit.generation import generate_texts
    from hf_knowedit.methods.statistics import SAMPLED_STARTS

    per_start = math.ceil(n_texts / len(SAMPLED_STARTS))
    return generate_texts(model, tok, SAMPLED_STARTS, max_new_tokens=length, seed=seed, per_prompt=per_start, top_k=50)[
        :n_texts
    ]


def second_moment(model: Any, tok: Any, texts: list[str], layer: int, n_tokens: int) -> torch.Tensor:
    from hf_knowedit.methods.statistics import compute_second_moment

    return compute_second_moment(model, tok, layer, corpus=texts, n_tokens=n_tokens, cache=False).matrix.double()


def timed_process(args: list[str], env: dict[str, str]) -> tuple[float, int]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-3000:])
    return time.perf_counter() - t0, proc.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=96, help="texts sampled for the speed row (whole blocks)")
    parser.add_argument("--c-tokens", type=int, default=20_000, help="tokens per second moment compared")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-first-edit", action="store_true", help="skip the fresh-process first edits")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    machine = machine_info(args.threads)
    t_start = time.perf_counter()

    from hf_knowedit._bundled import load_smollm2
    from hf_knowedit.methods.rome import default_layer
    from hf_knowedit.methods.statistics import SAMPLED_LENGTH, sampled_corpus
    from hf_knowedit.stack import forget_state

    model, tok = load_smollm2()
    length = SAMPLED_LENGTH
    rows = []

    # 1. sampling speed, against a plain forward over the same tokens and against the previous sampler
    t0 = time.perf_counter()
    texts = sampled_corpus(model, tok, args.texts * length / 1.1, length=length)
    sample_s = time.perf_counter() - t0
    generated = len(texts) * length
    forward = plain_forward_rate(model, tok, texts, 48)
    t0 = time.perf_counter()
    previous_sampler(model, tok, len(texts), 0, length)
    previous_s = time.perf_counter() - t0
    rows.append(
        {
            "measure": f"sampling {len(texts)} texts x {length} tokens",
            "row-seeded sampler tok/s": f"{generated / sample_s:,.0f}",
            "previous sampler tok/s": f"{generated / previous_s:,.0f}",
            "plain forward tok/s": f"{forward:,.0f}",
            "sampler / forward": f"{generated / sample_s / forward:.2f}",
            "sampler / previous": f"{previous_s / sample_s:.2f}",
        }
    )

    sys.stdout.write(rows_table(rows) + "\n\n")
    sys.stdout.flush()

    # 2. the same C within noise
    layer = default_layer(model)
    n_texts = math.ceil(1.1 * args.c_tokens / length)
    forget_state(model)
    new0 = sampled_corpus(model, tok, args.c_tokens, seed=0, length=length)
    new1 = sampled_corpus(model, tok, args.c_tokens, seed=1, length=length)
    old0 = previous_sampler(model, tok, n_texts, 0, length)
    c_new0, c_new1, c_old0 = (second_moment(model, tok, t, layer, args.c_tokens) for t in (new0, new1, old0))

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / a.norm())

    c_rows = [
        {
            "measure": f"C at layer {layer}, {args.c_tokens} tokens",
            "pair": "row-seeded seed 0 vs seed 1 (noise)",
            "relative Frobenius distance": f"{rel(c_new0, c_new1):.4f}",
        },
        {
            "measure": "",
            "pair": "row-seeded seed 0 vs previous seed 0",
            "relative Frobenius distance": f"{rel(c_new0, c_old0):.4f}",
        },
    ]

    sys.stdout.write(rows_table(c_rows) + "\n\n")
    sys.stdout.flush()

    # 3. the README's first edit on empty statistics/corpus caches, Python and CLI
    edit_rows = []
    if not args.no_first_edit:
        for what, argv in (("Python (README snippet)", ["-c", README_EDIT]), ("CLI (hf-knowedit edit)", CLI_EDIT)):
            with tempfile.TemporaryDirectory() as stats:
                env = dict(os.environ, HF_KNOWEDIT_STATS_CACHE=stats, HF_HUB_OFFLINE="1")
                env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
                seconds, code = timed_process(argv, env)
            edit_rows.append({"first edit": what, "wall s": f"{seconds:.0f}", "exit": code, "target": "< 180 s"})
            sys.stdout.write(f"{what}: {seconds:.0f} s, exit {code}\n")
            sys.stdout.flush()

    table = rows_table(rows) + "\n\n" + rows_table(c_rows)
    if edit_rows:
        table += "\n\n" + rows_table(edit_rows)
    wall = time.perf_counter() - t_start
    if args.out:
        write_markdown(args.out, "First run: the default statistics corpus and the first edit", table, machine, wall)


if __name__ == "__main__":
    main()
