"""Keys ``k*``: what the edited module reads for a fact (ROME ``compute_u``, MEMIT ``compute_ks``).

The input of ``mlp_out`` at the subject's last token, averaged over context templates. Only the
tokens up to the subject's last one are run (later tokens cannot change the key), in batched
forward passes grouped by length and stopped right after the module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..architectures import get_architecture, mlp_out_dims, mlp_out_path, model_device
from ..errors import InvalidConfigError
from ..hooks import Trace
from ..requests import EditRequest
from ..tokens import encode_template, pad_batch

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


def compute_keys(
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence[EditRequest],
    layer: int,
    templates: Sequence[str],
    *,
    average: bool = True,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
) -> torch.Tensor:
    """Input of ``mlp_out`` at ``layer`` at the subject's last token of each template-prefixed prompt.

    Returns float32 ``[n_requests, d_in]`` averaged over ``templates`` (``k*``), or
    ``[n_requests, n_templates, d_in]`` with ``average=False``. Runs on the model as it is (active
    edits included), in batched forward passes stopped right after the module.
    """
    if not templates:
        raise InvalidConfigError("compute_keys needs at least one template, e.g. ['{}'].")
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
            x = tr.input.reshape(ids.shape[0], ids.shape[1], d_in)  # OPT flattens tokens
            last = mask.sum(1) - 1
            keys[torch.tensor(group, device=device)] = x[torch.arange(len(group), device=device), last].float()
    keys = keys.reshape(len(requests), len(templates), d_in)
    return keys.mean(1) if average else keys
