"""A window of input rows: read, tokenized and checked (the plan and its work units come after)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa

from batchllm.config import JobSpec, SamplingParams
from batchllm.engine.random_streams import row_key
from batchllm.io.heap import give_back
from batchllm.io.prompts import PendingPrompts, Prompter
from batchllm.io.reader import open_input
from batchllm.io.row_params import row_params
from batchllm.io.source import CONVERT_ROWS, InputSource, RowBatch
from batchllm.job.rows import RowBlock
from batchllm.prefix_tree.seqs import TokenSeqs, TokenSpans


@dataclass(frozen=True)
class Window:
    start: int  # input row index of the window's first row
    ids: pa.Array
    keep: pa.Table | None
    token_ids: list[np.ndarray | None]
    errors: list[str | None]  # a row-level error, or None when the row can run
    skip: np.ndarray  # bool [rows]: committed by an earlier attempt
    params: list[SamplingParams | None] | None = None  # [rows] a row's own settings (None: the job's)
    schemas: list[str | None] | None = None  # [rows] each row's JSON Schema text (--schema-column)
    packed: TokenSeqs | None = None  # the buffer token_ids are views of (row i: row i), when read so

    def spans(self, rows: np.ndarray) -> TokenSpans | None:
        """These rows' prompts as spans of the window's one buffer (none copied), or None without one."""
        if self.packed is None:
            return None
        return TokenSpans(self.packed.tokens, self.packed.starts[rows], self.packed.lengths[rows])

    def __len__(self) -> int:
        return len(self.token_ids)

    def runnable(self) -> np.ndarray:
        """Window-local indices of the rows to generate now."""
        ok = np.fromiter((e is None for e in self.errors), dtype=bool, count=len(self))
        return np.nonzero(ok & ~self.skip)[0]

    def failed(self) -> np.ndarray:
        """Window-local indices of the rows that get an error row now."""
        bad = np.fromiter((e is not None for e in self.errors), dtype=bool, count=len(self))
        return np.nonzero(bad & ~self.skip)[0]

    @property
    def num_failed(self) -> int:
        return len(self.failed())

    def block(self, rows: np.ndarray) -> RowBlock:
        """Window-local ``rows`` (int64) as output rows."""
        take = pa.array(rows, type=pa.int64())
        lengths = [0 if self.token_ids[i] is None else len(self.token_ids[i]) for i in rows.tolist()]
        return RowBlock(
            row_index=rows.astype(np.int64) + self.start,
            ids=self.ids.take(take),
            keep=None if self.keep is None else self.keep.take(take),
            prompt_tokens=np.asarray(lengths, dtype=np.int32),
            errors=[self.errors[i] for i in rows.tolist()],
            schemas=None if self.schemas is None else [self.schemas[i] for i in rows.tolist()],
        )


def open_job_input(job: JobSpec) -> InputSource:
    """The job's input: its text column, or its messages column; its params column; the scoring column
    (read as a keep column, taken out again per window)."""
    column, messages = job.messages_column or job.column, job.messages_column is not None
    return open_input(
        job.input, job.format, column, job.id_column, input_keep_columns(job), messages, job.params_column,
        job.model,
    )  # fmt: skip


def input_keep_columns(job: JobSpec) -> tuple[str, ...]:
    """The keep columns to read: the job's, and the scoring column (taken out again per window)."""
    column = job.scoring.column
    if column is None or column in job.keep_columns:
        return job.keep_columns
    return (*job.keep_columns, column)


def read_windows(
    source: InputSource,
    prompter: Prompter,
    window_rows: int,
    max_new_tokens: int,
    max_positions: int,
    skip: np.ndarray,
    sampling: SamplingParams | None = None,
    systems: Callable[[int, int], list[str | None]] | None = None,
) -> Iterator[Window]:
    """Windows of rows, tokenized; rows marked in ``skip`` (bool [num_rows]) are not tokenized. Rows
    with a ``--params-column`` value get their own settings from ``sampling`` (the job's).
    ``systems(start, rows)``: each row's own system message (chat), when rows have their own.
    A window is read and tokenized in parts (``CONVERT_ROWS``), so only one part's texts are ever held."""
    cap = getattr(source, "caps_max_tokens", False)  # OpenAI requests under --max-new-tokens
    extra = getattr(source, "extra_param_keys", ())  # OpenAI requests: n too
    rows = _WindowRows(prompter, sampling, cap, extra)
    for part in _parts(source, window_rows):
        done = skip[part.start : part.start + len(part)]
        rows.add(part, done, systems(part.start, len(part)) if systems is not None else None)
        del part
        if len(rows) == window_rows:
            window = rows.finish(max_new_tokens, max_positions)
            if window is not None:
                yield window
    if len(rows):
        window = rows.finish(max_new_tokens, max_positions)
        if window is not None:
            yield window


