"""The causal-tracing engine: one fact's clean run, corrupted runs and batched restorations.

**No wasted work.** The reference code runs one 11-row forward pass per cell. Here:

* restorations are batched: the corrupted samples × many cells go through one forward pass, in chunks
  sized by a memory budget (``memory_mb``), with a progress bar;
* the clean run and the corrupted run are done once; every cell restored from layer ``l`` on (or from
  its window's start) reuses the corrupted run's outputs of the blocks below: those blocks are
  temporarily replaced by replay stubs (:func:`hf_knowedit.hooks.replaced_blocks`);
* cells at tokens before the subject are not run: corruption starts at the subject, so with causal
  attention those states are identical in the clean and the corrupted runs and restoring them is a
  no-op; their score is the corrupted probability;
* logits are computed at the scored position(s) only (:func:`hf_knowedit.architectures.lm_logits`);
* a cell restored at token ``t`` leaves every position before ``t`` as in the corrupted run (causal
  attention), so those positions are not recomputed: one corrupted forward over them builds a KV cache
  (the model's own ``Cache``), repeated over the batch, and only positions ``t..`` are run. Whether the
  model's cache reproduces a full forward exactly is checked once per trace on a probe cell; if not (or
  if the model has no cache, or its cache holds recurrent / convolution state besides keys and values:
  the hybrid stacks), full-length forwards are used (logged at debug level).

Hybrid stacks: an ``"attn"`` restoration restores the attention output of the blocks that have attention
(:func:`~hf_knowedit.architectures.attention_layers`); naming a block without attention (an LFM2
convolution block, a Bamba Mamba2 block) raises :class:`~hf_knowedit.errors.TraceError`.

Both reuses are exact (equal to a plain forward up to float rounding; ``reuse_lower_layers=False`` turns
them off). The tests check them on every architecture of the table against an independent tracer.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Sequence
from typing import Any

import torch
from huggingface_hub.utils import tqdm
from torch import nn

from ..architectures import (
    ArchitectureSpec,
    attention_layers,
    attn_out_path,
    decoder_config,
    get_architecture,
    get_module,
    layer_path,
    lm_logits,
    mlp_out_dims,
    mlp_path,
    model_device,
    num_layers,
)
from ..errors import InvalidRequestError, TraceError
from ..hooks import ReplayBlock, TraceDict, frozen, hidden, replace_hidden, replaced_blocks
from ..tokens import chars_to_tokens, encode, split_prompt_target, subject_char_span, target_separator
from .config import KINDS, TraceConfig
from .corruption import make_corruption

logger = logging.getLogger(__name__)

Restoration = Sequence[tuple[str, int, int]]  # ((kind, layer, token), ...)

#: seconds a trace runs before its progress bar appears (``progress=None``)
PROGRESS_DELAY_S = 3.0


def module_path(spec: ArchitectureSpec, kind: str, layer: int) -> str:
    """The module whose output a ``kind`` restoration at ``layer`` sets back."""
    if kind == "hidden":
        return layer_path(spec, layer)
    return mlp_path(spec, layer) if kind == "mlp" else attn_out_path(spec, layer)


def _holds_state(cache: Any) -> bool:
    """Whether a cache (or one layer of it) keeps recurrent or convolution state besides keys and values
    (state-space and convolution mixers of hybrid stacks)."""
    return any(hasattr(cache, name) for name in ("conv_states", "recurrent_states", "ssm_states"))


def _as_3d(t: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``[batch, seq, d]`` view of an activation (OPT's fc2 sees tokens flattened to ``[batch*seq, d]``)."""
    return t if t.dim() == 3 else t.reshape(-1, seq_len, t.shape[-1])


def _expand_output(output: Any, n: int, prefix: int = 0) -> Any:
    """Repeat each corrupted sample ``n`` times along the batch (sample-major rows: ``s * n + c``), keeping
    positions ``prefix..`` of the hidden state."""
    h = hidden(output)
    if h.dim() == 3:
        h = h[:, prefix:]
    return replace_hidden(output, h.repeat_interleave(n, dim=0))


