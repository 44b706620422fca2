"""Next-token choice when rows carry their own settings (``--params-column``): ``sampling.sample``
vectorised over rows with different temperature, top-k and top-p (per-row tensors, one pass).

A row gets exactly the token ``sample`` would give it alone with its settings: the same operations in
the same order (temperature, top-k cut at the k-th largest logit, softmax, top-p over the sorted
probabilities, the inverse-CDF draw from the row's own stream); a setting a row does not use is made
a no-op (top-k 0 cuts at the smallest logit, top-p 1 at infinity), not an approximation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from batchllm.config import SamplingParams
from batchllm.engine.random_streams import uniform


def sample_rows(
    logits: torch.Tensor, params: Sequence[SamplingParams], keys: Sequence[int], steps: Sequence[int]
) -> torch.Tensor:
    """One token per row (int64 [num_rows], on the logits' device); ``params[i]`` are row i's settings.
    ``logits``: [num_rows, vocab] float32; ``keys``: each row's stream; ``steps``: tokens it has made."""
    greedy_rows = [p.greedy for p in params]
    picks = logits.argmax(dim=-1)
    if all(greedy_rows):
        return picks
    device, vocab = logits.device, logits.shape[-1]
    temps = torch.tensor([p.temperature or 1.0 for p in params], dtype=torch.float32, device=device)
    scaled = logits.float() / temps.unsqueeze(1)
    probs = _row_filtered_probs(scaled, params)
    draws = [0.0 if g else uniform(k, int(s)) for g, k, s in zip(greedy_rows, keys, steps)]
    u = torch.tensor(draws, dtype=probs.dtype, device=device)
    cdf = probs.cumsum(dim=-1)
    sampled = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1)).squeeze(1).clamp_(max=vocab - 1)
    greedy = torch.tensor(greedy_rows, dtype=torch.bool, device=device)
    return torch.where(greedy, picks, sampled)


def _row_filtered_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    device, vocab = logits.device, logits.shape[-1]
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    if min(top_k) < vocab:
        index = torch.tensor(top_k, dtype=torch.int64, device=device).sub_(1).unsqueeze(1)
        kth = logits.sort(dim=-1, descending=True).values.gather(1, index)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    if all(p.top_p >= 1.0 for p in params):
        return probs
    top_p = [p.top_p if p.top_p < 1.0 else float("inf") for p in params]
    threshold = torch.tensor(top_p, dtype=probs.dtype, device=device).unsqueeze(1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # Keep the smallest set of most likely tokens whose mass reaches top_p (always the first).
    drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= threshold
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
