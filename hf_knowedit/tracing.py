"""Causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT", §2 and App. B).

Where does a model keep a fact? Run the prompt three ways:

1. **clean**: the prompt as is; the answer ``o`` is the clean run's top next token (or ``target=``).
2. **corrupted**: ``samples`` runs where Gaussian noise is added to the token embeddings of the
   subject tokens only (``corruption="gaussian"``, the paper's protocol), or where the subject is
   swapped for another subject of the same token length (``corruption="str"``, symmetric token
   replacement, which the interpretability community now prefers: Gaussian noise can push a model
   off its input distribution, Zhang & Nanda 2023, arXiv 2309.16042).
3. **corrupted-with-restoration**: a corrupted run in which one state is set back to its clean
   value. ``p(o)`` in that run, averaged over the corrupted samples, is one cell of the heatmap.

Restorations (one heatmap each, rows = input tokens, columns = layers):

* ``"hidden"``: block ``l``'s output (the residual stream) at token ``t``.
* ``"mlp"`` / ``"attn"``: the MLP (attention) output at token ``t`` in a window of ``window``
  consecutive layers centred on ``l`` (layers ``max(0, l - window//2) .. min(L, l + ceil(window/2)) - 1``),
  as in the paper (single-layer MLP restorations are too weak to see, App. B.2). The MLP output is
  the output of the table's ``mlp_out`` projection, the attention output that of ``attn_out``
  (restoring the projection's output at a token restores the module's output there).

The noise level ``noise="auto"`` is 3 × the standard deviation of the embedding-layer outputs of the
subject tokens of :data:`DEFAULT_SUBJECTS` (the paper measures it over the subjects of its 1,000 known
facts; pass ``subjects=[...]`` to do the same). The noise is drawn once from ``seed``, so every
restoration of one trace sees the same corrupted inputs.

**Scoring a target.** Without ``target`` the answer is the clean run's single top next token. With
``target="..."`` the target is tokenized in context after one space (:func:`hf_knowedit.tokens.split_prompt_target`);
a multi-token target is scored by teacher forcing: the model reads ``prompt + target[:-1]`` and the
score is ``p(target) = Π_i p(target_i | prompt, target_<i)`` (the product of the token probabilities,
i.e. the probability of the whole string); the token grid then also covers the teacher-forced target tokens.

**No wasted work.** The reference code runs one 11-row forward pass per cell. Here:

* restorations are batched: the corrupted samples × many cells go through one forward pass, in chunks
  sized by a memory budget (``memory_mb``), with a progress bar;
* the clean run and the corrupted run are done once; every cell restored from layer ``l`` on (or from
  its window's start) reuses the corrupted run's outputs of the blocks below: those blocks are
  temporarily swapped, in the ``layers`` ModuleList, for a tiny module that returns the cached
  corrupted output (restored in a ``finally``; no ``forward`` is replaced);
* cells at tokens before the subject are not run: corruption starts at the subject, so with causal
  attention those states are identical in the clean and the corrupted runs and restoring them is a
  no-op; their score is the corrupted probability;
* logits are computed at the scored position(s) only: the backbone runs, its last position goes through
  the LM head (the head alone is about a fifth of a forward pass on a 49k-vocabulary model);
* a cell restored at token ``t`` leaves every position before ``t`` as in the corrupted run (causal
  attention), so those positions are not recomputed: one corrupted forward over them builds a KV cache
  (the model's own ``Cache``), repeated over the batch, and only positions ``t..`` are run. Whether the
  model's cache reproduces a full forward exactly is checked once per trace on a probe cell; if not (or
  if the model has no cache), full-length forwards are used.

Both reuses are exact (equal to a plain forward up to float rounding; ``reuse_lower_layers=False`` turns
them off). The tests check them on every architecture of the table.

    >>> result = hf_knowedit.tracing.trace_fact(model, tok, "The Eiffel Tower is located in", "Eiffel Tower")
    >>> result.scores["mlp"].shape          # [n_tokens, n_layers]
    >>> result.plot("eiffel.png")
    >>> hf_knowedit.suggest_layers(hf_knowedit.trace_facts(model, tok, known_facts[:100]))
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .architectures import (ArchitectureSpec, attn_out_path, get_architecture, get_module, layer_path,
                            mlp_out_path, num_layers)
from .errors import InvalidRequestError, KnowEditError, TraceError
from .hooks import TraceDict, hidden, replace_hidden
from .stack import get_state
from .tokens import (chars_to_tokens, encode, split_prompt_target, subject_char_span, subject_token_span,
                     target_separator)

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_SUBJECTS", "KINDS", "CausalTracer", "TraceResult", "TraceSummary", "embedding_noise_level",
    "trace_fact", "trace_facts", "suggest_layers", "plot_trace", "plot_summary",
]

KINDS = ("hidden", "mlp", "attn")
CORRUPTIONS = ("gaussian", "str")

#: Well-known entities (people, places, organisations, works) whose subject-token embeddings set the
#: default noise level (``noise="auto"``) and serve as the default swap-in subjects of ``corruption="str"``.
DEFAULT_SUBJECTS: Tuple[str, ...] = (
    "Paris", "London", "Tokyo", "Berlin", "Rome", "Madrid", "Moscow", "Beijing", "Cairo", "Sydney",
    "France", "Germany", "Japan", "Italy", "Brazil", "Canada", "India", "Mexico", "Egypt", "Australia",
    "Albert Einstein", "Isaac Newton", "Marie Curie", "Charles Darwin", "William Shakespeare",
    "Leonardo da Vinci", "Pablo Picasso", "Wolfgang Amadeus Mozart", "Napoleon Bonaparte", "Barack Obama",
    "Michael Jordan", "Lionel Messi", "Steve Jobs", "Bill Gates", "Elon Musk",
    "Microsoft", "Google", "Apple", "Toyota", "BMW", "Nokia", "IBM", "Sony", "Samsung",
    "the Eiffel Tower", "the Amazon River", "Mount Everest", "the Sahara", "the Colosseum", "the Louvre",
    "Harry Potter", "The Beatles", "Windows 10", "the iPhone", "Star Wars",
)

_HISTORY_KEY = "tracing.embedding_std"
_SUMMARY_KEY = "tracing.summary"

Restoration = Sequence[Tuple[str, int, int]]  # ((kind, layer, token), ...)


# -----------------------------------------------------------------------------
# validation and small helpers


def _check_kinds(kinds: Any) -> Tuple[str, ...]:
    if isinstance(kinds, str):
        kinds = (kinds,)
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise TraceError(f"Unknown trace kind(s) {bad or kinds!r}; choose among {KINDS}, e.g. kinds=('hidden', 'mlp').")
    return tuple(dict.fromkeys(kinds))


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TraceError(f"{name} must be an integer >= 1, got {value!r}.")
    return value


def _window_layers(layer: int, window: int, n_layers: int) -> range:
    """The ``window`` layers centred on ``layer`` (clipped to the model), as in the ROME code."""
    return range(max(0, layer - window // 2), min(n_layers, layer + math.ceil(window / 2)))


def _module_path(spec: ArchitectureSpec, kind: str, layer: int) -> str:
    if kind == "hidden":
        return layer_path(spec, layer)
    return mlp_out_path(spec, layer) if kind == "mlp" else attn_out_path(spec, layer)


def _as_3d(t: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``[batch, seq, d]`` view of an activation (OPT's fc2 sees tokens flattened to ``[batch*seq, d]``)."""
    return t if t.dim() == 3 else t.reshape(-1, seq_len, t.shape[-1])


