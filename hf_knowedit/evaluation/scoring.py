"""Teacher-forced scores of whole multi-token targets after prompts, in padded batches.

For each ``(prompt, target)`` pair the target is tokenized *in context* (after one separating
space, :func:`hf_knowedit.tokens.split_prompt_target`), the sequence ``prompt_ids + target_ids``
is run once, and at every target position we read

* the log-probability of the target token (float32 ``log_softmax``), and
* the arg-max token (teacher forcing: the model sees the true earlier target tokens).

Batches are padded on the tokenizer's ``padding_side``; the attention mask marks the real tokens
and explicit ``position_ids = cumsum(mask) - 1`` make every real token sit at the position it would
have without padding. Left and right padding therefore give the same numbers (up to float
rounding), which a padding-side bug in another library once did not (anchors §d.5).
Models whose backbone takes no ``position_ids`` (ALiBi: Bloom, MPT) derive positions from the mask.

Logits are computed only at the positions that predict target tokens: the backbone named in the
architecture table runs, the hidden states at those positions go through the LM head (and the
soft-cap, where the table names one). Models without a table row are run whole (``model(...).logits``).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..architectures import get_architecture, get_module, lm_logits, model_device
from ..errors import UnsupportedArchitectureError
from ..hooks import frozen
from ..tokens import pad_batch, pad_id, split_prompt_target

Encoded = tuple[Sequence[int], Sequence[int]]  # (prompt_ids, target_ids)


@dataclass(frozen=True)
class TargetScore:
    """Scores of one target after one prompt.

    Attributes:
        logprobs: ``log p(target token j | prompt, target tokens < j)`` for each target token (natural log).
        predicted: the arg-max token id at each target position (teacher forced).
        target_ids: the target's token ids, as seen in context.
    """

    logprobs: tuple[float, ...]
    predicted: tuple[int, ...]
    target_ids: tuple[int, ...]

    @property
    def n_tokens(self) -> int:
        return len(self.target_ids)

    @property
    def sum_logprob(self) -> float:
        """``log p(target | prompt)`` of the whole target (sum over its tokens)."""
        return float(sum(self.logprobs))

    @property
    def mean_nll(self) -> float:
        """Mean negative log-probability per target token: the quantity ROME's reference code
        compares (``test_batch_prediction`` divides the summed NLL by the target length)."""
        return -self.sum_logprob / self.n_tokens

    @property
    def mean_prob(self) -> float:
        """``exp(-mean_nll)``: the per-token geometric-mean probability (ROME's EM/PM/NM use it)."""
        return math.exp(-self.mean_nll)

    @property
    def hits(self) -> tuple[bool, ...]:
        """Whether the arg-max equals the target token, per target token."""
        return tuple(p == t for p, t in zip(self.predicted, self.target_ids))

    @property
    def token_accuracy(self) -> float:
        """Fraction of target tokens predicted top-1 under teacher forcing."""
        return sum(self.hits) / self.n_tokens


def encode_pairs(tokenizer: Any, pairs: Sequence[tuple[str, str]]) -> list[Encoded]:
    """``split_prompt_target`` for every pair (raises its typed errors)."""
    return [split_prompt_target(tokenizer, p, t) for p, t in pairs]


def _accepts(module: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def logits_at(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
) -> torch.Tensor:
    """Float32 next-token logits ``[n, vocab]`` at positions ``(rows[i], cols[i])`` of a padded batch."""
    try:
        spec = get_architecture(model)
    except UnsupportedArchitectureError:
        spec = None
    runner = get_module(model, spec.backbone) if spec is not None else model
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if _accepts(runner, "position_ids"):
        kwargs["position_ids"] = position_ids
    if _accepts(runner, "use_cache"):
        kwargs["use_cache"] = False
    out = runner(**kwargs)
    if spec is None:
        logits = out.logits if hasattr(out, "logits") else out[0]
        return logits[rows, cols].float()
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return lm_logits(model, spec, hidden[rows, cols]).float()


@torch.no_grad()
def score_encoded(
    model: nn.Module,
    encoded: Sequence[Encoded],
    *,
    tokenizer: Any = None,
    batch_size: int = 32,
    padding_side: str | None = None,
) -> list[TargetScore]:
    """Score already tokenized ``(prompt_ids, target_ids)`` pairs; results in input order.

    ``padding_side`` defaults to ``tokenizer.padding_side`` (``"right"`` without a tokenizer).
    Pairs are sorted by length so each batch holds similar lengths.
    """
    side = padding_side or getattr(tokenizer, "padding_side", None) or "right"
    if side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
    for i, (p, t) in enumerate(encoded):
        if len(p) == 0 or len(t) == 0:
            raise ValueError(f"pair {i}: prompt and target need at least one token each (got {len(p)} and {len(t)}).")
    device = model_device(model)
    pad = pad_id(tokenizer)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]) + len(encoded[i][1]))
    out: list[TargetScore | None] = [None] * len(encoded)
    with frozen(model, params=False):
        for b in range(0, len(order), max(1, int(batch_size))):
            idx = order[b : b + batch_size]
            seqs = [list(encoded[i][0]) + list(encoded[i][1]) for i in idx]
            ids, mask, pos, offsets = pad_batch(seqs, pad, side, device)
            rows, cols, targets = [], [], []
            for r, i in enumerate(idx):
                p_len, t_ids = len(encoded[i][0]), list(encoded[i][1])
                for j, tid in enumerate(t_ids):  # token j is predicted at position p_len + j - 1
                    rows.append(r)
                    cols.append(offsets[r] + p_len + j - 1)
                    targets.append(tid)
            rows_t = torch.tensor(rows, device=device)
            cols_t = torch.tensor(cols, device=device)
            logits = logits_at(model, ids, mask, pos, rows_t, cols_t)
            logp = torch.log_softmax(logits, dim=-1)
            tgt = torch.tensor(targets, device=device)
            tok_lp = logp.gather(1, tgt[:, None])[:, 0].cpu().tolist()
            pred = logits.argmax(-1).cpu().tolist()
            k = 0
            for i in idx:
                n = len(encoded[i][1])
                out[i] = TargetScore(tuple(tok_lp[k : k + n]), tuple(pred[k : k + n]), tuple(encoded[i][1]))
                k += n
    return out  # type: ignore[return-value]


def score_targets(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int = 32,
    padding_side: str | None = None,
) -> list[TargetScore]:
    """Score ``(prompt, target)`` text pairs: per-token log-probs and teacher-forced arg-max.

    >>> s = score_targets(model, tok, [("The Eiffel Tower is in", "Paris")])[0]
    >>> s.sum_logprob, s.mean_nll, s.token_accuracy
    """
    return score_encoded(
        model, encode_pairs(tokenizer, pairs), tokenizer=tokenizer, batch_size=batch_size, padding_side=padding_side
    )
