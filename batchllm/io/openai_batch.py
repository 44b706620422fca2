"""OpenAI batch files as input: one request per line,
``{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body": {"model", "messages", ...}}``
(the format OpenAI's Batch API and vLLM's ``run-batch`` read; ``/v1/completions`` lines too).

Each line becomes a row (``io.openai_request``): its ``custom_id`` the id, its conversation or prompt
the text, ``max_completion_tokens`` / ``max_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop`` and
``n`` its own settings (``io.row_params``), ``response_format`` its JSON Schema, and what its output
line reports (logprobs, the url) a column ``openai_asked``. Opening the file reads every line once:
what the requests need of the job (``BatchNeeds``: the largest ``max_tokens``, ``n`` and
``top_logprobs``) widens the job's settings (``job.batch_job``). A request naming another model, or one
this tool cannot serve, is that row's error. A line that is not a JSON object, a missing or repeated
``custom_id`` is a job error.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import pyarrow as pa

from batchllm.config import SamplingParams
from batchllm.errors import JobError
from batchllm.io.jsonl import _line_chunks, _parse_python
from batchllm.io.openai_request import ASKED, ASKED_COLUMN, BatchRequest, parse_request
from batchllm.io.source import InputSource, PythonRows, RowBatch

_SCAN_ROWS = 65536


@dataclass(frozen=True)
class BatchNeeds:
    """What a file's runnable requests ask of the job (0: nothing asked)."""

    max_tokens: int = 0
    n: int = 1
    logprobs: int = 0  # the most alternatives per token asked; 1 when only chosen tokens' logprobs are
    schemas: bool = False  # some request has a response_format with a schema

    def add(self, request: BatchRequest) -> BatchNeeds:
        if request.error is not None:
            return self
        asked, wanted = request.asked, request.params["max_tokens"]
        return BatchNeeds(
            max(self.max_tokens, wanted if isinstance(wanted, int) and not isinstance(wanted, bool) else 0),
            max(self.n, asked["n"]),
            max(self.logprobs, max(1, asked["top_logprobs"]) if asked["logprobs"] else 0),
            self.schemas or request.schema is not None,
        )


@dataclass(frozen=True)
class OpenAIBatchSource(InputSource):
    models: tuple[str, ...]  # names a body may give for the model this job runs
    needs: BatchNeeds = field(default_factory=BatchNeeds)
    defaults: SamplingParams | None = None  # the job's own settings, before the requests widened them
    caps_max_tokens: bool = False  # a max_tokens above --max-new-tokens (given) is lowered to it
    batch_output: ClassVar[bool] = True  # the output is written in the batch output shape
    extra_param_keys: ClassVar[tuple[str, ...]] = ("n",)  # io.row_params keys beyond a params column's

    def _tables(self, rows_per_batch: int, start: int) -> Iterator[PythonRows]:
        for first_line, lines in _line_chunks(self.path, rows_per_batch, start):
            yield _parse_python(lines, first_line, self.path)

    def _batch_from_rows(self, start: int, parsed: PythonRows) -> RowBatch:
        texts, errors, params, schemas, asked = [], [], [], [], []
        for row, line_error in zip(parsed.rows, parsed.errors):
            request = BatchRequest(error=line_error) if line_error else self.request(row)
            texts.append(request.text)
            errors.append(request.error)
            params.append(self._filled(request.params))
            schemas.append(request.schema)
            asked.append(self._asked(request.asked, row.get("body")))
        ids = pa.array([row["custom_id"] for row in parsed.rows], type=pa.string())
        keep = pa.table({ASKED_COLUMN: pa.array(asked, ASKED)})
        return RowBatch(start, ids, texts, errors, keep, params, schemas)

    def request(self, row: dict, with_text: bool = True) -> BatchRequest:
        """The line's request, or its error (another model, a request this tool cannot serve)."""
        body = row.get("body")
        model = body.get("model") if isinstance(body, dict) else None
        if model is not None and not _same_model(model, self.models):
            return BatchRequest(error=f"body asks for model {model!r}, but this job runs {self.models[0]!r}")
        return parse_request(row, with_text)

    def _filled(self, params: dict | None) -> dict | None:
        """A request's settings with the job's own temperature and max tokens where it gives none: the
        job's settings as run are widened to the largest request (``job.batch_job``)."""
        if params is None or self.defaults is None:
            return params
        job = self.defaults
        own = {"temperature": job.temperature, "max_tokens": job.max_new_tokens, "n": job.n}
        return {**params, **{k: v for k, v in own.items() if params.get(k) is None}}

    def _asked(self, asked: dict | None, body: object) -> dict | None:
        """What the output line reports: the job's --n and --logprobs where the request says nothing."""
        if asked is None or self.defaults is None:
            return asked
        if "n" not in body:
            asked = {**asked, "n": self.defaults.n}
        if self.defaults.logprobs and "logprobs" not in body:
            asked = {**asked, "logprobs": True, "top_logprobs": self.defaults.logprobs}
        return asked


def _same_model(asked: object, models: tuple[str, ...]) -> bool:
    """The job's --model as given, or a path ending in the asked name (``.../meta-llama/Llama-3-8B``)."""
    if not isinstance(asked, str) or not asked:
        return False
    return asked in models or Path(models[0]).parts[-len(Path(asked).parts) :] == Path(asked).parts


def is_batch_file(path: Path) -> bool:
    """Whether the first non-blank line of ``path`` is an OpenAI batch request."""
    try:
        with open(path, "rb") as f:
            line = next((ln for ln in f if ln.strip()), b"")
        first = json.loads(line)
    except (OSError, ValueError):
        return False
    return isinstance(first, dict) and "custom_id" in first and "body" in first


def open_batch_file(path: Path, model: str) -> OpenAIBatchSource:
    """Every line parsed once: a row count, each ``custom_id`` present and unique, and what the
    requests need of the job."""
    seen: dict[str, int] = {}
    models = (model, Path(model).name)
    source = OpenAIBatchSource(path, 0, ["custom_id", "body"], "body", "custom_id", (), models, messages=True)
    needs = BatchNeeds()
    for first_line, lines in _line_chunks(path, _SCAN_ROWS):
        numbers = [n for n, line in enumerate(lines, first_line) if line.strip()]
        for lineno, row in zip(numbers, _parse_python(lines, first_line, path).rows):
            custom_id = row.get("custom_id")
            if not isinstance(custom_id, str):
                raise JobError(f"{path}: line {lineno} has no custom_id string")
            if custom_id in seen:
                raise JobError(
                    f"{path}: custom_id {custom_id!r} of line {lineno} repeats line {seen[custom_id]}"
                )
            seen[custom_id] = lineno
            needs = needs.add(source.request(row, with_text=False))
    return replace(source, num_rows=len(seen), needs=needs)
