"""What a causal trace returns (:class:`TraceResult` for one fact, :class:`TraceSummary` for many),
their JSON form, and ROME-style plots (matplotlib imported lazily)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import TraceError
from .config import KINDS


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x


def _none_to_nan(x: Any) -> Any:
    if isinstance(x, list):
        return [_none_to_nan(v) for v in x]
    return float("nan") if x is None else x


@dataclass
class TraceResult:
    """The causal trace of one fact.

    Attributes:
        scores: kind -> ``[n_tokens, n_layers]`` float32 tensor of ``p(answer)`` with that cell restored
            (NaN where a token was not traced, see ``positions=``).
        clean_prob: ``p(answer)`` in the clean run.
        corrupted_prob: ``p(answer)`` in the corrupted runs, nothing restored (mean over samples).
        tokens: the input tokens (decoded one by one).
        input_ids: their ids.
        subject_range: half-open token span ``(start, end)`` of the subject.
        answer: the traced answer as text; ``answer_ids`` its token ids.
        prompt, subject: as given.
        settings: kinds, samples, noise (the std actually used), window, corruption, seed, target.
    """

    scores: dict[str, torch.Tensor]
    clean_prob: float
    corrupted_prob: float
    tokens: list[str]
    input_ids: list[int]
    subject_range: tuple[int, int]
    answer: str
    answer_ids: list[int]
    prompt: str
    subject: str
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def last_subject_token(self) -> int:
        return self.subject_range[1] - 1

    def indirect_effect(self, kind: str) -> torch.Tensor:
        """``scores[kind] - corrupted_prob``: how much restoring each cell recovers."""
        return self.scores[kind] - self.corrupted_prob

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (NaN scores become ``None``)."""
        return {
            "scores": {k: _nan_to_none(v.tolist()) for k, v in self.scores.items()},
            "clean_prob": self.clean_prob,
            "corrupted_prob": self.corrupted_prob,
            "tokens": list(self.tokens),
            "input_ids": list(self.input_ids),
            "subject_range": list(self.subject_range),
            "answer": self.answer,
            "answer_ids": list(self.answer_ids),
            "prompt": self.prompt,
            "subject": self.subject,
            "settings": dict(self.settings),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TraceResult:
        try:
            return cls(
                scores={k: torch.tensor(_none_to_nan(v), dtype=torch.float32) for k, v in d["scores"].items()},
                clean_prob=float(d["clean_prob"]),
                corrupted_prob=float(d["corrupted_prob"]),
                tokens=list(d["tokens"]),
                input_ids=[int(i) for i in d["input_ids"]],
                subject_range=(int(d["subject_range"][0]), int(d["subject_range"][1])),
                answer=d["answer"],
                answer_ids=[int(i) for i in d["answer_ids"]],
                prompt=d["prompt"],
                subject=d["subject"],
                settings=dict(d.get("settings", {})),
            )
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise TraceError(
                f"Not a saved TraceResult ({type(e).__name__}: {e}); write one with TraceResult.save()."
            ) from None

    def save(self, path: str | Path) -> Path:
        """Write the result as JSON; read it back with :meth:`load`."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict()))
        return path

    @classmethod
    def load(cls, path: str | Path) -> TraceResult:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise TraceError(f"{path} is not JSON ({e}); write it with TraceResult.save().") from None
        return cls.from_dict(data)

    def plot(self, path: str | Path | None = None, *, kinds: Sequence[str] | None = None) -> Any:
        """The heatmaps side by side (see :func:`plot_trace`); writes ``path`` (PNG, PDF, ...) when given."""
        return plot_trace(self, path, kinds=kinds)


@dataclass
class TraceSummary:
    """Average indirect effects over many facts (the paper's Figure 2).

    ``aie[position][kind]`` is a ``[n_layers]`` tensor: the mean over facts of ``scores - corrupted_prob``
    at ``position`` ``"last_subject"`` (the subject's last token) or ``"last"`` (the prompt's last token).
    """

    aie: dict[str, dict[str, torch.Tensor]]
    n_facts: int
    n_skipped: int
    mean_clean: float
    mean_corrupted: float
    settings: dict[str, Any] = field(default_factory=dict)
    results: list[TraceResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "aie": {p: {k: v.tolist() for k, v in d.items()} for p, d in self.aie.items()},
            "n_facts": self.n_facts,
            "n_skipped": self.n_skipped,
            "mean_clean": self.mean_clean,
            "mean_corrupted": self.mean_corrupted,
            "settings": dict(self.settings),
        }

    def plot(self, path: str | Path | None = None) -> Any:
        """Line plots of the average indirect effect per layer (see :func:`plot_summary`)."""
        return plot_summary(self, path)


# -----------------------------------------------------------------------------
# plots

_CMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
_TITLES = {"hidden": "Restoring the hidden state", "mlp": "Restoring MLP outputs", "attn": "Restoring attention"}


def plot_trace(result: TraceResult, path: str | Path | None = None, *, kinds: Sequence[str] | None = None) -> Any:
    """ROME-style heatmaps side by side: rows = tokens (subject tokens starred), x = layer, colour = p(answer)
    (from the corrupted probability up). Returns the matplotlib ``Figure``; writes ``path`` when given."""
    from matplotlib.figure import Figure

    kinds = [k for k in (kinds or KINDS) if k in result.scores]
    if not kinds:
        raise TraceError(f"Nothing to plot: the result has kinds {list(result.scores)}.")
    s0, s1 = result.subject_range
    labels = [repr(t)[1:-1] + ("*" if s0 <= i < s1 else "") for i, t in enumerate(result.tokens)]
    n_tok = len(labels)
    fig = Figure(figsize=(3.6 * len(kinds), 0.9 + 0.28 * n_tok), layout="constrained")
    axes = fig.subplots(1, len(kinds), squeeze=False)[0]
    window = result.settings.get("window", "")
    for ax, kind in zip(axes, kinds):
        data = result.scores[kind].numpy()
        mesh = ax.pcolormesh(
            data,
            cmap=_CMAPS[kind],
            vmin=result.corrupted_prob,
            vmax=max(
                result.clean_prob,
                float(torch.nan_to_num(result.scores[kind], nan=0.0).max()),
                result.corrupted_prob + 1e-9,
            ),
        )
        ax.invert_yaxis()
        ax.set_yticks([i + 0.5 for i in range(n_tok)])
        ax.set_yticklabels(labels if ax is axes[0] else [])
        ax.set_title(_TITLES[kind], fontsize=9)
        ax.set_xlabel(
            "single restored layer" if kind == "hidden" else f"center of {window} restored layers", fontsize=8
        )
        cb = fig.colorbar(mesh, ax=ax)
        cb.ax.set_title(f"p({result.answer.strip()})", fontsize=8)
    fig.suptitle(
        f"{result.prompt!r} → {result.answer!r}  (clean {result.clean_prob:.3f}, "
        f"corrupted {result.corrupted_prob:.3f})",
        fontsize=9,
    )
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def plot_summary(summary: TraceSummary, path: str | Path | None = None) -> Any:
    """Average indirect effect per layer at the last subject token and at the last token, one line per kind."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.2), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    colours = {"hidden": "tab:purple", "mlp": "tab:green", "attn": "tab:red"}
    for ax, (pos, title) in zip(axes, [("last_subject", "last subject token"), ("last", "last token")]):
        for kind, effect in summary.aie[pos].items():
            ax.plot(effect.numpy(), label=kind, color=colours[kind])
        ax.set_title(f"Average indirect effect at the {title}", fontsize=9)
        ax.set_xlabel("layer (window centre for mlp/attn)", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("AIE on p(answer)")
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"{summary.n_facts} facts; mean clean p = {summary.mean_clean:.3f}, corrupted p = {summary.mean_corrupted:.3f}",
        fontsize=9,
    )
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
