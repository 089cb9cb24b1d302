"""The settings of a causal trace, validated in one place (:class:`TraceConfig`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from ..errors import TraceError
from .corruption import CORRUPTIONS

#: what can be restored: block outputs, MLP outputs, attention outputs
KINDS = ("hidden", "mlp", "attn")
#: how Gaussian noise is drawn (``TraceConfig.rng``)
RNGS = ("torch", "reference")


def check_kinds(kinds: Any) -> tuple[str, ...]:
    """``kinds`` as a tuple of known kinds without repeats (one string allowed)."""
    if isinstance(kinds, str):
        kinds = (kinds,)
    try:
        kinds = tuple(kinds)
    except TypeError:
        kinds = (kinds,)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise TraceError(f"Unknown trace kind(s) {bad or kinds!r}; choose among {KINDS}, e.g. kinds=('hidden', 'mlp').")
    return tuple(dict.fromkeys(kinds))


def check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TraceError(f"{name} must be an integer >= 1, got {value!r}.")
    return value


@dataclass(frozen=True)
class TraceConfig:
    """How a fact is traced; every field is checked when the config is made.

    Attributes:
        kinds: any of ``"hidden"``, ``"mlp"``, ``"attn"``.
        samples: number of corrupted runs (10 in the paper).
        noise: ``"auto"`` (3 × std of subject embeddings over ``subjects``) or the noise std as a float.
        window: consecutive layers restored together for ``"mlp"``/``"attn"`` (10 in the paper).
        corruption: ``"gaussian"`` (the paper) or ``"str"`` (swap in another subject of the same token
            length, drawn from ``subjects``); see :mod:`hf_knowedit.tracing.corruption`.
        seed: seeds the noise / the swapped-in subjects; the same seed gives the same trace.
        rng: how Gaussian noise is drawn. ``"torch"`` (default): ``torch.randn`` seeded with ``seed``.
            ``"reference"``: exactly as the reference (``experiments/causal_trace.py`` ``trace_with_patch``):
            ``numpy.random.RandomState(1).randn(samples, subject tokens, d)`` in float64, times the level,
            added in place to the embeddings of corrupted sample ``i`` (the reference's batch row ``i + 1``;
            row 0 is its clean run), the same draw for every restoration; and ``noise="auto"`` is measured
            as its ``collect_embedding_std``: each subject tokenized with the tokenizer's special tokens, a
            subject counted as often as it is listed (``trace_facts`` passes every fact's subject). The
            reference's seed is fixed, so ``seed`` must stay 0 with Gaussian noise.
        subjects: entity names for the noise level / the replacements (default ``DEFAULT_SUBJECTS``).
        memory_mb: activation memory budget per batched forward pass.
        reuse_lower_layers: replay the corrupted run's lower blocks and KV cache instead of recomputing
            them (exact; off only to check that it is).
        progress: show a progress bar (True: at once; None: once a trace has run a few seconds; False: never).
    """

    kinds: tuple[str, ...] = KINDS
    samples: int = 10
    noise: str | float = "auto"
    window: int = 10
    corruption: str = "gaussian"
    seed: int = 0
    rng: str = "torch"
    subjects: tuple[str, ...] | None = None
    memory_mb: float = 1024.0
    reuse_lower_layers: bool = True
    progress: bool | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kinds", check_kinds(self.kinds))
        check_positive_int("samples", self.samples)
        check_positive_int("window", self.window)
        if self.corruption not in CORRUPTIONS:
            raise TraceError(f"corruption must be one of {tuple(CORRUPTIONS)}, got {self.corruption!r}.")
        noise_ok = self.noise == "auto" or (
            isinstance(self.noise, (int, float))
            and not isinstance(self.noise, bool)
            and math.isfinite(self.noise)
            and self.noise >= 0
        )
        if not noise_ok:
            raise TraceError(f"noise must be 'auto' or a finite float >= 0 (the noise std), got {self.noise!r}.")
        if (
            isinstance(self.memory_mb, bool)
            or not isinstance(self.memory_mb, (int, float))
            or not math.isfinite(self.memory_mb)
            or self.memory_mb <= 0
        ):
            raise TraceError(f"memory_mb must be a positive number, got {self.memory_mb!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TraceError(f"seed must be an int, got {self.seed!r}.")
        if self.rng not in RNGS:
            raise TraceError(f"rng must be one of {RNGS}, got {self.rng!r}.")
        if self.rng == "reference" and self.corruption == "gaussian" and self.seed != 0:
            raise TraceError(
                "rng='reference' draws the reference's fixed noise (numpy.random.RandomState(1)), so seed has "
                f"no effect there; leave seed at 0 (got {self.seed}), or use rng='torch' to vary the noise."
            )
        if self.subjects is not None:
            if isinstance(self.subjects, str) or not isinstance(self.subjects, Sequence):
                raise TraceError(f"subjects must be a list of entity names, got {self.subjects!r}.")
            object.__setattr__(self, "subjects", tuple(self.subjects))
        for name in ("reuse_lower_layers",):
            if not isinstance(getattr(self, name), bool):
                raise TraceError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        if self.progress is not None and not isinstance(self.progress, bool):
            raise TraceError(f"progress must be True, False or None, got {self.progress!r}.")

    @classmethod
    def of(cls, config: TraceConfig | None = None, **kwargs: Any) -> TraceConfig:
        """``config`` with ``kwargs`` replaced (the keyword form of :func:`trace_fact` and friends)."""
        base = config if config is not None else cls()
        if not isinstance(base, cls):
            raise TraceError(f"config must be a TraceConfig, got {type(base).__name__}.")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TraceError(f"Unknown trace option(s) {unknown}; valid: {sorted(names)}.")
        values = {f.name: getattr(base, f.name) for f in fields(cls)}
        values.update(kwargs)
        return cls(**values)

    def window_layers(self, layer: int, n_layers: int) -> range:
        """The ``window`` layers centred on ``layer`` (clipped to the model), as in the ROME code."""
        return range(max(0, layer - self.window // 2), min(n_layers, layer + math.ceil(self.window / 2)))

    def settings(self, **extra: Any) -> dict[str, Any]:
        """What a trace records about how it was made (``rng`` only when it is not the default)."""
        out = dict(kinds=list(self.kinds), samples=self.samples, noise=self.noise, window=self.window,
                   corruption=self.corruption, seed=self.seed)  # fmt: skip
        if self.rng != "torch":
            out["rng"] = self.rng
        return {**out, **extra}

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v, tuple) else v) for f in fields(self) for v in [getattr(self, f.name)]}


__all__ = ["KINDS", "RNGS", "TraceConfig", "check_kinds", "check_positive_int"]
