"""When a row stops (EOS, length, stop string) and what text it returns."""

from __future__ import annotations

import numpy as np

from batchllm.config import SamplingParams
from batchllm.scheduler.seq import Seq


class StopChecker:
    def __init__(self, tokenizer, eos_token_ids: tuple[int, ...], params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.eos = frozenset(() if params.ignore_eos else eos_token_ids)
        self._eos_array = np.fromiter(self.eos, dtype=np.int64, count=len(self.eos))
        self.params = params
        # Enough trailing tokens to contain any stop string (a token is at least one byte).
        self._tail = max((len(s.encode()) for s in params.stop), default=0) + 8

    def check(self, token_ids: list[int], prompt_len: int) -> str | None:
        """The finish reason after the latest token of a row (prompt + output so far), or None to go on."""
        if token_ids[-1] in self.eos:
            return "stop"
        num_output = len(token_ids) - prompt_len
        if self.params.stop and self._hits_stop(token_ids[-min(self._tail, num_output) :]):
            return "stop"
        if num_output >= self.params.max_new_tokens:
            return "length"
        return None

    def check_batch(
        self, tokens: np.ndarray, num_output: np.ndarray, token_lists: list[list[int]]
    ) -> dict[int, str]:
        """``check`` for many rows at once: ``tokens`` [n] just sampled, ``num_output`` [n] tokens each
        row has generated with it, ``token_lists`` each row's tokens (read only for stop strings).
        Returns the finish reason of each row that stops, by its index."""
        stop = np.isin(tokens, self._eos_array)
        if self.params.stop:
            tails = np.minimum(self._tail, num_output)
            hits = [self._hits_stop(ids[-int(t) :]) for ids, t in zip(token_lists, tails)]
            stop |= np.asarray(hits, dtype=bool)
        length = ~stop & (num_output >= self.params.max_new_tokens)
        reasons = {int(i): "stop" for i in np.flatnonzero(stop)}
        reasons.update((int(i), "length") for i in np.flatnonzero(length))
        return reasons

    def check_seqs(
        self, tokens: np.ndarray, num_output: np.ndarray, seqs: list[Seq], own_params: bool = True
    ) -> dict[int, str]:
        """``check_batch`` for these rows, each with its own max tokens and stop strings where it has
        them (``Seq.params``). ``own_params`` False: the caller knows no row has any."""
        if not own_params or all(seq.params is None for seq in seqs):
            lists = [seq.token_ids for seq in seqs] if self.params.stop else []
            return self.check_batch(tokens, num_output, lists)
        params = [seq.params or self.params for seq in seqs]
        stop = np.isin(tokens, self._eos_array)
        for i, (p, seq) in enumerate(zip(params, seqs)):
            if p.stop and not stop[i]:
                tail = max(len(s.encode()) for s in p.stop) + 8
                stop[i] = self._hits_stop(seq.token_ids[-min(tail, int(num_output[i])) :], p.stop)
        limits = np.fromiter((p.max_new_tokens for p in params), dtype=np.int64, count=len(params))
        length = ~stop & (num_output >= limits)
        reasons = {int(i): "stop" for i in np.flatnonzero(stop)}
        reasons.update((int(i), "length") for i in np.flatnonzero(length))
        return reasons

    def text(self, output_ids: list[int], params: SamplingParams | None = None) -> str:
        """The decoded output, cut before the first stop string (of ``params``, else the job's)."""
        text = self.tokenizer.decode(output_ids, skip_special_tokens=True)
        cuts = [i for i in (text.find(s) for s in (params or self.params).stop) if i >= 0]
        return text[: min(cuts)] if cuts else text

    def _hits_stop(self, last_ids: list[int], stop: tuple[str, ...] | None = None) -> bool:
        tail = self.tokenizer.decode(last_ids, skip_special_tokens=True)
        return any(s in tail for s in (stop or self.params.stop))
