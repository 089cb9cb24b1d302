"""hf_knowedit demo on the bundled real model (SmolLM2-135M-Instruct, offline).

    python examples/demo.py [--data ../shared/data] [--out out/demo]

Takes one CounterFact record (the first of counterfact_500.json's records 0-99 that the model
predicts correctly, or a built-in fact when no data path is given) and shows: the architecture
entry, the subject's token span, the model's top-5 next tokens; a causal trace of the fact
(heatmap PNG); a ROME edit, its new prediction, the fact asked as a question through the chat
template before and after, revert and the old prediction; the edit saved as a
PEFT-compatible adapter, reloaded into a fresh model, and its model card; a MEMIT batch of 10
facts (``--batch``) and their efficacy.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import torch

import hf_knowedit
from hf_knowedit._bundled import load_smollm2
from hf_knowedit.evaluation.chat import ask
from hf_knowedit.evaluation.datasets import readable_prompt
from hf_knowedit.relations import question_table
from hf_knowedit.tokens import subject_token_span

N_TOKENS = 5_000  # tokens of statistics corpus (a demo: small, so the first run is quick on a CPU)

FALLBACK = {
    "case_id": "builtin",
    "requested_rewrite": {
        "prompt": "{} is located in the city of",
        "subject": "The Eiffel Tower",
        "target_new": {"str": "Rome"},
        "target_true": {"str": "Paris"},
        "relation_id": "P276",
    },
    "paraphrase_prompts": ["The Eiffel Tower, a landmark, stands in the city of"],
    "neighborhood_prompts": ["The Louvre is located in the city of"],
}


def load_record(model, tok, data: str | None, index: int | None) -> dict:
    """Record ``index`` of counterfact_500.json; by default the first of records 0-99 whose true object is
    the model's top-1 next token (a fact the model knows, so the causal trace has something to find)."""
    if not data:
        return FALLBACK
    records = json.loads((Path(data) / "counterfact_500.json").read_text())
    if index is not None:
        return records[index]
    for record in records[:100]:
        rw = record["requested_rewrite"]
        first = tok(" " + rw["target_true"]["str"])["input_ids"][0]
        if top_k(model, tok, rw["prompt"].format(rw["subject"]), 1)[0][0] == tok.decode(first):
            return record
    return records[0]


def stats_options(data: str | None) -> dict:
    """Second-moment statistics corpus for the demo. With data: the attribute and generation prompts of
    CounterFact records 100-499 (records the demo does not edit). Without: the library's offline default,
    text sampled from the model itself (slow on a CPU the first time, then cached on disk)."""
    if not data:
        return {"mom2_n_tokens": N_TOKENS}
    records = json.loads((Path(data) / "counterfact_500.json").read_text())[100:]
    corpus = [p for r in records for p in r["attribute_prompts"] + r["generation_prompts"]]
    return {"mom2_corpus": corpus, "mom2_n_tokens": N_TOKENS}


def top_k(model, tok, prompt: str, k: int = 5) -> list[tuple[str, float]]:
    ids = tok(prompt, return_tensors="pt").to(model.device)
    with torch.no_grad():
        probs = model(**ids).logits[0, -1].float().softmax(-1)
    p, i = probs.topk(k)
    return [(tok.decode(int(t)), float(q)) for t, q in zip(i, p)]


