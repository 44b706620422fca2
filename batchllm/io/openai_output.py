"""Results of an OpenAI batch file in the Batch API's output shape: one line per request in
``<output>`` (succeeded) and in ``<output stem>.errors.jsonl`` (failed), as OpenAI splits them::

    {"id": "batch_req_...", "custom_id": "request-1", "response": {"status_code": 200,
     "request_id": "req_...", "body": {"id": "chatcmpl-...", "object": "chat.completion", "created": ...,
     "model": ..., "choices": [{"index": 0, "message": {"role": "assistant", "content": ...},
     "logprobs": null, "finish_reason": "stop"}], "usage": {"prompt_tokens": ..., "completion_tokens": ...,
     "total_tokens": ..., "prompt_tokens_details": {"cached_tokens": ...}}}}, "error": null}

A failed request gets ``status_code`` 400 and ``{"error": {"message", "type": "invalid_request_error"}}``
as its body. Ids are derived from the ``custom_id``, so a resumed run writes the same lines.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa

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
    message = {"role": "assistant", "content": row["output"]}
    usage = {
        "prompt_tokens": row["prompt_tokens"],
        "completion_tokens": row["output_tokens"],
        "total_tokens": row["prompt_tokens"] + row["output_tokens"],
        "prompt_tokens_details": {"cached_tokens": row["cached_tokens"]},
    }
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": row["finish_reason"]}
    return {
        "id": f"chatcmpl-{_tag(row['id'])}", "object": "chat.completion", "created": created, "model": model,
        "choices": [choice], "usage": usage,
    }  # fmt: skip


def _tag(custom_id: str) -> str:
    return hashlib.blake2b(custom_id.encode("utf-8"), digest_size=12).hexdigest()
