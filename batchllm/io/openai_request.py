"""One request of an OpenAI batch file -> what a row needs: its prompt text, its own settings, its JSON
Schema, and what its output line must report (``Asked``).

``/v1/chat/completions`` bodies carry ``messages`` (rendered with the chat template); ``/v1/completions``
bodies a ``prompt`` string (tokenized as it is, the tokenizer's special tokens added). The row's text is
canonical JSON either way: a list (a conversation) or a string (a plain prompt), which the batch
prompter (``io.batch_prompts``) tells apart. A request this tool cannot serve is that row's error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow as pa

from batchllm.io.messages import python_conversation

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
MAX_N = 128
ASKED_COLUMN = "openai_asked"  # a column of every row of a batch file; never written out
# What each output line needs from its request: its url, whether it asked for logprobs, how many
# alternatives per token, and how many samples (a column the batch source adds to every row).
ASKED = pa.struct(
    [("url", pa.string()), ("logprobs", pa.bool_()), ("top_logprobs", pa.int32()), ("n", pa.int32())]
)
JSON_OBJECT = '{"type": "object"}'


@dataclass(frozen=True)
class BatchRequest:
    """A request as a row: ``error`` set (and the rest None) when it cannot run."""

    text: str | None = None
    params: dict | None = None  # io.row_params keys, with n
    schema: str | None = None  # JSON Schema text from response_format
    asked: dict | None = None  # ASKED's fields
    error: str | None = None


def parse_request(row: dict, with_text: bool = True) -> BatchRequest:
    """The request of one line (its model is checked by the caller); without ``with_text``, its
    settings only (a cheap look at what it asks: the prompt is not checked)."""
    url, body = row.get("url"), row.get("body")
    if row.get("method", "POST") != "POST" or url not in (CHAT_URL, COMPLETIONS_URL):
        got = f"{row.get('method')} {url}"
        return BatchRequest(error=f"only POST {CHAT_URL} and {COMPLETIONS_URL} are supported, got {got}")
    if not isinstance(body, dict):
        return BatchRequest(error="body is not an object")
    chat = url == CHAT_URL
    text, error = None, None
    if with_text:
        text, error = _chat_text(body) if chat else _completion_text(body)
    error = error or _unsupported(body, chat)
    schema, schema_error = response_schema(body.get("response_format"))
    asked, asked_error = _asked(body, url, chat)
    error = error or schema_error or asked_error
    if error is not None:
        return BatchRequest(error=error)
    params = {k: body.get(k) for k in ("temperature", "top_p", "seed", "stop")}
    params["max_tokens"] = body.get("max_completion_tokens", body.get("max_tokens"))
    params["n"] = body.get("n")  # None: the job's --n
    return BatchRequest(text, params, schema, asked)


def _chat_text(body: dict) -> tuple[str | None, str | None]:
    return python_conversation(_text_parts(body.get("messages")))


def _completion_text(body: dict) -> tuple[str | None, str | None]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        return None, "prompt must be a string (one prompt per request)"
    if not prompt:
        return None, "prompt is empty"
    return json.dumps(prompt, ensure_ascii=False), None


def _unsupported(body: dict, chat: bool) -> str | None:
    found = [
        body.get("tools") and "tools",
        not chat and body.get("echo") and "echo",
        not chat and body.get("suffix") and "suffix",
        not chat and body.get("best_of") not in (None, 1, body.get("n", 1)) and "best_of",
    ]
    return next((f"{f} is not supported" for f in found if f), None)


def response_schema(value: object) -> tuple[str | None, str | None]:
    """(the JSON Schema text a response_format asks for, or None for free text; None) or (None, error)."""
    if value is None:
        return None, None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None, None
    if kind == "json_object":
        return JSON_OBJECT, None
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            return None, "response_format json_schema needs json_schema.schema (an object)"
        return json.dumps(schema, ensure_ascii=False), None
    return None, f"response_format type must be text, json_object or json_schema, got {kind!r}"


def _asked(body: dict, url: str, chat: bool) -> tuple[dict, str | None]:
    """ASKED's fields: chat asks ``logprobs: true`` with ``top_logprobs`` K; completions ``logprobs: K``."""
    n, logprobs, top = body.get("n", 1), body.get("logprobs"), body.get("top_logprobs")
    if n is None:
        n = 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        return {}, f"n must be an integer in [1, {MAX_N}], got {n!r}"
    if chat:
        if logprobs not in (None, True, False):
            return {}, f"logprobs must be true or false, got {logprobs!r}"
        if top is not None and not logprobs:
            return {}, "top_logprobs needs logprobs: true"
        on, k = bool(logprobs), 0 if top is None else top
    else:
        on, k = logprobs is not None, 0 if logprobs is None else logprobs
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= 20:
        name = "top_logprobs" if chat else "logprobs"
        return {}, f"{name} must be an integer in [0, 20], got {k!r}"
    return {"url": url, "logprobs": on, "top_logprobs": k, "n": n}, None


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
