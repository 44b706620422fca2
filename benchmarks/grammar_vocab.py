"""A synthetic byte-level BPE tokenizer with a vocabulary the size of Qwen2's (151,643 + 3 specials).

Used by `bench_grammar.py`. A grammar engine's mask cost depends on how the vocabulary splits into
tokens that can go inside a JSON string, that start or end one, that hold digits or punctuation, so
the vocabulary mixes what real 150k vocabularies hold: words with and without a leading space and
capitalised, 1-3 digit numbers, runs of punctuation (`":"`, `"},`) and indentation, words led by one
punctuation character (`"name`, `_id`), CJK characters and pairs (partial UTF-8 tokens arise as their
prefixes). As in GPT-4's and Qwen2's pre-tokenizer splits, no token has letters followed by
punctuation (`name":`) unless `glued` (a worst case: with such tokens most of the vocabulary can
end a JSON string, so masks inside strings depend on what follows). Every token's
prefix (one byte-level character shorter) is a token too, and merge `prefix + last char` builds it,
so the model is a valid BPE. Built in a few seconds, deterministic for a seed, no training corpus.
"""

from __future__ import annotations

import random
import string
from collections.abc import Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
SPECIALS = [EOS_TOKEN, "<|im_start|>", "<|im_end|>"]
QWEN2_REGULAR_TOKENS = 151_643
QWEN2_LOGITS_VOCAB = 152_064  # the model's padded embedding rows, more than the tokenizer has

_PUNCT = list('{}[]":,.-_/()') + [" ", "\n", "  ", "\t"]
_LEAD = ['"', "_", ".", "(", "/", "-", "'", "@", "$"]  # one non-letter may lead letters (cl100k/Qwen2 regex)
_PUNCT_RUNS = ['":', '",', '":"', '","', '"}', '"]', '"},', '":[', '"],', '":{', '"},{', "()", "{}", "[]"]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which `ByteLevel` uses."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(keep, chars)}


_B2U = _bytes_to_unicode()


def to_byte_level(text: str) -> str:
    """`text` as ByteLevel's printable characters (one per UTF-8 byte)."""
    return "".join(_B2U[b] for b in text.encode("utf-8"))


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 10)))


def _candidates(rng: random.Random, glued: bool) -> Iterator[str]:
    """Token texts (plain UTF-8), endless, in the mix described in the module docstring."""
    yield from (str(n) for n in range(1000))
    yield from (f"{n:02d}" for n in range(100))
    yield from (f"{n:03d}" for n in range(100))
    while True:
        kind = rng.random()
        word = _word(rng)
        if kind < 0.45:
            yield " " + word
        elif kind < 0.65:
            yield word
        elif kind < 0.72:
            yield rng.choice(["", " "]) + word.capitalize()
        elif kind < 0.80:
            yield word + rng.choice(_PUNCT_RUNS) if glued else rng.choice(_LEAD) + word
        elif kind < 0.86:
            yield rng.choice(["", " "]) + (
                rng.choice(_PUNCT_RUNS)
                if rng.random() < 0.1
                else "".join(rng.choices(_PUNCT, k=rng.randint(2, 4)))
            )
        elif kind < 0.88:
            yield "\n" + " " * rng.randint(1, 16)
        else:
            yield "".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(rng.randint(1, 2)))


def build_vocab(
    size: int, seed: int = 0, glued: bool = False
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """`size` byte-level tokens (the 256 bytes first) and the merges that build them."""
    tokens: dict[str, None] = dict.fromkeys(_B2U[b] for b in range(256))
    rng = random.Random(seed)
    for text in _candidates(rng, glued):
        chain = to_byte_level(text)
        for end in range(2, len(chain) + 1):  # every prefix is a token: the merges stay valid
            tokens.setdefault(chain[:end])
            if len(tokens) >= size:
                break
        if len(tokens) >= size:
            break
    ordered = sorted(tokens, key=len)  # a token's prefix gets its id (and merge rank) first
    vocab = {t: i for i, t in enumerate(ordered)}
    merges = [(t[:-1], t[-1]) for t in ordered if len(t) > 1]
    return vocab, merges


def build_tokenizer(
    size: int = QWEN2_REGULAR_TOKENS, seed: int = 0, glued: bool = False
) -> PreTrainedTokenizerFast:
    """A `PreTrainedTokenizerFast` over `build_vocab(size)` plus the special tokens (eos: <|endoftext|>)."""
    vocab, merges = build_vocab(size, seed, glued)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        additional_special_tokens=SPECIALS[1:],
    )
