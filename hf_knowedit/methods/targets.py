"""Target vectors ``v*`` / ``z``: what the edited site should output so the model says the new object
(ROME ``compute_v``, MEMIT ``compute_z``).

One free vector ``δ`` per request is added at the subject's last token of every rewriting prompt
(each context template + the prompt + all but the last target token, teacher forcing) and of one
"essence" prompt ``"{} is a"``; ``δ`` minimises :func:`objective`. Adam takes the steps (rate ``v_lr``, or by default
``v_lr_relative`` times the RMS of ``init``, per request: :func:`step_size`);
after each one ``δ`` is projected into the ball of radius ``clamp_norm_factor · ‖init‖``; a request
stops once its loss is below ``early_stop`` (or by ENCORE's MPES rule, :func:`mpes_stop`). ``site="mlp"``
adds ``δ`` to the output of ``mlp_out`` (ROME's v*), ``site="residual"`` to the block output (MEMIT's z);
``init`` is the unedited value there.

Question rows (``chat_questions=True``): each request whose relation has a question
(:func:`hf_knowedit.methods.context.request_question`) gets one more rewriting row, the question as a user turn of
the chat template followed by the new object as the first words of the answer
(:func:`hf_knowedit.methods.context.question_template`); δ goes at the subject's last token in the question, and
the row counts in the NLL mean and in MPES's arg-max check like any other rewriting row.

Speed (``fast=True``, the default): ``δ`` enters at the edited layer, so the blocks below it run
once per optimisation: their output is recorded and, during the steps, replayed by stand-in blocks
(:func:`hf_knowedit.hooks.replaced_blocks`). The loss reads logits only at the target positions and
one position per essence prompt, so the backbone runs without the LM head and the head is applied to
those rows only (:func:`hf_knowedit.architectures.lm_logits`). Every position before the subject's
last token is the same at every layer and every step too: the recording pass keeps their keys and
values (a ``DynamicCache`` per layer) and each step runs only the positions from the subject's last
token on, on top of them (``prefix_cache=True``). Rows of a batch have different prefixes: each row's
suffix is left-aligned, its true positions are passed as ``position_ids`` and the attention mask has a
gap between the row's prefix and suffix (``ArchitectureSpec.prefix_cache="rows"``); where attention
depends on cache indices (sliding / local windows) or the model takes no ``position_ids``, every row
starts at the chunk's earliest subject (``"common"``); a model that returns no plain ``DynamicCache``
runs every position (logged at debug level), and so do the hybrid stacks, whose caches hold recurrent /
convolution state that cannot be cut at each row's subject (the table's ``prefix_cache="off"``).
``TargetResult.step_work`` counts the token-layers a step
runs on each path. ``fast=False`` runs the whole model with full logits at every step (the
reference's cost; for benchmarks).

NAMET's noise (``v_position_noise=True``, Dai et al. 2025; :func:`position_noise`): δ goes where the authors'
left-padded ``compute_z`` puts it, ``L_max − len(row)`` tokens before each row's subject (on no token where that
is before the row), and the target is ``init + δ`` plus the mean, over the non-bare template rows δ reaches, of
(the unedited value where δ goes − the value at the subject), as their ``opt_zs − cur_zs``. No extra prompts or
tokens; rows δ reaches early, or not at all, are run from there (from 0) at each step. Their other changes
(templates, weight decay, clamp radius) are not part of it (``docs/design.md``).

Batching (``batched=True``): all requests are optimised together, in chunks of at most
``batch_tokens`` padded tokens. Losses of different requests are independent, Adam is applied per
request row with its own moments, and a request that stops early is frozen exactly, so batched and
serial runs do the same arithmetic on differently shaped (padded) matrices: they differ by rounding,
amplified along the Adam path where a request does not converge. The one discrete difference is the
early-stop threshold: a request whose loss lands within rounding of ``early_stop`` after some step stops
there in one run and takes one more Adam step in the other. Requests with the same
``TargetResult.steps_taken`` in both runs agree up to amplified rounding (measured: ``docs/design.md``,
"Parity with the reference code").
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer

from ..architectures import (
    ArchitectureSpec,
    decoder_config,
    get_architecture,
    get_module,
    layer_path,
    lm_logits,
    mlp_out_dims,
    mlp_out_path,
    model_device,
)
from ..errors import InvalidConfigError
from ..hooks import ReplayBlock, Trace, first_input, hidden, replace_hidden, replaced_blocks
from ..requests import EditRequest
from ..tokens import encode_template, pad_batch, split_prompt_target
from .config import EditConfig, make_config
from .context import question_templates
from .keys import DEFAULT_BATCH_TOKENS, group_by_size, prefixed

logger = logging.getLogger(__name__)

#: most bytes the cached keys / values of all requests' prefixes may hold during one optimisation
#: (beyond it the remaining chunks run every position, as with ``prefix_cache=False``)
PREFIX_CACHE_BYTES = 4 * 2**30

#: ROME's essence prompt (the KL term keeps the subject's other properties)
KL_PROMPT = "{} is a"


def objective(
    nll: torch.Tensor, kl: torch.Tensor, delta: torch.Tensor, init: torch.Tensor, kl_factor: float, weight_decay: float
) -> torch.Tensor:
    """The loss of each request's ``δ`` (ROME eq. 4 with the reference code's terms)::

        L(δ) = NLL(δ) + kl_factor · KL(δ) + weight_decay · ‖δ‖ / ‖init‖²

    Args:
        nll: ``[n]`` mean over the request's rewriting prompts of the token-averaged negative
            log-likelihood of the new object, with ``δ`` added at the site.
        kl: ``[n]`` mean over the essence prompts of ``KL(p_δ ‖ p_0)`` of the next-token distribution.
        delta: ``[n, d]`` the vectors being optimised; ``init``: ``[n, d]`` the unedited site values.
    """
    return nll + kl_factor * kl + weight_decay * delta.norm(dim=1) / init.norm(dim=1) ** 2


@dataclass
class TargetResult:
    """Result of :func:`optimize_targets` (float32, on the model's device).

    Attributes:
        targets: ``init + δ`` per request, ``[n, d_model]`` (ROME's v*, MEMIT's z).
        init: the unedited value at the site, at the subject's last token of the first prompt.
        steps_taken: Adam updates applied per request.
        losses: the last loss per request (the one that stopped it, or after the last step).
        step_work: token-layers (padded tokens x decoder blocks run) of one step over all requests:
            ``"full"`` the whole model (``fast=False``), ``"replayed"`` the blocks from the edited
            layer up over every position (``prefix_cache=False``), ``"cached"`` those blocks from each
            row's cut on (this run's); empty with ``fast=False``.
    """

    targets: torch.Tensor
    init: torch.Tensor
    steps_taken: list[int]
    losses: list[float]
    step_work: dict[str, int] = field(default_factory=dict)

    def work_left(self, relative_to: str = "full") -> float:
        """The fraction of ``relative_to``'s token-layer work per step that this run's steps did
        (``"full"`` or ``"replayed"``; see ``step_work``)."""
        if not self.step_work:
            return 1.0
        return self.step_work["cached"] / self.step_work[relative_to]

    @property
    def deltas(self) -> torch.Tensor:
        return self.targets - self.init


@dataclass
class _Request:
    rows: list[list[int]]  # rewriting rows, then the essence row(s)
    lookups: list[int]  # where δ goes (the subject's last token, unless position_noise moves it)
    n_rewrite: int
    targets: list[tuple[int, int, int]] = field(default_factory=list)  # (row, position, token id)
    checked: list[bool] = field(default_factory=list)  # per rewriting row: does MPES's arg-max test read it?
    subjects: list[int] = field(default_factory=list)  # the subject's last token per row
    weights: list[float] = field(default_factory=list)  # 1: δ is added at lookups; 0: not at all


def position_noise(rows: Sequence[Sequence[int]], subjects: Sequence[int]) -> tuple[list[int], list[float]]:
    """NAMET's noise (Dai et al. 2025, the authors' ``compute_z`` with left padding): where δ goes in each row
    of one request, and whether at all.

    The authors left-pad the request's rows (its rewriting prompts and essence prompt) to the longest one and
    add δ at each row's subject-last index counted in the *unpadded* row, so in a row ``s = L_max − len(row)``
    tokens shorter than the longest δ lands ``s`` tokens before the subject's last token: ``subject − s``. Where
    that is before the row's start it lands on padding, which no token attends to: δ has no effect on that row
    (weight 0; its position is then 0, unused). The longest rows get δ at the subject as without noise.
    """
    longest = max(len(r) for r in rows)
    at = [subject - (longest - len(row)) for row, subject in zip(rows, subjects)]
    return [max(a, 0) for a in at], [1.0 if a >= 0 else 0.0 for a in at]


def _cache_argument(backbone: nn.Module) -> str | None:
    """The name under which ``backbone.forward`` takes a key / value cache (transformers renamed it)."""
    params = inspect.signature(backbone.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def _cache_mode(model: nn.Module, spec: ArchitectureSpec, backbone: nn.Module) -> str:
    """How the steps can skip the positions before the subject's last token.

    ``"rows"``: each row from its own subject last token on (the cached prefixes then end at different
    indices, so positions are passed explicitly and the attention mask has a gap); ``"common"``: every
    row from the earliest subject last token of its chunk on (indices stay positions: for models that
    take no ``position_ids`` or whose attention depends on index distances: sliding windows, the table's
    ``prefix_cache="common"``); ``"off"``: today's path over every position.
    """
    if spec.prefix_cache == "off" or _cache_argument(backbone) is None:
        why = "the architecture table's prefix_cache='off'" if spec.prefix_cache == "off" else "no cache argument"
        logger.debug("%s: no prefix cache (%s), v*/z steps run over every position.", spec.model_type, why)
        return "off"
    config = decoder_config(model, spec)
    windowed = (
        bool(getattr(config, "sliding_window", None)) and getattr(config, "use_sliding_window", True) is not False
    )
    full = set(getattr(config, "layer_types", None) or ()) <= {"full_attention"}
    takes_positions = "position_ids" in inspect.signature(backbone.forward).parameters
    if spec.prefix_cache == "common" or windowed or not full or not takes_positions:
        return "common"
    return "rows"


def _build(
    tokenizer: Any,
    req: EditRequest,
    templates: Sequence[str],
    kl_prompts: Sequence[str],
    noise: bool = False,
    question: str | None = None,
) -> _Request:
    """The request's rows: one rewriting row per template (the prompt in it, then the target), then its
    ``question`` row (a chat turn with ``{}`` for the subject, then the target as the answer's start:
    :func:`hf_knowedit.methods.context.question_template`) if given, then the essence rows."""
    rows, lookups, targets = [], [], []
    texts = [prefixed(t, req) for t in templates] + ([question] if question is not None else [])
    for text in texts:
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
    checked = [t != "{}" for t in templates]  # MPES leaves out the bare prompt, unless it is the only one
    checked = (checked if any(checked) else [True] * len(templates)) + [True] * (len(texts) - len(templates))
    at, weights = position_noise(rows, lookups) if noise else (list(lookups), [1.0] * len(rows))
    return _Request(rows, at, len(texts), targets, checked, lookups, weights)


def _structure(output: Any) -> Any:
    """The block output with its hidden tensor dropped (kept: tuple shape and the other entries)."""
    if isinstance(output, (tuple, list)):
        return type(output)([None] + [o.detach() if isinstance(o, torch.Tensor) else o for o in output[1:]])
    return None


def _adam(
    delta: torch.Tensor,
    grad: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    t: torch.Tensor,
    rows: torch.Tensor,
    lr: float | torch.Tensor,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> None:
    """``torch.optim.Adam`` (same formulas) applied to the selected request rows only."""
    b1, b2 = betas
    g = grad[rows]
    t[rows] += 1
    m[rows] = b1 * m[rows] + (1 - b1) * g
    v[rows] = b2 * v[rows] + (1 - b2) * g * g
    bc1 = 1 - b1 ** t[rows].unsqueeze(1)
    bc2 = 1 - b2 ** t[rows].unsqueeze(1)
    denom = v[rows].sqrt() / bc2.sqrt() + eps
    if isinstance(lr, torch.Tensor):  # one rate per request
        lr = lr[rows].unsqueeze(1)
    delta[rows] -= (lr / bc1) * m[rows] / denom


def mpes_stop(top1_steps: torch.Tensor, mean_prob: torch.Tensor, prob_cutoff: float) -> torch.Tensor:
    """ENCORE's most-probable early stopping (MPES) as its authors' ``compute_z`` (``prob_cutoff``): which
    requests stop at this forward pass (before its Adam step).

    ``prob_cutoff = −N`` (a negative whole number): once the forward passes at which the new object is the
    arg-max at every target token of every rewriting prompt but the bare ``"{}"`` one (question rows included)
    number ``N`` (``top1_steps``, counted along the run, not reset when a pass misses): ``−1`` stops at the first
    such pass, ``−N`` allows up to ``N − 1`` more Adam steps. ``0 < prob_cutoff < 1``: once ``mean_prob``, the new
    object's probability (``exp`` of the token-averaged NLL) averaged over all rewriting prompts, exceeds it.
    """
    if prob_cutoff < 0:
        return top1_steps >= -prob_cutoff
    return mean_prob > prob_cutoff


def optimize_targets(
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence[EditRequest],
    layer: int,
    hparams: EditConfig | None = None,
    *,
    site: Literal["mlp", "residual"] = "mlp",
    templates: Sequence[str] = ("{}",),
    batched: bool = True,
    fast: bool = True,
    kl_prompts: Sequence[str] = (KL_PROMPT,),
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    progress: Callable[[int, torch.Tensor], None] | None = None,
    prefix_cache: bool = True,
    **overrides: Any,
) -> TargetResult:
    """Optimise one vector per request so the model predicts ``target_new`` (see module docstring).

    Args:
        hparams: the method's config (any :class:`~hf_knowedit.methods.config.EditConfig`): its
            ``v_num_grad_steps``, ``v_lr``, ``kl_factor``, ``v_weight_decay``, ``clamp_norm_factor`` and
            ``early_stop`` are used; ``**overrides`` replace single fields (default: ``EditConfig()``).
        site: ``"mlp"`` adds δ to the output of ``mlp_out`` at ``layer`` (ROME's v*), ``"residual"`` to
            the output of block ``layer`` (MEMIT's z).
        templates: context templates with ``{}`` where the request's prompt goes (``"{}"`` first:
            ``init`` is read on the first template's prompt).
        batched: optimise all requests together (``False``: one request at a time).
        fast: replay the blocks below ``layer`` and compute logits only where the loss reads them.
        prefix_cache: with ``fast``, run the steps only from each row's subject last token on, on top
            of the keys / values of the positions before it (computed once; see module docstring).
        batch_tokens: padded tokens per forward pass (lower it when memory is short).
        progress: called as ``progress(step, per_request_losses)`` after every forward step.

    ``v_num_grad_steps`` counts forward passes (Adam updates at most one fewer, as the reference).
    Returns a :class:`TargetResult`. The model is not modified (gradients flow only into δ).
    """
    hp = make_config(type(hparams) if hparams is not None else EditConfig, hparams, overrides, "optimize_targets")
    if site not in ("mlp", "residual"):
        raise InvalidConfigError(f"site must be 'mlp' or 'residual', got {site!r}.")
    if isinstance(batch_tokens, bool) or not isinstance(batch_tokens, int) or batch_tokens < 1:
        raise InvalidConfigError(f"batch_tokens must be an int >= 1, got {batch_tokens!r}.")
    if not templates:
        raise InvalidConfigError("optimize_targets needs at least one template, e.g. ['{}'].")
    requests = list(requests)
    if not batched and len(requests) > 1:
        parts = [
            optimize_targets(
                model,
                tokenizer,
                [r],
                layer,
                hp,
                site=site,
                templates=templates,
                fast=fast,
                kl_prompts=kl_prompts,
                batch_tokens=batch_tokens,
                progress=progress,
                prefix_cache=prefix_cache,
            )
            for r in requests
        ]
        return TargetResult(
            torch.cat([p.targets for p in parts]),
            torch.cat([p.init for p in parts]),
            sum((p.steps_taken for p in parts), []),
            sum((p.losses for p in parts), []),
            {k: sum(p.step_work.get(k, 0) for p in parts) for k in parts[0].step_work},
        )
    spec = get_architecture(model)
    _, d_out = mlp_out_dims(model, spec, layer)  # raises LayerOutOfRangeError
    noise = bool(getattr(hp, "v_position_noise", False))
    asked = question_templates(tokenizer, requests) if hp.chat_questions else [None] * len(requests)
    built = [_build(tokenizer, r, templates, kl_prompts, noise, q) for r, q in zip(requests, asked)]
    sizes = [len(b.rows) * max(len(row) for row in b.rows) for b in built]
    chunks = [
        _Chunk(model, spec, layer, site, [(i, built[i]) for i in group]) for group in group_by_size(sizes, batch_tokens)
    ]
    n, device = len(requests), model_device(model)
    delta = torch.zeros(n, d_out, device=device, requires_grad=True)
    init = torch.zeros(n, d_out, device=device)
    offset = torch.zeros_like(init)  # position noise's term (zero without it)
    m, v = torch.zeros_like(init), torch.zeros_like(init)
    t = torch.zeros(n, dtype=torch.float64, device=device)
    active = torch.ones(n, dtype=torch.bool, device=device)
    losses = torch.zeros(n, dtype=torch.float64, device=device)
    top1_steps = torch.zeros(n, dtype=torch.long, device=device)  # passes with every checked token top-1 (MPES)
    mean_prob = torch.zeros(n, dtype=torch.float64, device=device)  # over the rewriting prompts (MPES)
    steps_taken = [0] * n
    by_mpes = torch.zeros(n, dtype=torch.bool, device=device)  # stopped because the new object is top-1
    try:
        with torch.enable_grad():
            if fast:
                budget = [PREFIX_CACHE_BYTES]  # what the chunks' cached prefixes may hold together
                for c in chunks:
                    c.record_prefix(prefix_cache, budget)
            for it in range(hp.v_num_grad_steps):
                last = it == hp.v_num_grad_steps - 1
                grad = torch.zeros_like(init)
                for c in chunks:
                    local = [j for j, (i, _) in enumerate(c.items) if bool(active[i])]
                    if not local:
                        continue
                    loss_i = c.loss(delta, local, hp.kl_factor, hp.v_weight_decay, fast)  # iteration 0 records init
                    if it == 0:
                        init[c.index] = c.init
                        if c.offset is not None:
                            offset[c.index] = c.offset
                    losses[c.index[local]] = loss_i.detach().double()
                    top1_steps[c.index[local]] += c.top1.long()
                    mean_prob[c.index[local]] = c.mean_prob.double()
                    if not last:
                        grad += torch.autograd.grad(loss_i.sum(), delta)[0]
                if progress is not None:
                    progress(it, losses.detach().cpu().clone())
                active &= ~(losses < hp.early_stop)  # stopped requests are frozen from here on
                if getattr(hp, "most_probable_stop", False):  # ENCORE's MPES (methods/encore.py)
                    reached = mpes_stop(top1_steps, mean_prob, getattr(hp, "prob_cutoff", -1)) & active
                    by_mpes |= reached
                    active &= ~reached
                if last or not bool(active.any()):
                    break
                if it == 0:
                    lr = step_size(hp, init)
                rows = active.nonzero().squeeze(1)
                with torch.no_grad():
                    _adam(delta.data, grad, m, v, t, rows, lr)
                    norms = delta.data[rows].norm(dim=1)
                    limit = hp.clamp_norm_factor * init[rows].norm(dim=1)
                    scale = torch.where(norms > limit, limit / norms.clamp_min(1e-30), torch.ones_like(norms))
                    delta.data[rows] *= scale.unsqueeze(1)
                for i in rows.tolist():
                    steps_taken[i] += 1
    finally:
        for c in chunks:
            c.close()
    delta = delta.detach()
    final = losses.cpu().tolist()
    unfinished = [i for i in range(n) if not bool(by_mpes[i])]  # MPES stops on purpose above early_stop
    warn_unfinished(*([seq[i] for i in unfinished] for seq in (requests, final, steps_taken)), hp.early_stop)
    work = {k: sum(c.work.get(k, 0) for c in chunks) for k in ("full", "replayed", "cached")} if fast else {}
    return TargetResult((init + offset + delta).float(), init.float(), steps_taken, final, work)


def step_size(hp: EditConfig, init: torch.Tensor) -> float | torch.Tensor:
    """Adam's rate: ``hp.v_lr`` if set, else ``hp.v_lr_relative · RMS(init)`` per request ``[n]``.

    Adam moves each coordinate by about the rate per step whatever the gradient's scale, so a fixed rate
    is a different strength on every model (measured: ``docs/design.md``, "Defaults across model families").
    """
    if hp.v_lr is not None:
        return hp.v_lr
    return hp.v_lr_relative * init.norm(dim=1) / init.shape[1] ** 0.5


#: a request whose last loss is above ``max(FAR_ABOVE · early_stop, FAR_ABOVE_FLOOR)`` likely did not take
FAR_ABOVE, FAR_ABOVE_FLOOR = 20.0, 0.5


def warn_unfinished(
    requests: Sequence[EditRequest], losses: Sequence[float], steps: Sequence[int], early_stop: float
) -> None:
    """Log a warning naming each request whose optimisation ended far above its early-stop loss."""
    bound = max(FAR_ABOVE * early_stop, FAR_ABOVE_FLOOR)
    for request, loss, n in zip(requests, losses, steps):
        if loss > bound:
            logger.warning(
                "The edit %r -> %r will likely not take: its target loss ended at %.3f after %d steps, far above "
                "early_stop=%.3g. Raise v_num_grad_steps or v_lr_relative, or edit another layer.",
                request.text,
                request.target_new,
                loss,
                n,
                early_stop,
            )


class _Chunk:
    """A group of requests optimised in the same forward passes."""

    def __init__(
        self, model: nn.Module, spec: ArchitectureSpec, layer: int, site: str, items: list[tuple[int, _Request]]
    ) -> None:
        self.model, self.spec, self.layer, self.site, self.items = model, spec, layer, site, items
        device = model_device(model)
        rows, owner, lookups, kind, subjects, weights = [], [], [], [], [], []
        tgt_row, tgt_pos, tgt_tok = [], [], []
        for j, (_, req) in enumerate(items):
            base = len(rows)
            rows += req.rows
            owner += [j] * len(req.rows)
            lookups += req.lookups
            subjects += req.subjects
            weights += req.weights
            kind += [0] * req.n_rewrite + [1] * (len(req.rows) - req.n_rewrite)
            for r, p, tok in req.targets:
                tgt_row.append(base + r)
                tgt_pos.append(p)
                tgt_tok.append(tok)
        self.ids, self.mask, _, _ = pad_batch(rows, 0, "right", device)
        self.owner = torch.tensor(owner, device=device)
        self.lookups = torch.tensor(lookups, device=device)
        self.subjects = torch.tensor(subjects, device=device)
        self.weights = torch.tensor(weights, device=device)
        self.moved = bool((self.lookups != self.subjects).any() or (self.weights != 1).any())
        self.is_kl = torch.tensor(kind, device=device).bool()
        self.checked = torch.tensor(
            [c for _, req in items for c in req.checked + [False] * (len(req.rows) - req.n_rewrite)], device=device
        )
        self.tgt_row = torch.tensor(tgt_row, device=device)
        self.tgt_pos = torch.tensor(tgt_pos, device=device)
        self.tgt_tok = torch.tensor(tgt_tok, device=device)
        self.first_row = torch.tensor(
            [sum(len(req.rows) for _, req in items[:j]) for j in range(len(items))], device=device
        )
        self.n_rewrite = torch.tensor([req.n_rewrite for _, req in items], device=device)
        self.n_kl = torch.tensor([len(req.rows) - req.n_rewrite for _, req in items], device=device)
        self.index = torch.tensor([i for i, _ in items], device=device)
        self.site_path = mlp_out_path(spec, layer) if site == "mlp" else layer_path(spec, layer)
        self.prefix: torch.Tensor | None = None
        self.structure: Any = None
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # keys / values before the cut
        self.cut: torch.Tensor | None = None
        self.position_ids = False
        self.cache_argument = "cache"  # the backbone's name for it (:func:`_cache_argument`)
        self.work: dict[str, int] = {}
        self.init: torch.Tensor | None = None
        self.offset: torch.Tensor | None = None  # position noise's term of the target (optimize_targets)
        self.kl_init: torch.Tensor | None = None

    # -- what δ cannot change, once ---------------------------------------------

    def record_prefix(self, prefix_cache: bool, budget: list[int]) -> None:
        """One no-grad forward over the chunk: the output of the block below the edited layer (replayed
        by the stand-ins) and, with ``prefix_cache``, every layer's keys / values before each row's
        subject last token (:func:`_cache_mode`)."""
        backbone = get_module(self.model, self.spec.backbone)
        mode = _cache_mode(self.model, self.spec, backbone) if prefix_cache else "off"
        n_rows, width = self.ids.shape
        n_layers = len(get_module(self.model, self.spec.layers))
        self.work = {"full": n_rows * width * n_layers, "replayed": n_rows * width * (n_layers - self.layer)}
        self.work["cached"] = self.work["replayed"]
        if mode == "off" and self.layer == 0:
            return
        with torch.no_grad(), contextlib.ExitStack() as stack:
            tr = None
            if self.layer > 0:
                tr = stack.enter_context(
                    Trace(
                        self.model,
                        layer_path(self.spec, self.layer - 1),
                        retain_output=True,
                        clone=True,
                        detach=True,
                        stop=mode == "off",
                    )
                )
            out = backbone(input_ids=self.ids, attention_mask=self.mask, use_cache=mode != "off")
        if tr is not None:
            self.prefix = hidden(tr.output)
            self.structure = _structure(tr.output)
        if mode == "off":
            return
        cache = getattr(out, "cache", None)
        if cache is None:
            cache = getattr(out, "past_key_values", None)
        layers = getattr(cache, "layers", None)
        if not isinstance(cache, DynamicCache) or not layers or any(type(x) is not DynamicLayer for x in layers):
            logger.debug(
                "%s returns a %s, not a plain DynamicCache: v*/z steps run over every position.",
                self.spec.model_type,
                type(cache).__name__,
            )
            return
        cut = self.lookups if mode == "rows" else self.lookups.min().expand(n_rows)
        prefix = int(cut.max())
        if prefix == 0:
            return
        size = sum(
            (x.keys[:, :, :prefix].numel() + x.values[:, :, :prefix].numel()) * x.keys.element_size() for x in layers
        )
        if size > budget[0]:
            logger.info(
                "The cached prefixes of the v*/z batch would exceed PREFIX_CACHE_BYTES (%.1f GiB); the remaining "
                "requests run every position. Lower batch_tokens / the batch size or raise the limit.",
                PREFIX_CACHE_BYTES / 2**30,
            )
            budget[0] = 0
            return
        budget[0] -= size
        self.cut = cut
        self.kv = [(x.keys[:, :, :prefix].detach().clone(), x.values[:, :, :prefix].detach().clone()) for x in layers]
        self.position_ids = mode == "rows"
        self.cache_argument = _cache_argument(backbone)
        lengths = self.mask.sum(1)
        self.work["cached"] = n_rows * int((lengths - cut).max()) * (n_layers - self.layer)

    def _stubs(self, rows: torch.Tensor, src: torch.Tensor | None) -> dict[int, nn.Module]:
        """Stand-ins for the blocks below the edited layer: the top one replays the recorded output of
        the selected rows (at positions ``src`` when the steps start past a cached prefix), the others
        pass their input through (their output is never read)."""
        blocks = get_module(self.model, self.spec.layers)
        structure, value = self.structure, self.prefix[rows]
        if src is not None:
            value = value.gather(1, src.unsqueeze(-1).expand(-1, -1, value.shape[-1]))

        def passthrough(*args: Any, **kwargs: Any) -> Any:
            return replace_hidden(structure, first_input(args, kwargs))

        def replay(*args: Any, **kwargs: Any) -> Any:
            return replace_hidden(structure, value.clone())

        return {j: ReplayBlock(blocks[j], replay if j == self.layer - 1 else passthrough) for j in range(self.layer)}

    def _suffix(self, rows: torch.Tensor) -> dict[str, Any]:
        """The backbone's inputs for the selected rows from their cut on: the positions after the cached
        prefix, left-aligned (``src``: their index in the full row), a mask over prefix + suffix, and a
        fresh cache holding the prefix (the steps must not grow the recorded one)."""
        cut, lengths = self.cut[rows], self.mask[rows].sum(1)
        width = int((lengths - cut).max())
        k = torch.arange(width, device=cut.device)
        valid = k.unsqueeze(0) < (lengths - cut).unsqueeze(1)
        src = (cut.unsqueeze(1) + k).clamp(max=self.ids.shape[1] - 1)
        prefix = self.kv[0][0].shape[2]
        before = torch.arange(prefix, device=cut.device).unsqueeze(0) < cut.unsqueeze(1)
        kwargs = {
            "input_ids": self.ids[rows].gather(1, src),  # positions past a row's end: masked
            "attention_mask": torch.cat([before, valid], dim=1).to(self.mask.dtype),
            self.cache_argument: DynamicCache(ddp_cache_data=[(key[rows], value[rows]) for key, value in self.kv]),
            "use_cache": True,
        }
        if self.position_ids:
            kwargs["position_ids"] = src
        return {"kwargs": kwargs, "src": src, "cut": cut}

    # -- one forward pass --------------------------------------------------------

    def _forward(
        self, rows: torch.Tensor, delta_rows: torch.Tensor, fast: bool, record_init: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits at the target positions and at the essence positions of the selected rows."""
        ids, mask, lookups = self.ids[rows], self.mask[rows], self.lookups[rows]
        suffix = self._suffix(rows) if fast and self.kv is not None else None
        offset = suffix["cut"] if suffix is not None else torch.zeros_like(lookups)
        at = lookups - offset  # where δ goes (the subject's last token) in the positions this pass runs
        subject = self.subjects[rows] - offset
        weight = self.weights[rows].unsqueeze(1)
        width = suffix["src"].shape[1] if suffix is not None else ids.shape[1]
        seen: dict[str, torch.Tensor] = {}

        def edit(output: Any, _path: str) -> Any:
            h = hidden(output)
            flat = h.dim() == 2  # OPT's fc2 sees [batch * seq, d]
            r = torch.arange(len(rows), device=h.device)
            index = (r * width + at,) if flat else (r, at)
            if record_init:
                seen["at"] = h[index].detach().float().clone()
                seen["init"] = h[(r * width + subject,) if flat else (r, subject)].detach().float().clone()
            return replace_hidden(output, h.index_put(index, (weight * delta_rows).to(h.dtype), accumulate=True))

        src = suffix["src"] if suffix is not None else None
        stubs = self._stubs(rows, src) if fast and self.prefix is not None else {}
        inputs = (
            suffix["kwargs"] if suffix is not None else {"input_ids": ids, "attention_mask": mask, "use_cache": False}
        )
        with (
            replaced_blocks(self.model, self.spec, stubs),
            Trace(self.model, self.site_path, retain_output=False, edit_output=edit),
        ):
            if fast:
                out = get_module(self.model, self.spec.backbone)(**inputs)
                h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
            else:
                h = None
                logits_full = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        local = torch.full((len(self.ids),), -1, dtype=torch.long, device=ids.device)
        local[rows] = torch.arange(len(rows), device=ids.device)
        keep = local[self.tgt_row] >= 0
        t_rows = local[self.tgt_row[keep]]
        t_pos = self.tgt_pos[keep] - offset[t_rows]
        kl_rows = (self.is_kl[rows]).nonzero().squeeze(1)
        kl_pos = at[kl_rows]
        if record_init:
            self._seen = seen
        if fast:
            sel = torch.cat([h[t_rows, t_pos], h[kl_rows, kl_pos]])
            logits = lm_logits(self.model, self.spec, sel).float()
        else:
            logits = torch.cat([logits_full[t_rows, t_pos], logits_full[kl_rows, kl_pos]]).float()
        return logits[: len(t_rows)], logits[len(t_rows) :]

    def loss(
        self, delta: torch.Tensor, active: list[int], kl_factor: float, weight_decay: float, fast: bool
    ) -> torch.Tensor:
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
            self.init = self._seen["init"][self.first_row]
            if self.moved:  # position noise: mean over the non-bare rewriting rows δ reaches of (at δ − at subject)
                use = (self.checked & (self.weights > 0)).float().unsqueeze(1)
                diff = (self._seen["at"] - self._seen["init"]) * use
                n_used = torch.zeros(len(self.items), device=device).index_add(0, self.owner, use.squeeze(1))
                total = torch.zeros_like(self.init).index_add(0, self.owner, diff)
                self.offset = total / n_used.clamp_min(1).unsqueeze(1)
            self._seen = {}
            self.kl_init = torch.log_softmax(kl_logits.detach(), dim=-1)
        keep = row_mask[self.tgt_row]
        logp = torch.log_softmax(tgt_logits, dim=-1).gather(1, self.tgt_tok[keep].unsqueeze(1)).squeeze(1)
        # token-averaged NLL per prompt, then mean over the request's prompts
        row_of_t = self.tgt_row[keep]
        n_rows = len(self.ids)
        per_row = torch.zeros(n_rows, device=device).index_add(0, row_of_t, -logp)
        count = torch.zeros(n_rows, device=device).index_add(0, row_of_t, torch.ones_like(logp))
        row_nll = per_row / count.clamp_min(1)
        missed = ((tgt_logits.argmax(-1) != self.tgt_tok[keep]) & self.checked[row_of_t]).float()
        self.top1 = (torch.zeros(len(self.items), device=device).index_add(0, self.owner[row_of_t], missed) == 0)[
            active_t
        ]
        is_rewrite = ~self.is_kl
        prob = torch.zeros(len(self.items), device=device).index_add(
            0, self.owner[is_rewrite], row_nll[is_rewrite].detach().neg().exp()
        )
        self.mean_prob = (prob / self.n_rewrite)[active_t]
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
        total = objective(nll, kl, delta[self.index], self.init, kl_factor, weight_decay)
        return total[active_t]

    def close(self) -> None:
        self.prefix = self.kv = None
