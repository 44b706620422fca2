"""The fixtures themselves: tokenizer, tiny models, the transformers reference, demo files, prompt rows."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import TINY_MODEL_SPECS
from hf_reference import hf_greedy, load_hf_model
from transformers import AutoTokenizer

from batchllm.testing.demo import DEMO_PREFIX, make_reviews, write_demo_job
from batchllm.testing.tiny import FAMILIES, make_tiny_model
from batchllm.testing.tiny_tokenizer import train_tokenizer

TEXTS = [
    "I bought the blender. It is great!",
    "  leading spaces, tabs\tand\nnewlines\n",
    "Unicode: café, naïve, 日本語, emoji 🙂",
    "<|endoftext|> looks special",
]


def _random_prompts(count: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(3, 30))] for _ in range(count)]


def test_tokenizer_round_trips_and_has_specials(tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert tok.is_fast
    assert len(tok) == 512
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert tok.bos_token is None
    for text in TEXTS[:3]:
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text
        assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == text
    assert len(tok("the sentiment of this review")["input_ids"]) < len("the sentiment of this review")
    assert tok(TEXTS[3])["input_ids"][0] == tok.eos_token_id  # special tokens in text are matched


def test_chat_template(tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    assert text == expected + "<|im_start|>assistant\n"
    no_prompt = tok.apply_chat_template(messages[1:], tokenize=False, add_generation_prompt=False)
    assert no_prompt == "<|im_start|>user\nHi<|im_end|>\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3


def test_bos_tokenizer_prepends_bos_once(tiny_model_bos: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_bos)
    assert tok.bos_token == "<|bos|>"
    ids = tok("hello there")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids, skip_special_tokens=True) == "hello there"
    # Like Llama's, the chat template writes the BOS itself: encode its text without special tokens.
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    chat_ids = tok(chat, add_special_tokens=False)["input_ids"]
    assert chat_ids[0] == tok.bos_token_id and chat_ids.count(tok.bos_token_id) == 1


def test_larger_vocab_and_bad_sizes(tmp_path: Path) -> None:
    assert len(train_tokenizer(tmp_path / "big", vocab_size=4096)) == 4096
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(tmp_path / "small", vocab_size=100)
    with pytest.raises(ValueError, match="unknown model family"):
        make_tiny_model(tmp_path / "m", "gpt2")


@pytest.mark.parametrize("family", FAMILIES)
def test_model_files_and_config(tiny_models: dict[str, Path], family: str) -> None:
    model_dir = tiny_models[family]
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = load_hf_model(model_dir)
    spec = TINY_MODEL_SPECS[family]
    assert (model_dir / "model.safetensors").is_file()
    assert model.config.model_type == family
    assert model.config.vocab_size == len(tok)
    assert model.config.tie_word_embeddings == spec["tie_word_embeddings"]
    assert model.config.num_key_value_heads == spec["num_kv_heads"]
    generation = json.loads((model_dir / "generation_config.json").read_text())
    eos_ids = [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>")]
    assert generation["eos_token_id"] == eos_ids


def test_qwen_specifics_are_kept(tiny_models: dict[str, Path]) -> None:
    qwen2 = load_hf_model(tiny_models["qwen2"])
    assert qwen2.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0  # random, not zero
    qwen3 = load_hf_model(tiny_models["qwen3"])
    assert qwen3.config.head_dim == 32 != qwen3.config.hidden_size // qwen3.config.num_attention_heads
    assert qwen3.model.layers[0].self_attn.q_norm.weight.std() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_output_is_varied(tiny_models: dict[str, Path], family: str) -> None:
    prompts = _random_prompts(20, vocab=512)
    outputs = hf_greedy(tiny_models[family], prompts, max_new_tokens=16, eos_token_ids=[])
    assert all(len(out) == 16 for out in outputs)
    assert len({tuple(out) for out in outputs}) >= 18
    assert all(len(set(out)) >= 3 for out in outputs)


def test_eos_stops_some_rows_but_not_all(tiny_models: dict[str, Path]) -> None:
    prompts = _random_prompts(20, vocab=512, seed=1)
    stopped = 0
    for model_dir in tiny_models.values():
        eos_ids = set(load_hf_model(model_dir).generation_config.eos_token_id)
        outputs = hf_greedy(model_dir, prompts, max_new_tokens=16)
        for out in outputs:
            assert 1 <= len(out) <= 16
            assert not eos_ids & set(out[:-1])  # generation ends at the first EOS, which is kept
        stopped += sum(out[-1] in eos_ids for out in outputs)
    assert 0 < stopped < len(prompts) * len(tiny_models) // 2


def test_hf_greedy_is_deterministic_and_prefix_consistent(tiny_models: dict[str, Path]) -> None:
    prompts = _random_prompts(3, vocab=512, seed=2)
    long = hf_greedy(tiny_models["llama"], prompts, max_new_tokens=12, eos_token_ids=[])
    short = hf_greedy(tiny_models["llama"], prompts, max_new_tokens=5, eos_token_ids=[])
    assert [out[:5] for out in long] == short


def test_same_seed_same_weights(tmp_path: Path, tokenizer_dir: Path) -> None:
    first = make_tiny_model(tmp_path / "a", "llama", tokenizer_dir=tokenizer_dir, seed=7)
    second = make_tiny_model(tmp_path / "b", "llama", tokenizer_dir=tokenizer_dir, seed=7)
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()


def test_demo_job_files(tmp_path: Path) -> None:
    job = write_demo_job(tmp_path, rows=30)
    table = pq.read_table(job.input_path)
    assert table.column_names == ["review_id", "text", "stars"]
    assert table.num_rows == 30
    assert len(set(table.column("review_id").to_pylist())) == 30
    assert all(1 <= s <= 5 for s in table.column("stars").to_pylist())
    assert job.prefix_path.read_text(encoding="utf-8") == DEMO_PREFIX
    assert not job.output_path.exists()
    assert load_hf_model(job.model_dir).config.model_type == "qwen2"
    with pytest.raises(ValueError, match="at least one row"):
        write_demo_job(tmp_path, rows=0)


def test_reviews_are_deterministic_with_duplicates() -> None:
    reviews = make_reviews(48)
    assert reviews == make_reviews(48)
    texts = [text for text, _ in reviews]
    assert 1 < len(set(texts)) < len(texts)


def test_make_rows_structure(make_rows) -> None:
    rows = make_rows(num_groups=3, rows_per_group=4, duplicates=2, shuffle=False, seed=5)
    assert rows == make_rows(num_groups=3, rows_per_group=4, duplicates=2, shuffle=False, seed=5)
    assert len(rows) == 14 and len(set(rows)) == 12
    instruction = rows[0].split("\n")[0]
    assert all(row.startswith(instruction + "\nGroup ") for row in rows)
    groups = [row.split("\n")[1] for row in rows[:12]]
    assert [len(set(groups[i : i + 4])) for i in range(0, 12, 4)] == [1, 1, 1]
    shuffled = make_rows(num_groups=3, rows_per_group=4, duplicates=2, seed=5)
    assert sorted(shuffled) == sorted(rows) and shuffled != rows