class CausalTracer:
    """One fact, prepared for tracing: the clean run and the corrupted runs are done on construction;
    :meth:`score` then runs any restorations, batched.

    A restoration is a sequence of ``(kind, layer, token)`` triples restored together; ``score`` returns,
    per restoration, ``p(answer)`` averaged over the corrupted samples. ``[]`` restores nothing (the
    corrupted probability); restoring ``("hidden", l, t)`` for every ``l, t`` gives back the clean one.

    Arguments: a :class:`~hf_knowedit.tracing.config.TraceConfig` (``config=``) or its fields as keywords.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        prompt: str,
        subject: str,
        *,
        target: str | None = None,
        config: TraceConfig | None = None,
        **options: Any,
    ) -> None:
        self.config = cfg = TraceConfig.of(config, **options)
        if not isinstance(prompt, str) or not prompt.strip():
            raise TraceError("prompt must be a non-empty string, e.g. 'The Eiffel Tower is located in'.")
        self.model, self.tokenizer, self.prompt, self.subject = model, tokenizer, prompt, subject
        self.samples, self.seed, self.memory_mb = cfg.samples, cfg.seed, float(cfg.memory_mb)
        self.reuse_lower_layers, self.progress = cfg.reuse_lower_layers, cfg.progress
        self.spec = get_architecture(model)
        self.n_layers = num_layers(model, self.spec)
        #: the blocks whose attention output an ``"attn"`` restoration can set back (all but in hybrid stacks)
        self.attention_layers = attention_layers(model, self.spec)
        self.device = model_device(model)
        self.dtype = next(model.parameters()).dtype

        # tokens: prompt (+ teacher-forced target prefix); subject span from offsets
        char_span = subject_char_span(prompt, subject)
        full = prompt
        if target is None:
            ids = list(encode(tokenizer, prompt)["input_ids"])
            target_ids: list[int] = []
        else:
            if not isinstance(target, str):
                raise TraceError(f"target must be a string or None, got {type(target).__name__}.")
            try:
                prompt_ids, target_ids = split_prompt_target(tokenizer, prompt, target)
            except InvalidRequestError as e:
                raise TraceError(f"{e} Give a target with visible text, e.g. target='Paris'.") from None
            ids = prompt_ids + target_ids[:-1]
            full = prompt + target_separator(prompt) + target.strip()
        offsets = encode(tokenizer, full)["offset_mapping"]
        self.subject_range = chars_to_tokens(offsets, char_span)
        self.input_ids = ids
        self.n_tokens = len(ids)
        self.target = target
        self.corruption = make_corruption(model, tokenizer, cfg.corruption, cfg.noise, cfg.subjects, cfg.rng)
        self.noise = self.corruption.level
        self.corrupted_ids = self.corruption.inputs(self, char_span, self.n_tokens - max(0, len(target_ids) - 1))

        with torch.no_grad(), frozen(model, params=False):
            self._clean_run(target_ids)
            self._corrupted_run()

    def _layers(self, kind: str) -> list[int]:
        """The blocks a ``kind`` restoration can name."""
        return self.attention_layers if kind == "attn" else list(range(self.n_layers))

    # -- the two reference runs -------------------------------------------------

    def _logprobs(self, last_hidden: torch.Tensor) -> torch.Tensor:
        """Sum of log p(answer tokens) per row, logits only at the scored (last ``k``) positions."""
        k = len(self.answer_ids)
        logits = lm_logits(self.model, self.spec, last_hidden[:, last_hidden.shape[1] - k :]).float()
        logp = torch.log_softmax(logits, dim=-1)
        answer = torch.tensor(self.answer_ids, device=logp.device)
        return logp.gather(-1, answer.view(1, k, 1).expand(logp.shape[0], k, 1)).squeeze(-1).sum(-1)

    def _backbone(self, ids: torch.Tensor) -> torch.Tensor:
        out = get_module(self.model, self.spec.backbone)(input_ids=ids, use_cache=False)
        return out[0]

    def _clean_run(self, target_ids: list[int]) -> None:
        paths = [module_path(self.spec, kind, l) for kind in KINDS for l in self._layers(kind)]
        ids = torch.tensor([self.input_ids], device=self.device)
        with TraceDict(self.model, paths, clone=True, detach=True) as td:
            last = self._backbone(ids)
        if target_ids:
            self.answer_ids = list(target_ids)
        else:
            logits = lm_logits(self.model, self.spec, last[:, -1:])
            self.answer_ids = [int(logits[0, -1].argmax())]
        self.clean_prob = float(self._logprobs(last).exp()[0])
        self.clean_states = {p: _as_3d(hidden(td[p].output), self.n_tokens)[0] for p in paths}  # [n_tokens, d]

    def _corrupt(self, n: int, offset: int = 0) -> Any:
        return self.corruption.applied(self.model, n, offset)

    def _corrupted_run(self) -> None:
        blocks = [layer_path(self.spec, l) for l in range(self.n_layers)]
        with TraceDict(self.model, blocks, clone=True, detach=True) as td, self._corrupt(1):
            last = self._backbone(self.corrupted_ids)
        self.corrupted_prob = float(self._logprobs(last).exp().mean())
        self.corrupted_outputs = [td[b].output for b in blocks]
        self.use_kv = self.reuse_lower_layers and self._kv_works()

    def _kv_works(self) -> bool:
        """Check once, on this model, that resuming the corrupted run from its KV cache gives what a full
        forward gives (any architecture whose cache does not support it falls back to full forwards)."""
        t = self.n_tokens - len(self.answer_ids)
        if t < 1:
            return False
        probe = [[("hidden", 0, t)]]
        try:
            with torch.no_grad(), frozen(self.model, params=False):
                fast = self._run_chunk(t, 0, probe)
                full = self._run_chunk(0, 0, probe)
        except Exception as e:  # noqa: BLE001 - any failure means: do not use the cache on this model
            logger.debug("KV-cache reuse disabled for %s: %s", type(self.model).__name__, e)
            return False
        ok = bool(torch.allclose(fast, full, rtol=1e-3, atol=1e-6))
        if not ok:
            logger.debug("KV-cache reuse disabled for %s: %s != %s", type(self.model).__name__, fast, full)
        return ok

    # -- restorations -----------------------------------------------------------

    def _rows_per_chunk(self, seq_len: int) -> int:
        cfg = decoder_config(self.model, self.spec)
        d = get_module(self.model, self.spec.embed).weight.shape[-1]
        heads = getattr(cfg, "num_attention_heads", None) or max(1, d // 64)
        inner = mlp_out_dims(self.model, self.spec, 0)[0]
        elem = torch.finfo(self.dtype).bits // 8
        per_row = elem * seq_len * (8 * d + 2 * inner + 2 * heads * self.n_tokens)
        per_row += 8 * len(self.answer_ids) * getattr(cfg, "vocab_size", 0)
        return max(self.samples, int(self.memory_mb * 2**20 // per_row))

    def score(self, restorations: Sequence[Restoration]) -> torch.Tensor:
        """``p(answer)`` averaged over the corrupted samples, for each restoration (float32 tensor ``[n]``).

        Restorations are grouped by the first position they touch (earlier positions come from the corrupted
        run's KV cache when the model supports it) and sorted by their lowest layer (lower blocks are
        replayed from the corrupted run), then run in chunks of at most ``memory_mb`` of activations.
        """
        first_scored = self.n_tokens - len(self.answer_ids)
        groups: dict[int, list[tuple[int, int, list[tuple[str, int, int]]]]] = {}
        for i, r in enumerate(restorations):
            triples = [(k, int(l), int(t)) for k, l, t in r]
            for k, l, t in triples:
                if k not in KINDS or not 0 <= l < self.n_layers or not 0 <= t < self.n_tokens:
                    raise TraceError(
                        f"bad restoration {(k, l, t)}: kind in {KINDS}, layer in [0, {self.n_layers}), "
                        f"token in [0, {self.n_tokens})."
                    )
                if l not in self._layers(k):
                    raise TraceError(
                        f"bad restoration {(k, l, t)}: block {l} of this {self.spec.model_type!r} model has no "
                        f"attention; restore attention in blocks {self.attention_layers}, or restore 'hidden' / "
                        "'mlp' there."
                    )
            start = min((l for _, l, _ in triples), default=self.n_layers) if self.reuse_lower_layers else 0
            prefix = min([t for _, _, t in triples] + [first_scored]) if self.use_kv else 0
            groups.setdefault(prefix, []).append((start, i, triples))
        chunks = []
        for prefix, cells in sorted(groups.items()):
            cells.sort(key=lambda c: c[0])
            per_chunk = max(1, self._rows_per_chunk(self.n_tokens - prefix) // self.samples)
            chunks += [(prefix, cells[j : j + per_chunk]) for j in range(0, len(cells), per_chunk)]
        out = torch.empty(len(restorations), dtype=torch.float32)
        # progress=None: the bar appears once the trace has run PROGRESS_DELAY_S seconds (a CPU trace of
        # one fact can take minutes, a GPU trace of many finishes unseen)
        delay = 0 if self.progress else PROGRESS_DELAY_S
        with (
            torch.no_grad(),
            frozen(self.model, params=False),
            tqdm(
                total=len(restorations), desc="causal trace", disable=self.progress is False, delay=delay, unit="cell"
            ) as bar,
        ):
            for prefix, chunk in chunks:
                probs = self._run_chunk(prefix, chunk[0][0], [c[2] for c in chunk])
                for (_, i, _), p in zip(chunk, probs):
                    out[i] = p
                bar.update(len(chunk))
        return out

    def _run_chunk(self, prefix: int, start: int, chunk: list[list[tuple[str, int, int]]]) -> torch.Tensor:
        """One batched forward: positions ``prefix..`` and blocks ``start..`` are computed, the rest is the
        corrupted run's (KV cache of the first ``prefix`` positions; replayed outputs of the blocks below)."""
        n, S, T = len(chunk), self.samples, self.n_tokens - prefix
        # rows are sample-major: row s * n + c is corrupted sample s with cell c's restoration
        edits: dict[str, tuple[list[int], list[int]]] = {}
        for c, triples in enumerate(chunk):
            for kind, l, t in triples:
                rows, pos = edits.setdefault(module_path(self.spec, kind, l), ([], []))
                rows.extend(s * n + c for s in range(S))
                pos.extend([t] * S)
        index = {
            p: (torch.tensor(r, device=self.device), torch.tensor(q, device=self.device)) for p, (r, q) in edits.items()
        }

        def restore(output: Any, path: str) -> Any:
            rows, pos = index[path]
            h = hidden(output)
            new = _as_3d(h, T).clone()
            new[rows, pos - prefix] = self.clean_states[path][pos].to(new.dtype)
            return replace_hidden(output, new.reshape(h.shape))

        backbone = get_module(self.model, self.spec.backbone)
        kwargs: dict[str, Any] = {"use_cache": False}
        if prefix:
            # transformers 5 names the KV cache `cache` (older models and releases: `past_key_values`)
            name = "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"
            with self._corrupt(1):
                out = backbone(input_ids=self.corrupted_ids[:, :prefix], use_cache=True)
            cache = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
            recurrent = list(dict.fromkeys(type(x).__name__ for x in getattr(cache, "layers", ()) if _holds_state(x)))
            if recurrent or _holds_state(cache):
                raise TraceError(
                    f"its cache holds recurrent / convolution state ({', '.join(recurrent) or type(cache).__name__}), "
                    "which is not resumed here: full-length forwards"
                )
            cache.batch_repeat_interleave(n)
            kwargs = {"use_cache": True, name: cache}
        ids = self.corrupted_ids[:, prefix:].repeat_interleave(n, dim=0)
        stubs = {}
        if start:
            top = _expand_output(self.corrupted_outputs[start - 1], n, prefix)
            layers = get_module(self.model, self.spec.layers)
            stubs = {i: ReplayBlock(layers[i], lambda *args, **kwargs: top) for i in range(start)}
        with (
            replaced_blocks(self.model, self.spec, stubs),
            TraceDict(self.model, list(index), retain_output=False, edit_output=restore),
            self._corrupt(n, prefix) if start == 0 else contextlib.nullcontext(),
        ):
            last = backbone(input_ids=ids, **kwargs)[0]
        return self._logprobs(last).exp().view(S, n).mean(0).cpu()
