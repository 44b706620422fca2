"""Log-probabilities of tokens under the model: the raw log-softmax of its logits, before any
temperature, top-k/top-p or constraint (what vLLM and OpenAI report).

Used for ``--logprobs K`` (generated tokens and their top-K alternatives) and for scoring given
text (``--choices``, ``--score-column``). Everything stays on the logits' device; the caller reads
the results back together with the step's sampled tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenLogprobs:
    """Per position: the log-probability of its target token, and the ``k`` most likely tokens."""

    chosen: torch.Tensor  # float32 [n]
    top_ids: torch.Tensor  # int64 [n, k]
    top_values: torch.Tensor  # float32 [n, k], descending

    def to_host(self) -> TokenLogprobs:
        return TokenLogprobs(self.chosen.cpu(), self.top_ids.cpu(), self.top_values.cpu())


def gather_logprobs(logits: torch.Tensor, targets: torch.Tensor, k: int = 0) -> TokenLogprobs:
    """``logits``: [n, vocab]; ``targets``: int64 [n] on the same device; ``k`` >= 0 alternatives."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, targets.view(-1, 1).to(logp.device)).squeeze(1)
    if k:
        top_values, top_ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    else:
        top_values = logp.new_empty((logp.shape[0], 0))
        top_ids = torch.empty((logp.shape[0], 0), dtype=torch.long, device=logp.device)
    return TokenLogprobs(chosen, top_ids, top_values)
