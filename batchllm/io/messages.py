"""A ``--messages-column`` value -> a checked conversation: a list of {role, content} (Parquet structs,
JSONL objects). The source carries each row's conversation as canonical JSON text (so the fingerprint,
windows and duplicates work as for texts); the Prompter renders it with the chat template.

A value that is not such a list (null, another type, a message without a string role or content) is
that row's error, never the job's."""

from __future__ import annotations

import json

import pyarrow as pa

Conversation = list[dict[str, str]]


def arrow_conversations(values: pa.ChunkedArray | pa.Array) -> tuple[list[str | None], list[str | None]]:
    """(canonical JSON per row, None where the row has an error; the error per row)."""
    pairs = [python_conversation(v) for v in values.to_pylist()]
    return [text for text, _ in pairs], [error for _, error in pairs]


def python_conversation(value: object) -> tuple[str | None, str | None]:
    """(canonical JSON of the conversation, None) or (None, why the value is not one)."""
    if value is None:
        return None, "messages is null"
    if not isinstance(value, list):
        return None, f"messages is not a list of {{role, content}} ({_kind(value)})"
    if not value:
        return None, "messages is empty"
    conversation: Conversation = []
    for number, message in enumerate(value, 1):
        if not isinstance(message, dict):
            return None, f"message {number} is not an object with role and content ({_kind(message)})"
        for key in ("role", "content"):
            if message.get(key) is None:
                return None, f"message {number} has no {key}"
            if not isinstance(message[key], str):
                return None, f"message {number}: {key} is not a string ({_kind(message[key])})"
        conversation.append({"role": message["role"], "content": message["content"]})
    return json.dumps(conversation, ensure_ascii=False), None


def conversation(text: str, system: str | None) -> Conversation:
    """The row's conversation, with ``system`` (the prefix) as its system message when it has none."""
    messages: Conversation = json.loads(text)
    if system is not None and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    return messages


def _kind(value: object) -> str:
    try:
        return str(pa.array([value]).type)  # named as Arrow would, like text errors are
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return type(value).__name__
