"""Grammar constraints for structured output (issue #14), on llguidance; knows no engine or sampler.

How a step loop uses it:

    cache = GrammarCache(tokenizer, vocab_size=logits.shape[-1])      # once per job (and model)
    row.constraint = cache.new_row(spec)                              # per row; ValueError -> bad spec
    bitmask = cache.allocate_bitmask(max_rows)                        # once; pinned CPU int32
    # every step, for the rows of the step (None: unconstrained), before sampling:
    if fill_mask([row.constraint for row in rows], bitmask[: len(rows)]):
        apply_mask(logits, bitmask[: len(rows)])                      # in place, on logits' device
    # after sampling, for each constrained row:
    row.constraint.accept(token)           # False: the row is in error (cannot happen under the mask)
    for token in row.constraint.forced_tokens():                      # jump-forward, no sampling
        row.constraint.accept(token); append token
    row.constraint.is_done()               # nothing but EOS can follow: finish the row

The mask allows EOS only where the grammar is complete (`can_stop()`), and nothing but EOS once
`is_done()`. `fill_mask` runs on CPU threads with the GIL released, so it can overlap the model's
forward pass of the same step: the mask depends only on tokens already accepted.

Grammar texts: `json_schema` is a JSON Schema (compact output: `,` and `:` separators, no free
whitespace; a schema's `"x-guidance"` key can change that), `regex` must match the whole output, and
`grammar` is a Lark grammar in llguidance's dialect, or GBNF (converted with `llguidance.gbnf_to_lark`).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import llguidance
import torch
from llguidance.gbnf_to_lark import GbnfToLarkError, any_to_lark

from batchllm.engine.grammar_spec import GRAMMAR_KINDS, GrammarKind, GrammarSpec
from batchllm.engine.token_mask import allocate_bitmask, apply_mask

__all__ = [
    "GRAMMAR_KINDS", "CompiledGrammar", "GrammarCache", "GrammarKind", "GrammarSpec", "RowConstraint",
    "allocate_bitmask", "apply_mask", "fill_mask",
]  # fmt: skip

logger = logging.getLogger(__name__)
# JSON as a model should write it: no runs of whitespace a sampler could wander into.
_JSON_DEFAULTS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}


@dataclass(frozen=True)
class CompiledGrammar:
    """A spec compiled for one tokenizer; `new_row()` gives a fresh matcher in its start state."""

    spec: GrammarSpec
    _template: llguidance.LLMatcher = field(repr=False)
    _executor: llguidance.LLExecutor = field(repr=False)

    def new_row(self) -> RowConstraint:
        return RowConstraint(self.spec, self._template.deep_copy(), self._executor)


class RowConstraint:
    """One row's matcher: which tokens may come next, given the tokens it has accepted so far."""

    def __init__(self, spec: GrammarSpec, matcher: llguidance.LLMatcher, executor: llguidance.LLExecutor):
        self.spec = spec
        self._matcher = matcher
        self._executor = executor

    def accept(self, token_id: int) -> bool:
        """Advance past `token_id` (EOS included). False when the grammar does not allow it: the row
        is then in error for good (see `error`)."""
        return self._matcher.consume_token(token_id)

    def forced_tokens(self) -> list[int]:
        """The tokens the grammar forces next (jump-forward), possibly none. Does not advance:
        `accept` each of them, in order, before the next step."""
        return self._matcher.compute_ff_tokens()

    def can_stop(self) -> bool:
        """The output so far is complete under the grammar: EOS is allowed now."""
        return self._matcher.is_accepting() and not self._matcher.is_error()

    def is_done(self) -> bool:
        """Nothing but EOS can follow (or EOS was accepted): the row can finish without sampling."""
        return self._matcher.is_stopped() and not self._matcher.is_error()

    @property
    def error(self) -> str | None:
        """Why the row failed (a rejected token), one line; None while it is fine."""
        return _one_line(self._matcher.get_error()) if self._matcher.is_error() else None


