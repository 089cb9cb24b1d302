"""Plain helper functions shared by the test modules (fixtures live in ``tests/conftest.py``).

* :func:`snapshot` / :func:`assert_untouched`: record a model's weights, forward-hook count and
  submodules, and later check that nothing moved (bit-exact), no hook was left behind, no block
  was swapped and no edit set is active.
* :func:`logits`: the float32 logits of one text; :func:`logprob`: the mean log-probability per
  token of a target after a prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import hf_knowedit
from hf_knowedit.hooks import count_forward_hooks
from hf_knowedit.methods.registry import get_method
from hf_knowedit.tokens import split_prompt_target
from tests.tiny_models import assert_same, weights


@dataclass
class Snapshot:
    """What :func:`assert_untouched` compares against."""

    weights: dict[str, torch.Tensor]
    hooks: int
    modules: list[nn.Module]


def snapshot(model: nn.Module) -> Snapshot:
    """Weights (detached copies), forward-hook count and the submodule objects of ``model``."""
    return Snapshot(weights(model), count_forward_hooks(model), list(model.modules()))


def assert_untouched(model: nn.Module, before: Snapshot, *, edits: bool = True) -> None:
    """``model`` is exactly as in ``before``: bit-identical weights, as many forward hooks, the same
    submodule objects (no block left replaced), and (``edits=True``) no active edit set."""
    assert_same(weights(model), before.weights)
    assert count_forward_hooks(model) == before.hooks, (count_forward_hooks(model), before.hooks)
    now = list(model.modules())
    assert len(now) == len(before.modules) and all(a is b for a, b in zip(now, before.modules)), "a module was replaced"
    if edits:
        assert hf_knowedit.list_edits(model) == []


@torch.no_grad()
def logits(model: nn.Module, tok: Any, text: str = "Angola is located in") -> torch.Tensor:
    """The logits ``[1, n_tokens, vocab]`` (float32) of one forward pass over ``text``."""
    return model(**tok(text, return_tensors="pt")).logits.float()


@torch.no_grad()
def logprob(model: nn.Module, tok: Any, prompt: str, target: str) -> float:
    """Mean log-probability per token of ``target`` after ``prompt`` (teacher forced, one forward pass)."""
    p, t = split_prompt_target(tok, prompt, target)
    logp = torch.log_softmax(model(input_ids=torch.tensor([p + t])).logits[0].float(), -1)
    return float(sum(logp[len(p) - 1 + i, x] for i, x in enumerate(t)) / len(t))


#: the methods hf_knowedit ships (test modules may register their own test methods)
SHIPPED_METHODS = [
    m for m in hf_knowedit.available_methods() if get_method(m).compute.__module__.startswith("hf_knowedit.")
]
#: shipped methods that edit routed mixture-of-experts blocks only (refused on dense rows)
ROUTED_ONLY_METHODS = ("moeedit",)
#: the shipped methods that edit every architecture (the dense-model tests run these)
DENSE_METHODS = [m for m in SHIPPED_METHODS if m not in ROUTED_ONLY_METHODS]
#: one fact and, per method, layers and strengths that give an update of visible size on a 4-layer tiny model
#: with ``mom2="identity"`` (the dispatch and half-precision tests)
CAPITAL_FACT = {"prompt": "The capital city of {}", "subject": "Italy", "target_new": "Paris", "target_true": "Rome"}
TINY_METHOD_SETTINGS = {
    "rome": dict(layers=[2]),
    "memit": dict(layers=[1, 2], mom2_update_weight=1.0),
    "alphaedit": dict(layers=[1, 2], nullspace_threshold=2.0, l2=0.5),
    "emmet": dict(layers=[1, 2]),
    "encore": dict(layers=[1, 2], mom2_update_weight=1.0),
    "rlsedit": dict(layers=[1, 2], mom2_update_weight=1.0),
}
