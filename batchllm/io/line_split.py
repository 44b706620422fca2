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
"""

from __future__ import annotations

import json
import re
from typing import Any

CUT = re.compile(r"(?<=\S\n)(?=\S)")  # a line start with a non-space character on each side of the newline
_SAFE_NORMALIZERS = {"NFC", "NFKC", "NFD", "NFKD", "Lowercase"}
_SAFE_PRE_TOKENIZERS = {"ByteLevel", "Split", "Digits"}
_BEFORE = ("x\n", "x.\n", "x:\n", "1\n", "'\n", "é\n", "a b\n", "\n\nx\n", "x)\n", " -\n", "中\n")
_AFTER = ("y", "Y", "1", "123", ".", "'s", "-x", "#", "<", "é", "中文", "\u0301a", "(x)")


def cut_lines(prompt: str) -> list[str]:
    """``prompt`` cut at every ``CUT``; the pieces joined give ``prompt`` back. ``str.split`` first, when
    every newline is a cut: the regex is ~30x slower on long prompts."""
    lines = prompt.split("\n")
    if all(line[:1] and not line[:1].isspace() for line in lines[1:]) and all(
        line[-1:] and not line[-1:].isspace() for line in lines[:-1]
    ):
        last = lines.pop()
        return [line + "\n" for line in lines] + [last] if last else [line + "\n" for line in lines]
    return CUT.split(prompt)


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