def _parts(source: InputSource, window_rows: int) -> Iterator[RowBatch]:
    """The input in parts of at most ``CONVERT_ROWS`` rows, cut where windows end."""
    filled = 0
    for part in source.iter_batches(rows_per_batch=min(window_rows, CONVERT_ROWS)):
        while len(part):
            head, part = part.split(min(len(part), window_rows - filled))
            filled = (filled + len(head)) % window_rows
            yield head


class _WindowRows:
    """One window's rows as its parts are read: each part tokenized at once, everything but its texts kept."""

    def __init__(self, prompter: Prompter, sampling: SamplingParams | None, cap: bool, extra: tuple) -> None:
        self.prompter, self.sampling, self.cap, self.extra = prompter, sampling, cap, extra
        self.parts: list[RowBatch] = []
        self.done: list[np.ndarray] = []
        self.pending: PendingPrompts | None = None

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def add(self, batch: RowBatch, done: np.ndarray, own: list[str | None] | None) -> None:
        params, param_errors = _params(batch.params, self.sampling, len(batch), self.cap, self.extra)
        texts = [None if d or p else t for t, d, p in zip(batch.texts, done, param_errors)]
        text_errors = [
            e or p or ("skipped" if d else None) for e, d, p in zip(batch.text_errors, done, param_errors)
        ]
        self.pending = self.prompter.encode_pending(texts, text_errors, own, self.pending)
        self.parts.append(replace(batch, texts=[None] * len(batch), text_errors=[], params=params))
        self.done.append(done)

    def finish(self, max_new_tokens: int, max_positions: int) -> Window | None:
        """The window (None when every row was committed before), and a fresh start for the next."""
        whole, done, pending = RowBatch.concat(self.parts), np.concatenate(self.done), self.pending
        self.parts, self.done, self.pending = [], [], None
        if done.all() or pending is None:
            return None
        give_back()  # the parts' freed buffers, before the window's ids take their one buffer
        prompts = pending.pack()
        del pending
        give_back()
        params, n = whole.params, len(whole)
        max_new = [max_new_tokens if p is None else p.max_new_tokens for p in params or [None] * n]
        errors = [
            err or length_error(ids, row_max_new, max_positions)
            for ids, err, row_max_new in zip(prompts.token_ids, prompts.errors, max_new)
        ]
        token_ids, schemas = prompts.token_ids, whole.schemas
        return Window(
            whole.start, whole.ids, whole.keep, token_ids, errors, done, params, schemas, prompts.packed
        )


def _params(
    values: list | None,
    sampling: SamplingParams | None,
    n: int,
    cap: bool = False,
    extra: tuple[str, ...] = (),
) -> tuple[list[SamplingParams | None] | None, list[str | None]]:
    """Each row's settings (None: the job's) and the error of a row whose value is wrong."""
    if values is None or sampling is None:
        return None, [None] * n
    pairs = [row_params(v, sampling, cap, extra) for v in values]
    return [p for p, _ in pairs], [e for _, e in pairs]


def length_error(token_ids: np.ndarray | None, max_new_tokens: int, max_positions: int) -> str | None:
    n = 0 if token_ids is None else len(token_ids)
    if n == 0:
        return "the prompt is empty (0 tokens)"
    if n + max_new_tokens > max_positions:
        return (
            f"prompt has {n} tokens; with max_new_tokens={max_new_tokens} that exceeds the model's "
            f"{max_positions} positions"
        )
    return None


def row_keys(
    seed: int, ids: pa.Array, rows: np.ndarray, params: list[SamplingParams | None] | None = None
) -> list[int]:
    """Each row's random stream key: from its id and the job's seed, or its own ``seed`` param."""
    values = ids.take(pa.array(rows)).to_pylist()
    if params is None:
        return [row_key(seed, v) for v in values]
    seeds = [seed if params[i] is None else params[i].seed for i in rows.tolist()]
    return [row_key(s, v) for s, v in zip(seeds, values)]
