"""Shared fixtures: a trained tokenizer, tiny random models of all families, rows with shared prefixes."""

from __future__ import annotations

import os

import torch

# Before anything imports triton: without a GPU, Triton kernels run in its interpreter on the CPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from batchllm.testing.tiny import make_tiny_model  # noqa: E402
from batchllm.testing.tiny_tokenizer import train_tokenizer  # noqa: E402

# family -> make_tiny_model arguments. Between them they cover tied and untied embeddings, GQA, MHA
# and MQA, qwen2's q/k/v biases and qwen3's q/k norms with head_dim != hidden_size / num_heads.
TINY_MODEL_SPECS: dict[str, dict] = {
    "llama": {"tie_word_embeddings": False, "num_kv_heads": 2, "seed": 0},
    "mistral": {"tie_word_embeddings": False, "num_kv_heads": 4, "seed": 1},
    "qwen2": {"tie_word_embeddings": True, "num_kv_heads": 2, "seed": 2},
    "qwen3": {"tie_word_embeddings": True, "num_kv_heads": 1, "head_dim": 32, "seed": 3},
}

_WORDS = (
    "the", "review", "product", "battery", "shipping", "price", "quality", "color", "size", "order",
    "great", "poor", "fast", "slow", "quiet", "noisy", "cheap", "sturdy", "broken", "fine", "and",
    "but", "with", "after", "before", "it", "was", "is", "not", "very", "a", "week", "day", "box",
)  # fmt: skip


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer (vocab 512, no BOS), trained once per test session."""
    out_dir = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> dict[str, Path]:
    """family -> directory of a tiny random float32 model (see TINY_MODEL_SPECS), sharing one tokenizer."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {
        family: make_tiny_model(root / family, family, tokenizer_dir=tokenizer_dir, **spec)
        for family, spec in TINY_MODEL_SPECS.items()
    }


@pytest.fixture(scope="session")
def tiny_model_bos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama whose tokenizer puts `<|bos|>` in front of every encoded text."""
    root = tmp_path_factory.mktemp("tiny_bos")
    train_tokenizer(root / "tokenizer", add_bos=True)
    return make_tiny_model(root / "model", "llama", tokenizer_dir=root / "tokenizer", seed=4)


def shared_prefix_rows(
    num_groups: int = 4,
    rows_per_group: int = 6,
    *,
    seed: int = 0,
    shuffle: bool = True,
    duplicates: int = 0,
    instruction_words: int = 40,
    group_words: int = 12,
    row_words: int = 3,
) -> list[str]:
    """Prompt texts with nested shared structure, deterministic from `seed`:

        [long instruction shared by all][group text shared by rows_per_group rows][short row text]

    `duplicates` extra rows repeat earlier rows exactly. Rows come grouped unless `shuffle`.
    """
    rng = random.Random(seed)
    instruction = _sentence(rng, instruction_words) + "\n"
    rows = []
    for group in range(num_groups):
        group_text = f"Group {group}: {_sentence(rng, group_words)}\n"
        # The index keeps row texts distinct, so only `duplicates` makes exact repeats.
        rows += [
            f"{instruction}{group_text}{_sentence(rng, row_words)} ({group}.{row})"
            for row in range(rows_per_group)
        ]
    rows += [rng.choice(rows) for _ in range(duplicates)]
    if shuffle:
        rng.shuffle(rows)
    return rows


def _sentence(rng: random.Random, num_words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(num_words)).capitalize() + "."


@pytest.fixture(scope="session")
def make_rows() -> Callable[..., list[str]]:
    """The `shared_prefix_rows` function, for tests that take it as a fixture."""
    return shared_prefix_rows
