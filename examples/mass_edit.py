"""Mass editing in a ``from_pretrained`` workflow: MEMIT on N CounterFact facts, scored, shared as an
adapter, and loaded back with PEFT alone.

    python examples/mass_edit.py --data ../shared/data [--model PATH_OR_HUB_ID] [-n 20] [--out out/mass_edit]

Without ``--model`` it uses the bundled SmolLM2-135M-Instruct (converted once to a local
safetensors folder, then loaded with ``AutoModelForCausalLM.from_pretrained`` like any checkpoint).
Steps: load; ``hf_knowedit.attach``; ``evaluate(..., method="memit", protocol="batch")`` for ES/PS/NS
before and after; the edit itself with ``apply_edits``; ``save_pretrained`` of the edit set; a fresh
base model wrapped by ``peft.PeftModel.from_pretrained`` on that folder, compared with the edited model.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_knowedit


def load(name: str):
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder with counterfact_500.json")
    parser.add_argument("--model", default=None, help="a local folder or Hub id (default: the bundled SmolLM2)")
    parser.add_argument("-n", type=int, default=20, help="facts edited in one call")
    parser.add_argument("--out", type=Path, default=Path("out/mass_edit"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    if args.model is None:
        from hf_knowedit._bundled import converted_dir, load_smollm2

        load_smollm2()  # converts the bundled GGUF once
        args.model = str(converted_dir())
    model, tok = load(args.model)
    hf_knowedit.attach(model, tok)
    records = hf_knowedit.load_records(args.data / "counterfact_500.json", limit=args.n)
    options = dict(mom2_n_tokens=10_000, context_templates=2)  # small statistics: quick on a CPU

    result = hf_knowedit.evaluate(
        model, tok, records, method="memit", protocol="batch", fluency=False, progress=False, **options
    )
    print(result.to_markdown())

    edit = model.apply_edits([r.request for r in records], method="memit", **options)
    path = edit.save_pretrained(args.out / "adapter") or args.out / "adapter"
    print(f"\n{edit!r}\nsaved to {path}: " + ", ".join(sorted(f.name for f in Path(path).iterdir())))

    from peft import PeftModel

    base, _ = load(args.model)
    peft_model = PeftModel.from_pretrained(base, str(path))
    prompt = records[0].request.text
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        ours, theirs = model(**ids).logits[0, -1], peft_model(**ids).logits[0, -1]
    print(
        f"{prompt!r}: hf_knowedit -> {tok.decode(ours.argmax())!r}, PEFT -> {tok.decode(theirs.argmax())!r}, "
        f"max |logit difference| {float((ours - theirs).abs().max()):.1e}"
    )


if __name__ == "__main__":
    main()
