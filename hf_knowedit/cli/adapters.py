"""Commands on saved edit adapters: ``apply`` (and ``--merge-to``), ``truncate``, ``export`` (GGUF),
``list`` and ``show``."""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import BaseModelMismatchError, InvalidDataError
from ..version import __version__
from .common import (
    _ADAPTER_MARKER,
    BUNDLED,
    Output,
    UsageError,
    _check_adapter_dir,
    _check_merge_target,
    _check_model_arg,
    _check_output_file,
    _edit_summary,
    _fmt_top,
    _is_checkpoint,
    _model,
    _save_and_push,
    _top,
    logger,
)

#: facts listed in a merged checkpoint's model card (all of them are in the adapters)
CARD_MAX_FACTS = 50


def merged_model_card(base_model: str | None, applied: Sequence[tuple[str, Any]], target: str) -> str:
    """README.md of a merged checkpoint: what was merged (source, name, method, base model, layers) and the facts."""
    from huggingface_hub import ModelCard, ModelCardData

    def cell(value: Any) -> str:
        text = "" if value is None else " ".join(str(value).split())
        return text.replace("|", "\\|") or "–"

    is_repo = bool(base_model) and re.fullmatch(r"[\w.-]+/[\w.-]+", base_model or "") is not None
    data = ModelCardData(
        library_name="transformers",
        base_model=base_model if is_repo else None,
        tags=["knowledge-editing", "hf_knowedit", *sorted({es.method for _, es in applied})],
        pipeline_tag="text-generation",
    )
    n_facts = sum(len(es.requests) for _, es in applied)
    lines = [
        f"# {Path(target).name}",
        "",
        f"`{base_model or 'the base model'}` with {len(applied)} knowledge edit set(s) ({n_facts} facts) merged into "
        f"its weights by hf_knowedit {__version__} (`hf-knowedit apply ... --merge-to`). "
        "It is a plain checkpoint: the edits cannot be reverted from it; the adapters below can be.",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'model = AutoModelForCausalLM.from_pretrained("{target}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{target}")',
        "```",
        "",
        "## Edits applied (in this order)",
        "",
        "| # | adapter | name | method | base model | layers | facts |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, (source, es) in enumerate(applied, 1):
        lines.append(
            f"| {i} | {cell(source)} | {cell(es.name)} | {cell(es.method)} | {cell(es.base_model)} | "
            f"{cell(', '.join(map(str, es.layers)))} | {len(es.requests)} |"
        )
    lines += ["", "## Facts", "", "| # | prompt | old | new |", "|---|---|---|---|"]
    shown = 0
    for i, (_, es) in enumerate(applied, 1):
        for r in es.requests:
            if shown == CARD_MAX_FACTS:
                break
            lines.append(f"| {i} | {cell(r.text)} | {cell(r.target_true)} | {cell(r.target_new)} |")
            shown += 1
    if n_facts > shown:
        lines += ["", f"... and {n_facts - shown} more (listed in the adapters' knowedit_config.json)."]
    return str(ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n" + "\n".join(lines) + "\n"))


def cmd_apply(args: argparse.Namespace, out: Output) -> int:
    import hf_knowedit

    from ..editset import EditSet

    _check_merge_target(args.merge_to)
    for prompt in args.prompt or ():
        if not prompt.strip():
            raise UsageError("--prompt must not be empty")
    sets = []
    for source in args.adapters:  # read (and check) every adapter before the model loads
        es = EditSet.from_pretrained(source)
        if args.max_rank is not None:
            es = _truncated(es, args.max_rank, source, out)
        sets.append((source, es))
    _check_model_arg(args)
    model, tok = _model(args)
    applied = []
    for source, es in sets:
        try:
            active = hf_knowedit.load_edits(model, es, force=args.force)
        except BaseModelMismatchError as err:
            hint = f" It was made for {es.base_model!r} (--model)." if es.base_model else ""
            if "fingerprint" in str(err):
                hint += " --force applies it anyway."
            raise BaseModelMismatchError(f"{source}: {err}{hint}") from None
        applied.append((source, active))
        logger.info("Applied %s as %r (%s, %d fact(s)).", source, active.name, active.method, len(active.requests))
    rows = []
    for source, es in applied:
        row = {"source": source, **_edit_summary(es)}
        rows.append(row)
        out.say(
            f"{source}: {es.name} ({es.method}, {len(es.requests)} fact(s), layers {es.layers}, "
            f"base {es.base_model or '?'})"
        )
    data: dict[str, Any] = {"applied": rows}
    predictions = []
    for prompt in args.prompt or ():
        top = _top(model, tok, prompt)
        out.say(f"{prompt!r}: {_fmt_top(top)}")
        predictions.append({"prompt": prompt, "top": top})
    if predictions:
        data["predictions"] = predictions
    if args.merge_to:
        target = Path(args.merge_to).expanduser().absolute()
        base = applied[0][1].base_model if applied else None
        card = merged_model_card(base, applied, args.merge_to)
        hf_knowedit.merge_and_unload(model)

        def write(tmp: Path) -> None:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            (tmp / "README.md").write_text(card, encoding="utf-8")

        logger.info("Writing the merged checkpoint to %s ...", target)
        from ..adapter_files import atomic_directory

        with atomic_directory(target, replaceable=_is_checkpoint, what="model checkpoint") as tmp:
            write(tmp)
        out.say("merged checkpoint written to", args.merge_to, "(loads with AutoModelForCausalLM.from_pretrained)")
        data["merged_to"] = str(target)
    out.result(data)
    return 0


def _truncated(es: Any, rank: int, source: str, out: Output) -> Any:
    """``es.truncate(rank)``, with each module's rank and relative error said."""
    small = es.truncate(rank)
    info = small.metrics["truncation"]
    for path, error in info["relative_error"].items():
        before, after = info["ranks_before"][path], info["ranks_after"][path]
        what = f"rank {before} -> {after}, relative error {error:.4f}" if before != after else f"rank {before} (kept)"
        out.say(f"{source}: {path}: {what}")
    return small


def cmd_truncate(args: argparse.Namespace, out: Output) -> int:
    from ..editset import EditSet

    _check_adapter_dir(args.out, "--out")
    if args.push and not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", args.push):
        raise UsageError(f"--push {args.push!r} is not a Hub repo id (e.g. 'user/angola-edit-r64')")
    if not args.out and not args.push:
        raise UsageError("give --out DIR and/or --push REPO: where to write the truncated adapter")
    es = EditSet.from_pretrained(args.adapter)
    small = _truncated(es, args.rank, args.adapter, out)
    info = small.metrics["truncation"]
    out.say(f"max relative error {info['max_relative_error']:.4f} at rank {args.rank} (‖ΔW − ΔW_r‖_F / ‖ΔW‖_F)")
    data: dict[str, Any] = {"source": args.adapter, **_edit_summary(small), "truncation": info}
    _save_and_push(small, args, out, data, "truncated adapter saved to")
    out.result(data)
    return 0


def _model_config(args: argparse.Namespace) -> Any:
    """The config of ``--model`` (no weights loaded): the bundled model's from its cache or its GGUF."""
    from transformers import AutoConfig

    if args.model != BUNDLED:
        return AutoConfig.from_pretrained(args.model)
    from .._bundled import GGUF_FILE, converted_dir, gguf_dir

    if (converted_dir() / "config.json").exists():
        return AutoConfig.from_pretrained(converted_dir())
    return AutoConfig.from_pretrained(gguf_dir(), gguf_file=GGUF_FILE)


def cmd_export(args: argparse.Namespace, out: Output) -> int:
    from ..editset import EditSet
    from ..export_gguf import export_gguf_lora, merge_to_gguf, write_modelfile

    if not args.gguf_lora and not args.merge_to_gguf:
        raise UsageError("give --gguf-lora OUT.gguf and/or --merge-to-gguf OUT.gguf: what to write")
    _check_output_file(args.gguf_lora, "--gguf-lora", (".gguf",))
    _check_output_file(args.merge_to_gguf, "--merge-to-gguf", (".gguf",))
    _check_model_arg(args)
    base = args.base_gguf
    if base is None and args.model == BUNDLED:
        from .._bundled import GGUF_FILE, gguf_dir

        base = str(gguf_dir() / GGUF_FILE)
    if base is not None and not Path(base).expanduser().is_file():
        raise BaseModelMismatchError(f"--base-gguf {base}: no such file; pass the base model's .gguf file.")
    if args.merge_to_gguf and base is None:
        raise UsageError("--merge-to-gguf needs --base-gguf FILE: the GGUF to merge the edit into")
    es = EditSet.from_pretrained(args.adapter)
    if args.max_rank is not None:
        es = _truncated(es, args.max_rank, args.adapter, out)
    config = _model_config(args)
    data: dict[str, Any] = {"source": args.adapter, **_edit_summary(es)}
    if args.gguf_lora:
        written = export_gguf_lora(es, args.gguf_lora, config, base_gguf=base, dtype=args.gguf_dtype, force=args.force)
        data["gguf_lora"] = str(written)
        out.say(f"llama.cpp LoRA adapter written to {written} ({args.gguf_dtype}, base {base or 'not checked'})")
        if base is not None:
            data["modelfile"] = str(write_modelfile(written, base))
            out.say(f"Ollama Modelfile written to {data['modelfile']} (ollama create NAME -f {data['modelfile']})")
        else:
            out.say("no --base-gguf: the base was not checked and no Ollama Modelfile was written")
    if args.merge_to_gguf:
        merged = merge_to_gguf(es, args.merge_to_gguf, config, base, type=args.type, force=args.force)
        data["merged_gguf"] = str(merged)
        data["merged_modelfile"] = str(write_modelfile(None, merged))
        out.say(f"merged GGUF written to {merged} (edited tensors {args.type}, the rest as in {base})")
    out.result(data)
    return 0


def _find_adapters(root: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if _ADAPTER_MARKER in filenames:
            found.append(Path(dirpath))
    return found


def cmd_list(args: argparse.Namespace, out: Output) -> int:
    root = Path(args.directory).expanduser()
    if not root.is_dir():
        raise InvalidDataError(f"{args.directory}: no such directory; pass a directory that holds saved adapters.")
    rows = []
    for path in _find_adapters(root):
        row: dict[str, Any] = {"path": str(path)}
        try:
            meta = json.loads((path / _ADAPTER_MARKER).read_text(encoding="utf-8"))
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
            row.update(
                name=meta.get("name"),
                method=meta.get("method"),
                edits=len(meta.get("requests") or []),
                layers=meta.get("layers") or [],
                base_model=meta.get("base_model"),
                library_version=meta.get("library_version"),
            )
            layers = ",".join(map(str, row["layers"]))
            out.say(
                f"{path}  {row['method']}  {row['edits']} fact(s)  layers {layers or '?'}  "
                f"base {row['base_model'] or '?'}  name {row['name'] or '-'}"
            )
        except (OSError, ValueError) as err:
            row["error"] = f"unreadable {_ADAPTER_MARKER}: {err}"
            out.say(f"{path}  ({row['error']})")
        rows.append(row)
    if not rows:
        out.say(f"no adapters under {args.directory}")
    out.result(rows)
    return 0


def cmd_show(args: argparse.Namespace, out: Output) -> int:
    from ..architectures import LAYOUT_PARAM
    from ..editset import EditSet

    es = EditSet.from_pretrained(args.source)
    out.say(repr(es))
    out.say(f"  base model: {es.base_model or '?'}" + (f" @ {es.revision}" if es.revision else ""))
    out.say(f"  method: {es.method}, layers {es.layers}")
    for path, experts in sorted(es.num_experts.items()):
        out.say(
            f"  {path}: {experts} routed experts, rank {es.deltas[path].rank} "
            f"(LoRA on its {LAYOUT_PARAM['experts']} parameter: PEFT target_parameters)"
        )
    for path in sorted(p for p, target in es.peft_targets.items() if target == "parameter"):
        out.say(
            f"  {path}: rank {es.deltas[path].rank} "
            f"(LoRA on its {LAYOUT_PARAM['linear']} parameter: PEFT target_parameters)"
        )
    for r in es.requests[: args.show]:
        out.say(f"  {r.text!r}: {r.target_true!r} -> {r.target_new!r}")
    if len(es.requests) > args.show:
        out.say(f"  ... and {len(es.requests) - args.show} more (--show N lists more)")
    vllm = None
    if args.vllm:
        from ..serving import check_vllm

        check = check_vllm(es)
        out.say("  " + check.advice(args.source))
        vllm = {"fits": check.fits, "rank": check.rank, "max_lora_rank": check.max_lora_rank}
    out.result(
        {
            **_edit_summary(es),
            **({"vllm": vllm} if vllm is not None else {}),
            "revision": es.revision,
            "config": es.config,
            "metrics": es.metrics,
            "requests": [r.to_dict() for r in es.requests],
        }
    )
    return 0
