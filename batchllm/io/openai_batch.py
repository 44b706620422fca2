"""OpenAI batch files as input: one request per line,
``{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body": {"model", "messages", ...}}``
(the format OpenAI's Batch API and vLLM's ``run-batch`` read).

Each line becomes a row: its ``custom_id`` the id, ``body.messages`` the conversation (``io.messages``),
and ``max_completion_tokens`` / ``max_tokens``, ``temperature``, ``top_p``, ``seed`` and ``stop`` its own
settings (``io.row_params``; a ``max_tokens`` above ``--max-new-tokens`` is capped to it). A request
this tool cannot serve (another url or model, ``n`` > 1, log probabilities, a response format) is that
row's error. A line that is not a JSON object, a missing or repeated ``custom_id`` is a job error.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pyarrow as pa

from batchllm.errors import JobError
from batchllm.io.jsonl import _line_chunks, _parse_python
from batchllm.io.messages import python_conversation
from batchllm.io.source import InputSource, PythonRows, RowBatch

CHAT_URL = "/v1/chat/completions"
_SCAN_ROWS = 65536


@dataclass(frozen=True)
class OpenAIBatchSource(InputSource):
    models: tuple[str, ...]  # names a body may give for the model this job runs
    caps_max_tokens: ClassVar[bool] = True  # a request's max_tokens is capped to --max-new-tokens
    batch_output: ClassVar[bool] = True  # the output is written in the batch output shape

    def _tables(self, rows_per_batch: int, start: int) -> Iterator[PythonRows]:
        for first_line, lines in _line_chunks(self.path, rows_per_batch, start):
            yield _parse_python(lines, first_line, self.path)

    def _batch_from_rows(self, start: int, parsed: PythonRows) -> RowBatch:
        texts, errors, params = [], [], []
        for row, line_error in zip(parsed.rows, parsed.errors):
            text, row_params, error = (None, None, line_error) if line_error else self.request(row)
            texts.append(text)
            errors.append(error)
            params.append(row_params)
        ids = pa.array([row["custom_id"] for row in parsed.rows], type=pa.string())
        return RowBatch(start, ids, texts, errors, None, params)

    def request(self, row: dict) -> tuple[str | None, dict | None, str | None]:
        """(the conversation as canonical JSON, the row's settings, None) or (None, None, its error)."""
        body = row.get("body")
        if row.get("method", "POST") != "POST" or row.get("url") != CHAT_URL:
            return None, None, f"only POST {CHAT_URL} is supported, got {row.get('method')} {row.get('url')}"
        if not isinstance(body, dict):
            return None, None, "body is not an object"
        model = body.get("model")
        if model is not None and not _same_model(model, self.models):
            return None, None, f"body asks for model {model!r}, but this job runs {self.models[0]!r}"
        unsupported = [
            body.get("n") not in (None, 1) and "n > 1",
            (body.get("logprobs") or body.get("top_logprobs")) and "logprobs",
            body.get("tools") and "tools",
            body.get("response_format") not in (None, {"type": "text"}) and "response_format",
        ]
        if any(unsupported):
            return None, None, f"{next(u for u in unsupported if u)} is not supported"
        text, error = python_conversation(_text_parts(body.get("messages")))
        if error is not None:
            return None, None, error
        params = {k: body.get(k) for k in ("temperature", "top_p", "seed", "stop")}
        params["max_tokens"] = body.get("max_completion_tokens", body.get("max_tokens"))
        return text, params, None


def _same_model(asked: object, models: tuple[str, ...]) -> bool:
    """The job's --model as given, or a path ending in the asked name (``.../meta-llama/Llama-3-8B``)."""
    if not isinstance(asked, str) or not asked:
        return False
    return asked in models or Path(models[0]).parts[-len(Path(asked).parts) :] == Path(asked).parts


def _text_parts(messages: object) -> object:
    """Content given as a list of text parts (``[{"type": "text", "text": ...}]``) joined into one string."""
    if not isinstance(messages, list):
        return messages
    out = []
    for m in messages:
        parts = m.get("content") if isinstance(m, dict) else None
        if isinstance(parts, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in parts):
            m = {**m, "content": "".join(str(p.get("text", "")) for p in parts)}
        out.append(m)
    return out


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
    """Every line parsed once: a row count, and each ``custom_id`` present and unique."""
    seen: dict[str, int] = {}
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
    models = (model, Path(model).name)
    columns = ["custom_id", "body"]
    return OpenAIBatchSource(path, len(seen), columns, "body", "custom_id", (), models, messages=True)
