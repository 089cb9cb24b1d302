"""How the subject is corrupted in a causal trace: small strategy objects.

* :class:`GaussianNoise` (``corruption="gaussian"``, the paper's protocol): seeded Gaussian noise is
  added to the token embeddings of the subject tokens only.
* :class:`SubjectSwap` (``corruption="str"``, symmetric token replacement, which the interpretability
  community now prefers: Gaussian noise can push a model off its input distribution, Zhang & Nanda
  2023, arXiv 2309.16042): the subject is swapped for another subject of the same token length.

A strategy turns the clean token ids into ``[samples, n_tokens]`` corrupted ids (:meth:`Corruption.inputs`)
and, while a corrupted forward runs, edits the embeddings (:meth:`Corruption.applied`; a no-op for swaps).
Adding a strategy = one class here and one entry in :data:`CORRUPTIONS`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..architectures import get_architecture, get_module, model_device
from ..errors import TraceError
from ..hooks import TraceDict
from ..stack import get_state
from ..tokens import encode

#: Well-known entities (people, places, organisations, works) whose subject-token embeddings set the
#: default noise level (``noise="auto"``) and serve as the default swap-in subjects of ``corruption="str"``.
DEFAULT_SUBJECTS: tuple[str, ...] = (
    "Paris",
    "London",
    "Tokyo",
    "Berlin",
    "Rome",
    "Madrid",
    "Moscow",
    "Beijing",
    "Cairo",
    "Sydney",
    "France",
    "Germany",
    "Japan",
    "Italy",
    "Brazil",
    "Canada",
    "India",
    "Mexico",
    "Egypt",
    "Australia",
    "Albert Einstein",
    "Isaac Newton",
    "Marie Curie",
    "Charles Darwin",
    "William Shakespeare",
    "Leonardo da Vinci",
    "Pablo Picasso",
    "Wolfgang Amadeus Mozart",
    "Napoleon Bonaparte",
    "Barack Obama",
    "Michael Jordan",
    "Lionel Messi",
    "Steve Jobs",
    "Bill Gates",
    "Elon Musk",
    "Microsoft",
    "Google",
    "Apple",
    "Toyota",
    "BMW",
    "Nokia",
    "IBM",
    "Sony",
    "Samsung",
    "the Eiffel Tower",
    "the Amazon River",
    "Mount Everest",
    "the Sahara",
    "the Colosseum",
    "the Louvre",
    "Harry Potter",
    "The Beatles",
    "Windows 10",
    "the iPhone",
    "Star Wars",
)

_HISTORY_KEY = "tracing.embedding_std"


def embedding_noise_level(
    model: nn.Module,
    tokenizer: Any,
    subjects: Sequence[str] | None = None,
    *,
    factor: float = 3.0,
    reference: bool = False,
) -> float:
    """``factor`` × the standard deviation of the embedding outputs of the subjects' tokens.

    Each subject is tokenized on its own (no special tokens); the std is over all values of all their
    embedding vectors (the ROME code's ``collect_embedding_std``). Default subjects: :data:`DEFAULT_SUBJECTS`.
    ``reference=True`` tokenizes as the reference does (``tokenizer.encode``: with the tokenizer's special
    tokens, e.g. Llama's BOS; the same for GPT-2, which adds none) and takes the subjects as given.
    The std is cached on the model (``get_state(model).history``), keyed by the subject list.
    """
    subjects = list(DEFAULT_SUBJECTS if subjects is None else subjects)
    if reference:
        subjects = [s for s in subjects if isinstance(s, str) and s]
    else:
        subjects = [s.strip() for s in subjects if isinstance(s, str) and s.strip()]
    if not subjects:
        raise TraceError("subjects is empty: give a list of entity names to measure the embedding spread on.")
    spec = get_architecture(model)
    key = hashlib.sha256(json.dumps([spec.embed, subjects] + (["reference"] if reference else [])).encode()).hexdigest()
    cache = get_state(model).history.setdefault(_HISTORY_KEY, {})
    if key not in cache:
        embed = get_module(model, spec.embed)
        ids = [i for s in subjects for i in tokenizer(s, add_special_tokens=reference)["input_ids"]]
        with torch.no_grad():
            vectors = embed(torch.tensor([ids], device=model_device(model)))
        cache[key] = float(vectors.float().std())
    return factor * cache[key]


class Corruption:
    """A way to corrupt the subject. Subclasses set :attr:`name` and implement :meth:`inputs`."""

    name = ""
    #: the noise std (0 for strategies without noise), recorded in the trace's settings
    level = 0.0

    def inputs(self, tracer: Any, char_span: tuple[int, int], n_prompt: int) -> torch.Tensor:
        """``[samples, n_tokens]`` token ids of the corrupted runs for ``tracer``'s fact."""
        raise NotImplementedError

    def applied(self, model: nn.Module, n: int, offset: int = 0) -> contextlib.AbstractContextManager:
        """Active while a corrupted forward runs; ``n`` rows per sample, input positions from ``offset``."""
        return contextlib.nullcontext()

    def settings(self) -> dict[str, Any]:
        """What the trace records about the corruption besides its name."""
        return {}


#: the reference's fixed noise seed (``trace_with_patch``: ``numpy.random.RandomState(1)``)
REFERENCE_SEED = 1


def reference_noise(samples: int, n_tokens: int, d: int, level: float) -> torch.Tensor:
    """The reference's noise for a trace (float64 ``[samples, n_tokens, d]``): ``level *
    numpy.random.RandomState(1).randn(samples, n_tokens, d)``; row ``i`` goes to corrupted sample ``i``."""
    import numpy

    draw = numpy.random.RandomState(REFERENCE_SEED).randn(samples, n_tokens, d)
    return level * torch.from_numpy(draw)


class GaussianNoise(Corruption):
    """Seeded Gaussian noise of std ``level`` on the subject's token embeddings (``rng``: see
    :class:`~hf_knowedit.tracing.TraceConfig`)."""

    name = "gaussian"

    def __init__(self, level: float, rng: str = "torch") -> None:
        self.level = float(level)
        self.rng = rng
        self.noise: torch.Tensor | None = None
        self.subject_range = (0, 0)

    def inputs(self, tracer: Any, char_span: tuple[int, int], n_prompt: int) -> torch.Tensor:
        s0, s1 = self.subject_range = tracer.subject_range
        d = get_module(tracer.model, tracer.spec.embed).weight.shape[-1]
        if self.rng == "reference":  # float64, added in place as the reference adds it (MPS has no float64)
            noise = reference_noise(tracer.config.samples, s1 - s0, d, self.level)
            self.noise = noise.to(tracer.device, torch.float32 if tracer.device.type == "mps" else torch.float64)
        else:
            g = torch.Generator().manual_seed(tracer.config.seed)
            self.noise = (torch.randn(tracer.config.samples, s1 - s0, d, generator=g) * self.level).to(tracer.device)
        self.embed = tracer.spec.embed
        return torch.tensor(tracer.input_ids, device=tracer.device).expand(tracer.config.samples, -1)

    def applied(self, model: nn.Module, n: int, offset: int = 0) -> contextlib.AbstractContextManager:
        s0, s1 = self.subject_range
        noise = self.noise

        def add_noise(output: Any, path: str) -> Any:
            a, b = max(s0, offset), min(s1, offset + output.shape[1])
            if a >= b:
                return output
            out = output.clone()
            part = noise[:, a - s0 : b - s0]
            if part.dtype != torch.float64:  # rng="torch": the noise in the model's dtype
                part = part.to(out.dtype)
            out[:, a - offset : b - offset] += part.repeat_interleave(n, dim=0)  # float64: cast on the add
            return out

        return TraceDict(model, [self.embed], retain_output=False, edit_output=add_noise)


class SubjectSwap(Corruption):
    """Another subject of the same token length in place of the fact's, everything else identical."""

    name = "str"

    def __init__(self, pool: Sequence[str] | None = None) -> None:
        self.pool = [s.strip() for s in (DEFAULT_SUBJECTS if pool is None else pool) if isinstance(s, str)]
        self.replacements: list[str] = []

    def inputs(self, tracer: Any, char_span: tuple[int, int], n_prompt: int) -> torch.Tensor:
        cs, ce = char_span
        s0, s1 = tracer.subject_range
        ids = tracer.input_ids
        swaps = []
        for other in dict.fromkeys(self.pool):
            if not other or other == tracer.subject.strip():
                continue
            new = list(encode(tracer.tokenizer, tracer.prompt[:cs] + other + tracer.prompt[ce:])["input_ids"])
            if len(new) == n_prompt and new[:s0] == ids[:s0] and new[s1:] == ids[s1:n_prompt]:
                swaps.append(new + ids[n_prompt:])
        if not swaps:
            raise TraceError(
                f"corruption='str' found no replacement subject with the same number of tokens as "
                f"{tracer.subject!r} ({s1 - s0}); pass subjects=[...] with more candidates (e.g. the subjects of "
                "known_1000.json), or use corruption='gaussian'."
            )
        g = torch.Generator().manual_seed(tracer.config.seed)
        order = torch.randperm(len(swaps), generator=g).tolist()
        picked = [swaps[order[i % len(order)]] for i in range(tracer.config.samples)]
        self.replacements = [tracer.tokenizer.decode(p[s0:s1]) for p in picked]
        return torch.tensor(picked, device=tracer.device)

    def settings(self) -> dict[str, Any]:
        return {"replacements": self.replacements}


#: ``corruption=`` name -> strategy class
CORRUPTIONS: dict[str, type] = {GaussianNoise.name: GaussianNoise, SubjectSwap.name: SubjectSwap}


def make_corruption(
    model: nn.Module,
    tokenizer: Any,
    name: str,
    noise: str | float,
    subjects: Sequence[str] | None,
    rng: str = "torch",
) -> Corruption:
    """The strategy ``name`` with its parameters resolved (``noise="auto"`` measured on ``subjects``)."""
    if name == GaussianNoise.name:
        reference = rng == "reference"
        level = (
            embedding_noise_level(model, tokenizer, subjects, reference=reference) if noise == "auto" else float(noise)
        )
        return GaussianNoise(level, rng)
    return CORRUPTIONS[name](subjects)
