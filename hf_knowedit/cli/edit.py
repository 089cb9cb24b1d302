"""``hf-knowedit edit`` and ``hf-knowedit eval``: requests and method options from the command line, the
statistics they need, editing and scoring."""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import InvalidDataError
from .common import (
    Output,
    UsageError,
    _check_adapter_dir,
    _check_model_arg,
    _check_output_file,
    _corpus_description,
    _edit_summary,
    _fact,
    _fmt_top,
    _limit,
    _model,
    _parse_layers,
    _save_and_push,
    _stats_dir,
    _top,
    logger,
    read_corpus,
    read_records,
    statistics_size,
)


def _edit_requests(args: argparse.Namespace) -> list[Any]:
    """Validated :class:`EditRequest` s from ``--requests FILE`` or the single-fact flags."""
    from ..errors import KnowEditError as _KE
    from ..requests import normalize_requests, to_request

    single = [args.prompt, args.subject, args.target]
    if args.requests:
        if any(x is not None for x in single + [args.target_true]):
            raise UsageError("give either --requests FILE or --prompt/--subject/--target, not both")
        raw = _limit(read_records(args.requests, "edit requests"), args.limit)
        reqs = []
        for i, record in enumerate(raw):
            try:
                reqs.append(to_request(record))
            except _KE as err:
                raise InvalidDataError(f"{args.requests}, record {i}: {err}") from None
        try:
            return normalize_requests(reqs)
        except _KE as err:
            raise InvalidDataError(f"{args.requests}: {err}") from None
    missing = [f for f, v in zip(("--prompt", "--subject", "--target"), single) if v is None]
    if missing:
        raise UsageError(f"the following arguments are required: {', '.join(missing)} (or pass --requests FILE)")
    record = {"prompt": args.prompt, "subject": args.subject, "target_new": args.target}
    if args.target_true:
        record["target_true"] = args.target_true
    return normalize_requests([to_request(record)])


