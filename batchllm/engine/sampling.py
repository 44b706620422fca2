"""Next-token choice: greedy, or temperature / top-k / top-p with a random stream per row.

A row's randomness is a pure function of (seed, row key, position): the uniform number that picks
its token at generation step ``t`` is derived by hashing, so a row's output does not depend on which
rows share its batch, the order of work, the token budget, or preemptions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from batchllm.config import SamplingParams
from batchllm.engine.random_streams import uniform
from batchllm.engine.token_mask import apply_mask


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    keys: list[int],
    steps: Sequence[int],
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pick one token per row (int64 [num_rows], on the logits' device; no host sync).
    ``logits``: [num_rows, vocab] float32; ``steps``: tokens each row has generated so far;
    ``mask``: a packed int32 bitmask [num_rows, words] of allowed tokens (see ``token_mask``), applied
    to ``logits`` in place, in one op, before greedy or temperature / top-k / top-p."""
    if mask is not None:
        apply_mask(logits, mask)
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = _filtered_probs(logits.float() / params.temperature, params)
    draws = [uniform(k, int(s)) for k, s in zip(keys, steps)]
    u = torch.tensor(draws, dtype=probs.dtype, device=probs.device)
    cdf = probs.cumsum(dim=-1)
    # Inverse-CDF draw; clamp guards against a cdf that ends a hair below u after rounding.
    picks = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1)).squeeze(1)
    return picks.clamp_(max=logits.shape[-1] - 1)


def _filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest set of most likely tokens whose mass reaches top_p (always the first).
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return probs
