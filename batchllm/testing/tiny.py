"""Tiny random models (with the trained tokenizer of ``tiny_tokenizer``), for tests, benchmarks and the demo.

Nothing here downloads anything: the tokenizer is trained on a small built-in corpus and the models
are random, saved with `save_pretrained` so they load like any Hugging Face checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
)
from transformers.utils import logging as hf_logging

from batchllm.testing.tiny_tokenizer import EOS_TOKEN, IM_END, copy_tokenizer_files, train_tokenizer

logger = logging.getLogger(__name__)

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
# Mixture-of-experts and Gemma families: make_tiny_model builds them too; the demo offers FAMILIES.
MORE_FAMILIES = ("qwen2_moe", "qwen3_moe", "mixtral", "gemma3")

_CONFIG_CLASSES: dict[str, type[PretrainedConfig]] = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
    "qwen2_moe": Qwen2MoeConfig,
    "qwen3_moe": Qwen3MoeConfig,
    "mixtral": MixtralConfig,
    "gemma3": Gemma3TextConfig,
}
# Family settings on top of the shared shape; `inter` stands for make_tiny_model's intermediate_size.
_EXPERTS = {"num_experts": 4, "num_experts_per_tok": 2}
_FAMILY_DEFAULTS: dict[str, dict] = {
    "qwen2_moe": _EXPERTS | {"moe_intermediate_size": "inter/2", "shared_expert_intermediate_size": "inter"},
    "qwen3_moe": _EXPERTS | {"moe_intermediate_size": "inter/2", "norm_topk_prob": True},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": "inter/2"},
    "gemma3": {"sliding_window": 16, "query_pre_attn_scalar": 24},
}

# Init scales found by measuring greedy output on random prompts: prompt-dependent, varied text with
# EOS in roughly a quarter of 16-token continuations. A larger embedding than _EMBED_STD makes tied
# models repeat the last input token (its own logit e.e dominates); a larger _PROJ_GAIN makes the
# network more chaotic, so float32 rounding differences flip more near-tied argmaxes.
_EMBED_STD = 0.15
_PROJ_GAIN = 1.25
_EOS_ROW_SCALE = 1.4


def make_tiny_model(
    out_dir: Path,
    family: str,
    *,
    tokenizer_dir: Path | None = None,
    tie_word_embeddings: bool = False,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    head_dim: int | None = None,
    seed: int = 0,
    max_position_embeddings: int = 2048,
    config_overrides: dict | None = None,
) -> Path:
    """Save a random float32 model of `family` with a tokenizer to `out_dir` and return `out_dir`.

    The weights are drawn wider than Hugging Face's default init, so greedy decoding gives varied text
    that depends on the prompt (std 0.02 makes a tiny model repeat one token forever). `head_dim`
    defaults to hidden_size // num_heads; `config_overrides` go to the transformers config as they are.
    """
    if family not in FAMILIES + MORE_FAMILIES:
        known = ", ".join(FAMILIES + MORE_FAMILIES)
        raise ValueError(f"unknown model family {family!r}; choose one of {known}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is None:
        tokenizer = train_tokenizer(out_dir)
    else:
        copy_tokenizer_files(Path(tokenizer_dir), out_dir)
        tokenizer = AutoTokenizer.from_pretrained(out_dir)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    settings = _family_settings(family, intermediate_size, config_overrides)
    config = _CONFIG_CLASSES[family](
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim or hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        bos_token_id=tokenizer.bos_token_id,
        **settings,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _widen_init(model, eos_id)
    with _no_progress_bar():
        model.save_pretrained(out_dir, safe_serialization=True)
    _write_generation_config(out_dir, config, eos_ids=[eos_id, tokenizer.convert_tokens_to_ids(IM_END)])
    logger.debug("saved a random %s model (%d parameters) to %s", family, model.num_parameters(), out_dir)
    return out_dir


def _family_settings(family: str, intermediate_size: int, overrides: dict | None) -> dict:
    """Config settings beyond the shared shape: the family's defaults, then the caller's overrides."""
    settings = {"sliding_window": None}  # full attention unless the family or the caller says otherwise
    for key, value in (_FAMILY_DEFAULTS.get(family, {}) | (overrides or {})).items():
        sizes = {"inter": intermediate_size, "inter/2": intermediate_size // 2}
        settings[key] = sizes.get(value, value) if isinstance(value, str) else value
    settings.setdefault("intermediate_size", intermediate_size)
    return settings


@contextlib.contextmanager
def _no_progress_bar() -> Iterator[None]:
    """Silence transformers' "Writing model shards" bar (it clutters `batchllm demo`), then restore it."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


@torch.no_grad()
def _widen_init(model: PreTrainedModel, eos_id: int) -> None:
    """Redraw the weights so that greedy decoding depends on the prompt and does not loop at once.

    Projections get std _PROJ_GAIN/sqrt(fan_in); norm weights are drawn around 1 and biases are
    non-zero, so that a loader that drops a norm weight or a bias gives different tokens. Gemma's
    norms scale by (1 + weight), so theirs are drawn around 0. Stacked expert weights are
    [experts, out, in].
    """
    norm_offset = 1.0 if model.config.model_type.startswith("gemma") else 0.0
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.uniform_(0.5 - norm_offset, 1.5 - norm_offset)
        elif name.endswith(".bias"):
            param.normal_(0.0, 0.2)
        elif "embed_tokens" in name:
            param.normal_(0.0, _EMBED_STD)
        elif param.dim() in (2, 3):
            param.normal_(0.0, _PROJ_GAIN / param.shape[-1] ** 0.5)
    # Rows of the output layer with a larger norm win the argmax more often: make EOS one of them,
    # so that generation sometimes stops early and sometimes runs to max_new_tokens.
    model.get_output_embeddings().weight[eos_id] *= _EOS_ROW_SCALE


def _write_generation_config(out_dir: Path, config: PretrainedConfig, eos_ids: list[int]) -> None:
    generation = {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos_ids,
        "pad_token_id": config.pad_token_id,
        "do_sample": False,
    }
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