def _model_device_dtype(model: nn.Module) -> Tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


class _eval_mode:
    """Put every module in eval mode (no dropout) for the duration; restore each module's flag after."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.flags = {m: m.training for m in model.modules()}

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc: Any) -> None:
        for m, flag in self.flags.items():
            m.training = flag


# -----------------------------------------------------------------------------
# noise level


def embedding_noise_level(
    model: nn.Module, tokenizer: Any, subjects: Optional[Sequence[str]] = None, *, factor: float = 3.0
) -> float:
    """``factor`` × the standard deviation of the embedding outputs of the subjects' tokens.

    Each subject is tokenized on its own (no special tokens); the std is over all values of all their
    embedding vectors (the ROME code's ``collect_embedding_std``). Default subjects: :data:`DEFAULT_SUBJECTS`.
    The std is cached on the model (``get_state(model).history``), keyed by the subject list.
    """
    subjects = list(DEFAULT_SUBJECTS if subjects is None else subjects)
    subjects = [s.strip() for s in subjects if isinstance(s, str) and s.strip()]
    if not subjects:
        raise TraceError("subjects is empty: give a list of entity names to measure the embedding spread on.")
    spec = get_architecture(model)
    key = hashlib.sha256(json.dumps([spec.embed, subjects]).encode()).hexdigest()
    cache = get_state(model).history.setdefault(_HISTORY_KEY, {})
    if key not in cache:
        device, _ = _model_device_dtype(model)
        embed = get_module(model, spec.embed)
        ids = [i for s in subjects for i in tokenizer(s, add_special_tokens=False)["input_ids"]]
        with torch.no_grad():
            vectors = embed(torch.tensor([ids], device=device))
        cache[key] = float(vectors.float().std())
    return factor * cache[key]


# -----------------------------------------------------------------------------
# the engine: clean run, corrupted run, batched restorations


class _Replay(nn.Module):
    """Stands in for a decoder block: returns the corrupted run's cached output of the block at the top
    of the replayed stack (expanded to the batch), with the block output's tuple/tensor structure."""

    def __init__(self, block: nn.Module, output: Any) -> None:
        super().__init__()
        for name, value in vars(block).items():  # plain attributes some models read (layer_idx, attention_type)
            if not name.startswith("_") and isinstance(value, (str, int, float, bool, type(None))):
                self.__dict__.setdefault(name, value)
        self.output = output

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.output


def _expand_output(output: Any, n: int, batch: int, prefix: int = 0) -> Any:
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

    Arguments are those of :func:`trace_fact`.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        prompt: str,
        subject: str,
        *,
        target: Optional[str] = None,
        samples: int = 10,
        noise: Union[str, float] = "auto",
        corruption: str = "gaussian",
        subjects: Optional[Sequence[str]] = None,
        seed: int = 0,
        memory_mb: float = 1024.0,
        reuse_lower_layers: bool = True,
        progress: Optional[bool] = None,
    ) -> None:
        self.samples = _check_positive_int("samples", samples)
        if corruption not in CORRUPTIONS:
            raise TraceError(f"corruption must be one of {CORRUPTIONS}, got {corruption!r}.")
        if corruption == "gaussian" and not (noise == "auto" or (
                isinstance(noise, (int, float)) and not isinstance(noise, bool) and math.isfinite(noise) and noise >= 0)):
            raise TraceError(f"noise must be 'auto' or a finite float >= 0 (the noise std), got {noise!r}.")
        if not (isinstance(memory_mb, (int, float)) and memory_mb > 0):
            raise TraceError(f"memory_mb must be a positive number, got {memory_mb!r}.")
        if not isinstance(prompt, str) or not prompt.strip():
            raise TraceError("prompt must be a non-empty string, e.g. 'The Eiffel Tower is located in'.")
        self.model, self.tokenizer, self.prompt, self.subject = model, tokenizer, prompt, subject
        self.spec = get_architecture(model)
        self.n_layers = num_layers(model, self.spec)
        self.corruption, self.seed, self.memory_mb = corruption, seed, float(memory_mb)
        self.reuse_lower_layers, self.progress = reuse_lower_layers, progress
        self.device, self.dtype = _model_device_dtype(model)

        # tokens: prompt (+ teacher-forced target prefix); subject span from offsets
        char_span = subject_char_span(prompt, subject)
        full = prompt
        if target is None:
            ids = list(encode(tokenizer, prompt)["input_ids"])
            target_ids: List[int] = []
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
        noise_level = 0.0
        if corruption == "gaussian":
            noise_level = embedding_noise_level(model, tokenizer, subjects) if noise == "auto" else float(noise)
        self.noise = noise_level
        self.corrupted_ids = self._corrupted_inputs(subjects, char_span, target_ids)

        with torch.no_grad(), _eval_mode(model):
            self._clean_run(target_ids)
            self._corrupted_run()

    # -- inputs -----------------------------------------------------------------

    def _corrupted_inputs(self, subjects: Optional[Sequence[str]], char_span: Tuple[int, int],
                          target_ids: List[int]) -> torch.Tensor:
        """``[samples, n_tokens]`` ids of the corrupted runs (the prompt itself for Gaussian noise)."""
        ids = torch.tensor(self.input_ids, device=self.device)
        if self.corruption == "gaussian":
            g = torch.Generator().manual_seed(self.seed)
            s0, s1 = self.subject_range
            d = get_module(self.model, self.spec.embed).weight.shape[-1]
            self._noise = (torch.randn(self.samples, s1 - s0, d, generator=g) * self.noise).to(self.device)
            return ids.expand(self.samples, -1)
        # symmetric token replacement: other subjects with the same token length, everything else identical
        cs, ce = char_span
        s0, s1 = self.subject_range
        pool = [s.strip() for s in (DEFAULT_SUBJECTS if subjects is None else subjects) if isinstance(s, str)]
        swaps = []
        for other in dict.fromkeys(pool):
            if not other or other == self.subject.strip():
                continue
            text = self.prompt[:cs] + other + self.prompt[ce:]
            new = list(encode(self.tokenizer, text)["input_ids"])
            n_prompt = self.n_tokens - max(0, len(target_ids) - 1)
            if len(new) == n_prompt and new[:s0] == self.input_ids[:s0] and new[s1:] == self.input_ids[s1:n_prompt]:
                swaps.append(new + self.input_ids[n_prompt:])
        if not swaps:
            raise TraceError(
                f"corruption='str' found no replacement subject with the same number of tokens as "
                f"{self.subject!r} ({s1 - s0}); pass subjects=[...] with more candidates (e.g. the subjects of "
                "known_1000.json), or use corruption='gaussian'.")
        g = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(len(swaps), generator=g).tolist()
        picked = [swaps[order[i % len(order)]] for i in range(self.samples)]
        self._noise = None
        self.replacements = [self.tokenizer.decode(p[s0:s1]) for p in picked]
        return torch.tensor(picked, device=self.device)

    # -- the two reference runs -------------------------------------------------

    def _logprobs(self, last_hidden: torch.Tensor) -> torch.Tensor:
        """Sum of log p(answer tokens) per row, logits only at the scored (last ``k``) positions."""
        k = len(self.answer_ids)
        h = last_hidden[:, last_hidden.shape[1] - k:]
        logits = get_module(self.model, self.spec.lm_head)(h).float()
        cap = getattr(self.model.config, self.spec.logit_softcap, None) if self.spec.logit_softcap else None
        if cap:
            logits = cap * torch.tanh(logits / cap)
        logp = torch.log_softmax(logits, dim=-1)
        answer = torch.tensor(self.answer_ids, device=logp.device)
        return logp.gather(-1, answer.view(1, k, 1).expand(logp.shape[0], k, 1)).squeeze(-1).sum(-1)

    def _backbone(self, ids: torch.Tensor) -> torch.Tensor:
        out = get_module(self.model, self.spec.backbone)(input_ids=ids, use_cache=False)
        return out[0]

    def _clean_run(self, target_ids: List[int]) -> None:
        paths = [_module_path(self.spec, kind, l) for kind in KINDS for l in range(self.n_layers)]
        ids = torch.tensor([self.input_ids], device=self.device)
        with TraceDict(self.model, paths, clone=True, detach=True) as td:
            last = self._backbone(ids)
        if target_ids:
            self.answer_ids = list(target_ids)
        else:
            logits = get_module(self.model, self.spec.lm_head)(last[:, -1:])
            self.answer_ids = [int(logits[0, -1].argmax())]
        self.clean_prob = float(self._logprobs(last).exp()[0])
        self.clean_states = {p: _as_3d(hidden(td[p].output), self.n_tokens)[0] for p in paths}  # [n_tokens, d]

    def _embed_hook(self, n: int, offset: int = 0):
        """Add the (seeded) noise to the subject's embeddings; ``offset``: first position of the input."""
        s0, s1 = self.subject_range

        def add_noise(output: Any, path: str) -> Any:
            a, b = max(s0, offset), min(s1, offset + output.shape[1])
            if a >= b:
                return output
            out = output.clone()
            out[:, a - offset:b - offset] += self._noise[:, a - s0:b - s0].to(out.dtype).repeat_interleave(n, dim=0)
            return out
        return add_noise

    def _corrupt(self, n: int, offset: int = 0):
        if self._noise is None:
            return contextlib.nullcontext()
        return TraceDict(self.model, [self.spec.embed], retain_output=False, edit_output=self._embed_hook(n, offset))

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
            with torch.no_grad(), _eval_mode(self.model):
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
        cfg = self.model.config
        d = get_module(self.model, self.spec.embed).weight.shape[-1]
        heads = getattr(cfg, "num_attention_heads", None) or max(1, d // 64)
        inner = getattr(get_module(self.model, mlp_out_path(self.spec, 0)), "weight").numel() // d
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
        groups: Dict[int, List[Tuple[int, int, List[Tuple[str, int, int]]]]] = {}
        for i, r in enumerate(restorations):
            triples = [(k, int(l), int(t)) for k, l, t in r]
            for k, l, t in triples:
                if k not in KINDS or not 0 <= l < self.n_layers or not 0 <= t < self.n_tokens:
                    raise TraceError(f"bad restoration {(k, l, t)}: kind in {KINDS}, layer in [0, {self.n_layers}), "
                                     f"token in [0, {self.n_tokens}).")
            start = min((l for _, l, _ in triples), default=self.n_layers) if self.reuse_lower_layers else 0
            prefix = min([t for _, _, t in triples] + [first_scored]) if self.use_kv else 0
            groups.setdefault(prefix, []).append((start, i, triples))
        chunks = []
        for prefix, cells in sorted(groups.items()):
            cells.sort(key=lambda c: c[0])
            per_chunk = max(1, self._rows_per_chunk(self.n_tokens - prefix) // self.samples)
            chunks += [(prefix, cells[j:j + per_chunk]) for j in range(0, len(cells), per_chunk)]
        out = torch.empty(len(restorations), dtype=torch.float32)
        from huggingface_hub.utils import tqdm

        show = self.progress if self.progress is not None else len(restorations) * self.samples >= 20000
        with torch.no_grad(), _eval_mode(self.model), tqdm(
                total=len(restorations), desc="causal trace", disable=not show, unit="cell") as bar:
            for prefix, chunk in chunks:
                probs = self._run_chunk(prefix, chunk[0][0], [c[2] for c in chunk])
                for (_, i, _), p in zip(chunk, probs):
                    out[i] = p
                bar.update(len(chunk))
        return out

    def _run_chunk(self, prefix: int, start: int, chunk: List[List[Tuple[str, int, int]]]) -> torch.Tensor:
        """One batched forward: positions ``prefix..`` and blocks ``start..`` are computed, the rest is the
        corrupted run's (KV cache of the first ``prefix`` positions; replayed outputs of the blocks below)."""
        n, S, T = len(chunk), self.samples, self.n_tokens - prefix
        # rows are sample-major: row s * n + c is corrupted sample s with cell c's restoration
        edits: Dict[str, Tuple[List[int], List[int]]] = {}
        for c, triples in enumerate(chunk):
            for kind, l, t in triples:
                rows, pos = edits.setdefault(_module_path(self.spec, kind, l), ([], []))
                rows.extend(s * n + c for s in range(S))
                pos.extend([t] * S)
        index = {p: (torch.tensor(r, device=self.device), torch.tensor(q, device=self.device))
                 for p, (r, q) in edits.items()}

        def restore(output: Any, path: str) -> Any:
            rows, pos = index[path]
            h = hidden(output)
            new = _as_3d(h, T).clone()
            new[rows, pos - prefix] = self.clean_states[path][pos].to(new.dtype)
            return replace_hidden(output, new.reshape(h.shape))

        backbone = get_module(self.model, self.spec.backbone)
        kwargs: Dict[str, Any] = {"use_cache": False}
        if prefix:
            # transformers 5 names the KV cache `cache` (older models and releases: `past_key_values`)
            name = "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"
            with self._corrupt(1):
                out = backbone(input_ids=self.corrupted_ids[:, :prefix], use_cache=True)
            cache = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
            cache.batch_repeat_interleave(n)
            kwargs = {"use_cache": True, name: cache}
        layers = get_module(self.model, self.spec.layers)
        originals = [layers[i] for i in range(start)]
        ids = self.corrupted_ids[:, prefix:].repeat_interleave(n, dim=0)
        try:
            if start:
                top = _expand_output(self.corrupted_outputs[start - 1], n, S, prefix)
                for i in range(start):
                    layers[i] = _Replay(originals[i], top)
            with TraceDict(self.model, list(index), retain_output=False, edit_output=restore), \
                    (self._corrupt(n, prefix) if start == 0 else contextlib.nullcontext()):
                last = backbone(input_ids=ids, **kwargs)[0]
        finally:
            for i, block in enumerate(originals):
                layers[i] = block
        return self._logprobs(last).exp().view(S, n).mean(0).cpu()


# -----------------------------------------------------------------------------
# one fact


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

    scores: Dict[str, torch.Tensor]
    clean_prob: float
    corrupted_prob: float
    tokens: List[str]
    input_ids: List[int]
    subject_range: Tuple[int, int]
    answer: str
    answer_ids: List[int]
    prompt: str
    subject: str
    settings: Dict[str, Any] = field(default_factory=dict)

    @property
    def last_subject_token(self) -> int:
        return self.subject_range[1] - 1

    def indirect_effect(self, kind: str) -> torch.Tensor:
        """``scores[kind] - corrupted_prob``: how much restoring each cell recovers."""
        return self.scores[kind] - self.corrupted_prob

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict (NaN scores become ``None``)."""
        return {
            "scores": {k: _nan_to_none(v.tolist()) for k, v in self.scores.items()},
            "clean_prob": self.clean_prob, "corrupted_prob": self.corrupted_prob, "tokens": list(self.tokens),
            "input_ids": list(self.input_ids), "subject_range": list(self.subject_range), "answer": self.answer,
            "answer_ids": list(self.answer_ids), "prompt": self.prompt, "subject": self.subject,
            "settings": dict(self.settings),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TraceResult":
        try:
            return cls(
                scores={k: torch.tensor(_none_to_nan(v), dtype=torch.float32) for k, v in d["scores"].items()},
                clean_prob=float(d["clean_prob"]), corrupted_prob=float(d["corrupted_prob"]),
                tokens=list(d["tokens"]), input_ids=[int(i) for i in d["input_ids"]],
                subject_range=(int(d["subject_range"][0]), int(d["subject_range"][1])), answer=d["answer"],
                answer_ids=[int(i) for i in d["answer_ids"]], prompt=d["prompt"], subject=d["subject"],
                settings=dict(d.get("settings", {})))
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise TraceError(f"Not a saved TraceResult ({type(e).__name__}: {e}); write one with TraceResult.save().") from None

    def save(self, path: Union[str, Path]) -> Path:
        """Write the result as JSON; read it back with :meth:`load`."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict()))
        return path

    @classmethod
    def load(cls, path: Union[str, Path]) -> "TraceResult":
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise TraceError(f"{path} is not JSON ({e}); write it with TraceResult.save().") from None
        return cls.from_dict(data)

    def plot(self, path: Union[str, Path, None] = None, *, kinds: Optional[Sequence[str]] = None) -> Any:
        """The heatmaps side by side (see :func:`plot_trace`); writes ``path`` (PNG, PDF, ...) when given."""
        return plot_trace(self, path, kinds=kinds)


def trace_fact(
    model: nn.Module,
    tokenizer: Any,
    prompt: str,
    subject: str,
    *,
    target: Optional[str] = None,
    kinds: Union[str, Sequence[str]] = KINDS,
    samples: int = 10,
    noise: Union[str, float] = "auto",
    window: int = 10,
    corruption: str = "gaussian",
    seed: int = 0,
    subjects: Optional[Sequence[str]] = None,
    positions: Optional[Iterable[int]] = None,
    memory_mb: float = 1024.0,
    reuse_lower_layers: bool = True,
    progress: Optional[bool] = None,
) -> TraceResult:
    """Causal trace of one fact (ROME, Meng et al. 2022): which hidden states, MLP and attention outputs
    carry it. See the module docstring for the protocol and what is computed.

    Args:
        prompt: the filled prompt, e.g. ``"The Eiffel Tower is located in"``.
        subject: the entity in ``prompt`` whose tokens are corrupted (first occurrence).
        target: trace ``p(target)`` instead of the clean top next token (multi-token: teacher forced).
        kinds: any of ``"hidden"``, ``"mlp"``, ``"attn"``.
        samples: number of corrupted runs (10 in the paper).
        noise: ``"auto"`` (3 × std of subject embeddings over ``subjects``) or the noise std as a float.
        window: number of consecutive layers restored together for ``"mlp"``/``"attn"`` (10 in the paper).
        corruption: ``"gaussian"`` (the paper) or ``"str"`` (swap in another subject of the same token length,
            drawn from ``subjects``).
        seed: seeds the noise / the swapped-in subjects; the same seed gives the same trace.
        subjects: entity names for the noise level / the replacements (default :data:`DEFAULT_SUBJECTS`).
        positions: token indices to trace (default all); other rows of ``scores`` are NaN.
        memory_mb: activation memory budget per batched forward pass.
        reuse_lower_layers: replay the corrupted run's lower blocks instead of recomputing them (exact; off
            only to check that it is).
        progress: show a progress bar (default: for long traces).

    Raises:
        SubjectNotFoundError: the subject is not in the prompt.
        TraceError: ``samples < 1``, ``window < 1``, unknown kind, a target that tokenizes to nothing, ...
    """
    kinds = _check_kinds(kinds)
    window = _check_positive_int("window", window)
    tracer = CausalTracer(model, tokenizer, prompt, subject, target=target, samples=samples, noise=noise,
                          corruption=corruption, subjects=subjects, seed=seed, memory_mb=memory_mb,
                          reuse_lower_layers=reuse_lower_layers, progress=progress)
    T, L = tracer.n_tokens, tracer.n_layers
    if positions is None:
        rows = list(range(T))
    else:
        rows = sorted({int(t) for t in positions})
        if not rows or rows[0] < -T or rows[-1] >= T:
            raise TraceError(f"positions must be token indices in [0, {T}), got {positions!r}.")
        rows = sorted({t % T for t in rows})
    s0 = tracer.subject_range[0]
    scores = {k: torch.full((T, L), float("nan")) for k in kinds}
    jobs, where = [], []
    for kind in kinds:
        for t in rows:
            if t < s0:  # before the corruption: clean == corrupted there, restoring is a no-op
                scores[kind][t] = tracer.corrupted_prob
                continue
            for l in range(L):
                layers = [l] if kind == "hidden" else _window_layers(l, window, L)
                jobs.append([(kind, j, t) for j in layers])
                where.append((kind, t, l))
    if jobs:
        for (kind, t, l), p in zip(where, tracer.score(jobs).tolist()):
            scores[kind][t, l] = p
    settings = dict(kinds=list(kinds), samples=samples, noise=tracer.noise, window=window, corruption=corruption,
                    seed=seed, target=target)
    if corruption == "str":
        settings["replacements"] = tracer.replacements
    return TraceResult(
        scores=scores, clean_prob=tracer.clean_prob, corrupted_prob=tracer.corrupted_prob,
        tokens=[tokenizer.decode([i]) for i in tracer.input_ids], input_ids=list(tracer.input_ids),
        subject_range=tuple(tracer.subject_range), answer=tokenizer.decode(tracer.answer_ids),
        answer_ids=list(tracer.answer_ids), prompt=prompt, subject=subject, settings=settings)


# -----------------------------------------------------------------------------
# many facts


@dataclass
class TraceSummary:
    """Average indirect effects over many facts (the paper's Figure 2).

    ``aie[position][kind]`` is a ``[n_layers]`` tensor: the mean over facts of ``scores - corrupted_prob``
    at ``position`` ``"last_subject"`` (the subject's last token) or ``"last"`` (the prompt's last token).
    """

    aie: Dict[str, Dict[str, torch.Tensor]]
    n_facts: int
    n_skipped: int
    mean_clean: float
    mean_corrupted: float
    settings: Dict[str, Any] = field(default_factory=dict)
    results: List[TraceResult] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return {"aie": {p: {k: v.tolist() for k, v in d.items()} for p, d in self.aie.items()},
                "n_facts": self.n_facts, "n_skipped": self.n_skipped, "mean_clean": self.mean_clean,
                "mean_corrupted": self.mean_corrupted, "settings": dict(self.settings)}

    def plot(self, path: Union[str, Path, None] = None) -> Any:
        """Line plots of the average indirect effect per layer (see :func:`plot_summary`)."""
        return plot_summary(self, path)


def _fact_fields(fact: Any) -> Tuple[str, str, Optional[str]]:
    if isinstance(fact, Mapping):
        prompt = fact.get("prompt")
        if prompt is None and "template" in fact and "subject" in fact:
            prompt = fact["template"].replace("{}", fact["subject"])
        subject, attribute = fact.get("subject"), fact.get("attribute")
    elif isinstance(fact, (tuple, list)) and len(fact) in (2, 3):
        prompt, subject, attribute = (tuple(fact) + (None,))[:3]
    else:
        prompt = subject = attribute = None
    if not isinstance(prompt, str) or not isinstance(subject, str):
        raise TraceError(f"A fact needs 'prompt' and 'subject' strings (known_1000.json records work, or "
                         f"(prompt, subject[, attribute]) tuples); got {fact!r}.")
    return prompt, subject, attribute


def trace_facts(
    model: nn.Module,
    tokenizer: Any,
    facts: Sequence[Any],
    *,
    kinds: Union[str, Sequence[str]] = KINDS,
    samples: int = 10,
    noise: Union[str, float] = "auto",
    window: int = 10,
    corruption: str = "gaussian",
    seed: int = 0,
    subjects: Optional[Sequence[str]] = None,
    require_correct: bool = True,
    keep_results: bool = False,
    memory_mb: float = 1024.0,
    progress: Optional[bool] = None,
) -> TraceSummary:
    """Trace many facts and average the indirect effects at the last subject token and the last token.

    ``facts``: ``known_1000.json`` records (``prompt``, ``subject``, ``attribute``) or ``(prompt, subject[,
    attribute])`` tuples. With ``require_correct`` (the reference's protocol), facts whose clean top-1 next
    token is not the first token of ``attribute`` are skipped. Only the two positions of Figure 2 are traced.
    ``subjects`` defaults to the facts' own subjects for the noise level, as in the paper. The summary is
    also kept on the model so that ``suggest_layers(model)`` can reuse it.
    """
    kinds = _check_kinds(kinds)
    _check_positive_int("window", window)
    _check_positive_int("samples", samples)
    parsed = [_fact_fields(f) for f in facts]
    if not parsed:
        raise TraceError("facts is empty: pass e.g. the records of known_1000.json.")
    if subjects is None:
        subjects = list(dict.fromkeys(s for _, s, _ in parsed))
    noise_level = noise
    if corruption == "gaussian" and noise == "auto":
        noise_level = embedding_noise_level(model, tokenizer, subjects)
    from huggingface_hub.utils import tqdm

    device, _ = _model_device_dtype(model)
    sums = {p: {k: torch.zeros(num_layers(model)) for k in kinds} for p in ("last_subject", "last")}
    results, skipped, clean, corrupted = [], 0, [], []
    for prompt, subject, attribute in tqdm(parsed, desc="tracing facts", disable=progress is False):
        if require_correct and attribute is not None:
            try:
                want = split_prompt_target(tokenizer, prompt, attribute)[1][0]
            except InvalidRequestError:
                skipped += 1
                continue
            with torch.no_grad(), _eval_mode(model):
                logits = model(input_ids=torch.tensor([encode(tokenizer, prompt)["input_ids"]], device=device),
                               use_cache=False).logits
            if int(logits[0, -1].argmax()) != want:
                skipped += 1
                continue
        try:
            span_end = subject_token_span(tokenizer, prompt, subject)[1]
        except KnowEditError:
            skipped += 1
            continue
        r = trace_fact(model, tokenizer, prompt, subject, kinds=kinds, samples=samples, noise=noise_level,
                       window=window, corruption=corruption, seed=seed, subjects=subjects,
                       positions=[span_end - 1, -1], memory_mb=memory_mb, progress=False)
        for k in kinds:
            sums["last_subject"][k] += r.indirect_effect(k)[r.last_subject_token]
            sums["last"][k] += r.indirect_effect(k)[-1]
        clean.append(r.clean_prob)
        corrupted.append(r.corrupted_prob)
        if keep_results:
            results.append(r)
    n = len(clean)
    if n == 0:
        raise TraceError(f"None of the {len(parsed)} facts could be traced (all skipped: the model does not predict "
                         "their attribute); pass require_correct=False or facts the model knows.")
    aie = {p: {k: v / n for k, v in d.items()} for p, d in sums.items()}
    summary = TraceSummary(aie=aie, n_facts=n, n_skipped=skipped, mean_clean=sum(clean) / n,
                           mean_corrupted=sum(corrupted) / n, results=results,
                           settings=dict(kinds=list(kinds), samples=samples, noise=noise_level, window=window,
                                         corruption=corruption, seed=seed))
    get_state(model).history[_SUMMARY_KEY] = summary
    return summary


def suggest_layers(
    trace: Union[TraceSummary, TraceResult, Sequence[TraceResult], nn.Module],
    *,
    kind: str = "mlp",
    count: int = 1,
) -> List[int]:
    """Where the indirect effect of ``kind`` (default the MLP) at the last subject token peaks.

    ``count=1`` gives the peak layer (ROME's single edited layer); ``count > 1`` the ``count`` consecutive
    layers with the largest summed effect (MEMIT's range). ``trace`` is a :class:`TraceSummary`, one or
    more :class:`TraceResult` (averaged), or a model on which :func:`trace_facts` has run.
    """
    kind = _check_kinds(kind)[0]
    count = _check_positive_int("count", count)
    if isinstance(trace, nn.Module):
        state = get_state(trace, create=False)
        summary = state.history.get(_SUMMARY_KEY) if state is not None else None
        if summary is None:
            raise TraceError("No causal-tracing summary on this model: run hf_knowedit.trace_facts(model, tokenizer, "
                             "facts) first (e.g. 100 records of known_1000.json the model predicts correctly).")
        trace = summary
    if isinstance(trace, TraceResult):
        trace = [trace]
    if isinstance(trace, TraceSummary):
        effect = trace.aie["last_subject"].get(kind)
    else:
        trace = list(trace)
        if not trace or not all(isinstance(r, TraceResult) for r in trace):
            raise TraceError("suggest_layers needs a TraceSummary, TraceResult(s), or a model traced by trace_facts.")
        effect = torch.stack([r.indirect_effect(kind)[r.last_subject_token] for r in trace]).mean(0) \
            if all(kind in r.scores for r in trace) else None
    if effect is None or torch.isnan(effect).all():
        raise TraceError(f"The trace has no {kind!r} scores at the last subject token; trace with kinds=({kind!r},).")
    effect = torch.nan_to_num(effect.float(), nan=float("-inf"))
    count = min(count, effect.numel())
    sums = effect.unfold(0, count, 1).sum(-1)
    start = int(sums.argmax())
    return list(range(start, start + count))


# -----------------------------------------------------------------------------
# plots (matplotlib imported lazily)

_CMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
_TITLES = {"hidden": "Restoring the hidden state", "mlp": "Restoring MLP outputs", "attn": "Restoring attention"}


def plot_trace(result: TraceResult, path: Union[str, Path, None] = None, *,
               kinds: Optional[Sequence[str]] = None) -> Any:
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
        mesh = ax.pcolormesh(data, cmap=_CMAPS[kind], vmin=result.corrupted_prob, vmax=max(result.clean_prob,
                             float(torch.nan_to_num(result.scores[kind], nan=0.0).max()), result.corrupted_prob + 1e-9))
        ax.invert_yaxis()
        ax.set_yticks([i + 0.5 for i in range(n_tok)])
        ax.set_yticklabels(labels if ax is axes[0] else [])
        ax.set_title(_TITLES[kind], fontsize=9)
        ax.set_xlabel("single restored layer" if kind == "hidden" else f"center of {window} restored layers",
                      fontsize=8)
        cb = fig.colorbar(mesh, ax=ax)
        cb.ax.set_title(f"p({result.answer.strip()})", fontsize=8)
    fig.suptitle(f"{result.prompt!r} → {result.answer!r}  (clean {result.clean_prob:.3f}, "
                 f"corrupted {result.corrupted_prob:.3f})", fontsize=9)
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def plot_summary(summary: TraceSummary, path: Union[str, Path, None] = None) -> Any:
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
    fig.suptitle(f"{summary.n_facts} facts; mean clean p = {summary.mean_clean:.3f}, "
                 f"corrupted p = {summary.mean_corrupted:.3f}", fontsize=9)
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
