"""Where a prompt can be cut so that its pieces, tokenized apart, give the ids of the whole prompt.

The cut points are line starts: just after a newline with a non-space character on each side (a space or
another newline before it can join it in one pre-token: GPT-2's `` \n`` and ``\n\n``). The Rust
tokenizer runs added tokens, then the normalizer, then the pre-tokenizer, then the model per pre-token.
A cut is exact when (1) no added token can span it or absorb the newline before it (none holds a
newline, none strips on its left); (2) the normalizer works per character (Unicode forms, lowercasing;
a newline composes with nothing); (3) the pre-tokenizer always splits there and adds nothing at a
text's start. (3) holds for the byte-level regexes of GPT-2, Llama 3, Qwen 2 and GPT-4o: none of their
alternatives can hold a newline followed by a non-space character (a newline ends a whitespace run; no
leading-character class takes one), and after a non-space character a newline starts a new one.

It is checked, not assumed: the pre-tokenizer must be one of the kinds below, and a grid of probes
(a newline after letters, digits, punctuation, non-ASCII; before letters, digits, punctuation,
contractions, combining marks, CJK and special tokens) must encode identically whole and cut. Anything
else (SentencePiece's Metaspace, no pre-tokenizer, a prefix space) gets whole prompts. Cut prompts are
checked again against whole encoding on the first rows of every window (``io.prompts``).

A line seen for the first time is cut again before its words (``WORD_CUT``: a space between two non-space
characters, the space going with the word after it), so that each distinct word is tokenized once: (3)
holds there too for those regexes (no alternative holds a non-space character followed by a space; a
space followed by a non-space starts one), and no added token may hold a space or strip on its right.
The pre-tokenizer itself is probed: it must split at every such space of a probe grid.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

CUT = re.compile(r"(?<=\S\n)(?=\S)")  # a line start with a non-space character on each side of the newline
WORD_CUT = re.compile(r"(?<=\S)(?= \S)")  # a space between two non-space characters, joined to the word after
_SAFE_NORMALIZERS = {"NFC", "NFKC", "NFD", "NFKD", "Lowercase"}
_SAFE_PRE_TOKENIZERS = {"ByteLevel", "Split", "Digits"}
_BEFORE = ("x\n", "x.\n", "x:\n", "1\n", "'\n", "é\n", "a b\n", "\n\nx\n", "x)\n", " -\n", "中\n")
_WORD_PROBES = (
    "The quick brown fox, 123 jumps; over 4567 lazy dogs! He's here (again) - isn't it?",
    "café au lait — naïve résumé ü 中文 字 ok. x y z 1 2 3 ... !? a\tb c  d",
)
_AFTER = ("y", "Y", "1", "123", ".", "'s", "-x", "#", "<", "é", "中文", "\u0301a", "(x)")
# ``\s`` in ``CUT`` is ``str.isspace`` (no space lies past U+3000): ASCII ones by byte, others by their UTF-8
# bytes read as one integer.
_SPACES = [c for c in range(0x3001) if chr(c).isspace()]
_ASCII_SPACE = np.isin(np.arange(256), [c for c in _SPACES if c < 128])
_WIDE_SPACE = np.array(sorted(int.from_bytes(chr(c).encode(), "big") for c in _SPACES if c >= 128), np.int64)


def line_cuts(data: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """``CUT`` over many strings at once: ``data`` (uint8) holds the UTF-8 bytes of rows laid end to end,
    row i in ``data[offsets[i] : offsets[i + 1]]``. Returns the ascending byte positions of every row's cuts
    (a cut at position c starts a piece at ``data[c]``): the cuts ``CUT`` finds in each row."""
    return _between_non_spaces(data, offsets, 10) + 1


def word_cuts(data: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """``WORD_CUT`` over many strings at once (as ``line_cuts``): the positions of spaces that start words."""
    return _between_non_spaces(data, offsets, 32)


def _between_non_spaces(data: np.ndarray, offsets: np.ndarray, byte: int) -> np.ndarray:
    """Positions of ``byte`` (an ASCII space character) with a non-space character on each side in its row."""
    at = np.flatnonzero(data == byte)
    row = np.searchsorted(offsets, at, side="right") - 1
    at = at[(at > offsets[row]) & (at + 1 < offsets[row + 1])]  # a character on each side
    return at[~_space_ending_at(data, at - 1) & ~_space_starting_at(data, at + 1)]


def _space_ending_at(data: np.ndarray, last: np.ndarray) -> np.ndarray:
    """Whether the character whose last byte is ``data[last]`` is a space (by its last 1, 2 or 3 bytes;
    bytes before a row's start can only make a non-space look like one, which only means no cut)."""
    byte = data[last].astype(np.int64)
    two = (data[np.maximum(last - 1, 0)].astype(np.int64) << 8) | byte
    three = (data[np.maximum(last - 2, 0)].astype(np.int64) << 16) | two
    return _ASCII_SPACE[byte] | np.isin(two, _WIDE_SPACE) | np.isin(three, _WIDE_SPACE)


def _space_starting_at(data: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Whether the character whose first byte is ``data[first]`` is a space."""
    end = data.size - 1
    byte = data[first].astype(np.int64)
    two = (byte << 8) | data[np.minimum(first + 1, end)]
    three = (two << 8) | data[np.minimum(first + 2, end)]
    wide = (byte >= 0xC2) & (np.isin(two, _WIDE_SPACE) | np.isin(three, _WIDE_SPACE))  # a lead byte only
    return _ASCII_SPACE[byte] | wide


def backend_of(tokenizer: Any) -> Any | None:
    """The Rust ``tokenizers.Tokenizer`` behind a fast tokenizer (transformers' or ``model.fast_tokenizer``),
    or None."""
    from tokenizers import Tokenizer

    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend if isinstance(backend, Tokenizer) else None


def cuts_at_lines(tokenizer: Any) -> bool:
    """Whether prompts for ``tokenizer`` may be cut at line starts (see the module's docstring)."""
    backend = backend_of(tokenizer)
    if backend is None:
        return False
    added = backend.get_added_tokens_decoder().values()
    if any("\n" in t.content or t.lstrip for t in added):
        return False
    spec = json.loads(backend.to_str())
    if not _safe(spec.get("normalizer"), _SAFE_NORMALIZERS) or not _safe_pre(spec.get("pre_tokenizer")):
        return False
    specials = [t.content for t in added][:4]
    return all(_encodes_cut(backend, before, after) for before in _BEFORE for after in (*_AFTER, *specials))


def cuts_at_words(tokenizer: Any) -> bool:
    """Whether lines for ``tokenizer`` may also be cut before words (see the module's docstring); only
    asked where ``cuts_at_lines`` holds."""
    backend = backend_of(tokenizer)
    added = backend.get_added_tokens_decoder().values()
    if any(" " in t.content or t.rstrip for t in added):
        return False
    pre = backend.pre_tokenizer
    for probe in _WORD_PROBES:
        ends = {end for _, (_, end) in pre.pre_tokenize_str(probe)}
        if any(m.start() not in ends for m in WORD_CUT.finditer(probe)):
            return False
    befores = ("x", "X.", "12", "don't", "é", "中", "x)", "#", "a\nb")
    afters = (" y", " Y", " 1", " 123", " .", " 's", " -x", " #", " é", " 中文", " \u0301a", " (x)", " <")
    specials = [f" {t.content}" for t in added][:4]
    return all(_encodes_cut(backend, before, after) for before in befores for after in (*afters, *specials))


def _safe(node: dict | None, kinds: set[str]) -> bool:
    if node is None:
        return True
    if node.get("type") == "Sequence":
        return all(_safe(n, kinds) for n in node.get("normalizers", []))
    return node.get("type") in kinds


def _safe_pre(node: dict | None) -> bool:
    if node is None:
        return False  # no pre-tokenizer: the model merges across anything
    if node.get("type") == "Sequence":
        children = node.get("pretokenizers", [])
        return bool(children) and all(_safe_pre(n) for n in children)
    if node.get("type") == "ByteLevel" and node.get("add_prefix_space", False):
        return False
    return node.get("type") in _SAFE_PRE_TOKENIZERS


def _encodes_cut(backend: Any, before: str, after: str) -> bool:
    def ids(text: str) -> list[int]:
        return backend.encode(text, add_special_tokens=False).ids

    return ids(before + after) == ids(before) + ids(after)


def special_ids(backend: Any) -> tuple[list[int], list[int]] | None:
    """The ids the tokenizer's post-processor puts before and after every text (BOS, EOS), when they
    are the same for every text; None when they are not (then texts are encoded whole)."""
    found = set()
    for probe in ("Hello world", "a\nb 12", "x"):
        plain = backend.encode(probe, add_special_tokens=False).ids
        full = backend.encode(probe, add_special_tokens=True).ids
        starts = [i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain]
        if len(starts) != 1:
            return None
        i = starts[0]
        found.add((tuple(full[:i]), tuple(full[i + len(plain) :])))
    if len(found) != 1:
        return None
    pre, post = found.pop()
    return list(pre), list(post)
