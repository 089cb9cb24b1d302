"""``hf-knowedit stats compute | show | push | pull``: second-moment statistics and their cache."""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ..errors import InvalidDataError
from .common import (
    Output,
    UsageError,
    _check_model_arg,
    _corpus_description,
    _model,
    _parse_layers,
    _stats_dir,
    logger,
    read_corpus,
    statistics_size,
)


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

    from ..methods.statistics import compute_second_moment
    from ..moments import StatsCache

    layers = _parse_layers(args.layers)
    if layers == "auto" or not layers:
        raise UsageError("stats compute: --layers takes layer indices (6, 4,5,6 or 4-8)")
    corpus = read_corpus(args.corpus) if args.corpus else None
    _check_model_arg(args)
    model, tok = _model(args)
    cache = StatsCache(args.cache_dir)
    logger.info(
        "Second moments at layer(s) %s from %s of %s, cached in %s (files already there are reused). "
        "Pass --n-tokens N or --corpus FILE to make it cheaper.",
        layers,
        statistics_size(model, layers[0], SimpleNamespace(mom2_n_tokens=args.n_tokens, mom2_n_keys=None))
        + (" each" if len(layers) > 1 else ""),
        _corpus_description(corpus),
        cache.directory,
    )
    entries = []
    for layer in layers:
        entry = compute_second_moment(
            model,
            tok,
            layer,
            corpus=corpus,
            n_tokens=args.n_tokens,
            dtype=getattr(torch, args.stats_dtype),
            cache=cache,
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
    from ..moments import SecondMoment

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
    from ..moments import SecondMoment, push_statistics

    SecondMoment.load(args.file)  # a bad file fails before any network call
    commit = push_statistics(args.file, args.repo, private=args.private or None, revision=args.revision)
    url = getattr(commit, "commit_url", None) or str(commit)
    out.say("pushed to", url)
    out.result({"repo": args.repo, "commit": url})
    return 0


def cmd_stats_pull(args: argparse.Namespace, out: Output) -> int:
    from ..moments import StatsCache, pull_statistics

    cache = StatsCache(args.cache_dir)
    entry = pull_statistics(args.repo, args.filename, revision=args.revision, stats_cache=cache)
    info = _stats_entry(entry, cache.path(entry.key))
    _say_stats(out, info)
    out.result(info)
    return 0
