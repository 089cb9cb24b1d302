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
from typing import Any

from torch import nn

from ..errors import InvalidConfigError
from ..generation import generate_texts
from ..stack import disable_edits, get_state

logger = logging.getLogger(__name__)

#: the neutral starts of MEMIT's context templates (cycled when ``n`` is larger)
STARTS = ("The", "Therefore", "Because", "I", "You")
_HISTORY_KEY = "context.templates"


def _clean(text: str) -> str:
    """One line without braces (they would break ``str.format``), ending in ``". "``."""
    text = " ".join(text.replace("{", " ").replace("}", " ").split())
    return text + ". "


def context_templates(model: nn.Module, tokenizer: Any, *, n: int = 5, length: int = 10, seed: int = 0) -> list[str]:
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
        with disable_edits(model):  # templates come from the unedited model
            texts = generate_texts(model, tokenizer, starts, max_new_tokens=length, seed=seed) if n else []
        cache[key] = ["{}"] + [_clean(t) + "{}" for t in texts]
        logger.info("Context templates (seed %d): %s", seed, cache[key])
    return list(cache[key])
