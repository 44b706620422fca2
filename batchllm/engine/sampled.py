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
class HostSampled:
    """What ``Sampled.read_all`` brings back: the tokens, their logprobs (if asked for), the scored
    positions' log-probs (if the step scores: the float32 values as Python floats, in ``spans`` order)."""

    tokens: list[int]
    logprobs: StepLogprobs | None
    scored: list[float] | None


@dataclass(frozen=True)
class Sampled:
    """``tokens`` feed the next step on the device; ``packed`` (only with logprobs) is what is read back:
    float64 [rows, 2 + 2k] = token id, its logprob, k alternative ids, their logprobs (ids < 2**53: exact).
    ``scored``: the step's scored log-probs (float32 on the device), read back in the same copy."""

    tokens: torch.Tensor  # int64 [rows sampled], on the device
    packed: torch.Tensor | None = None
    scored: torch.Tensor | None = None

    @classmethod
    def of(cls, tokens: torch.Tensor, logprobs: TokenLogprobs | None = None) -> Sampled:
        if logprobs is None:
            return cls(tokens)
        parts = [tokens.view(-1, 1), logprobs.chosen.view(-1, 1), logprobs.top_ids, logprobs.top_values]
        return cls(tokens, torch.cat([p.to(torch.float64) for p in parts], dim=1))

    def read(self) -> tuple[list[int], StepLogprobs | None]:
        """The tokens (and logprobs) on the host: the step's one device->host sync."""
        host = self.read_all()
        return host.tokens, host.logprobs

    def read_all(self) -> HostSampled:
        """Tokens, logprobs and scored log-probs on the host, in one device->host copy."""
        if self.packed is None and self.scored is None:
            return HostSampled(self.tokens.tolist(), None, None)
        rows = self.packed if self.packed is not None else self.tokens.view(-1, 1).to(torch.float64)
        flat = rows.flatten()
        if self.scored is not None:
            flat = torch.cat([flat, self.scored.to(torch.float64)])
        host = flat.cpu().numpy()
        table = host[: rows.numel()].reshape(rows.shape)
        scored = host[rows.numel() :].tolist() if self.scored is not None else None
        tokens = table[:, 0].astype(np.int64).tolist()
        if self.packed is None:
            return HostSampled(tokens, None, scored)
        k = (table.shape[1] - 2) // 2
        top_ids, top_values = table[:, 2 : 2 + k].astype(np.int32), table[:, 2 + k :].astype(np.float32)
        return HostSampled(tokens, StepLogprobs(table[:, 1].astype(np.float32), top_ids, top_values), scored)


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