def show_top(title: str, rows: list[tuple[str, float]]) -> None:
    print(f"  {title}: " + ", ".join(f"{t!r} {p:.3f}" for t, p in rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("HF_KNOWEDIT_DATA"), help="folder with counterfact_500.json")
    ap.add_argument(
        "--record",
        type=int,
        default=None,
        help="index of the CounterFact record (default: the first of 0-99 the model gets right)",
    )
    ap.add_argument("--out", default="out/demo", help="where to write plots and adapters")
    ap.add_argument("--batch", type=int, default=10, help="facts in the MEMIT batch (needs --data)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    model, tok = load_smollm2()
    model = hf_knowedit.attach(model, tok)
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"Loaded {model.name_or_path} ({model.config.model_type}, {n_params:.0f}M "
        f"params, {model.dtype}) in {time.time() - t0:.1f}s"
    )

    record = load_record(model, tok, args.data, args.record)
    rw = record["requested_rewrite"]
    prompt = rw["prompt"].format(rw["subject"])
    print(
        f"\nFact (case {record.get('case_id')}): {prompt!r} -> true {rw['target_true']['str']!r}, "
        f"new {rw['target_new']['str']!r}" + ("" if args.data else "  [built-in fact: no --data given]")
    )

    print("\n1. Architecture entry")
    spec = hf_knowedit.get_architecture(model)
    for key, value in vars(spec).items():
        print(f"  {key:15s} {value}")

    print("\n2. Subject tokens")
    start, end = subject_token_span(tok, prompt, rw["subject"])
    ids = tok(prompt)["input_ids"]
    print(f"  span [{start}, {end}) of {len(ids)} tokens: {[tok.decode(i) for i in ids[start:end]]}")

    print("\n3. Next-token prediction")
    show_top("top-5", top_k(model, tok, prompt))

    print("\n4. Causal trace: where does the model recall it?")
    trace = model.trace_fact(prompt, rw["subject"], target=rw["target_true"]["str"], samples=5)
    trace.plot(out / "trace.png")
    mlp = trace.scores["mlp"][end - 1]
    print(
        f"  answer {trace.answer!r}: clean p={trace.clean_prob:.3f}, corrupted p={trace.corrupted_prob:.3f}; "
        f"MLP effect at the last subject token peaks at layer {int(mlp.argmax())}"
    )
    print(f"  heatmaps written to {out / 'trace.png'}")

    print("\n5. ROME edit")
    edit = model.apply_edits(record, method="rome", **stats_options(args.data))
    print(f"  {edit!r}")
    show_top("edited  ", top_k(model, tok, prompt))
    # scored whole; shown from the sentence that names the subject (CounterFact prefixes noise), the
    # cleanest of the record's paraphrases
    for para in sorted(record.get("paraphrase_prompts", []), key=lambda p: len(readable_prompt(p, rw["subject"])))[:1]:
        show_top(f"paraphrase {readable_prompt(para, rw['subject'])!r}", top_k(model, tok, para, 3))
    rel = question_table().get(rw.get("relation_id"))
    if rel:  # what a user of the instruct model sees: the fact asked in chat, greedy answer, end of turn
        question = rel["question"].format(rw["subject"])
        after = ask(model, tok, [question])[0]
        with model.disable_edits():
            before = ask(model, tok, [question])[0]
        print(f"  asked in chat {question!r}\n    before: {before!r}\n    after:  {after!r}")
    with model.disable_edits():
        show_top("disabled", top_k(model, tok, prompt))

    print("\n6. The edit as a PEFT-compatible adapter")
    path = out / "adapter"
    edit.save_pretrained(path)  # atomic; edit.push_to_hub("me/my-edit") shares it
    for f in sorted(path.iterdir()):
        print(f"  {f.name:28s} {f.stat().st_size:>9,} bytes")
    model.revert_edits()
    show_top("reverted", top_k(model, tok, prompt))
    fresh = hf_knowedit.attach(load_smollm2()[0], tok)
    fresh.load_edits(path)  # shapes + base-weight fingerprints checked; all modules or none
    show_top("fresh model + adapter", top_k(fresh, tok, prompt))
    card = (path / "README.md").read_text().split("---")[1].strip().splitlines()
    print("  model card metadata: " + "; ".join(card))
    del fresh

    if args.data:
        print(f"\n7. MEMIT: {args.batch} facts in one call")
        records = hf_knowedit.load_records(Path(args.data) / "counterfact_500.json", limit=args.batch)
        result = hf_knowedit.evaluate(
            model,
            tok,
            records,
            method="memit",
            protocol="batch",
            fluency=False,
            progress=False,
            **stats_options(args.data),
        )
        print(
            f"  efficacy ES {result.pre['ES']:.0f} -> {result.post['ES']:.0f}, paraphrase PS {result.pre['PS']:.0f} "
            f"-> {result.post['PS']:.0f}, neighbourhood NS {result.pre['NS']:.0f} -> {result.post['NS']:.0f} "
            f"({result.timing.get('edit_s', float('nan')):.0f}s editing; reverted afterwards)"
        )
    print(f"\nDone in {time.time() - t0:.1f}s. Outputs in {out}/")


if __name__ == "__main__":
    main()
