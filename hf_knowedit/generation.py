"""Text generation, one way for the whole library: context templates, the model-sampled statistics
corpus and the fluency metric all call :func:`generate_texts`.

Rows are left-padded with :func:`~hf_knowedit.tokens.pad_id` (tokenizers without a pad token need
no change), generated ``batch_size`` at a time in eval mode without gradients, under a forked RNG
seeded once per call, so neither the caller's random state nor batch boundaries outside the call
change the result. ``seed=None`` decodes greedily. ``row_seeds`` gives every row its own sampling
generator (:class:`RowSampler`), so a row's text does not depend on which other rows share its batch:
fluency generates many records in one batch and still gets each record's own numbers.
The model runs as it is: wrap the call in ``disable_edits(model)`` to generate from the base model
(for every thread), or in :func:`~hf_knowedit.stack.base_view` (for the calling thread only, as the
library's own passes do).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from huggingface_hub.utils import tqdm
from torch import nn
from transformers.generation.logits_process import LogitsProcessor, LogitsProcessorList
from transformers.generation.streamers import BaseStreamer

from .architectures import decoder_config, model_device
from .errors import InvalidConfigError, UnsupportedArchitectureError
from .hooks import frozen
from .tokens import pad_batch, pad_id


def max_positions(model: nn.Module) -> int:
    """The longest sequence the model's position embeddings allow (large if the config does not say), read
    from the text decoder's config (:func:`~hf_knowedit.architectures.decoder_config`) for a supported model."""
    try:
        config = decoder_config(model)
    except UnsupportedArchitectureError:
        config = model.config
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1 << 20


#: generations of at least this many tokens in all show a progress bar
PROGRESS_MIN_TOKENS = 4096


class _Ticks(BaseStreamer):
    """A ``generate`` streamer that only advances a progress bar, one tick per generated token step."""

    def __init__(self, bar: Any, steps: int) -> None:
        self.bar, self.steps, self.calls, self.done = bar, steps, 0, 0

    def put(self, value: Any) -> None:
        self.calls += 1
        if self.calls > 1 and self.done < self.steps:  # the first call hands over the prompt
            self.done += 1
            self.bar.update(1)

    def end(self) -> None:
        pass


class RowSampler(LogitsProcessor):
    """Top-``k`` sampling with one seeded generator per row, as a logits processor under greedy decoding:
    each step draws row ``b``'s token from the softmax of its ``k`` largest logits with ``generators[b]``
    and leaves only that token finite, so the greedy arg-max takes it."""

    def __init__(self, seeds: Sequence[int], top_k: int | None) -> None:
        self.generators = [torch.Generator().manual_seed(int(s) % (1 << 63)) for s in seeds]
        self.top_k = top_k

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logits = scores.float().cpu()
        k = logits.shape[-1] if self.top_k is None else min(self.top_k, logits.shape[-1])
        values, index = logits.topk(k, dim=-1)
        probs = torch.softmax(values, dim=-1)
        out = torch.full_like(scores, float("-inf"))
        for b, gen in enumerate(self.generators):
            pick = index[b, torch.multinomial(probs[b], 1, generator=gen)]
            out[b, pick.to(out.device)] = 0.0
        return out


def _join(start: str, new: str) -> str:
    if not start:
        return new
    return start + ("" if not new or new[0].isspace() else " ") + new


@torch.no_grad()
def generate_texts(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    seed: int | None = 0,
    top_k: int | None = 5,
    per_prompt: int = 1,
    batch_size: int = 64,
    row_seeds: Sequence[int] | None = None,
    stop_ids: Sequence[int] | None = None,
    add_special_tokens: bool = True,
) -> list[str]:
    """``prompt + continuation`` for each prompt, ``per_prompt`` times each, in the order of ``prompts``.

    Exactly ``max_new_tokens`` tokens are generated (fewer only where the model's positions run out),
    without stopping at EOS, as ROME's ``generate_fast`` does. ``seed`` set: top-``k`` sampling with
    the RNG seeded inside :func:`torch.random.fork_rng`; ``seed=None``: greedy decoding.
    ``row_seeds`` (one per prompt; ``per_prompt`` must be 1): top-``k`` sampling with one generator per
    row (:class:`RowSampler`), independent of batching; ``seed`` is then ignored.
    ``stop_ids``: a row stops at the first of these tokens (an answer's end of turn), which is not part
    of its text; other rows of the batch go on. ``add_special_tokens=False`` tokenizes prompts that
    carry their special tokens already (a rendered chat template).
    """
    if not prompts:
        return []
    if row_seeds is not None and (len(row_seeds) != len(prompts) or per_prompt != 1):
        raise InvalidConfigError(f"row_seeds needs one seed per prompt ({len(prompts)}) and per_prompt=1.")
    device = model_device(model)
    pad = pad_id(tokenizer)
    rows = [
        (p, list(tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"]))
        for p in prompts
        for _ in range(per_prompt)
    ]
    width = max(len(ids) for _, ids in rows)
    new_tokens = max(1, min(max_new_tokens, max_positions(model) - width))
    sample = seed is not None and row_seeds is None
    options = dict(
        do_sample=sample,
        top_k=top_k if sample else None,
        top_p=1.0 if sample else None,
        temperature=1.0 if sample else None,
    )
    # without stop tokens every row gets exactly new_tokens tokens; with them a row ends at the first one
    if stop_ids:
        options["eos_token_id"] = list(stop_ids)
    else:
        options["min_new_tokens"] = new_tokens
    rng_devices = [] if device.type == "cpu" else [device.index or 0]
    out: list[str] = []
    with torch.random.fork_rng(devices=rng_devices, device_type=device.type), frozen(model, params=False):
        if sample:
            torch.manual_seed(int(seed))
        starts = range(0, len(rows), max(1, int(batch_size)))
        # a bar only where it takes a while (the model-sampled statistics corpus: hundreds of texts)
        with tqdm(
            total=len(starts) * new_tokens,
            desc=f"generating {len(rows)} texts of {new_tokens} tokens",
            unit="step",
            disable=len(rows) * new_tokens < PROGRESS_MIN_TOKENS,
            leave=False,
        ) as bar:
            for i in starts:
                chunk = rows[i : i + batch_size]
                ids, mask, _, _ = pad_batch([r for _, r in chunk], pad, "left", device, width=width)
                ticks = _Ticks(bar, new_tokens)
                rows_sampler = None
                if row_seeds is not None:
                    rows_sampler = LogitsProcessorList([RowSampler(row_seeds[i : i + batch_size], top_k)])
                gen = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=new_tokens,
                    pad_token_id=pad,
                    num_beams=1,
                    use_cache=True,
                    streamer=None if bar.disable else ticks,
                    logits_processor=rows_sampler,
                    **options,
                )
                bar.update(new_tokens - ticks.done)
                for (start, _), row in zip(chunk, gen):
                    new = row[ids.shape[1] :].tolist()
                    if stop_ids:
                        new = new[: next((k for k, t in enumerate(new) if t in stop_ids), len(new))]
                    out.append(_join(start, tokenizer.decode(new, skip_special_tokens=True)))
    return out
