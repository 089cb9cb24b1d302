"""Independent reference implementations ("oracles") that tests compare the library against.

They are written plainly and slowly on purpose: whole forward passes, one quantity at a time,
PyTorch forward hooks registered and removed by hand. They share with the library only the
architecture table (which module is an MLP output, a block, the embedding), never its algorithms.

* :class:`NaiveTracer` — ROME's causal tracing (Meng et al. 2022; the reference code's
  ``trace_with_patch``): for every (kind, token, layer) cell, one forward pass of the corrupted
  samples in which the clean state of that cell (or of the MLP / attention outputs of the window of
  layers around it) is copied back, and ``p(answer)`` at the last position averaged over samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from hf_knowedit.architectures import attn_out_path, get_architecture, get_module, layer_path, mlp_out_path

KINDS = ("hidden", "mlp", "attn")


def _path(model: nn.Module, kind: str, layer: int) -> str:
    spec = get_architecture(model)
    return {"hidden": layer_path, "mlp": mlp_out_path, "attn": attn_out_path}[kind](spec, layer)


def _tensor(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _with_tensor(output: Any, tensor: torch.Tensor) -> Any:
    return (tensor, *output[1:]) if isinstance(output, tuple) else tensor


@contextmanager
def _hooks(model: nn.Module, edits: dict[str, Any]):
    """Forward hooks ``{module path: fn(output) -> output}``, removed on exit."""
    handles = [
        get_module(model, path).register_forward_hook(lambda m, a, out, fn=fn: fn(out)) for path, fn in edits.items()
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def subject_tokens(tokenizer: Any, prompt: str, subject: str) -> tuple[int, int]:
    """``(first, end)`` token indices of the first occurrence of ``subject`` in ``prompt``: every
    token with a character inside the subject."""
    cs = prompt.index(subject)
    ce = cs + len(subject)
    offsets = tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]
    hits = [i for i, (s, e) in enumerate(offsets) if e > s and s < ce and e > cs]
    return hits[0], hits[-1] + 1


def window(layer: int, size: int, n_layers: int) -> list[int]:
    """The ``size`` consecutive layers centred on ``layer`` (ROME: ``layer - size // 2`` onwards), clipped."""
    start = layer - size // 2
    return [j for j in range(start, start + size) if 0 <= j < n_layers]


class NaiveTracer:
    """One fact prepared for plain causal tracing: the clean run is done on construction.

    Args:
        prompt, subject: the fact; the subject's tokens are corrupted.
        noise: ``[samples, n_subject_tokens, d_model]`` added to the embedding output at the subject
            tokens, one row per corrupted sample.
    Attributes: ``input_ids``, ``subject_range``, ``answer`` (the clean top next token), ``clean_prob``,
    ``corrupted_prob``, ``n_layers``.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, prompt: str, subject: str, noise: torch.Tensor) -> None:
        self.model, self.noise = model, noise
        self.spec = get_architecture(model)
        self.n_layers = len(get_module(model, self.spec.layers))
        self.input_ids = tokenizer(prompt)["input_ids"]
        self.subject_range = subject_tokens(tokenizer, prompt, subject)
        T = len(self.input_ids)
        self.clean: dict[str, torch.Tensor] = {}  # every state a restoration may copy back, [T, d]

        def keep(path):
            def fn(out):
                h = _tensor(out)
                self.clean[path] = h.reshape(1, T, h.shape[-1])[0].clone()  # OPT's fc2 sees [batch * T, d]
                return out

            return fn

        names = dict(model.named_modules())
        paths = {_path(model, kind, l) for kind in KINDS for l in range(self.n_layers)} & set(names)
        #: blocks with attention (hybrid stacks: not every block)
        self.attention = [l for l in range(self.n_layers) if _path(model, "attn", l) in names]
        with torch.no_grad(), _hooks(model, {p: keep(p) for p in paths}):
            logits = model(input_ids=torch.tensor([self.input_ids]), use_cache=False).logits[0, -1].float()
        self.answer = int(logits.argmax())
        self.clean_prob = float(torch.softmax(logits, -1)[self.answer])
        self.corrupted_prob = self.prob([])

    @torch.no_grad()
    def prob(self, restore: Sequence[tuple[str, int, int]]) -> float:
        """``p(answer)`` at the last position, averaged over the corrupted samples, with the clean
        states of the ``(kind, layer, token)`` cells in ``restore`` copied back (one forward pass)."""
        samples, T = self.noise.shape[0], len(self.input_ids)
        s0, s1 = self.subject_range
        tokens: dict[str, list[int]] = {}
        for kind, layer, t in restore:
            tokens.setdefault(_path(self.model, kind, layer), []).append(t)

        def corrupt(out):
            out = out.clone()
            out[:, s0:s1] += self.noise.to(out.dtype)
            return out

        def patch(path, toks):
            def fn(out):
                h = _tensor(out)
                h3 = h.reshape(samples, T, h.shape[-1]).clone()
                h3[:, toks] = self.clean[path][toks]
                return _with_tensor(out, h3.reshape(h.shape))

            return fn

        edits = {self.spec.embed: corrupt} | {p: patch(p, toks) for p, toks in tokens.items()}
        with _hooks(self.model, edits):
            logits = self.model(input_ids=torch.tensor([self.input_ids] * samples), use_cache=False).logits
        return float(torch.softmax(logits[:, -1].float(), -1)[:, self.answer].mean())

    def grid(self, kind: str, window_size: int = 10) -> torch.Tensor:
        """``[n_tokens, n_layers]``: the score of every cell, one forward pass each; an MLP / attention
        cell restores that kind's outputs over the window of layers around its layer (an attention cell: those
        of its window's blocks with attention; NaN where there is none)."""
        T, L = len(self.input_ids), self.n_layers
        out = torch.zeros(T, L)
        for t in range(T):
            for l in range(L):
                layers = [l] if kind == "hidden" else window(l, window_size, L)
                layers = [j for j in layers if kind != "attn" or j in self.attention]
                out[t, l] = self.prob([(kind, j, t) for j in layers]) if layers else float("nan")
        return out


# -----------------------------------------------------------------------------
# the v* / z objective


def _site_path(model: nn.Module, site: str, layer: int) -> str:
    return _path(model, "mlp" if site == "mlp" else "hidden", layer)


@torch.no_grad()
def _forward(
    model: nn.Module, ids: list[int], site_path: str, position: int, delta: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities ``[len(ids), vocab]`` of one sequence, with ``delta`` added to the output of
    ``site_path`` at ``position`` (``None``: unedited), and the unedited site output there."""
    seen = {}

    def fn(out):
        h = _tensor(out)
        h3 = h.reshape(1, len(ids), h.shape[-1])  # OPT's fc2 sees [T, d]
        seen["site"] = h3[0, position].clone()
        if delta is None:
            return out
        h3 = h3.clone()
        h3[0, position] += delta.to(h3.dtype)
        return _with_tensor(out, h3.reshape(h.shape))

    with _hooks(model, {site_path: fn}):
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()
    return torch.log_softmax(logits, -1), seen["site"].float()


def target_loss(
    model: nn.Module,
    tokenizer: Any,
    prompt: str,
    subject: str,
    target: str,
    layer: int,
    site: str,
    templates: Sequence[str],
    delta: torch.Tensor,
    *,
    kl_factor: float,
    weight_decay: float,
) -> dict[str, float]:
    """ROME's v* loss (``compute_v`` in kmeng01/rome; MEMIT's ``compute_z``) of one request at ``delta``,
    from plain full forward passes.

    ``delta`` is added at the site (``"mlp"``: the output of the MLP's output projection of ``layer``;
    ``"residual"``: the output of block ``layer``) at the subject's last token of every prompt:

    * rewriting prompts: each template with the request's prompt in its ``{}`` and the subject filled
      in, followed by the target (teacher forced); NLL = mean over prompts of the mean over the target's
      tokens of ``-log p(token)``;
    * the essence prompt ``"{subject} is a"``: KL(p_δ ‖ p_0) of the distribution the reference code reads
      there, at the subject's last token (``kl_logits`` at ``lookup_idxs``);
    * weight decay ``‖δ‖ / ‖init‖²``, ``init`` the unedited site value at the subject's last token of the
      first rewriting prompt.

    Returns ``{"nll", "kl", "decay", "loss"}`` with ``loss = nll + kl_factor · kl + weight_decay · decay``.
    """
    site_path = _site_path(model, site, layer)
    nlls, init = [], None
    for template in templates:
        text = template.replace("{}", prompt, 1).replace("{}", subject)
        full = text + " " + target
        p_ids, f_ids = tokenizer(text)["input_ids"], tokenizer(full)["input_ids"]
        assert f_ids[: len(p_ids)] == p_ids, (text, target)
        t_ids = f_ids[len(p_ids) :]
        last = subject_tokens(tokenizer, text, subject)[1] - 1
        logp, site_value = _forward(model, f_ids, site_path, last, delta)
        if init is None:
            init = site_value
        nlls.append(-sum(float(logp[len(p_ids) - 1 + m, tid]) for m, tid in enumerate(t_ids)) / len(t_ids))
    essence = f"{subject} is a"
    last = subject_tokens(tokenizer, essence, subject)[1] - 1
    ids = tokenizer(essence)["input_ids"]
    cur = _forward(model, ids, site_path, last, delta)[0][last]
    ref = _forward(model, ids, site_path, last, None)[0][last]
    kl = float((cur.exp() * (cur - ref)).sum())
    nll = sum(nlls) / len(nlls)
    decay = float(delta.norm() / init.norm() ** 2)
    return {"nll": nll, "kl": kl, "decay": decay, "loss": nll + kl_factor * kl + weight_decay * decay}
