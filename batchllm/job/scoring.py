"""Scoring jobs: what each row scores (``--choices``, ``--choices-column``, ``--score-column``).

Scoring replaces generation for the whole job. A row's continuations are token ids appended to its
prompt's ids: each text is encoded alone by the tokenizer, without special tokens, exactly as given
(so a leading space belongs in the choice text when the model needs one: ``" positive"``). Each
continuation's log-probability is the sum of its tokens' log-softmax under the model given the prompt
and the tokens before it (``--choice-score mean``: divided by its token count).

Per row, the output holds:
  choices:      ``label`` (the best choice, first on a tie), ``label_logprobs`` (list<float64>, one
                per choice in the given order); ``output`` = label.
  score column: ``score_logprob`` (float64, the sum), ``score_tokens`` (int32); ``output`` is null.
Both: ``finish_reason`` = "scored", ``output_tokens`` = 0; a row that fails has these columns null.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from batchllm.config import JobSpec, ScoringParams
from batchllm.errors import JobError
from batchllm.job.windows import Window
from batchllm.prefix_tree.plan import Plan

CHOICE_COLUMNS = pa.schema([("label", pa.string()), ("label_logprobs", pa.list_(pa.float64()))])
SCORE_COLUMNS = pa.schema([("score_logprob", pa.float64()), ("score_tokens", pa.int32())])


@dataclass(frozen=True, eq=False)
class Continuations:
    """What one row scores: the texts (choices, or the score column's text) and their token ids."""

    texts: list[str]
    ids: list[np.ndarray]  # int32, each non-empty

    def __len__(self) -> int:
        return len(self.texts)


def score_schema(params: ScoringParams) -> pa.Schema | None:
    """The columns a scoring job adds to every output row; None for a generating job."""
    if not params.enabled:
        return None
    return SCORE_COLUMNS if params.score_column is not None else CHOICE_COLUMNS


def append_columns(
    table: pa.Table, schema: pa.Schema | None, values: list[dict | None] | None = None
) -> pa.Table:
    """``table`` with ``schema``'s columns appended: from ``values`` (one dict per row, None: nulls)."""
    if schema is None:
        return table
    rows = values or [None] * table.num_rows
    for f in schema:
        table = table.append_column(f, pa.array([None if v is None else v[f.name] for v in rows], f.type))
    return table


def score_inputs(job: JobSpec, tokenizer: Any, max_positions: int) -> ScoreInputs | None:
    """The job's ``ScoreInputs``; None for a generating job. Refuses keep columns that clash."""
    schema = score_schema(job.scoring)
    if schema is None:
        return None
    clashes = [c for c in job.keep_columns if c in schema.names]
    if clashes:
        raise JobError(
            f"keep column(s) {', '.join(map(repr, clashes))} clash with the scoring output columns"
        )
    return ScoreInputs(job, tokenizer, max_positions)


def row_score(
    params: ScoringParams, labels: list[str], logprobs: list[list[float]]
) -> tuple[str | None, dict]:
    """A finished row's ``output`` and score columns, from each continuation's token log-probs."""
    if params.score_column is not None:
        (tokens,) = logprobs
        return None, {"score_logprob": math.fsum(tokens), "score_tokens": len(tokens)}
    scores = [math.fsum(t) / (len(t) if params.choice_score == "mean" else 1) for t in logprobs]
    label = labels[int(np.argmax(scores))]
    return label, {"label": label, "label_logprobs": scores}


class ScoreInputs:
    """Per window: each row's continuations as token ids, and the row errors scoring adds."""

    def __init__(self, job: JobSpec, tokenizer: Any, max_positions: int) -> None:
        self.params, self.tokenizer, self.max_positions = job.scoring, tokenizer, max_positions
        self.drop = job.scoring.column if job.scoring.column not in job.keep_columns else None
        self._ids: dict[str, np.ndarray] = {}
        choices = list(job.scoring.choices)
        self._shared = Continuations(choices, [self._encode(c) for c in choices])  # --choices, once

    def prepare(self, window: Window) -> tuple[Window, list[Continuations | None]]:
        """The window without the scoring column unless kept, with scoring's row errors; and each
        row's continuations (None for a row that fails)."""
        rows: list[Continuations | None] = []
        errors = list(window.errors)
        for i, row in enumerate(self._rows(window)):
            error = row if isinstance(row, str) else self._length_error(window.token_ids[i], row)
            errors[i] = errors[i] or error
            rows.append(row if errors[i] is None else None)
        keep = window.keep
        if self.drop is not None:
            keep = keep.drop_columns([self.drop])
            keep = keep if keep.num_columns else None
        return dataclasses.replace(window, keep=keep, errors=errors), rows

    def _rows(self, window: Window) -> list[Continuations | str]:
        """Each row's continuations, or why it has none."""
        if self.params.column is None:
            return [self._shared] * len(window)
        out: list[Continuations | str] = []
        self._ids.clear()  # per window: a score column's texts rarely repeat
        for value in window.keep.column(self.params.column).to_pylist():
            texts, error = self._texts(value)
            out.append(error or Continuations(texts, [self._encode(t) for t in texts]))
        return out

    def _texts(self, value: object) -> tuple[list[str], str | None]:
        name = self.params.column
        if self.params.score_column is not None:
            if not isinstance(value, str) or not value:
                what = "null" if value is None else "empty" if value == "" else "not a string"
                return [], f"score column {name!r} is {what}"
            return [value], None
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            what = "null" if value is None else "not a list of non-empty strings"
            return [], f"choices column {name!r} is {what}"
        if not value:
            return [], f"choices column {name!r} holds an empty list"
        if len(set(value)) < len(value):
            return [], f"choices column {name!r} names a choice twice"
        return value, None

    def _encode(self, text: str) -> np.ndarray:
        ids = self._ids.get(text)
        if ids is None:
            encoded = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            ids = self._ids[text] = np.asarray(encoded, dtype=np.int32)
        return ids

    def _length_error(self, prompt: np.ndarray | None, row: Continuations | None) -> str | None:
        if row is None:
            return None
        for text, ids in zip(row.texts, row.ids):
            if not len(ids):
                return f"continuation {text!r} encodes to no tokens"
        total = (0 if prompt is None else len(prompt)) + max(len(ids) for ids in row.ids)
        if total > self.max_positions:
            return f"prompt and continuation have {total} tokens, over the model's {self.max_positions}"
        return None


def scoring_figures(plan: Plan, rows: list[Continuations]) -> dict[str, int]:
    """What ``batchllm plan`` adds for a scoring job: SCORE sequences, their scored tokens, and the
    prefill tokens the engine will compute (see ``job.score_sequences``). Per representative row: its
    prompt beyond its plan prefix, less the last token, once; each continuation's own tokens."""
    reps = plan.row_order.tolist()
    own = sum(sum(len(ids) for ids in rows[r].ids) for r in reps)
    return {
        "score_sequences": sum(len(rows[r]) for r in reps),
        "score_tokens": own,
        "prefill_tokens_planned_scoring": plan.stats.prefill_tokens_planned - len(reps) + own,
    }
