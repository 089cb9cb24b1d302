"""``hf-knowedit trace``: causal tracing of one fact or of a file of facts, and the layers it suggests."""

from __future__ import annotations

import argparse
import importlib.util
from typing import Any

from ..errors import InvalidConfigError
from .common import (
    Output,
    UsageError,
    _check_model_arg,
    _check_output_file,
    _fact,
    _limit,
    _model,
    logger,
    read_records,
)


def _trace_options(args: argparse.Namespace) -> dict[str, Any]:
    options = {"kinds": tuple(args.kinds), "samples": args.samples, "window": args.window, "seed": args.seed}
    if getattr(args, "rng", "torch") != "torch":
        options["rng"] = args.rng
    return options


def _peaks(effects: dict[str, Any]) -> dict[str, int]:
    import torch

    return {k: int(torch.nan_to_num(v.float(), nan=float("-inf")).argmax()) for k, v in effects.items()}


#: a peak MLP indirect effect under this share of the total effect (clean − corrupted probability) does not
#: stand above the trace's noise: no layer is suggested from it
MIN_EFFECT_SHARE = 0.1


def _suggest(model: Any, trace: Any, effects: dict[str, Any], total: float, band: int, out: Output) -> dict:
    """The layers to edit that a trace supports (``{}`` without an MLP trace), said on ``out``: the MLP's
    peak at the last subject token when it is at least ``MIN_EFFECT_SHARE`` of the total effect, else
    the measured defaults, with the reason."""
    import hf_knowedit

    from ..architectures import num_layers
    from ..methods.memit import default_band
    from ..methods.rome import default_layer

    if "mlp" not in effects:
        return {}
    n_layers = num_layers(model)
    peak = float(effects["mlp"].float().nan_to_num(nan=float("-inf")).max())
    if total > 0 and peak >= MIN_EFFECT_SHARE * total:
        rome = hf_knowedit.suggest_layers(trace, kind="mlp", count=1)
        memit = hf_knowedit.suggest_layers(trace, kind="mlp", count=min(band, n_layers))
        out.say(f"suggested layers: rome --layers {rome[0]}; memit --layers {memit[0]}-{memit[-1]}")
        return {"rome": rome, "memit": memit}
    rome, memit = [default_layer(model)], default_band(n_layers, min(band, n_layers))
    out.say(
        f"no MLP layer stands out at the last subject token (peak {peak:+.4f} is under "
        f"{MIN_EFFECT_SHARE:.0%} of the total effect {total:+.4f}); keep the measured defaults: "
        f"rome --layers {rome[0]}; memit --layers {memit[0]}-{memit[-1]} (docs/layers.md)"
    )
    return {}


def cmd_trace(args: argparse.Namespace, out: Output) -> int:
    import hf_knowedit

    facts = None
    if args.facts:
        if args.prompt or args.subject or args.target:
            raise UsageError("give either --facts FILE or --prompt/--subject, not both")
        raw = _limit(read_records(args.facts, "facts"), args.limit)
        facts = [_fact(r, f"{args.facts}, record {i}") for i, r in enumerate(raw)]
    else:
        if args.prompt is None or args.subject is None:
            raise UsageError("the following arguments are required: --prompt, --subject (or pass --facts FILE)")
        prompt = args.prompt.replace("{}", args.subject, 1) if "{}" in args.prompt else args.prompt
        _fact({"prompt": prompt, "subject": args.subject}, "--prompt/--subject")
    if args.rng == "reference" and args.seed != 0:
        raise UsageError(
            "--rng reference draws the reference's fixed noise (numpy RandomState(1)), so --seed has no effect "
            f"there; drop --seed (got {args.seed}) or use --rng torch to vary the noise"
        )
    _check_output_file(args.plot, "--plot", (".png", ".pdf", ".svg", ".jpg", ".jpeg"))
    _check_output_file(args.save, "--save", (".json",))
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise InvalidConfigError("--plot needs matplotlib: pip install matplotlib (or hf_knowedit[plot]).")
    _check_model_arg(args)
    model, tok = _model(args)
    from ..architectures import num_layers

    options = _trace_options(args)
    n_layers = num_layers(model)
    if facts is not None:
        logger.info(
            "Tracing %d facts: per fact %d kind(s) x %d layers x %d corrupted samples at 2 positions. Pass --limit N, "
            "--samples N or --kinds mlp to make it cheaper.",
            len(facts),
            len(args.kinds),
            n_layers,
            args.samples,
        )
        summary = hf_knowedit.trace_facts(model, tok, facts, require_correct=not args.all_facts, **options)
        peaks = _peaks(summary.aie["last_subject"])
        total = summary.mean_clean - summary.mean_corrupted
        suggested = _suggest(model, summary, summary.aie["last_subject"], total, args.band, out)
        out.say(
            f"{summary.n_facts} facts traced ({summary.n_skipped} skipped: the model does not predict their "
            f"attribute{'' if args.all_facts else '; --all-facts traces them too'})"
        )
        out.say(f"mean p(answer): clean {summary.mean_clean:.4f}, corrupted {summary.mean_corrupted:.4f}")
        for kind, layer in peaks.items():
            effect = float(summary.aie["last_subject"][kind][layer])
            out.say(f"peak average indirect effect of {kind} at the last subject token: layer {layer} ({effect:+.4f})")
        data = {**summary.to_dict(), "peak_layers": peaks, "suggested_layers": suggested}
        figure = summary
    else:
        logger.info(
            "Tracing one fact: %d kind(s) x %d layers x every token x %d corrupted samples. Pass --samples N or "
            "--kinds mlp to make it cheaper.",
            len(args.kinds),
            n_layers,
            args.samples,
        )
        result = hf_knowedit.trace_fact(model, tok, prompt, args.subject, target=args.target, **options)
        if args.save:
            result.save(args.save)
            out.say("trace saved to", args.save)
        effects = {k: result.indirect_effect(k)[result.last_subject_token] for k in result.scores}
        peaks = _peaks(effects)
        suggested = _suggest(model, result, effects, result.clean_prob - result.corrupted_prob, args.band, out)
        out.say(f"answer {result.answer!r}: clean p={result.clean_prob:.4f}, corrupted p={result.corrupted_prob:.4f}")
        for kind, layer in peaks.items():
            effect = float(effects[kind][layer])
            out.say(f"peak indirect effect of {kind} at the last subject token: layer {layer} ({effect:+.4f})")
        data = {**result.to_dict(), "peak_layers": peaks, "suggested_layers": suggested}
        figure = result
    if args.plot:
        figure.plot(args.plot)
        out.say("plot written to", args.plot)
        data["plot"] = args.plot
    out.result(data)
    return 0
