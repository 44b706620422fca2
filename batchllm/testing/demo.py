"""Files for `batchllm demo`: a tiny random model, a Parquet file of product reviews and a shared prompt."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from rich.markup import escape
from rich.table import Table

from batchllm.config import EngineConfig, JobSpec, SamplingParams
from batchllm.testing.smollm2 import find_smollm2_gguf
from batchllm.testing.tiny import FAMILIES, make_tiny_model
from batchllm.testing.tiny_tokenizer import default_corpus, train_tokenizer

DEMO_PREFIX = "Classify the sentiment of this review as positive or negative.\nReview: "
# With a real chat model (SmolLM2-135M-Instruct) the prefix is the system message.
DEMO_SYSTEM = "Classify the sentiment of the customer review. Answer with one word: positive or negative."

_POSITIVE = (
    "Love it!", "Works great.", "Exactly what I needed.", "Fast shipping and well made.",
    "Would buy again.", "Best purchase this year.", "My kids love it.", "Sturdy and quiet.",
)  # fmt: skip
_NEGATIVE = (
    "Broke after a week.", "Do not buy.", "Cheap plastic, feels flimsy.", "Arrived damaged.",
    "Customer service never answered.", "Too noisy to use.", "Returned it the next day.",
)  # fmt: skip
_NEUTRAL = ("It is okay.", "Does the job.", "Nothing special.", "Fine for the price.")
_PRODUCTS = ("blender", "kettle", "backpack", "lamp", "keyboard", "tent", "charger", "headphones")
# Every so often a review repeats an earlier one word for word, as real review dumps do.
_DUPLICATE_RATE = 0.1


@dataclass(frozen=True)
class DemoJob:
    model_dir: Path
    input_path: Path  # Parquet: review_id (string), text (string), stars (int)
    prefix_path: Path  # the shared instruction put in front of every review
    output_path: Path  # where the demo run writes its results (not created here)
    chat: bool = False  # True with a real chat model: the prefix is its system message
    max_new_tokens: int = 24

    def spec(self) -> JobSpec:
        return JobSpec(
            input=self.input_path,
            model=str(self.model_dir),
            output=self.output_path,
            id_column="review_id",
            keep_columns=("stars",),
            prefix=self.prefix_path.read_text(encoding="utf-8"),
            chat=self.chat,
            sampling=SamplingParams(max_new_tokens=self.max_new_tokens),
            engine=EngineConfig(device="cpu"),
        )


def choose_demo_job(workdir: Path, rows: int = 48) -> tuple[DemoJob, str]:
    """SmolLM2-135M-Instruct's demo when its GGUF has been fetched, else the tiny random model's;
    with a line that says which."""
    gguf = find_smollm2_gguf()
    if gguf is not None:
        return write_real_demo_job(workdir, gguf, rows), f"{gguf.name} labels each review's sentiment."
    banner = (
        "a tiny model with RANDOM weights, so its outputs are noise;\n"
        "the point is to see the pipeline run end to end with nothing to download."
    )
    return write_demo_job(workdir, rows), banner


def write_real_demo_job(workdir: Path, gguf: Path, rows: int = 48) -> DemoJob:
    """The demo reviews for a real chat model (a GGUF file): a one-word sentiment label per review."""
    if rows < 1:
        raise ValueError(f"the demo needs at least one row, got rows={rows}")
    input_path, prefix_path = _write_reviews(Path(workdir), rows, DEMO_SYSTEM)
    output_path = Path(workdir) / "reviews_out.parquet"
    return DemoJob(gguf, input_path, prefix_path, output_path, chat=True, max_new_tokens=4)


def preview(output: Path, rows: int = 5) -> Table:
    """The first rows of a demo output, as a table to print."""
    table = Table(title=f"first rows of {output.name}")
    columns = ["id", "output", "prompt_tokens", "cached_tokens", "finish_reason"]
    for name in columns:
        table.add_column(name, no_wrap=True)
    for row in pq.read_table(output, columns=columns).slice(0, rows).to_pylist():
        table.add_row(*(escape(repr(row[c])[:40] if c == "output" else str(row[c])) for c in columns))
    return table


def write_demo_job(workdir: Path, rows: int = 48, family: str = "qwen2") -> DemoJob:
    """Write a tiny model, a reviews file and a prompt prefix under `workdir` (deterministic)."""
    if rows < 1:
        raise ValueError(f"the demo needs at least one row, got rows={rows}")
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    reviews = make_reviews(rows)
    texts = [text for text, _ in reviews]

    tokenizer_dir = workdir / "tokenizer"
    train_tokenizer(tokenizer_dir, corpus=default_corpus(2000) + texts + [DEMO_PREFIX])
    model_dir = make_tiny_model(
        workdir / "model", family, tokenizer_dir=tokenizer_dir, tie_word_embeddings=True
    )

    input_path, prefix_path = _write_reviews(workdir, rows, DEMO_PREFIX)
    return DemoJob(model_dir, input_path, prefix_path, workdir / "reviews_out.parquet")


def _write_reviews(workdir: Path, rows: int, prefix: str) -> tuple[Path, Path]:
    """reviews.parquet and prompt.txt under ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    reviews = make_reviews(rows)
    input_path = workdir / "reviews.parquet"
    table = pa.table(
        {
            "review_id": pa.array([f"rev-{i:04d}" for i in range(rows)], pa.string()),
            "text": pa.array([text for text, _ in reviews], pa.string()),
            "stars": pa.array([stars for _, stars in reviews], pa.int64()),
        }
    )
    pq.write_table(table, input_path)
    prefix_path = workdir / "prompt.txt"
    prefix_path.write_text(prefix, encoding="utf-8")
    return input_path, prefix_path


def make_reviews(rows: int, seed: int = 0) -> list[tuple[str, int]]:
    """`rows` short (text, stars) product reviews from templates, with some exact duplicates."""
    rng = random.Random(seed)
    reviews: list[tuple[str, int]] = []
    for _ in range(rows):
        if reviews and rng.random() < _DUPLICATE_RATE:
            reviews.append(rng.choice(reviews))
        else:
            reviews.append(_review(rng))
    return reviews


def _review(rng: random.Random) -> tuple[str, int]:
    stars = rng.randint(1, 5)
    phrases = _POSITIVE if stars >= 4 else _NEGATIVE if stars <= 2 else _NEUTRAL
    product = rng.choice(_PRODUCTS)
    sentences = rng.sample(phrases, k=rng.randint(1, 2))
    return f"The {product}: {' '.join(sentences)}", stars
