"""The keys of earlier sequential batches, ``Σ K_p K_pᵀ`` per layer: a method's history on a model.

AlphaEdit and ENCORE put the keys of the batches edited before into each new batch's system, so the new
batch does not overwrite them. The sum lives in ``get_state(model).history[method]`` (no globals) and grows
only once an edit set is active (``MethodResult.commit``), so a failed call leaves it untouched. Within one
call, each chunk (``chunk=True``) adds its keys before the next chunk is solved, as a batch of its own. Each
edit set also carries its own keys in ``EditSet.state`` (``"<method>.keys.<layer>"``), so a saved sequence
can rebuild the history on another model (:func:`restore`). Reverting an edit set does not remove its keys
from the history (they only make later edits more conservative); :func:`reset` starts afresh explicitly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..editset import EditSet
from ..errors import InvalidConfigError
from ..stack import get_state
from .registry import EditContext, MethodResult


@dataclass
class KeyHistory:
    """What a method remembers of earlier batches on one model.

    Attributes:
        prior: layer -> ``Σ K_p K_pᵀ`` over the keys of all committed batches (float64, ``[d_in, d_in]``).
        edits: number of edits committed.
    """

    prior: dict[int, torch.Tensor] = field(default_factory=dict)
    edits: int = 0


def state_prefix(method: str) -> str:
    """The ``EditSet.state`` key prefix of ``method``'s keys: ``"<method>.keys."`` + layer."""
    return f"{method}.keys."


class PriorKeys:
    """One call's running ``Σ K Kᵀ`` per layer: the committed history, plus each chunk of this call once it
    is solved (pass :meth:`remember` as ``mass_edit``'s ``on_keys``). Nothing reaches the model until the
    caller's commit stores :meth:`updated`."""

    def __init__(self, history: KeyHistory, method: str, layers: Sequence[int]) -> None:
        self.history = history
        self.method = method
        self.prior = dict(self.history.prior)
        self.keys: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}

    def get(self, layer: int, device: torch.device) -> torch.Tensor | None:
        """``Σ K_p K_pᵀ`` of ``layer`` so far (float64 on ``device``), or None when there is none."""
        prior = self.prior.get(layer)
        return prior.to(device) if prior is not None else None

    def remember(self, keys: dict[int, torch.Tensor]) -> None:
        """Add a solved chunk's keys (``[n, d_in]`` per layer): later chunks keep them."""
        for layer, K in keys.items():
            K64 = K.double()
            self.prior[layer] = self.prior.get(layer, 0) + K64.t() @ K64
            self.keys[layer].append(K)

    def state(self) -> dict[str, torch.Tensor]:
        """This call's keys per layer, for ``MethodResult.state`` (float32)."""
        prefix = state_prefix(self.method)
        return {f"{prefix}{layer}": torch.cat(ks).float() for layer, ks in self.keys.items() if ks}

    def updated(self, n_edits: int, **changes: object) -> KeyHistory:
        """The history with this call's keys and ``n_edits`` more edits (``changes``: other fields of a
        :class:`KeyHistory` subclass)."""
        return dataclasses.replace(
            self.history, prior={**self.history.prior, **self.prior}, edits=self.history.edits + n_edits, **changes
        )

    def result(self, ctx: EditContext, deltas: dict, layers: list[int], stats: dict, **changes: object) -> MethodResult:
        """The call's :class:`MethodResult`: its ``deltas``, this call's keys as its state, and a commit that stores
        :meth:`updated` (``changes`` included) in ``ctx.history`` in one assignment, once the set is active."""
        history = self.updated(len(ctx.requests), **changes)

        def commit() -> None:  # the last step of the stack's switch: nothing half-done
            ctx.history[self.method] = history

        return MethodResult(
            deltas=deltas,
            layers=layers,
            stats_key={layer: s.key for layer, s in stats.items()},
            state=self.state(),
            commit=commit,
        )


def get(model: nn.Module, method: str, empty: type[KeyHistory] = KeyHistory) -> KeyHistory:
    """``method``'s history on ``model`` (``empty()`` if it has none)."""
    return get_state(model).history.get(method) or empty()


def reset(model: nn.Module, method: str) -> None:
    """Forget ``method``'s earlier batches on ``model``; active edit sets stay active."""
    get_state(model).history.pop(method, None)


def restore(model: nn.Module, edit_sets: Iterable[EditSet], method: str, empty: type[KeyHistory] = KeyHistory) -> int:
    """Add the keys stored in ``edit_sets`` (made with ``method``, in order) to ``method``'s history on
    ``model``, all or nothing. Returns the number of edits added. Use it on a model whose history was reset
    (or never written), or keys are counted twice."""
    state = get_state(model)
    old = state.history.get(method) or empty()
    prefix = state_prefix(method)
    prior, added = dict(old.prior), 0
    for es in edit_sets:
        keys = {int(k[len(prefix) :]): v for k, v in es.state.items() if k.startswith(prefix)}
        if not keys:
            raise InvalidConfigError(
                f"Edit set {es.name!r} ({es.method}) carries no {method} keys; "
                f"only sets made with method={method!r} can restore its history."
            )
        for layer, K in keys.items():
            K = K.double()
            prior[layer] = prior.get(layer, 0) + K.t() @ K
        added += len(es.requests)
    state.history[method] = dataclasses.replace(old, prior=prior, edits=old.edits + added)
    return added
