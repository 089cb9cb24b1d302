"""Keys ``k*`` and target vectors ``v*`` / ``z``: the two vectors every locate-and-edit method needs.

**Keys** (ROME ``compute_u``, MEMIT ``compute_ks``): the input of ``mlp_out`` at the subject's
last token, averaged over context templates (:func:`compute_keys`).

**Targets** (ROME ``compute_v``, MEMIT ``compute_z``): one free vector ``δ`` per request is added
at the subject's last token of every rewriting prompt (each context template + the prompt +
all but the last target token, teacher forcing) and of one "essence" prompt ``"{} is a"``;
``δ`` minimises

    mean over prompts of the token-averaged NLL of the target
    + kl_factor · KL(current ‖ initial) of the next-token distribution at the essence prompt
    + weight_decay · ‖δ‖ / ‖init‖²

with Adam(lr); after each step ``δ`` is projected into the ball of radius
``clamp_factor · ‖init‖``; a request stops early once its loss is below ``early_stop``
(:func:`optimize_targets`). ``site="mlp"`` adds ``δ`` to the output of ``mlp_out`` (ROME's v*),
``site="residual"`` to the block output (MEMIT's z); ``init`` is the unedited value there.

Speed (``fast=True``, the default): ``δ`` enters at the edited layer, so the blocks below it
run once per optimisation: their output is cached and, during the steps, each block below is
swapped in its ``ModuleList`` for a stub returning that cached output (restored in ``finally``;
no ``forward`` is replaced). The loss reads logits only at the target positions and one position
per essence prompt, so the backbone runs without the LM head, the positions are gathered, and
the head (plus soft-capping) is applied to those rows only. ``fast=False`` runs the whole model
with full logits at every step (the reference's cost; for benchmarks).

Batching (``batched=True``): all requests are optimised together, in chunks of at most
``batch_tokens`` padded tokens. Losses of different requests are independent and Adam is
element-wise, so this equals one-by-one optimisation up to floating-point noise; a request
that stops early is frozen exactly (Adam is applied per request row, with its own moments).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Literal, Optional, Sequence, Tuple

import torch
from torch import nn

from .architectures import ArchitectureSpec, get_architecture, get_module, layer_path, mlp_out_dims, mlp_out_path
from .errors import InvalidConfigError
from .hooks import Trace, _first_input, hidden, replace_hidden
from .requests import EditRequest
from .tokens import encode_template, split_prompt_target

logger = logging.getLogger(__name__)

#: ROME's essence prompt (the KL term keeps the subject's other properties)
KL_PROMPT = "{} is a"
DEFAULT_BATCH_TOKENS = 2048


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _check_layer(model: nn.Module, spec: ArchitectureSpec, layer: int) -> Tuple[int, int]:
    return mlp_out_dims(model, spec, layer)  # raises LayerOutOfRangeError


def _pad(rows: Sequence[Sequence[int]], device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (pad id 0, masked out) and the attention mask. Right padding leaves every
    real token's position and attention exactly as without padding."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


def _prefixed(template: str, request: EditRequest) -> str:
    """A context template with the request's prompt in place of its ``{}``."""
    return template.replace("{}", request.prompt, 1)


def _chunks(sizes: Sequence[int], budget: int) -> List[List[int]]:
    """Group item indices (sorted by size) so that ``len(group) * max size <= budget`` where possible."""
    order = sorted(range(len(sizes)), key=lambda i: sizes[i])
    groups: List[List[int]] = []
    current: List[int] = []
    for i in order:
        if current and (len(current) + 1) * sizes[i] > budget:
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    return groups


# -----------------------------------------------------------------------------
# keys


