"""NAS: Norm-Anchor Scaling of the target vectors ``z`` (arXiv 2602.02543), an option of the MEMIT family.

Sequential MEMIT-style editing collapses as the solved ``z`` vectors drift to ever larger norms: each
batch writes residuals ``z − h`` that are partly a norm increase, the edited layers grow, and later
hidden states grow with them. NAS keeps each solved ``z``'s direction and gives it back the norm of the
hidden state it was optimised from (its anchor):

    z ← z · ‖h‖ / ‖z‖                      (one line in z; ``nas=True`` on MEMIT, AlphaEdit, EMMET, ENCORE)

``h`` is the block output at the subject's last token that ``z`` starts from (``TargetResult.init``: the
model as it is when the batch is edited; for the first batch of a stream, the original model). The paper
reports collapse delayed more than 4x over the full 20,877-edit CounterFact stream with MEMIT and AlphaEdit.
"""

from __future__ import annotations

import torch


def norm_anchor_scale(z: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """``z [n, d]`` rescaled row by row to the norms of ``anchor [n, d]`` (float32 in, float32 out)."""
    z64, a64 = z.double(), anchor.double()
    return (z64 * (a64.norm(dim=1) / z64.norm(dim=1).clamp_min(1e-30)).unsqueeze(1)).to(z.dtype)
