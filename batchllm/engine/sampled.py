"""A step's sampled tokens on the device, with their log-probabilities when ``--logprobs`` asks,
packed so that the engine reads them all back in the step's one device->host copy."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from batchllm.engine.logprobs import TokenLogprobs


@dataclass(frozen=True)
class StepLogprobs:
    """Host copies for the rows a step sampled: each token's raw logprob and its top ``k`` alternatives."""

    chosen: np.ndarray  # float32 [rows]
    top_ids: np.ndarray  # int32 [rows, k]
    top_values: np.ndarray  # float32 [rows, k], descending


@dataclass(frozen=True)
class Sampled:
    """``tokens`` feed the next step on the device; ``packed`` (only with logprobs) is what is read back:
    float64 [rows, 2 + 2k] = token id, its logprob, k alternative ids, their logprobs (ids < 2**53: exact)."""

    tokens: torch.Tensor  # int64 [rows sampled], on the device
    packed: torch.Tensor | None = None

    @classmethod
    def of(cls, tokens: torch.Tensor, logprobs: TokenLogprobs | None = None) -> Sampled:
        if logprobs is None:
            return cls(tokens)
        parts = [tokens.view(-1, 1), logprobs.chosen.view(-1, 1), logprobs.top_ids, logprobs.top_values]
        return cls(tokens, torch.cat([p.to(torch.float64) for p in parts], dim=1))

    def read(self) -> tuple[list[int], StepLogprobs | None]:
        """The tokens (and logprobs) on the host: the step's one device->host sync."""
        if self.packed is None:
            return self.tokens.tolist(), None
        host = self.packed.cpu().numpy()
        k = (host.shape[1] - 2) // 2
        tokens = host[:, 0].astype(np.int64).tolist()
        top_ids = host[:, 2 : 2 + k].astype(np.int32)
        top_values = host[:, 2 + k :].astype(np.float32)
        return tokens, StepLogprobs(host[:, 1].astype(np.float32), top_ids, top_values)


class LogprobLog:
    """One row's logprobs while it runs, in arrays that grow by doubling (no per-token objects)."""

    def __init__(self, k: int, capacity: int = 16) -> None:
        self.size = 0
        self.ids = np.zeros(capacity, dtype=np.int32)
        self.chosen = np.zeros(capacity, dtype=np.float32)
        self.top_ids = np.zeros((capacity, k), dtype=np.int32)
        self.top_values = np.zeros((capacity, k), dtype=np.float32)

    def append(self, token: int, step: StepLogprobs, i: int) -> None:
        if self.size == len(self.ids):
            for name in ("ids", "chosen", "top_ids", "top_values"):
                old = getattr(self, name)
                setattr(self, name, np.concatenate([old, np.zeros_like(old)]))
        n = self.size
        self.ids[n] = token
        self.chosen[n] = step.chosen[i]
        self.top_ids[n] = step.top_ids[i]
        self.top_values[n] = step.top_values[i]
        self.size = n + 1

    def total(self) -> float:
        """The sum of the generated tokens' logprobs (float64)."""
        return float(self.chosen[: self.size].astype(np.float64).sum())
