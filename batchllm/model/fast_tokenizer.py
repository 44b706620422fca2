"""A model's ``tokenizer.json`` run by the ``tokenizers`` library directly, without importing transformers.

Importing transformers' tokenizer classes costs seconds at start-up; encoding and decoding need only
the Rust tokenizer the file describes. ``FastTokenizer`` is used where it gives transformers' ids
exactly, which is decided from the files alone (``plain_tokenizer_files``): a ``tokenizer.json``; a
model type and tokenizer class whose transformers tokenizer loads that file unchanged; no
``add_bos_token``/``add_eos_token`` override of its post-processor; no clean-up of decoded spaces (or
a BPE model, where transformers skips it). Anything else it is asked for (a chat template's rendering,
a grammar's vocabulary) goes to the transformers tokenizer, built on first use (``hf``), the same
object ``AutoTokenizer`` gives today.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

# transformers picks the tokenizer class from config.json's model_type too, and some families' classes
# rebuild parts of tokenizer.json (Qwen2's splits digits one by one): only these are known to keep it.
PLAIN_MODEL_TYPES = frozenset({"llama", "mistral"})
# Classes whose transformers tokenizer is tokenizer.json as is (their defaults add nothing).
PLAIN_CLASSES = frozenset(
    {"PreTrainedTokenizerFast", "TokenizersBackend", "GPT2Tokenizer", "GPT2TokenizerFast",
     "Qwen2Tokenizer", "Qwen2TokenizerFast"}
)  # fmt: skip
_OVERRIDES = ("add_bos_token", "add_eos_token", "add_prefix_space")
_CLEAN_UP = "clean_up_tokenization_spaces"


def plain_tokenizer_files(model_path: Path) -> dict[str, Any] | None:
    """The tokenizer config when ``FastTokenizer`` reproduces transformers on this model, else None."""
    config_file = model_path / "tokenizer_config.json"
    if not (model_path / "tokenizer.json").is_file() or not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if config.get("tokenizer_class") not in PLAIN_CLASSES or any(k in config for k in _OVERRIDES):
        return None
    if _model_type(model_path) not in PLAIN_MODEL_TYPES:
        return None
    if not isinstance(config.get("chat_template", ""), str):  # named templates: transformers picks
        return None
    return _with_special_tokens_map(model_path, config)


def _model_type(model_path: Path) -> str | None:
    try:
        return json.loads((model_path / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def _with_special_tokens_map(model_path: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """Special tokens written to ``special_tokens_map.json`` count where the config names none."""
    file = model_path / "special_tokens_map.json"
    if not file.is_file():
        return config
    try:
        extra = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return {**extra, **config}


class FastTokenizer:
    """The subset of transformers' tokenizer interface that batchllm calls on every run."""

    is_fast = True

    def __init__(self, model_path: Path, config: dict[str, Any]) -> None:
        self.path = model_path
        self.backend_tokenizer = Tokenizer.from_file(str(model_path / "tokenizer.json"))
        self.backend_tokenizer.no_padding()
        self.backend_tokenizer.no_truncation()
        self.config = config
        self.chat_template = _chat_template(model_path, config)
        self.eos_token_id = self._special_id("eos_token")
        self.bos_token_id = self._special_id("bos_token")
        self._clean_up = bool(config.get(_CLEAN_UP, False))
        if self._clean_up and type(self.backend_tokenizer.model).__name__ == "BPE":
            self._clean_up = bool(config.get(f"{_CLEAN_UP}_for_bpe_even_though_it_will_corrupt_output"))
        self._hf = None

    @property
    def hf(self):
        """transformers' tokenizer for this model (imports transformers on first use)."""
        if self._hf is None:
            from transformers import AutoTokenizer

            self._hf = AutoTokenizer.from_pretrained(self.path)
        return self._hf

    def __call__(self, text: str | list[str], add_special_tokens: bool = True, **unused: Any) -> dict:
        """``{"input_ids": ids}`` for one text, or a list of id lists for a list of texts."""
        if isinstance(text, str):
            return {"input_ids": self.encode(text, add_special_tokens)}
        encodings = self.backend_tokenizer.encode_batch(text, add_special_tokens=add_special_tokens)
        return {"input_ids": [e.ids for e in encodings]}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if self._clean_up:
            return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)
        ids = [ids] if isinstance(ids, int) else list(ids)
        return self.backend_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return self.backend_tokenizer.token_to_id(token)

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def apply_chat_template(self, *args: Any, **kwargs: Any):
        return self.hf.apply_chat_template(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # anything else: transformers' own tokenizer
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.hf, name)

    def _special_id(self, name: str) -> int | None:
        token = self.config.get(name)
        if isinstance(token, dict):  # an AddedToken written out
            token = token.get("content")
        return self.backend_tokenizer.token_to_id(token) if isinstance(token, str) else None


def _chat_template(model_path: Path, config: dict[str, Any]) -> str | None:
    """The template transformers would give: ``chat_template.jinja`` first, else the config's entry."""
    jinja = model_path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = config.get("chat_template")
    return template if isinstance(template, str) else None