class GrammarCache:
    """Compiles each distinct `GrammarSpec` once (by digest) for one tokenizer and logits width.

    `vocab_size` is the width of the model's logits, which can exceed the tokenizer's vocabulary
    (padded embeddings); ids the tokenizer lacks are always masked out. `eos_token_ids` are the ids
    that end a row (default: the tokenizer's EOS). `threads`: CPU threads for `fill_mask` (default:
    llguidance's, 80% of the cores up to 32). Setting up the tokenizer costs about a second at a
    150k vocabulary, so make one cache per job. Failed compiles are cached too, with their message.
    """

    def __init__(
        self,
        tokenizer: Any,  # transformers' fast tokenizer, or model.fast_tokenizer's FastTokenizer
        vocab_size: int | None = None,
        eos_token_ids: Sequence[int] | None = None,
        threads: int | None = None,
    ) -> None:
        self.vocab_size = len(tokenizer) if vocab_size is None else vocab_size
        if self.vocab_size < len(tokenizer):
            raise ValueError(f"vocab_size {self.vocab_size} is smaller than the tokenizer's {len(tokenizer)}")
        eos = list(eos_token_ids) if eos_token_ids is not None else [tokenizer.eos_token_id]
        if not eos or None in eos:
            raise ValueError("structured output needs an EOS token id; the tokenizer has none")
        import llguidance.hf  # imports transformers: only jobs with grammars pay for it

        hf = getattr(tokenizer, "hf", tokenizer)  # model.fast_tokenizer's wraps transformers' own
        self._tokenizer = llguidance.hf.from_tokenizer(hf, n_vocab=self.vocab_size, eos_token=eos)
        self._executor = llguidance.LLExecutor(num_threads=threads)
        self._compiled: dict[str, CompiledGrammar] = {}
        self._failed: dict[str, str] = {}
        self._lock = (
            threading.Lock()
        )  # the next window's schemas compile while the engine runs (job.read_ahead)

    def __len__(self) -> int:
        """How many distinct specs compiled successfully."""
        return len(self._compiled)

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        """The compiled grammar for `spec`, compiled on first use. ValueError (one line) if invalid."""
        key = spec.digest
        with self._lock:
            if key in self._failed:
                raise ValueError(self._failed[key])
            if key not in self._compiled:
                try:
                    self._compiled[key] = self._build(spec)
                except ValueError as e:
                    self._failed[key] = str(e)
                    raise
            return self._compiled[key]

    def new_row(self, spec: GrammarSpec) -> RowConstraint:
        """A fresh matcher for one row (compiling `spec` if new). ValueError if `spec` is invalid."""
        return self.compile(spec).new_row()

    def allocate_bitmask(self, rows: int) -> torch.Tensor:
        """A CPU int32 bitmask [rows, ceil(vocab_size / 32)] for `fill_mask`; pinned where CUDA is."""
        return allocate_bitmask(rows, self.vocab_size)

    def _build(self, spec: GrammarSpec) -> CompiledGrammar:
        grammar = _grammar_text(spec)
        matcher = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"invalid {spec.describe()}: {_one_line(matcher.get_error())}")
        for warning in matcher.get_grammar_warnings():
            logger.warning("%s: %s", spec.describe(), _one_line(warning))
        return CompiledGrammar(spec, matcher, self._executor)


def fill_mask(constraints: Sequence[RowConstraint | None], bitmask: torch.Tensor) -> bool:
    """Write row i's allowed tokens into `bitmask[i]` (bit j of word k: token 32 k + j) for each row
    of a step; rows whose constraint is None get all bits set. Returns whether any row is constrained
    (if not, `apply_mask` can be skipped). `bitmask`: contiguous CPU int32 [>= rows, words], as from
    `GrammarCache.allocate_bitmask`; all constraints must come from caches of the same vocab_size."""
    if bitmask.dtype != torch.int32 or bitmask.device.type != "cpu" or bitmask.dim() != 2:
        raise ValueError("bitmask must be a 2-D int32 CPU tensor")
    if not bitmask.is_contiguous():
        raise ValueError("bitmask must be contiguous")
    if bitmask.shape[0] < len(constraints):
        raise ValueError(f"bitmask has {bitmask.shape[0]} rows for {len(constraints)} constraints")
    rows = bitmask[: len(constraints)]
    rows.fill_(-1)
    work = [(c._matcher, i) for i, c in enumerate(constraints) if c is not None]
    if not work:
        return False
    executor = next(c for c in constraints if c is not None)._executor
    # What llguidance.torch does, without importing it (its import compiles a kernel: ~2.5 s of start-up).
    executor.unsafe_compute_mask_ptr(work, rows.data_ptr(), rows.shape[1] * 4, rows.shape[0])
    return True


def _grammar_text(spec: GrammarSpec) -> str:
    """The spec as an llguidance grammar; ValueError for text that is not even JSON."""
    if spec.kind == "json_schema":
        try:
            schema = json.loads(spec.text)
        except ValueError as e:
            raise ValueError(f"invalid {spec.describe()}: not JSON: {e}") from None
        if not isinstance(schema, dict):
            raise ValueError(f"invalid {spec.describe()}: a JSON schema must be an object")
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_DEFAULTS)
    if spec.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.text)
    try:
        lark = any_to_lark(spec.text)  # GBNF (llama.cpp's) becomes Lark; Lark stays as it is
    except GbnfToLarkError as e:
        raise ValueError(f"invalid {spec.describe()}: {_one_line(str(e))}") from None
    return llguidance.LLMatcher.grammar_from_lark(lark)


def _one_line(message: str) -> str:
    """llguidance's multi-line errors (source excerpts, parser state) cut to their informative lines."""
    lines = [line.strip() for line in message.strip().splitlines()]
    keep = [lines[0]] + [line for line in lines[1:] if line.startswith("error:")]
    return " ".join(keep)[:300]
