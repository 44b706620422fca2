"""One piece of engine work: a row to generate for, or a shared prefix to prefill once."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from batchllm.config import SamplingParams


class SeqKind(enum.Enum):
    ROW = "row"  # a prompt that is prefilled, then decoded until it stops
    PREFIX = "prefix"  # a shared prefix: prefilled once, its KV then lent to every sequence beneath it
    SCORE = "score"  # a prompt + given continuation: prefilled, the continuation's log-probs read, no decode


@dataclass(eq=False)
class Seq:
    """Token state and KV blocks of one sequence.

    Like vLLM's scheduler, there are no prefill/decode phases: ``num_computed`` (tokens whose KV is
    in the cache) catches up with ``len(token_ids)`` under the step's token budget::

        token_ids:  [ parent prefix | own prompt tokens | generated tokens ]
                      ^ KV borrowed    ^ computed here     ^ the last one is fed to the next step
        block_table: [ parent's full blocks (retained) | own blocks ... ]

    Build one with ``Seq.row`` or ``Seq.prefix``.
    """

    kind: SeqKind
    index: int  # ROW: the row's index in its piece of work; PREFIX: the prefix's node id there
    token_ids: list[int]
    prompt_len: int
    parent: Seq | None = None  # the PREFIX whose KV this sequence starts from
    pending_rows: int = 0  # PREFIX: rows beneath that have not finished yet
    sample_key: int = 0  # ROW: seeds this row's random stream
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    num_borrowed_blocks: int = 0  # leading entries of block_table retained from the parent
    prefilled: bool = False  # PREFIX: all its tokens are in the cache
    finish_reason: str | None = None
    preemptions: int = 0
    slot: int | None = None  # its slot in the scheduler's BatchState while it runs
    params: SamplingParams | None = None  # ROW: its own sampling settings (None: the engine's)
    logprobs: Any = None  # ROW under --logprobs: its generated tokens' logprobs (engine.sampled.LogprobLog)
    constraint: Any = None  # ROW: its structured-output matcher (engine.constraints.RowConstraint)
    error: str | None = None  # ROW: what is wrong with its output (structured output), if anything
    score_start: int = 0  # SCORE: len(prompt); position p's logits score continuation token p + 1
    score_last: int = 0  # SCORE: the continuation's last token, scored at the last position, never fed
    scored: list[float] = field(default_factory=list)  # SCORE: log-prob of each continuation token
    choice: int = 0  # SCORE: which of its row's continuations this is
    of_row: bool = False  # PREFIX: one row's prompt less its last token, shared by its SCORE sequences

    # While a sequence runs, the BatchState holds its live block table and num_computed; they are
    # written back here when it leaves (finished, preempted, or a prefix prefilled).

    @classmethod
    def row(
        cls,
        index: int,
        prompt: list[int],
        parent: Seq | None = None,
        sample_key: int = 0,
        params: SamplingParams | None = None,
    ) -> Seq:
        return cls(
            SeqKind.ROW, index, list(prompt), len(prompt), parent, sample_key=sample_key, params=params
        )

    @classmethod
    def prefix(cls, node: int, tokens: list[int], parent: Seq | None = None, pending_rows: int = 0) -> Seq:
        return cls(SeqKind.PREFIX, node, list(tokens), len(tokens), parent, pending_rows=pending_rows)

    @classmethod
    def score(cls, index: int, prompt: list[int], continuation: list[int], parent: Seq | None = None) -> Seq:
        """Prefill ``prompt + continuation[:-1]`` (its last token's KV is never needed) and read the
        log-prob of each continuation token (``continuation`` must not be empty)."""
        tokens = list(prompt) + list(continuation[:-1])
        seq = cls(SeqKind.SCORE, index, tokens, len(tokens), parent, score_start=len(prompt))
        seq.score_last = int(continuation[-1])
        seq.scored = [math.nan] * len(continuation)
        return seq

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens whose KV this sequence borrows instead of computing."""
        return self.parent.prompt_len if self.parent is not None else 0

    @property
    def output_ids(self) -> list[int]:
        """A copy of the generated tokens (use ``num_output`` and ``token_ids`` in hot paths)."""
        return self.token_ids[self.prompt_len :]

    @property
    def is_row(self) -> bool:
        return self.kind is SeqKind.ROW
