"""The model's own tokenizer, loaded the way transformers loads it."""

from __future__ import annotations

from pathlib import Path

from batchllm.errors import JobError
from batchllm.model.fast_tokenizer import FastTokenizer, plain_tokenizer_files
from batchllm.model.gguf_file import is_gguf


def load_tokenizer(model_path: Path):
    """The model's tokenizer: ``FastTokenizer`` where it gives transformers' ids exactly (no
    transformers import), else transformers' own."""
    if is_gguf(model_path):
        from batchllm.model.gguf import load_gguf_tokenizer

        return load_gguf_tokenizer(model_path)
    config = plain_tokenizer_files(model_path)
    if config is not None:
        try:
            return FastTokenizer(model_path, config)
        except Exception:  # a file tokenizers cannot read: transformers reports it below
            pass
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except Exception as exc:  # transformers raises many types for a missing/broken tokenizer
        raise JobError(f"cannot load the tokenizer from {model_path}: {exc}") from exc
    if not tokenizer.is_fast:
        raise JobError(f"the tokenizer in {model_path} has no fast (Rust) version; batchllm needs one")
    return tokenizer