def compute_keys(model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest], layer: int,
                 templates: Sequence[str], *, average: bool = True,
                 batch_tokens: int = DEFAULT_BATCH_TOKENS) -> torch.Tensor:
    """Input of ``mlp_out`` at ``layer`` at the subject's last token of each template-prefixed prompt.

    Returns float32 ``[n_requests, d_in]`` averaged over ``templates`` (``k*``), or
    ``[n_requests, n_templates, d_in]`` with ``average=False``. Runs on the model as it is (active
    edits included), in batched forward passes stopped right after the module.
    """
    if not templates:
        raise InvalidConfigError("compute_keys needs at least one template, e.g. ['{}'].")
    spec = get_architecture(model)
    d_in, _ = _check_layer(model, spec, layer)
    path = mlp_out_path(spec, layer)
    device = _device(model)
    prompts = []
    for req in requests:
        for t in templates:
            enc = encode_template(tokenizer, _prefixed(t, req), req.subject)
            prompts.append(enc.input_ids[: enc.subject_last + 1])  # later tokens cannot change the key
    keys = torch.empty(len(prompts), d_in, dtype=torch.float32, device=device)
    with torch.no_grad():
        for group in _chunks([len(p) for p in prompts], batch_tokens):
            ids, mask = _pad([prompts[i] for i in group], device)
            with Trace(model, path, retain_input=True, retain_output=False, stop=True) as tr:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            x = tr.input.reshape(ids.shape[0], ids.shape[1], d_in)  # OPT flattens tokens
            last = mask.sum(1) - 1
            keys[torch.tensor(group, device=device)] = x[torch.arange(len(group), device=device), last].float()
    keys = keys.reshape(len(requests), len(templates), d_in)
    return keys.mean(1) if average else keys


# -----------------------------------------------------------------------------
# targets


@dataclass
class TargetResult:
    """Result of :func:`optimize_targets` (float32, on the model's device).

    Attributes:
        targets: ``init + δ`` per request, ``[n, d_model]`` (ROME's v*, MEMIT's z).
        init: the unedited value at the site, at the subject's last token of the first prompt.
        steps_taken: Adam updates applied per request.
        losses: the last loss per request (the one that stopped it, or after the last step).
    """

    targets: torch.Tensor
    init: torch.Tensor
    steps_taken: List[int]
    losses: List[float]

    @property
    def deltas(self) -> torch.Tensor:
        return self.targets - self.init


@dataclass
class _Request:
    rows: List[List[int]]  # rewriting rows, then the essence row(s)
    lookups: List[int]
    n_rewrite: int
    targets: List[Tuple[int, int, int]] = field(default_factory=list)  # (row, position, token id)


def _build(tokenizer: Any, req: EditRequest, templates: Sequence[str], kl_prompts: Sequence[str]) -> _Request:
    rows, lookups, targets = [], [], []
    for t in templates:
        text = _prefixed(t, req)
        enc = encode_template(tokenizer, text, req.subject)
        prompt_ids, target_ids = split_prompt_target(tokenizer, enc.text, req.target_new)
        row = len(rows)
        rows.append(prompt_ids + target_ids[:-1])
        lookups.append(enc.subject_last)
        targets += [(row, len(prompt_ids) - 1 + m, tid) for m, tid in enumerate(target_ids)]
    for kl in kl_prompts:
        enc = encode_template(tokenizer, kl, req.subject)
        rows.append(enc.input_ids)
        lookups.append(enc.subject_last)
    return _Request(rows, lookups, len(templates), targets)


class _CachedBlock(nn.Module):
    """Stands in for a decoder block below the edited layer: returns the block's output recorded
    once (``value``, for the selected ``rows``) or passes its input through. Attribute lookups it
    cannot answer go to the original block (e.g. ``attention_type``)."""

    def __init__(self, original: nn.Module, structure: Any, value: Optional[torch.Tensor]) -> None:
        super().__init__()
        self.__dict__["_original"] = original
        self.__dict__["_structure"] = structure
        self.__dict__["_value"] = value
        self.__dict__["rows"] = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._value is None:
            return replace_hidden(self._structure, _first_input(args, kwargs))
        value = self._value if self.rows is None else self._value[self.rows]
        return replace_hidden(self._structure, value.clone())

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_original"], name)


def _structure(output: Any) -> Any:
    """The block output with its hidden tensor dropped (kept: tuple shape and the other entries)."""
    if isinstance(output, (tuple, list)):
        return type(output)([None] + [o.detach() if isinstance(o, torch.Tensor) else o for o in output[1:]])
    return None


def _logits(model: nn.Module, spec: ArchitectureSpec, hidden_states: torch.Tensor) -> torch.Tensor:
    logits = get_module(model, spec.lm_head)(hidden_states)
    cap = getattr(model.config, spec.logit_softcap, None) if spec.logit_softcap else None
    if cap:
        logits = cap * torch.tanh(logits / cap)
    return logits


