"""Grammar constraints: specs, the compile cache, per-row matchers, batched masks and jump-forward."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from batchllm.engine.constraints import (
    GrammarCache,
    GrammarSpec,
    RowConstraint,
    allocate_bitmask,
    apply_mask,
    fill_mask,
)

LOGITS_VOCAB = 600  # wider than the 512-token tokenizer, as padded embeddings are

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "score": {"type": "number"},
        "active": {"type": "boolean"},
        "tier": {"enum": ["bronze", "silver", "gold"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    },
    "required": ["name", "age", "score", "active", "tier", "tags"],
    "additionalProperties": False,
}
JSON_SPEC = GrammarSpec("json_schema", json.dumps(SCHEMA))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path) -> PreTrainedTokenizerFast:
    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def cache(tokenizer: PreTrainedTokenizerFast) -> GrammarCache:
    return GrammarCache(tokenizer, vocab_size=LOGITS_VOCAB, threads=1)


def walk(row: RowConstraint, cache: GrammarCache, eos: int, seed: int, max_steps: int = 400) -> list[int]:
    """Generate under the constraint: forced tokens appended unsampled, else argmax of random logits
    under the mask. Returns the tokens without EOS."""
    gen = torch.Generator().manual_seed(seed)
    bitmask = cache.allocate_bitmask(1)
    out: list[int] = []
    for _ in range(max_steps):
        if row.is_done():
            return out
        forced = row.forced_tokens()
        for token in forced:
            assert row.accept(token), row.error
        out += forced
        if forced:
            continue
        logits = torch.randn(1, cache.vocab_size, generator=gen)
        assert fill_mask([row], bitmask)
        apply_mask(logits, bitmask)
        token = int(logits.argmax())
        assert row.accept(token), row.error
        if token == eos:
            return out
        out.append(token)
    raise AssertionError(f"no end after {max_steps} steps: {out}")


def allowed(bitmask: torch.Tensor, row: int, token: int) -> bool:
    return bool((int(bitmask[row, token // 32]) >> (token % 32)) & 1)


def test_spec_digest_is_stable_and_ignores_json_whitespace() -> None:
    spaced = GrammarSpec("json_schema", json.dumps(SCHEMA, indent=2))
    assert spaced.digest == JSON_SPEC.digest
    assert GrammarSpec("regex", "a+").digest == GrammarSpec("regex", "a+").digest
    assert GrammarSpec("regex", "a+").digest != GrammarSpec("grammar", "a+").digest
    with pytest.raises(ValueError, match="unknown grammar kind"):
        GrammarSpec("yaml", "a")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kind", "text"),
    [
        ("json_schema", "{not json"),
        ("json_schema", "[1, 2]"),
        ("json_schema", '{"type": "objectx"}'),
        ("regex", "a(b"),
        ("grammar", "start: undefined_rule\n"),
    ],
)
def test_invalid_spec_is_one_line_value_error(cache: GrammarCache, kind: str, text: str) -> None:
    spec = GrammarSpec(kind, text)  # type: ignore[arg-type]
    for _ in range(2):  # the second time from the cache of failures
        with pytest.raises(ValueError, match="^invalid ") as raised:
            cache.new_row(spec)
        assert "\n" not in str(raised.value)


def test_each_spec_compiles_once(tokenizer: PreTrainedTokenizerFast) -> None:
    cache = GrammarCache(tokenizer, threads=1)
    first = cache.compile(JSON_SPEC)
    assert cache.compile(GrammarSpec("json_schema", json.dumps(SCHEMA, indent=4))) is first
    cache.new_row(GrammarSpec("regex", "[0-9]+"))
    assert len(cache) == 2
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        GrammarCache(tokenizer, vocab_size=100)


@pytest.mark.parametrize("seed", range(4))
def test_random_walk_yields_valid_json(cache: GrammarCache, tokenizer, seed: int) -> None:
    row = cache.new_row(JSON_SPEC)
    text = tokenizer.decode(walk(row, cache, tokenizer.eos_token_id, seed))
    jsonschema.validate(json.loads(text), SCHEMA)
    assert row.can_stop() and row.error is None


@pytest.mark.parametrize("seed", range(3))
def test_random_walk_matches_regex(cache: GrammarCache, tokenizer, seed: int) -> None:
    pattern = r"[A-Z]{2}-[0-9]{3}( ok| not ok)?"
    row = cache.new_row(GrammarSpec("regex", pattern))
    text = tokenizer.decode(walk(row, cache, tokenizer.eos_token_id, seed))
    assert re.fullmatch(pattern, text), text


def test_lark_grammar_walk(cache: GrammarCache, tokenizer) -> None:
    grammar = 'start: "yes" | "no" | "maybe " NUM\nNUM: /[0-9]{1,2}/\n'
    row = cache.new_row(GrammarSpec("grammar", grammar))
    text = tokenizer.decode(walk(row, cache, tokenizer.eos_token_id, 0))
    assert re.fullmatch(r"yes|no|maybe [0-9]{1,2}", text), text


def test_forced_tokens_at_fixed_keys(cache: GrammarCache, tokenizer) -> None:
    row = cache.new_row(JSON_SPEC)
    forced = tokenizer.decode(row.forced_tokens())
    assert forced.startswith('{"name') and '{"name":"'.startswith(forced)
    for token in tokenizer.encode('{"name":"x"'):
        assert row.accept(token), row.error
    forced = tokenizer.decode(row.forced_tokens())
    assert forced.startswith(',"age') and ',"age":'.startswith(forced)


def test_eos_only_when_complete(cache: GrammarCache, tokenizer) -> None:
    eos, bitmask = tokenizer.eos_token_id, cache.allocate_bitmask(1)
    row = cache.new_row(GrammarSpec("regex", "ab[0-9]{2}"))
    for token in tokenizer.encode("ab1"):
        fill_mask([row], bitmask)
        assert not allowed(bitmask, 0, eos) and not row.can_stop()
        assert row.accept(token)
    assert not row.accept(eos) and row.error is not None and "\n" not in row.error
    row = cache.new_row(GrammarSpec("regex", "ab[0-9]{2}"))
    for token in tokenizer.encode("ab12"):
        assert row.accept(token)
    fill_mask([row], bitmask)
    assert row.can_stop() and row.is_done()
    assert [t for t in range(cache.vocab_size) if allowed(bitmask, 0, t)] == [eos]
    assert row.accept(eos) and row.error is None


def test_batch_mask_leaves_unconstrained_rows(cache: GrammarCache, tokenizer) -> None:
    rows = [None, cache.new_row(GrammarSpec("regex", "[0-9]+")), None, cache.new_row(JSON_SPEC)]
    bitmask = cache.allocate_bitmask(8)
    assert not fill_mask([None, None], bitmask)
    assert fill_mask(rows, bitmask)
    logits = torch.randn(4, LOGITS_VOCAB)
    before = logits.clone()
    apply_mask(logits, bitmask[:4])
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    digits = {tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)}
    kept = set(torch.isfinite(logits[1]).nonzero().flatten().tolist())
    assert digits <= kept and all(tokenizer.decode([t]).isdigit() for t in kept)
    assert not torch.isfinite(logits[1::2, len(tokenizer) :]).any()  # ids past the tokenizer: never


def test_apply_mask_matches_bits() -> None:
    gen = torch.Generator().manual_seed(0)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, 4), dtype=torch.int32, generator=gen)
    logits = torch.zeros(3, 100)
    apply_mask(logits, bitmask)
    expected = [[allowed(bitmask, r, t) for t in range(100)] for r in range(3)]
    assert torch.isfinite(logits).tolist() == expected
    with pytest.raises(ValueError, match="does not cover"):
        apply_mask(torch.zeros(3, 200), bitmask)
    assert allocate_bitmask(2, 33).shape == (2, 2)
