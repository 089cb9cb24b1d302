"""Keys ``k*``: what the edited module reads for a fact (ROME ``compute_u``, MEMIT ``compute_ks``).

The input of ``mlp_out`` at the subject's last token, averaged over context templates. Only the
tokens up to the subject's last one are run (later tokens cannot change the key), in batched
forward passes grouped by length and stopped right after the module.

Averaging follows the reference of each method: a flat list of templates is averaged uniformly
(ROME's ``compute_u``); groups of templates (``[["{}"], [prefix, ...], ...]``) are averaged within
each group, then across groups (MEMIT's ``compute_ks``, also used by AlphaEdit and EMMET), so
with MEMIT's ``[["{}"], five prefixes]`` the bare prompt weighs ½ rather than ⅙.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..architectures import get_architecture, mlp_out_dims, mlp_out_path, model_device
from ..errors import InvalidConfigError
from ..experts import traced_key
from ..hooks import Trace, hidden
from ..requests import EditRequest
from ..tokens import encode_template, pad_batch, pad_id

#: padded tokens per forward pass when computing keys or targets
DEFAULT_BATCH_TOKENS = 2048


def prefixed(template: str, request: EditRequest) -> str:
    """A context template with the request's prompt in place of its ``{}``."""
    return template.replace("{}", request.prompt, 1)


def group_by_size(sizes: Sequence[int], budget: int) -> list[list[int]]:
    """Group item indices (sorted by size) so that ``len(group) * max size <= budget`` where possible."""
    order = sorted(range(len(sizes)), key=lambda i: sizes[i])
    groups: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if current and (len(current) + 1) * sizes[i] > budget:
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    return groups


def template_groups_of(templates: Sequence[str] | Sequence[Sequence[str]]) -> list[list[str]]:
    """``templates`` as non-empty groups: a flat list of strings is one group (averaged uniformly)."""
    if isinstance(templates, str):
        raise InvalidConfigError("templates must be a list of templates (e.g. ['{}']), not one string.")
    if all(isinstance(t, str) for t in templates):
        groups = [list(templates)]
    else:
        if not all(isinstance(g, (list, tuple)) and all(isinstance(t, str) for t in g) for g in templates):
            raise InvalidConfigError("templates must be a list of strings or a list of lists of strings.")
        groups = [list(g) for g in templates]
    groups = [g for g in groups if g]
    if not groups:
        raise InvalidConfigError("compute_keys needs at least one template, e.g. ['{}'].")
    return groups


def average_keys(keys: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """``[n, T, d]`` keys -> ``[n, d]``: the mean within each consecutive group of ``sizes[i]`` templates,
    then the mean of the group means (one group: the plain mean over all ``T``)."""
    if len(sizes) == 1:
        return keys.mean(1)
    means, start = [], 0
    for size in sizes:
        means.append(keys[:, start : start + size].mean(1))
        start += size
    return torch.stack(means, 1).mean(1)


def compute_keys(
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence[EditRequest],
    layer: int,
    templates: Sequence[str] | Sequence[Sequence[str]],
    *,
    average: bool = True,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
) -> torch.Tensor:
    """Input of ``mlp_out`` at ``layer`` (routed experts: the routed key, :mod:`hf_knowedit.experts`) at the
    subject's last token of each template-prefixed prompt.

    ``templates``: a flat list (keys averaged uniformly, ROME) or a list of groups (averaged within
    each group, then across groups, MEMIT's ``compute_ks``; see the module docstring).

    Returns float32 ``[n_requests, d_in]`` (``k*``), or ``[n_requests, n_templates, d_in]`` (all
    templates, flattened in order) with ``average=False``. Runs on the model as it is (active edits
    included), in batched forward passes stopped right after the module.
    """
    groups = template_groups_of(templates)
    templates = [t for g in groups for t in g]
    spec = get_architecture(model)
    d_in, _ = mlp_out_dims(model, spec, layer)  # raises LayerOutOfRangeError
    path = mlp_out_path(spec, layer)
    device = model_device(model)
    prompts = []
    for req in requests:
        for t in templates:
            enc = encode_template(tokenizer, prefixed(t, req), req.subject)
            prompts.append(enc.input_ids[: enc.subject_last + 1])  # later tokens cannot change the key
    keys = torch.empty(len(prompts), d_in, dtype=torch.float32, device=device)
    with torch.no_grad():
        for group in group_by_size([len(p) for p in prompts], batch_tokens):
            ids, mask, _, _ = pad_batch([prompts[i] for i in group], 0, "right", device)
            with Trace(model, path, retain_input=True, retain_output=False, stop=True) as tr:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            x = traced_key(spec.mlp_out_layout, model, path, tr).reshape(ids.shape[0], ids.shape[1], d_in)  # OPT
            last = mask.sum(1) - 1
            rows = x[torch.arange(len(group), device=x.device), last.to(x.device)]  # x: on the module's device
            keys[torch.tensor(group, device=device)] = rows.to(device, torch.float32)
    keys = keys.reshape(len(requests), len(templates), d_in)
    return average_keys(keys, [len(g) for g in groups]) if average else keys


def output_at_subject(
    model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest], path: str, batch_size: int = 64
) -> torch.Tensor:
    """The output of module ``path`` at the subject's last token of each request's plain prompt,
    ``[n, d]`` float32 on the CPU (the forward stops there)."""
    device = model_device(model)
    out = []
    for b in range(0, len(requests), batch_size):
        encs = [encode_template(tokenizer, r.prompt, r.subject) for r in requests[b : b + batch_size]]
        # right padding: real tokens keep their positions
        ids, mask, _, _ = pad_batch([e.input_ids for e in encs], pad_id(tokenizer), "right", device)
        with Trace(model, path, retain_output=True, stop=True) as tr:
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        h = hidden(tr.output)
        h = h.reshape(ids.shape[0], ids.shape[1], -1) if h.dim() == 2 else h  # OPT's fc2 flattens tokens
        rows = torch.arange(len(encs), device=h.device)  # h: on the module's device
        out.append(h[rows, torch.tensor([e.subject_last for e in encs], device=h.device)].float().cpu())
    return torch.cat(out)