def _adam(delta: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, t: torch.Tensor,
          rows: torch.Tensor, lr: float, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
    """``torch.optim.Adam`` (same formulas) applied to the selected request rows only."""
    b1, b2 = betas
    g = grad[rows]
    t[rows] += 1
    m[rows] = b1 * m[rows] + (1 - b1) * g
    v[rows] = b2 * v[rows] + (1 - b2) * g * g
    bc1 = 1 - b1 ** t[rows].unsqueeze(1)
    bc2 = 1 - b2 ** t[rows].unsqueeze(1)
    denom = v[rows].sqrt() / bc2.sqrt() + eps
    delta[rows] -= (lr / bc1) * m[rows] / denom


def optimize_targets(model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest], layer: int, *,
                     site: Literal["mlp", "residual"] = "mlp", templates: Sequence[str] = ("{}",),
                     steps: int = 20, lr: float = 0.5, kl_factor: float = 0.0625, weight_decay: float = 0.5,
                     clamp_factor: float = 4.0, early_stop: float = 0.05, batched: bool = True, fast: bool = True,
                     kl_prompts: Sequence[str] = (KL_PROMPT,), batch_tokens: int = DEFAULT_BATCH_TOKENS,
                     progress: Optional[Callable[[int, torch.Tensor], None]] = None) -> TargetResult:
    """Optimise one vector per request so the model predicts ``target_new`` (see module docstring).

    Args:
        site: ``"mlp"`` adds δ to the output of ``mlp_out`` at ``layer`` (ROME's v*), ``"residual"`` to
            the output of block ``layer`` (MEMIT's z).
        templates: context templates with ``{}`` where the request's prompt goes (``"{}"`` first:
            ``init`` is read on the first template's prompt).
        steps: forward passes at most (Adam updates at most ``steps - 1``, as the reference).
        batched: optimise all requests together (``False``: one request at a time).
        fast: cache the blocks below ``layer`` and compute logits only where the loss reads them.
        batch_tokens: padded tokens per forward pass (lower it when memory is short).
        progress: called as ``progress(step, per_request_losses)`` after every forward step.

    Returns a :class:`TargetResult`. The model is not modified (gradients flow only into δ).
    """
    if site not in ("mlp", "residual"):
        raise InvalidConfigError(f"site must be 'mlp' or 'residual', got {site!r}.")
    for name, value in (("steps", steps), ("batch_tokens", batch_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidConfigError(f"{name} must be an int >= 1, got {value!r}.")
    if not templates:
        raise InvalidConfigError("optimize_targets needs at least one template, e.g. ['{}'].")
    requests = list(requests)
    if not batched and len(requests) > 1:
        parts = [optimize_targets(model, tokenizer, [r], layer, site=site, templates=templates, steps=steps, lr=lr,
                                  kl_factor=kl_factor, weight_decay=weight_decay, clamp_factor=clamp_factor,
                                  early_stop=early_stop, batched=True, fast=fast, kl_prompts=kl_prompts,
                                  batch_tokens=batch_tokens, progress=progress) for r in requests]
        return TargetResult(torch.cat([p.targets for p in parts]), torch.cat([p.init for p in parts]),
                            sum((p.steps_taken for p in parts), []), sum((p.losses for p in parts), []))
    spec = get_architecture(model)
    _, d_out = _check_layer(model, spec, layer)
    built = [_build(tokenizer, r, templates, kl_prompts) for r in requests]
    sizes = [len(b.rows) * max(len(row) for row in b.rows) for b in built]
    chunks = [_Chunk(model, spec, layer, site, [(i, built[i]) for i in group]) for group in _chunks(sizes, batch_tokens)]
    n, device = len(requests), _device(model)
    delta = torch.zeros(n, d_out, device=device, requires_grad=True)
    init = torch.zeros(n, d_out, device=device)
    m, v = torch.zeros_like(init), torch.zeros_like(init)
    t = torch.zeros(n, dtype=torch.float64, device=device)
    active = torch.ones(n, dtype=torch.bool, device=device)
    losses = torch.zeros(n, dtype=torch.float64, device=device)
    steps_taken = [0] * n
    try:
        with torch.enable_grad():
            if fast and layer > 0:
                for c in chunks:
                    c.record_prefix()
            for it in range(steps):
                last = it == steps - 1
                grad = torch.zeros_like(init)
                for c in chunks:
                    local = [j for j, (i, _) in enumerate(c.items) if bool(active[i])]
                    if not local:
                        continue
                    loss_i = c.loss(delta, local, kl_factor, weight_decay, fast)  # iteration 0 records init
                    if it == 0:
                        init[c.index] = c.init
                    losses[c.index[local]] = loss_i.detach().double()
                    if not last:
                        grad += torch.autograd.grad(loss_i.sum(), delta)[0]
                if progress is not None:
                    progress(it, losses.detach().cpu().clone())
                active &= ~(losses < early_stop)  # stopped requests are frozen from here on
                if last or not bool(active.any()):
                    break
                rows = active.nonzero().squeeze(1)
                with torch.no_grad():
                    _adam(delta.data, grad, m, v, t, rows, lr)
                    norms = delta.data[rows].norm(dim=1)
                    limit = clamp_factor * init[rows].norm(dim=1)
                    scale = torch.where(norms > limit, limit / norms.clamp_min(1e-30), torch.ones_like(norms))
                    delta.data[rows] *= scale.unsqueeze(1)
                for i in rows.tolist():
                    steps_taken[i] += 1
    finally:
        for c in chunks:
            c.close()
    delta = delta.detach()
    return TargetResult((init + delta).float(), init.float(), steps_taken, losses.cpu().tolist())


class _Chunk:
    """A group of requests optimised in the same forward passes."""

    def __init__(self, model: nn.Module, spec: ArchitectureSpec, layer: int, site: str,
                 items: List[Tuple[int, _Request]]) -> None:
        self.model, self.spec, self.layer, self.site, self.items = model, spec, layer, site, items
        device = _device(model)
        rows, owner, lookups, kind = [], [], [], []
        tgt_row, tgt_pos, tgt_tok = [], [], []
        for j, (_, req) in enumerate(items):
            base = len(rows)
            rows += req.rows
            owner += [j] * len(req.rows)
            lookups += req.lookups
            kind += [0] * req.n_rewrite + [1] * (len(req.rows) - req.n_rewrite)
            for r, p, tok in req.targets:
                tgt_row.append(base + r)
                tgt_pos.append(p)
                tgt_tok.append(tok)
        self.ids, self.mask = _pad(rows, device)
        self.owner = torch.tensor(owner, device=device)
        self.lookups = torch.tensor(lookups, device=device)
        self.is_kl = torch.tensor(kind, device=device).bool()
        self.tgt_row = torch.tensor(tgt_row, device=device)
        self.tgt_pos = torch.tensor(tgt_pos, device=device)
        self.tgt_tok = torch.tensor(tgt_tok, device=device)
        self.first_row = torch.tensor([sum(len(req.rows) for _, req in items[:j]) for j in range(len(items))],
                                      device=device)
        self.n_rewrite = torch.tensor([req.n_rewrite for _, req in items], device=device)
        self.n_kl = torch.tensor([len(req.rows) - req.n_rewrite for _, req in items], device=device)
        self.index = torch.tensor([i for i, _ in items], device=device)
        self.site_path = mlp_out_path(spec, layer) if site == "mlp" else layer_path(spec, layer)
        self.prefix: Optional[torch.Tensor] = None
        self.structure: Any = None
        self.init: Optional[torch.Tensor] = None
        self.kl_init: Optional[torch.Tensor] = None

    # -- the blocks below the edited layer, once ------------------------------

    def record_prefix(self) -> None:
        with torch.no_grad(), Trace(self.model, layer_path(self.spec, self.layer - 1), retain_output=True,
                                    clone=True, detach=True, stop=True) as tr:
            self.model(input_ids=self.ids, attention_mask=self.mask, use_cache=False)
        self.prefix = hidden(tr.output)
        self.structure = _structure(tr.output)

    def _swap(self, rows: torch.Tensor) -> List[nn.Module]:
        blocks = get_module(self.model, self.spec.layers)
        originals = [blocks[j] for j in range(self.layer)]
        for j, block in enumerate(originals):
            stub = _CachedBlock(block, self.structure, self.prefix if j == self.layer - 1 else None)
            stub.__dict__["rows"] = rows
            blocks[j] = stub
        return originals

    def _restore(self, originals: List[nn.Module]) -> None:
        blocks = get_module(self.model, self.spec.layers)
        for j, block in enumerate(originals):
            blocks[j] = block

    # -- one forward pass --------------------------------------------------------

    def _forward(self, rows: torch.Tensor, delta_rows: torch.Tensor, fast: bool,
                 record_init: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """Logits at the target positions and at the essence positions of the selected rows."""
        ids, mask, lookups = self.ids[rows], self.mask[rows], self.lookups[rows]
        width = ids.shape[1]
        seen: Dict[str, torch.Tensor] = {}

        def edit(output: Any, _path: str) -> Any:
            h = hidden(output)
            flat = h.dim() == 2  # OPT's fc2 sees [batch * seq, d]
            index = (torch.arange(len(rows), device=h.device) * width + lookups,) if flat else \
                (torch.arange(len(rows), device=h.device), lookups)
            if record_init:
                seen["init"] = h[index].detach().float().clone()
            return replace_hidden(output, h.index_put(index, delta_rows.to(h.dtype), accumulate=True))

        originals = self._swap(rows) if fast and self.prefix is not None else None
        try:
            with Trace(self.model, self.site_path, retain_output=False, edit_output=edit):
                if fast:
                    out = get_module(self.model, self.spec.backbone)(input_ids=ids, attention_mask=mask, use_cache=False)
                    h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
                else:
                    h = None
                    logits_full = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        finally:
            if originals is not None:
                self._restore(originals)
        local = torch.full((len(self.ids),), -1, dtype=torch.long, device=ids.device)
        local[rows] = torch.arange(len(rows), device=ids.device)
        keep = local[self.tgt_row] >= 0
        t_rows, t_pos = local[self.tgt_row[keep]], self.tgt_pos[keep]
        kl_rows = (self.is_kl[rows]).nonzero().squeeze(1)
        kl_pos = lookups[kl_rows]
        if record_init:
            self._seen = seen
        if fast:
            sel = torch.cat([h[t_rows, t_pos], h[kl_rows, kl_pos]])
            logits = _logits(self.model, self.spec, sel).float()
        else:
            logits = torch.cat([logits_full[t_rows, t_pos], logits_full[kl_rows, kl_pos]]).float()
        return logits[: len(t_rows)], logits[len(t_rows):]

    def loss(self, delta: torch.Tensor, active: List[int], kl_factor: float, weight_decay: float,
             fast: bool) -> torch.Tensor:
        """Per-request loss ``[len(active)]`` for the chunk's requests at local indices ``active``."""
        device = self.ids.device
        active_t = torch.tensor(active, device=device)
        row_mask = torch.isin(self.owner, active_t)
        rows = row_mask.nonzero().squeeze(1)
        delta_rows = delta[self.index[self.owner[rows]]]
        first = self.init is None
        tgt_logits, kl_logits = self._forward(rows, delta_rows, fast, record_init=first)
        if first:  # δ = 0 here: the unedited site values and essence distributions
            if len(rows) != len(self.ids):
                raise RuntimeError("the first pass must include every request")
            self.init = self._seen.pop("init")[self.first_row]
            self.kl_init = torch.log_softmax(kl_logits.detach(), dim=-1)
        keep = row_mask[self.tgt_row]
        logp = torch.log_softmax(tgt_logits, dim=-1).gather(1, self.tgt_tok[keep].unsqueeze(1)).squeeze(1)
        # token-averaged NLL per prompt, then mean over the request's prompts
        row_of_t = self.tgt_row[keep]
        n_rows = len(self.ids)
        per_row = torch.zeros(n_rows, device=device).index_add(0, row_of_t, -logp)
        count = torch.zeros(n_rows, device=device).index_add(0, row_of_t, torch.ones_like(logp))
        row_nll = per_row / count.clamp_min(1)
        is_rewrite = ~self.is_kl
        nll = torch.zeros(len(self.items), device=device).index_add(0, self.owner[is_rewrite], row_nll[is_rewrite])
        nll = nll / self.n_rewrite
        # KL(current ‖ initial) at the essence prompts
        kl_rows_all = self.is_kl.nonzero().squeeze(1)
        kl_sel = row_mask[kl_rows_all]
        cur = torch.log_softmax(kl_logits, dim=-1)
        init = self.kl_init[kl_sel]
        kl_each = (cur.exp() * (cur - init)).sum(-1)
        kl = torch.zeros(len(self.items), device=device).index_add(0, self.owner[kl_rows_all[kl_sel]], kl_each)
        kl = kl / self.n_kl.clamp_min(1)
        d = delta[self.index]
        decay = weight_decay * d.norm(dim=1) / self.init.norm(dim=1) ** 2
        total = nll + kl_factor * kl + decay
        return total[active_t]

    def close(self) -> None:
        self.prefix = None