def _config_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _parse_config(pairs: Sequence[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UsageError(f"--config expects key=value (e.g. context_templates=0), got {pair!r}")
        out[key] = _config_value(value.strip())
    return out


def _edit_config(args: argparse.Namespace, method: str) -> tuple[dict[str, Any], Any]:
    """The method's config as a dict from ``--config``, ``--mom2-n-tokens``, ``--corpus`` and ``--preserve``, validated
    (unknown names and bad values fail here, before the model loads); the CLI's statistics default added."""
    from ..methods.config import make_config
    from ..methods.registry import get_method

    cfg = _parse_config(args.config)
    for flag, key, value in (
        ("--mom2-n-tokens", "mom2_n_tokens", args.mom2_n_tokens),
        ("--corpus", "mom2_corpus", args.corpus),
        ("--preserve", "mom2_preserve", args.preserve),
    ):
        if key in cfg and value is not None:
            raise UsageError(f"give {flag} or --config {key}=..., not both")
    if args.mom2_n_tokens is not None:
        cfg["mom2_n_tokens"] = args.mom2_n_tokens
    if args.corpus is not None:
        cfg["mom2_corpus"] = read_corpus(args.corpus)
    if args.preserve is not None:
        cfg["mom2_preserve"] = read_corpus(args.preserve)
    spec = get_method(method)
    return cfg, make_config(spec.config_cls, cfg, {}, spec.name)


def _statistics_plan(model: Any, method: str, config: Any, cfg: dict[str, Any], layers: Any) -> None:
    if getattr(config, "mom2", None) != "corpus":
        return
    from ..methods.rome import default_layer

    layer = layers[0] if isinstance(layers, list) and layers else default_layer(model)
    logger.info(
        "%s needs second-moment statistics C = E[k kᵀ] of each edited layer: unless already cached (%s), they "
        "are computed once from %s of %s. Pass --mom2-n-tokens N or --corpus FILE to make it cheaper, "
        "--config mom2=identity to skip it, or precompute with 'hf-knowedit stats compute'.",
        method,
        _stats_dir(None),
        statistics_size(model, layer, config),
        _corpus_description(cfg.get("mom2_corpus")),
    )


def cmd_edit(args: argparse.Namespace, out: Output) -> int:
    import hf_knowedit

    requests = _edit_requests(args)
    layers = _parse_layers(args.layers)
    cfg, config = _edit_config(args, args.method)
    trace_facts = None
    if args.trace_facts:
        if layers != "auto":
            raise UsageError("--trace-facts is for --layers auto")
        trace_facts = [
            _fact(r, f"{args.trace_facts}, record {i}") for i, r in enumerate(read_records(args.trace_facts, "facts"))
        ]
    _check_adapter_dir(args.out, "--out")
    if args.push and not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", args.push):
        raise UsageError(f"--push {args.push!r} is not a Hub repo id (e.g. 'user/angola-edit')")
    _check_model_arg(args)
    model, tok = _model(args)
    _statistics_plan(model, args.method, config, cfg, layers)
    if layers == "auto":
        facts = trace_facts or [(r.text, r.subject, r.target_true) for r in requests]
        logger.info(
            "--layers auto: tracing %d fact(s) (mlp, %d samples) to find the layer with the largest indirect effect; "
            "pass --layers N to skip this.",
            len(facts),
            args.samples,
        )
        hf_knowedit.trace_facts(
            model, tok, facts, require_correct=trace_facts is not None, kinds=("mlp",), samples=args.samples,
            window=args.window,
        )  # fmt: skip
    shown = requests[: args.show]
    before = [_top(model, tok, r.text) for r in shown]
    logger.info("Editing %d fact(s) with %s ...", len(requests), args.method)
    start = time.perf_counter()
    es = hf_knowedit.apply_edits(model, tok, requests, method=args.method, layers=layers, config=cfg, name=args.name)
    seconds = time.perf_counter() - start
    after = [_top(model, tok, r.text) for r in shown]
    facts_out = []
    for r, b, a in zip(shown, before, after):
        out.say(f"{r.text!r} -> {r.target_new!r}")
        out.say(f"  before: {_fmt_top(b)}")
        out.say(f"  after:  {_fmt_top(a)}")
        facts_out.append({"prompt": r.text, "target_new": r.target_new, "before": b, "after": a})
    if len(requests) > len(shown):
        out.say(f"  ... and {len(requests) - len(shown)} more (--show N lists more)")
    out.say(f"{es!r} in {seconds:.1f} s")
    data: dict[str, Any] = {"edit_set": _edit_summary(es), "seconds": seconds, "facts": facts_out}
    _save_and_push(es, args, out, data, "adapter saved to")
    out.result(data)
    return 0


def cmd_eval(args: argparse.Namespace, out: Output) -> int:
    import hf_knowedit

    raw = read_records(args.records, "benchmark records (CounterFact, flat CounterFact or zsRE)")
    records = hf_knowedit.load_records(raw, args.schema, limit=args.limit)
    kwargs: dict[str, Any] = {}
    if args.method is None:
        if args.config or args.layers or args.mom2_n_tokens is not None or args.corpus:
            raise UsageError("--config, --layers, --mom2-n-tokens and --corpus need --method")
        if args.protocol != "single":
            raise UsageError("--protocol needs --method (without one the unedited model is scored)")
    else:
        cfg, config = _edit_config(args, args.method)
        kwargs = {"config": cfg, "layers": _parse_layers(args.layers)}
    _check_output_file(args.out, "--out", (".md", ".json", ".txt"))
    _check_model_arg(args)
    model, tok = _model(args)
    if args.method is not None:
        _statistics_plan(model, args.method, config, cfg, kwargs["layers"])
    fluency = not args.no_fluency and any(r.generation_prompts for r in records)
    logger.info(
        "Evaluating %d %s records (%s protocol%s)%s.%s",
        len(records),
        records[0].schema,
        args.protocol,
        f", {args.method}" if args.method else ", unedited model",
        "; fluency generates ~10 texts per record before and after" if fluency else "",
        " Pass --limit N" + (" or --no-fluency" if fluency else "") + " to make it cheaper.",
    )
    result = hf_knowedit.evaluate(
        model,
        tok,
        records,
        method=args.method,
        protocol=args.protocol,
        batch_size=args.batch_size,
        fluency=not args.no_fluency,
        chat=args.chat,
        progress=not args.no_progress,
        **kwargs,
    )
    report = json.dumps(result.to_dict(), indent=2) if args.json else result.to_markdown()
    if args.out:
        text = json.dumps(result.to_dict(), indent=2) if args.out.endswith(".json") else result.to_markdown()
        Path(args.out).write_text(text + "\n", encoding="utf-8")
        logger.info("Report written to %s.", args.out)
    print(report)
    return 0
