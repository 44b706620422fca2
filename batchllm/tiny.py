"""Tiny random models and a trained byte-level BPE tokenizer, for tests, benchmarks and `batchllm demo`.

Nothing here downloads anything: the tokenizer is trained on a small built-in corpus and the models
are random, saved with `save_pretrained` so they load like any Hugging Face checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
)
from transformers.utils import logging as hf_logging

logger = logging.getLogger(__name__)

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
# Mixture-of-experts and Gemma families: make_tiny_model builds them too; the demo offers FAMILIES.
MORE_FAMILIES = ("qwen2_moe", "qwen3_moe", "mixtral", "gemma3")

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
BOS_TOKEN = "<|bos|>"

# Files that make up a saved tokenizer (transformers 5 writes the chat template to its own file).
_TOKENIZER_FILE_PREFIXES = ("tokenizer", "special_tokens", "chat_template", "added_tokens", "vocab", "merges")

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

_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Word lists for the built-in corpus: review-like sentences, plus invented brand names so that BPE
# keeps finding new merges even for vocabularies of several thousand tokens.
_OPENERS = ("I", "We", "My wife", "My son", "Our team", "The kids", "My friend", "Everyone")
_VERBS = ("bought", "ordered", "tried", "returned", "used", "received", "tested", "loved", "hated")
_ITEMS = (
    "blender", "headphones", "backpack", "kettle", "phone case", "lamp", "keyboard", "jacket",
    "coffee maker", "vacuum", "tent", "charger", "monitor", "water bottle", "chair", "book",
)  # fmt: skip
_QUALITIES = (
    "great", "terrible", "okay", "excellent", "disappointing", "sturdy", "flimsy", "beautiful",
    "noisy", "quiet", "comfortable", "cheap", "expensive", "reliable", "broken", "amazing",
)  # fmt: skip
_DETAILS = (
    "the battery lasts all day", "it broke after a week", "shipping was fast", "the price was fair",
    "customer service never answered", "the color faded quickly", "it works exactly as described",
    "the instructions were confusing", "it feels well made", "it arrived damaged",
    "I would buy it again", "I want a refund", "five stars from me", "one star, avoid it",
)  # fmt: skip
_SYLLABLES = (
    "ka", "lo", "mi", "zen", "tor", "vex", "ra", "ple", "qui", "dor", "bel", "nix", "sa", "tru",
    "gon", "fi", "mar", "lux", "ae", "on", "ix", "ul", "pra", "sto", "wen", "dy", "cor", "ber",
)  # fmt: skip


def default_corpus(num_sentences: int = 6000, seed: int = 0) -> list[str]:
    """Deterministic review-like sentences (with invented brand names and numbers)."""
    rng = random.Random(seed)
    return [_corpus_sentence(rng) for _ in range(num_sentences)]


def _corpus_sentence(rng: random.Random) -> str:
    brand = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))).capitalize()
    return (
        f"{rng.choice(_OPENERS)} {rng.choice(_VERBS)} the {brand} {rng.choice(_ITEMS)} "
        f"for ${rng.randint(5, 400)}. It is {rng.choice(_QUALITIES)} and {rng.choice(_DETAILS)}. "
        f"Rating: {rng.randint(1, 5)}/5."
    )


def train_tokenizer(
    out_dir: Path,
    corpus: Iterable[str] | None = None,
    vocab_size: int = 512,
    add_bos: bool = False,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer, save it to `out_dir` (Hugging Face layout) and return it.

    Special tokens: `<|endoftext|>` (eos and pad), `<|im_start|>`, `<|im_end|>` and, when `add_bos`,
    `<|bos|>`, which encoding then puts in front of every text (as Llama's tokenizer does). The
    vocabulary can come out smaller than `vocab_size` when the corpus runs out of merges.
    """
    special = [EOS_TOKEN, IM_START, IM_END] + ([BOS_TOKEN] if add_bos else [])
    if vocab_size < 256 + len(special):
        raise ValueError(f"vocab_size must be at least {256 + len(special)} (all bytes + specials)")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_texts(corpus), trainer=trainer)
    backend.post_processor = _post_processor(backend, add_bos)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        bos_token=BOS_TOKEN if add_bos else None,
        additional_special_tokens=[IM_START, IM_END],
    )
    tokenizer.chat_template = ("{{ bos_token }}" if add_bos else "") + _CHAT_TEMPLATE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    _check_tokenizer(out_dir, add_bos)
    return tokenizer


def _texts(corpus: Iterable[str] | None) -> Iterator[str]:
    yield from default_corpus() if corpus is None else corpus
    # The prompts used by the demo and tests use these words; make sure they get merges too.
    yield "Classify the sentiment of this review as positive or negative.\nReview: "
    yield "system user assistant\n"


def _post_processor(backend: Tokenizer, add_bos: bool) -> processors.PostProcessor:
    if not add_bos:
        return processors.ByteLevel(trim_offsets=False)
    bos_id = backend.token_to_id(BOS_TOKEN)
    return processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A:0",
        pair=f"{BOS_TOKEN} $A:0 {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )


def _check_tokenizer(out_dir: Path, add_bos: bool) -> None:
    """Reload from disk and check the things batchllm relies on; raise RuntimeError if one fails."""
    loaded = AutoTokenizer.from_pretrained(out_dir)
    if not loaded.is_fast:
        raise RuntimeError(f"tokenizer in {out_dir} did not load back as a fast tokenizer")
    text = "I bought the blender. It is great!"
    ids = loaded(text)["input_ids"]
    if (ids[0] == loaded.bos_token_id) != add_bos:
        raise RuntimeError(f"tokenizer in {out_dir}: bos placement wrong (add_bos={add_bos})")
    if loaded.decode(ids, skip_special_tokens=True) != text:
        raise RuntimeError(f"tokenizer in {out_dir} does not round-trip text")
    chat = loaded.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    if not chat.endswith(f"{IM_START}assistant\n"):
        raise RuntimeError(f"tokenizer in {out_dir}: chat template gave {chat!r}")


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

    The weights are drawn wider than Hugging Face's default init, so that greedy decoding gives
    varied text that depends on the prompt (the default std of 0.02 makes a tiny model repeat one
    token forever). `head_dim` defaults to hidden_size // num_heads. `config_overrides` go to the
    transformers config as they are (e.g. `sliding_window`, `layer_types`, `num_experts`).
    """
    if family not in FAMILIES + MORE_FAMILIES:
        known = ", ".join(FAMILIES + MORE_FAMILIES)
        raise ValueError(f"unknown model family {family!r}; choose one of {known}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is None:
        tokenizer = train_tokenizer(out_dir)
    else:
        _copy_tokenizer_files(Path(tokenizer_dir), out_dir)
        tokenizer = AutoTokenizer.from_pretrained(out_dir)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    settings = {"sliding_window": None}  # full attention unless the family or the caller says otherwise
    for key, value in (_FAMILY_DEFAULTS.get(family, {}) | (config_overrides or {})).items():
        sizes = {"inter": intermediate_size, "inter/2": intermediate_size // 2}
        settings[key] = sizes.get(value, value) if isinstance(value, str) else value
    settings.setdefault("intermediate_size", intermediate_size)
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


def _copy_tokenizer_files(src: Path, dst: Path) -> None:
    if not (src / "tokenizer.json").is_file():
        raise ValueError(f"{src} holds no tokenizer.json; train one with train_tokenizer() first")
    for path in src.iterdir():
        if path.is_file() and path.name.startswith(_TOKENIZER_FILE_PREFIXES):
            shutil.copy2(path, dst / path.name)


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
