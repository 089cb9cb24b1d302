"""Context templates: short prefixes the model writes itself, so an edit generalises across contexts.

ROME and MEMIT average the key ``k*`` (and optimise the value) over a few prompts that
put a random prefix before the fact: ``"{}"`` (no prefix) plus ``n`` generations such as
``"Therefore, the team decided. {}"``. The reference code seeds generation from GPT-2's
``"<|endoftext|>"``; here every prefix starts from a neutral English word (MEMIT's
``"The"``, ``"Therefore"``, ``"Because"``, ``"I"``, ``"You"``), is sampled with a fixed seed
(top-k 5, as the reference) from the *unedited* model, and is cached per model in
``get_state(model).history`` (no module-level caches).

>>> context_templates(model, tok, n=5, length=10)
['{}', 'The first time I saw the movie. {}', ...]
"""

from __future__ import annotations

import logging
from typing import Any, List, Sequence

import torch
from torch import nn

from .errors import InvalidConfigError
from .stack import disable_edits, get_state

logger = logging.getLogger(__name__)

#: the neutral starts of MEMIT's context templates (cycled when ``n`` is larger)
STARTS = ("The", "Therefore", "Because", "I", "You")
_HISTORY_KEY = "context.templates"


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def max_positions(model: nn.Module) -> int:
    """The longest sequence the model's position embeddings allow (large if the config does not say)."""
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1 << 20


def generate_texts(model: nn.Module, tokenizer: Any, starts: Sequence[str], *, length: int, seed: int = 0,
                   per_start: int = 1, top_k: int = 5, batch_size: int = 64) -> List[str]:
    """Sample ``per_start`` continuations of ``length`` new tokens after each start (seeded).

    All rows are generated together (left-padded, ``batch_size`` rows per ``generate`` call) on the
    base model (active edits disabled) under a forked RNG, so neither the caller's random state nor
    active edits change the result. Returns ``start + continuation`` strings, ``per_start`` per start
    in the order of ``starts``.
    """
    device = _device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad = 0 if pad is None else pad
    rows = [(start, tokenizer(start)["input_ids"]) for start in starts for _ in range(per_start)]
    width = max(len(ids) for _, ids in rows)
    new_tokens = max(1, min(length, max_positions(model) - width))
    out: List[str] = []
    rng_devices = [] if device.type == "cpu" else [device.index or 0]
    training = model.training
    with torch.random.fork_rng(devices=rng_devices, device_type=device.type), disable_edits(model), torch.no_grad():
        model.eval()
        torch.manual_seed(seed)
        try:
            for i in range(0, len(rows), batch_size):
                chunk = rows[i:i + batch_size]
                ids = torch.tensor([[pad] * (width - len(r)) + r for _, r in chunk], device=device)
                mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for _, r in chunk], device=device)
                gen = model.generate(
                    input_ids=ids, attention_mask=mask, do_sample=True, top_k=top_k, top_p=1.0, temperature=1.0,
                    max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad, num_beams=1,
                    use_cache=True,
                )
                for (start, _), row in zip(chunk, gen):
                    new = tokenizer.decode(row[width:], skip_special_tokens=True)
                    out.append(start + ("" if not new or new[0].isspace() else " ") + new if start else new)
        finally:
            model.train(training)
    return out


def _clean(text: str) -> str:
    """One line without braces (they would break ``str.format``), ending in ``". "``."""
    text = " ".join(text.replace("{", " ").replace("}", " ").split())
    return text + ". "


def context_templates(model: nn.Module, tokenizer: Any, *, n: int = 5, length: int = 10, seed: int = 0) -> List[str]:
    """``["{}"]`` plus ``n`` model-generated prefixes, each ending in ``". {}"``.

    Prefixes start from :data:`STARTS` (cycled), ``length`` sampled tokens each, seeded.
    Cached per model and per ``(n, length, seed)`` in ``get_state(model).history``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise InvalidConfigError(f"context_templates: n must be an int >= 0, got {n!r}.")
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise InvalidConfigError(f"context_templates: length must be an int >= 1, got {length!r}.")
    cache = get_state(model).history.setdefault(_HISTORY_KEY, {})
    key = (n, length, seed)
    if key not in cache:
        starts = [STARTS[i % len(STARTS)] for i in range(n)]
        texts = generate_texts(model, tokenizer, starts, length=length, seed=seed) if n else []
        cache[key] = ["{}"] + [_clean(t) + "{}" for t in texts]
        logger.info("Context templates (seed %d): %s", seed, cache[key])
    return list(cache[key])
