"""Results of an OpenAI batch file in the Batch API's output shape: one line per request in
``<output>`` (succeeded) and in ``<output stem>.errors.jsonl`` (failed), as OpenAI splits them::

    {"id": "batch_req_...", "custom_id": "request-1", "response": {"status_code": 200,
     "request_id": "req_...", "body": {"id": "chatcmpl-...", "object": "chat.completion", "created": ...,
     "model": ..., "choices": [{"index": 0, "message": {"role": "assistant", "content": ...},
     "logprobs": null, "finish_reason": "stop"}], "usage": {"prompt_tokens": ..., "completion_tokens": ...,
     "total_tokens": ..., "prompt_tokens_details": {"cached_tokens": ...}}}}, "error": null}

A request with ``n`` gets a choice per sample (``usage.completion_tokens`` counts them all); one asking
``logprobs`` gets them per choice in OpenAI's shape (chat: ``{"content": [{"token", "logprob", "bytes",
"top_logprobs"}]}``; completions: ``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``),
cut to its own ``top_logprobs``. A ``/v1/completions`` request gets a ``text_completion``.
A failed request gets ``status_code`` 400 and ``{"error": {"message", "type": "invalid_request_error"}}``
as its body. Ids are derived from the ``custom_id``, so a resumed run writes the same lines.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa

from batchllm.io.openai_request import ASKED_COLUMN, CHAT_URL

WriteAtomic = Callable[[Callable[[BinaryIO], None], Path, str], None]


def errors_path(output: Path) -> Path:
    return output.with_name(f"{output.stem}.errors{output.suffix or '.jsonl'}")


def write_batch_output(table: pa.Table, output: Path, model: str, write_atomic: WriteAtomic) -> None:
    """``table`` (the output columns, input order) as the output and errors files, each atomically."""
    created = int(time.time())
    done, failed = [], []
    for row in table.to_pylist():
        if row["error"] is None:
            done.append(_line(row["id"], 200, _completion(row, model, created)))
        else:
            error = {"message": row["error"], "type": "invalid_request_error", "param": None, "code": None}
            failed.append(_line(row["id"], 400, {"error": error}))
    for lines, path in ((done, output), (failed, errors_path(output))):
        data = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode("utf-8")
        write_atomic(lambda f, d=data: f.write(d), path, "the output")


def _line(custom_id: str, status: int, body: dict) -> dict:
    tag = _tag(custom_id)
    response = {"status_code": status, "request_id": f"req_{tag}", "body": body}
    return {"id": f"batch_req_{tag}", "custom_id": custom_id, "response": response, "error": None}


def _completion(row: dict, model: str, created: int) -> dict:
    """The response body: a chat.completion, or a text_completion for a ``/v1/completions`` request."""
    asked = row.get(ASKED_COLUMN) or {"url": CHAT_URL, "logprobs": False, "top_logprobs": 0, "n": 1}
    chat = asked["url"] == CHAT_URL
    usage = {
        "prompt_tokens": row["prompt_tokens"],
        "completion_tokens": row["output_tokens"],  # every sample's
        "total_tokens": row["prompt_tokens"] + row["output_tokens"],
        "prompt_tokens_details": {"cached_tokens": row["cached_tokens"]},
    }
    choices = [
        _choice(index, text, reason, logs, asked, chat)
        for index, (text, reason, logs) in enumerate(_samples(row))
    ]
    kind, tag = ("chat.completion", "chatcmpl") if chat else ("text_completion", "cmpl")
    return {
        "id": f"{tag}-{_tag(row['id'])}", "object": kind, "created": created, "model": model,
        "choices": choices, "usage": usage,
    }  # fmt: skip


def _samples(row: dict) -> list[tuple[str | None, str, list | None]]:
    """(text, finish reason, per-token logprobs or None) of each of the row's samples."""
    logs = row.get("output_logprobs")
    if row.get("outputs") is None:  # one sample per row
        return [(row["output"], row["finish_reason"], logs)]
    return list(zip(row["outputs"], row["finish_reasons"], logs or [None] * len(row["outputs"])))


def _choice(index: int, text: str | None, reason: str, logs: list | None, asked: dict, chat: bool) -> dict:
    k = asked["top_logprobs"]
    logprobs = None
    if asked["logprobs"] and logs is not None:
        logprobs = _chat_logprobs(logs, k) if chat else _completion_logprobs(logs, k)
    if chat:
        message = {"role": "assistant", "content": text}
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": reason}
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}


def _chat_logprobs(logs: list[dict], k: int) -> dict:
    """OpenAI's chat shape: per token its text, logprob, UTF-8 bytes and its ``k`` top alternatives."""

    def entry(t: dict) -> dict:
        return {"token": t["token"], "logprob": t["logprob"], "bytes": list(t["token"].encode("utf-8"))}

    content = [entry(t) | {"top_logprobs": [entry(a) for a in t["top"][:k]]} for t in logs]
    return {"content": content, "refusal": None}


def _completion_logprobs(logs: list[dict], k: int) -> dict:
    """The completions shape: parallel lists, ``top_logprobs`` a {token: logprob} per token (k > 0)."""
    tokens = [t["token"] for t in logs]
    offsets = [0, *itertools.accumulate(len(t) for t in tokens)][: len(tokens)]
    top = [{a["token"]: a["logprob"] for a in t["top"][:k]} for t in logs] if k else None
    return {
        "tokens": tokens,
        "token_logprobs": [t["logprob"] for t in logs],
        "top_logprobs": top,
        "text_offset": offsets,
    }


def _tag(custom_id: str) -> str:
    return hashlib.blake2b(custom_id.encode("utf-8"), digest_size=12).hexdigest()
