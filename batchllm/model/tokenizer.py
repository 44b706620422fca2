"""The model's own tokenizer, loaded the way transformers loads it."""

from __future__ import annotations

from pathlib import Path

from batchllm.errors import JobError
from batchllm.model.gguf_file import is_gguf


def load_tokenizer(model_path: Path):
    from transformers import AutoTokenizer

    if is_gguf(model_path):
        from batchllm.model.gguf import load_gguf_tokenizer

        return load_gguf_tokenizer(model_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except Exception as exc:  # transformers raises many types for a missing/broken tokenizer
        raise JobError(f"cannot load the tokenizer from {model_path}: {exc}") from exc
    if not tokenizer.is_fast:
        raise JobError(f"the tokenizer in {model_path} has no fast (Rust) version; batchllm needs one")
    return tokenizer
