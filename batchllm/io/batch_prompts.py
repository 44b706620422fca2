"""Prompts of an OpenAI batch file, where chat and completion requests mix: a row's text is canonical
JSON, a conversation (a list, rendered with the chat template) or a plain prompt (a string, tokenized as
it is, the tokenizer's special tokens added, as vLLM's ``/v1/completions`` does)."""

from __future__ import annotations

import json
from typing import Any

from batchllm.io.piece_encoder import PieceEncoder
from batchllm.io.prompts import PendingPrompts, PromptBatch, Prompter
from batchllm.io.source import InputSource


def batch_prompter(source: InputSource, tokenizer: Any, prefix: str | None, chat: bool) -> Prompter:
    """The prompter of ``source``: a ``BatchPrompter`` for an OpenAI batch file."""
    if getattr(source, "batch_output", False):
        return BatchPrompter(tokenizer, prefix, chat, source.messages)
    return Prompter(tokenizer, prefix, chat, source.messages)


def is_plain(text: str | None) -> bool:
    return text is not None and text.startswith('"')


class BatchPrompter(Prompter):
    """Conversations through the chat template; plain prompts (JSON strings) without it."""

    def __init__(self, tokenizer: Any, prefix: str | None, chat: bool, messages: bool = True) -> None:
        super().__init__(tokenizer, prefix, False)  # a model without a template fails its chat rows only
        self.chat, self.messages = True, True
        self._plain = Prompter(tokenizer, None, False)
        self._has_template = bool(getattr(tokenizer, "chat_template", None))

    def encode_pending(
        self,
        texts: list[str | None],
        text_errors: list[str | None] | None = None,
        systems: list[str | None] | None = None,
        pending: PendingPrompts | None = None,
    ) -> PendingPrompts:
        errors = list(text_errors or [None] * len(texts))
        plain = [i for i, t in enumerate(texts) if is_plain(t)]
        chat = [i for i, t in enumerate(texts) if t is not None and not is_plain(t)]
        if chat and not self._has_template:
            for i in chat:
                errors[i] = "chat requests need a tokenizer with a chat template; this model's has none"
            chat = []
        token_ids: list = [None] * len(texts)
        for rows, encode in ((plain, self._encode_plain), (chat, self._encode_chat)):
            if not rows:
                continue
            own = None if systems is None else [systems[i] for i in rows]
            got = encode([texts[i] for i in rows], own)
            for i, ids, error in zip(rows, got.token_ids, got.errors):
                token_ids[i], errors[i] = ids, error
        for i, t in enumerate(texts):
            if t is None or (token_ids[i] is None and errors[i] is None):
                errors[i] = errors[i] or "text is null"
        pending = pending if pending is not None else PendingPrompts(PieceEncoder(None, False, False, None))
        pending.add_done(PromptBatch(token_ids, errors))
        return pending

    def _encode_plain(self, texts: list[str], systems: list[str | None] | None) -> PromptBatch:
        return self._plain.encode([json.loads(t) for t in texts])

    def _encode_chat(self, texts: list[str], systems: list[str | None] | None) -> PromptBatch:
        return super().encode_pending(texts, None, systems).pack()
