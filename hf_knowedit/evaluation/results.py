"""The result of one evaluation: pre- and post-edit metrics side by side, a curve, per-record numbers."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .chat import CHAT_METRICS
from .generative import GEN_METRICS
from .metrics import ROME_METRICS, TOKEN_ACC_METRICS, ZSRE_METRICS

#: the probability-comparison family (papers), generation (WILD-style, no teacher forcing), questions asked
#: in the model's chat form, and the teacher-forced token accuracy family (EasyEdit)
FAMILIES = {
    "paper": ROME_METRICS + ZSRE_METRICS,
    "generation": GEN_METRICS,
    "chat": CHAT_METRICS,
    "token_accuracy": TOKEN_ACC_METRICS,
}


def family_label(metric: str) -> str:
    """The label of a metric's family in tables."""
    if metric in TOKEN_ACC_METRICS:
        return "token accuracy (EasyEdit)"
    if metric in GEN_METRICS:
        return "generation (WILD)"
    if metric in CHAT_METRICS:
        return "chat (questions)"
    return "paper"


@dataclass
class EvalResult:
    """What :func:`hf_knowedit.evaluate` returns.

    Attributes:
        method / protocol / schema / n_records: what was measured.
        pre: metrics of the model before editing (percent; ``GE`` in ROME's units, 100 x bits).
        post: metrics after editing (``None`` when ``method=None``).
        curve: for the sequential protocol, ``[{"n_edits": k, metric: value, ...}, ...]`` on the records
            edited so far.
        records: per-record metrics, ``[{"index", "case_id", "pre": {...}, "post": {...}}, ...]`` (fractions).
        failed: edits that raised (``{"records", "case_ids", "error"}``); their records were scored unedited.
        settings: the arguments that shaped the numbers (seed, batch sizes, method options, ...).
        timing: seconds spent scoring before, editing, scoring after, and in total.
    """

    method: str | None
    protocol: str
    schema: str
    n_records: int
    pre: dict[str, float]
    post: dict[str, float] | None = None
    curve: list[dict[str, float]] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict."""
        return json.loads(json.dumps(asdict(self), default=str))

    def metric_names(self) -> list[str]:
        names = list(self.pre)
        for k in self.post or {}:
            if k not in names:
                names.append(k)
        return names

    def to_markdown(self, digits: int = 1) -> str:
        """A table: one row per metric, columns pre / post / change, grouped by family."""
        head = (
            f"**{self.method or 'unedited'}**, protocol `{self.protocol}`, {self.schema}, "
            f"{self.n_records} records" + (f", {len(self.failed)} failed edit(s)" if self.failed else "")
        )
        cols = ["metric", "family", "pre"] + (["post", "change"] if self.post is not None else [])
        lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for k in self.metric_names():
            row = [k, family_label(k), _fmt(self.pre.get(k), digits)]
            if self.post is not None:
                a, b = self.pre.get(k), self.post.get(k)
                row += [_fmt(b, digits), _fmt(None if a is None or b is None else b - a, digits, sign=True)]
            lines.append("| " + " | ".join(row) + " |")
        if self.curve:
            names = [k for k in self.curve[-1] if k != "n_edits"]
            lines += ["", "| edits | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
            for point in self.curve:
                lines.append(f"| {point['n_edits']} | " + " | ".join(_fmt(point.get(k), digits) for k in names) + " |")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()

    def plot(self, metrics: Sequence[str] = ("ES", "PS", "NS"), ax: Any = None, path: Any = None) -> Any:
        """Plot the curve (metrics against the number of edits) when there is one, else pre vs post bars.

        Metrics that are absent (e.g. ES on zsRE) are replaced by the family's counterparts. Needs
        matplotlib (``pip install hf_knowedit[plot]``). Returns the figure; saves it when ``path`` is given.
        """
        import matplotlib

        if ax is None and path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        have = set(self.pre) | set(self.post or {})
        names = [m for m in metrics if m in have] or [m for m in ("Efficacy", "Paraphrase", "Specificity") if m in have]
        if ax is None:
            fig, ax = plt.subplots(figsize=(6, 4))
        else:
            fig = ax.figure
        title = f"{self.method or 'unedited'} ({self.protocol}, {self.schema}, {self.n_records} records)"
        if self.curve:
            xs = [p["n_edits"] for p in self.curve]
            for m in names:
                (line,) = ax.plot(xs, [p.get(m) for p in self.curve], marker="o", label=m)
                ax.axhline(self.pre[m], color=line.get_color(), linestyle=":", linewidth=1)
            ax.set_xlabel("number of edits")
            ax.set_ylabel("percent (dotted: unedited)")
        else:
            width = 0.4
            xs = range(len(names))
            ax.bar([x - width / 2 for x in xs], [self.pre.get(m, 0) for m in names], width, label="pre")
            if self.post is not None:
                ax.bar([x + width / 2 for x in xs], [self.post.get(m, 0) for m in names], width, label="post")
            ax.set_xticks(list(xs), names)
            ax.set_ylabel("percent")
        ax.set_title(title)
        ax.legend()
        if path is not None:
            fig.savefig(path, bbox_inches="tight")
        return fig


def _fmt(x: float | None, digits: int, sign: bool = False) -> str:
    if x is None:
        return "–"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"
