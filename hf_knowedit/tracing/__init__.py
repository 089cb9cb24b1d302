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
  (restoring the projection's output at a token restores the module's output there). In hybrid stacks
  whose blocks alternate attention with convolution or Mamba2 mixers (LFM2, Bamba), an ``"attn"`` cell
  restores the attention outputs of the window's attention blocks; a cell whose window has none is NaN.

The noise level ``noise="auto"`` is 3 × the standard deviation of the embedding-layer outputs of the
subject tokens of :data:`DEFAULT_SUBJECTS` (the paper measures it over the subjects of its 1,000 known
facts; pass ``subjects=[...]`` to do the same). The noise is drawn once from ``seed``, so every
restoration of one trace sees the same corrupted inputs.

**Scoring a target.** Without ``target`` the answer is the clean run's single top next token. With
``target="..."`` the target is tokenized in context after one space (:func:`hf_knowedit.tokens.split_prompt_target`);
a multi-token target is scored by teacher forcing: the model reads ``prompt + target[:-1]`` and the
score is ``p(target) = Π_i p(target_i | prompt, target_<i)`` (the product of the token probabilities,
i.e. the probability of the whole string); the token grid then also covers the teacher-forced target tokens.

How it is computed fast, and exactly: :mod:`hf_knowedit.tracing.engine`. Files: ``config.py``
(:class:`TraceConfig`), ``corruption.py`` (the strategies), ``engine.py``, ``results.py`` (results and
plots), ``api.py`` (the functions below).

    >>> result = hf_knowedit.trace_fact(model, tok, "The Eiffel Tower is located in", "Eiffel Tower")
    >>> result.scores["mlp"].shape          # [n_tokens, n_layers]
    >>> result.plot("eiffel.png")
    >>> hf_knowedit.suggest_layers(hf_knowedit.trace_facts(model, tok, known_facts[:100]))
"""

from .api import suggest_layers, trace_fact, trace_facts
from .config import KINDS, TraceConfig
from .corruption import CORRUPTIONS, DEFAULT_SUBJECTS, Corruption, GaussianNoise, SubjectSwap, embedding_noise_level
from .engine import CausalTracer
from .results import TraceResult, TraceSummary, plot_summary, plot_trace

__all__ = [
    "CORRUPTIONS",
    "DEFAULT_SUBJECTS",
    "KINDS",
    "CausalTracer",
    "Corruption",
    "GaussianNoise",
    "SubjectSwap",
    "TraceConfig",
    "TraceResult",
    "TraceSummary",
    "embedding_noise_level",
    "plot_summary",
    "plot_trace",
    "suggest_layers",
    "trace_fact",
    "trace_facts",
]
