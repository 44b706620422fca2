"""A job's output constraints, checked by the driver before any model loads.

The job's own constraint (``--json-schema``, ``--regex``, ``--grammar``) is compiled once when the
job opens: an invalid one ends the job (exit 2, one line). Per-row schemas (``--schema-column``) are
read window by window and compiled once per distinct text; a bad one is that row's error. Workers get
the schema texts, never compiled matchers (they compile again, once per distinct text, on their own
``GrammarCache``: llguidance matchers do not cross processes).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from batchllm.config import JobSpec
from batchllm.engine.grammar_spec import GrammarSpec
from batchllm.errors import JobError
from batchllm.io.reader import open_input
from batchllm.io.source import InputSource
from batchllm.job.windows import Window
from batchllm.model.config import ModelConfig

if TYPE_CHECKING:  # the grammar engine imports torch: only constrained jobs load it
    from batchllm.engine.constraints import GrammarCache

SCHEMA_IN_PROMPT = "Answer with JSON that matches this JSON Schema:\n"


def grammar_cache(tokenizer: Any, mcfg: ModelConfig) -> GrammarCache:
    """A compile cache for this model: its logits' width and its EOS ids."""
    from batchllm.engine.constraints import GrammarCache

    width = max(mcfg.vocab_size, len(tokenizer))
    return GrammarCache(tokenizer, vocab_size=width, eos_token_ids=mcfg.eos_token_ids)


def is_constrained(job: JobSpec) -> bool:
    return job.grammar is not None or job.schema_column is not None or job.request_schemas


def system_prefix(job: JobSpec) -> str | None:
    """The prefix (the system message with --chat), with the job's schema in it for --schema-in-prompt."""
    if not job.schema_in_prompt or job.grammar is None:
        return job.prefix
    return schema_system(job.prefix, job.grammar.text)


def schema_system(prefix: str | None, schema: str) -> str:
    head = f"{prefix.rstrip()}\n\n" if prefix else ""
    return f"{head}{SCHEMA_IN_PROMPT}{schema.strip()}"


class JobGrammars:
    """The driver's compile cache and per-row schema column of one job."""

    def __init__(self, job: JobSpec, tokenizer: Any, mcfg: ModelConfig) -> None:
        self.job = job
        self.cache = grammar_cache(tokenizer, mcfg)
        if job.grammar is not None:
            try:
                self.cache.compile(job.grammar)
            except ValueError as e:
                raise JobError(f"--{job.grammar.flag}: {e}") from None
        self.column: InputSource | None = None
        if job.schema_column is not None:
            try:
                self.column = open_input(job.input, job.format, job.schema_column, None, ())
            except JobError as e:  # it names the column by its role in open_input: the text column
                raise JobError(str(e).replace("text column", "schema column", 1)) from None

    def fingerprint(self) -> dict:
        """What the manifest records: the job grammar's hash, or the schema column's content hash."""
        job = self.job
        found = {"grammar": job.grammar.digest if job.grammar is not None else None}
        if self.column is not None:
            digest = hashlib.blake2b(digest_size=16)
            for batch in self.column.iter_batches(rows_per_batch=65536):
                for text in batch.texts:
                    digest.update(b"\x01" if text is None else b"\x00" + text.encode("utf-8", "replace"))
            found |= {"schema_column": job.schema_column, "schema_column_hash": digest.hexdigest()}
        if job.schema_in_prompt:
            found["schema_in_prompt"] = True
        return found

    def row_systems(self) -> Callable[[int, int], list[str | None]] | None:
        """``systems`` when rows show their own schema in the prompt, else None."""
        return self.systems if self.column is not None and self.job.schema_in_prompt else None

    def systems(self, start: int, rows: int) -> list[str | None]:
        """Each row's system message for --schema-column with --schema-in-prompt: the prefix and its
        schema (just the prefix where the schema is missing)."""
        batch = next(self.column.iter_batches(rows_per_batch=rows, start=start))
        prefix = self.job.prefix
        return [prefix if text is None else schema_system(prefix, text) for text in batch.texts]

    def with_schemas(self, window: Window) -> Window:
        """The window with each row's schema text, and a row error for a schema that is missing or bad."""
        if self.column is None or not len(window):
            return self._checked(window) if window.schemas is not None else window
        batch = next(self.column.iter_batches(rows_per_batch=len(window), start=window.start))
        errors = list(window.errors)
        for i, (text, problem) in enumerate(zip(batch.texts, batch.text_errors)):
            if errors[i] is not None or window.skip[i]:
                continue
            errors[i] = self._schema_error(text, problem)
        return dataclasses.replace(window, errors=errors, schemas=list(batch.texts))

    def _checked(self, window: Window) -> Window:
        """The window with an error for each row whose own schema (an OpenAI response_format) is bad."""
        errors = list(window.errors)
        for i, text in enumerate(window.schemas):
            if text is None or errors[i] is not None or window.skip[i]:
                continue
            try:
                self.cache.compile(GrammarSpec("json_schema", text))
            except ValueError as e:
                errors[i] = f"response_format: {e}"
        return dataclasses.replace(window, errors=errors)

    def _schema_error(self, text: str | None, problem: str | None) -> str | None:
        name = self.job.schema_column
        if text is None:
            return f"schema column {name!r}: {(problem or 'null').replace('text ', 'value ')}"
        try:
            self.cache.compile(GrammarSpec("json_schema", text))
        except ValueError as e:
            return f"schema column {name!r}: {e}"
        return None
