"""Log-sum-exp merge of two partial attention states in plain torch (see ``merge.py`` for the math).

The torch backend's cascade decode merges with it, and it is the reference the Triton merge kernel
is tested against.
"""

from __future__ import annotations

import torch


def merge_attention_states(
    a: tuple[torch.Tensor, torch.Tensor],  # (out [..., D], lse [...]) over one part of the positions
    b: tuple[torch.Tensor, torch.Tensor],  # the same over the rest
) -> tuple[torch.Tensor, torch.Tensor]:  # (out float32, lse) over both
    (out_a, lse_a), (out_b, lse_b) = a, b
    lse = torch.logaddexp(lse_a, lse_b)
    finite = torch.isfinite(lse)
    safe = torch.where(finite, lse, torch.zeros_like(lse))
    w_a = torch.where(finite, torch.exp(lse_a - safe), 0.0)[..., None]
    w_b = torch.where(finite, torch.exp(lse_b - safe), 0.0)[..., None]
    out = out_a.float().nan_to_num(0.0) * w_a + out_b.float().nan_to_num(0.0) * w_b
    return out, lse
