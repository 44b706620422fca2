"""Row texts -> prompts -> token ids, exactly as transformers would feed them to the model."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from batchllm.errors import JobError
from batchllm.io.line_split import backend_of, cuts_at_lines, cuts_at_words, special_ids
from batchllm.io.messages import conversation
from batchllm.io.piece_encoder import PieceEncoder, row_views
from batchllm.prefix_tree.seqs import TokenSeqs

logger = logging.getLogger(__name__)
ENCODE_BATCH_ROWS = 4096  # rows tokenized whole at a time
PIECE_BATCH_ROWS = 65536  # rows cut into pieces at a time (Arrow arrays of their bytes)
CHECK_ROWS = 32  # rows per window whose cut encoding is compared with their whole prompt's


@dataclass(frozen=True)
class PromptBatch:
    token_ids: list[np.ndarray | None]  # int32 [prompt_len] per row; None where the row failed
    errors: list[str | None]  # why a row failed; None on success
    packed: TokenSeqs | None = None  # the one buffer every row's ids are a view of (row i: row i), if any

    def __len__(self) -> int:
        return len(self.token_ids)


class PendingPrompts:
    """A window's rows, tokenized part by part as they are read, their ids not yet laid out in one buffer
    (``pack``): a part's texts go as soon as it is encoded (a million rows' texts are ~1 GB)."""

    def __init__(self, encoder: PieceEncoder) -> None:
        self.encoder = encoder
        self.errors: list[str | None] = []
        self.checked = False  # whether some of its rows were compared with whole-prompt encoding

    def __len__(self) -> int:
        return len(self.errors)

    def add_done(self, batch: PromptBatch) -> None:
        """Rows whose ids were found another way."""
        for ids in batch.token_ids:
            self.encoder.add_failed() if ids is None else self.encoder.add_ids(ids)
        self.errors += batch.errors

    def pack(self) -> PromptBatch:
        packed = self.encoder.pack()
        token_ids: list[np.ndarray | None] = list(row_views(packed))
        for i, e in enumerate(self.errors):
            if e is not None:
                token_ids[i] = None
        return PromptBatch(token_ids, self.errors, packed)


class Prompter:
    """plain: prompt = prefix + text, tokenized with the tokenizer's defaults (its special tokens too).
    chat: the chat template renders [system: prefix (when given), user: text] plus the generation prompt
    (messages: the row's own conversation, the prefix as its system message when it has none);
    the rendered string already holds every special token, so it is tokenized without adding more
    (what `apply_chat_template(tokenize=True)` does)."""

    def __init__(self, tokenizer: Any, prefix: str | None, chat: bool, messages: bool = False) -> None:
        if (chat or messages) and not getattr(tokenizer, "chat_template", None):
            flag = "--messages-column" if messages else "--chat"
            raise JobError(
                f"{flag} needs a tokenizer with a chat template, and this model's tokenizer has none"
            )
        self.tokenizer = tokenizer
        self.prefix = prefix
        self.chat = chat or messages
        self.messages = messages  # texts are conversations as JSON (io.messages), rendered as they are
        self.cut: bool | None = None  # prompts cut at line starts (decided at the first encode)
        self.words = False  # new lines cut again before words (decided with ``cut``)
        self.fast = True  # distinct pieces tokenized once into one buffer (io.piece_encoder)
        self.specials: tuple[list[int], list[int]] | None = None  # ids around every plain prompt

    def render(self, texts: list[str], systems: list[str | None] | None = None) -> list[str]:
        """The prompt strings for these texts; with chat, ``systems`` (one per text) replace the
        prefix as each row's system message."""
        if not self.chat:
            prefix = self.prefix or ""
            return [prefix + t for t in texts]
        systems = systems if systems is not None else [self.prefix] * len(texts)
        if self.messages:
            conversations = [conversation(t, s) for t, s in zip(texts, systems)]
        else:
            conversations = [
                [
                    *([{"role": "system", "content": s}] if s is not None else []),
                    {"role": "user", "content": t},
                ]
                for t, s in zip(texts, systems)
            ]
        if not conversations:
            return []
        return self.tokenizer.apply_chat_template(conversations, add_generation_prompt=True, tokenize=False)

    def encode(
        self,
        texts: list[str | None],
        text_errors: list[str | None] | None = None,
        systems: list[str | None] | None = None,
    ) -> PromptBatch:
        """Token ids per row; a row without text gets its text error, one the tokenizer rejects gets that.
        ``systems``: each row's own system message (chat only; see ``render``)."""
        return self.encode_pending(texts, text_errors, systems).pack()

    def encode_pending(
        self,
        texts: list[str | None],
        text_errors: list[str | None] | None = None,
        systems: list[str | None] | None = None,
        pending: PendingPrompts | None = None,
    ) -> PendingPrompts:
        """``encode``, less laying the ids out (``PendingPrompts.pack``), which needs no texts. Rows are
        added to ``pending`` (a window read part by part), or to a new one; the first rows added to it
        are checked against their whole prompts' encoding."""
        if text_errors is not None and len(text_errors) != len(texts):
            raise ValueError(f"{len(text_errors)} text errors for {len(texts)} texts")
        reasons = text_errors or [None] * len(texts)
        errors = [None if t is not None else (reason or "text is null") for t, reason in zip(texts, reasons)]
        pending = pending if pending is not None else self.new_pending()
        if pending.encoder.backend is None:
            pending.add_done(self._encode_slowly(texts, errors, systems))
            return pending
        for lo in range(0, len(texts), PIECE_BATCH_ROWS):
            end = min(lo + PIECE_BATCH_ROWS, len(texts))
            self._add_rows(pending.encoder, lo, end, texts, errors, systems)
        compared = 0 if pending.checked else self._first_rows_same(pending, texts, errors, systems)
        if compared is None:
            logger.warning("fast tokenization (%s) changed token ids; falling back", self._mode())
            if self.words:  # words, then lines, then whole prompts, then the tokenizer itself
                self.words = False
            else:
                self.cut, self.fast = False, not self.cut
            pending.encoder = self.new_pending().encoder
            for _ in range(len(pending)):  # rows before went unchecked: none had a prompt
                pending.encoder.add_failed()
            return self.encode_pending(texts, errors, systems, pending)
        pending.checked = pending.checked or compared > 0
        pending.errors += errors
        return pending

    def new_pending(self) -> PendingPrompts:
        """An empty window: pieces (``_piece_encoder``) or, without a fast tokenizer, whole prompts."""
        return PendingPrompts(self._piece_encoder() or PieceEncoder(None, False, False, None))

    def _encode_slowly(
        self, texts: list[str | None], errors: list[str | None], systems: list[str | None] | None
    ) -> PromptBatch:
        """Every prompt tokenized whole by the tokenizer itself."""
        token_ids: list[np.ndarray | None] = [None] * len(texts)
        rows = [i for i, t in enumerate(texts) if t is not None]
        # Sub-batches bound the Python int lists the tokenizer returns (~30 bytes a token) before
        # they are packed into int32 arrays; a million-row window would otherwise need tens of GB.
        for lo in range(0, len(rows), ENCODE_BATCH_ROWS):
            chunk = rows[lo : lo + ENCODE_BATCH_ROWS]
            own = None if systems is None else [systems[i] for i in chunk]
            for i, (ids, error) in zip(chunk, self._encode_all([texts[i] for i in chunk], own)):
                token_ids[i], errors[i] = ids, error
        return PromptBatch(token_ids, errors)

    def _piece_encoder(self) -> PieceEncoder | None:
        """The fast path (distinct pieces once, one buffer), or None: a tokenizer without a Rust backend,
        or one whose fast path failed its check. Whether prompts are cut at lines is decided once."""
        backend = backend_of(self.tokenizer) if self.fast else None
        if backend is None:
            return None
        if self.cut is None:
            self._tokenize(["probe"])  # transformers sets the backend's truncation and padding off
            self.specials = None if self.chat else special_ids(backend)
            self.cut = (self.chat or self.specials is not None) and cuts_at_lines(self.tokenizer)
            self.words = self.cut and cuts_at_words(self.tokenizer)
            logger.debug("prompts: %s", self._mode())
        specials = self.specials if self.cut else None
        return PieceEncoder(backend, self.cut, not self.chat, specials, self.words)

    def _mode(self) -> str:
        return "cut at words and lines" if self.words else "cut at lines" if self.cut else "whole"

    def _first_rows_same(
        self,
        pending: PendingPrompts,
        texts: list[str | None],
        errors: list[str | None],
        systems: list[str | None] | None,
    ) -> int | None:
        """The per-window check: the first rows with a prompt, just added, encoded whole too. How many
        rows were compared (0: none had a prompt yet, the next part is checked), or None on a difference."""
        rows = [i for i, t in enumerate(texts) if t is not None and errors[i] is None][:CHECK_ROWS]
        if not rows:
            return 0
        base = len(pending)  # rows added by earlier calls
        first = list(row_views(pending.encoder.pack(base + rows[-1] + 1)))[base:]
        return len(rows) if self._same_as_whole(texts, first, rows, systems) else None

    def _add_rows(
        self,
        encoder: PieceEncoder,
        lo: int,
        end: int,
        texts: list[str | None],
        errors: list[str | None],
        systems: list[str | None] | None,
    ) -> None:
        """Rows [lo, end) into ``encoder``; a row without text is a failed row. When the batch fails,
        smaller batches find the rows the tokenizer (or the UTF-8 encoding) rejects."""
        chunk = [i for i in range(lo, end) if texts[i] is not None]
        own = None if systems is None else [systems[i] for i in chunk]
        try:
            rendered = iter(self.render([texts[i] for i in chunk], own))
            encoder.add([next(rendered) if texts[i] is not None else None for i in range(lo, end)])
            return
        except Exception:  # the tokenizer's error types vary
            pass
        if end - lo > ENCODE_BATCH_ROWS:
            for a in range(lo, end, ENCODE_BATCH_ROWS):
                self._add_rows(encoder, a, min(a + ENCODE_BATCH_ROWS, end), texts, errors, systems)
            return
        encoded = dict(zip(chunk, self._encode_all([texts[i] for i in chunk], own)))
        for i in range(lo, end):
            ids, errors[i] = encoded.get(i, (None, errors[i]))
            encoder.add_failed() if ids is None else encoder.add_ids(ids)

    def _same_as_whole(
        self,
        texts: list[str | None],
        token_ids: list[np.ndarray | None],
        rows: list[int],
        systems: list[str | None] | None,
    ) -> bool:
        """Whether these rows' ids equal their whole prompts' (a row rejected one way only: a difference)."""
        own = None if systems is None else [systems[i] for i in rows]
        whole = self._encode_all([texts[i] for i in rows], own)
        return all(
            ids is not None and token_ids[i] is not None and np.array_equal(ids, token_ids[i])
            for i, (ids, _) in zip(rows, whole)
        )

    def _encode_all(
        self, texts: list[str], systems: list[str | None] | None = None
    ) -> list[tuple[np.ndarray | None, str | None]]:
        try:
            ids = self._tokenize(self.render(texts, systems))
        except Exception:  # the tokenizer's error types vary; find the bad rows one by one
            logger.debug("batch tokenization failed; encoding %d rows one by one", len(texts))
            own = systems if systems is not None else [self.prefix] * len(texts)
            return [self._encode_one(t, s) for t, s in zip(texts, own)]
        return [(np.asarray(row, dtype=np.int32), None) for row in ids]

    def _encode_one(self, text: str, system: str | None = None) -> tuple[np.ndarray | None, str | None]:
        try:
            (ids,) = self._tokenize(self.render([text], [system] if self.chat else None))
        except Exception as e:  # any rejection is this row's error, not the job's
            return None, f"tokenizer rejected the text: {e}"
        return np.asarray(ids, dtype=np.int32), None

    def _tokenize(self, prompts: list[str]) -> list[list[int]]:
        if not prompts:
            return []
        extra = {"add_special_tokens": False} if self.chat else {}
        return self.tokenizer(prompts, return_attention_mask=False, **extra)["input_ids"]
