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
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..architectures import get_architecture, get_module
from ..errors import UnsupportedArchitectureError
from ..tokens import split_prompt_target

Encoded = Tuple[Sequence[int], Sequence[int]]  # (prompt_ids, target_ids)


@dataclass(frozen=True)
class TargetScore:
    """Scores of one target after one prompt.

    Attributes:
        logprobs: ``log p(target token j | prompt, target tokens < j)`` for each target token (natural log).
        predicted: the arg-max token id at each target position (teacher forced).
        target_ids: the target's token ids, as seen in context.
    """

    logprobs: Tuple[float, ...]
    predicted: Tuple[int, ...]
    target_ids: Tuple[int, ...]

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
    def hits(self) -> Tuple[bool, ...]:
        """Whether the arg-max equals the target token, per target token."""
        return tuple(p == t for p, t in zip(self.predicted, self.target_ids))

    @property
    def token_accuracy(self) -> float:
        """Fraction of target tokens predicted top-1 under teacher forcing."""
        return sum(self.hits) / self.n_tokens


def encode_pairs(tokenizer: Any, pairs: Sequence[Tuple[str, str]]) -> List[Encoded]:
    """``split_prompt_target`` for every pair (raises its typed errors)."""
    return [split_prompt_target(tokenizer, p, t) for p, t in pairs]


def _accepts(module: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def logits_at(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              position_ids: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
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
    logits = get_module(model, spec.lm_head)(hidden[rows, cols]).float()
    cap = getattr(model.config, spec.logit_softcap, None) if spec.logit_softcap else None
    if cap:
        logits = cap * torch.tanh(logits / cap)
    return logits


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, padding_side: str,
              device: Any) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, List[int]]:
    """``(input_ids, attention_mask, position_ids, offsets)``; ``offsets[i]`` = index of row i's first real token."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    offsets = []
    for i, s in enumerate(seqs):
        start = width - len(s) if padding_side == "left" else 0
        ids[i, start:start + len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, start:start + len(s)] = 1
        offsets.append(start)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), position_ids.to(device), offsets


def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None) if tokenizer is not None else None
        if isinstance(value, int):
            return value
    return 0


@torch.no_grad()
def score_encoded(model: nn.Module, encoded: Sequence[Encoded], *, tokenizer: Any = None,
                  batch_size: int = 32, padding_side: Optional[str] = None) -> List[TargetScore]:
    """Score already tokenized ``(prompt_ids, target_ids)`` pairs; results in input order.

    ``padding_side`` defaults to ``tokenizer.padding_side`` (``"right"`` without a tokenizer).
    Pairs are sorted by length so each batch holds similar lengths.
    """
    side = padding_side or getattr(tokenizer, "padding_side", None) or "right"
    if side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
    for i, (p, t) in enumerate(encoded):
        if len(p) == 0 or len(t) == 0:
            raise ValueError(f"pair {i}: prompt and target need at least one token each "
                             f"(got {len(p)} and {len(t)}).")
    device = next(model.parameters()).device
    pad_id = _pad_id(tokenizer)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]) + len(encoded[i][1]))
    out: List[Optional[TargetScore]] = [None] * len(encoded)
    training = model.training
    model.eval()
    try:
        for b in range(0, len(order), max(1, int(batch_size))):
            idx = order[b:b + batch_size]
            seqs = [list(encoded[i][0]) + list(encoded[i][1]) for i in idx]
            ids, mask, pos, offsets = pad_batch(seqs, pad_id, side, device)
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
                out[i] = TargetScore(tuple(tok_lp[k:k + n]), tuple(pred[k:k + n]), tuple(encoded[i][1]))
                k += n
    finally:
        model.train(training)
    return out  # type: ignore[return-value]


def score_targets(model: nn.Module, tokenizer: Any, pairs: Sequence[Tuple[str, str]], *, batch_size: int = 32,
                  padding_side: Optional[str] = None) -> List[TargetScore]:
    """Score ``(prompt, target)`` text pairs: per-token log-probs and teacher-forced arg-max.

    >>> s = score_targets(model, tok, [("The Eiffel Tower is in", "Paris")])[0]
    >>> s.sum_logprob, s.mean_nll, s.token_accuracy
    """
    return score_encoded(model, encode_pairs(tokenizer, pairs), tokenizer=tokenizer, batch_size=batch_size,
                         padding_side=padding_side)


@torch.no_grad()
def generate_texts(model: nn.Module, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 90,
                   top_k: Optional[int] = 5, seed: Optional[int] = 0) -> List[str]:
    """Continue each prompt (one left-padded batch); return prompt + continuation as text.

    ``seed`` set: top-``k`` sampling (ROME's ``generate_fast`` samples with k=5) with the global RNG
    seeded inside :func:`torch.random.fork_rng`, so the caller's random state is untouched.
    ``seed=None``: greedy decoding. Generation runs to ``max_new_tokens`` (ROME's 100 tokens in total
    with ~10-token prompts) without stopping at EOS, as ROME's does.
    """
    if not prompts:
        return []
    device = next(model.parameters()).device
    enc = tokenizer(list(prompts), padding=True, padding_side="left", return_tensors="pt")
    pad_id = _pad_id(tokenizer)
    sample = seed is not None
    kwargs = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=sample,
                  pad_token_id=pad_id, top_k=top_k if sample else None, top_p=None, temperature=None)
    training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if sample:
                torch.manual_seed(int(seed))
            out = model.generate(input_ids=enc["input_ids"].to(device),
                                 attention_mask=enc["attention_mask"].to(device), **kwargs)
    finally:
        model.train(training)
    return tokenizer.batch_decode(out, skip_special_tokens=True)
