"""GGUF checkpoints (llama.cpp's format): the config from its metadata, its tensors dequantized into a
CausalLM, and the tokenizer and chat template it carries.

Names map GGUF -> HF -> our parameters (``loader.weight_targets``), so fused q/k/v and gate/up
slots are filled as for safetensors. llama.cpp's converter interleaves the two rotary halves of every
q/k head for the ``llama`` architecture (its rope pairs adjacent values); ``_unpermute`` undoes that,
as transformers' GGUF loader does. qwen2/qwen3 files are written unpermuted (NEOX rope).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from batchllm.errors import JobError
from batchllm.model.config import ModelConfig, RopeScaling
from batchllm.model.decoder import CausalLM
from batchllm.model.gguf_file import GgufHeader, TensorData, check_dequantizable, read_header
from batchllm.model.loader import _copy_into, weight_targets

logger = logging.getLogger(__name__)

# general.architecture -> (HF architecture, q/k rows permuted by llama.cpp)
_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", True),
    "qwen2": ("Qwen2ForCausalLM", False),
    "qwen3": ("Qwen3ForCausalLM", False),
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
ROPE_FREQS = "rope_freqs.weight"  # llama3-style rope: per-frequency divisors, stored as a tensor


def load_gguf_config(path: Path) -> ModelConfig:
    header = read_header(path)
    architecture, _ = _architecture(header)
    meta, names = _ArchMetadata(header), {t.name for t in header.tensors}
    if meta.get("expert_count"):
        raise JobError(f"{path.name}: mixture-of-experts GGUF models are not supported")
    hidden, heads = int(meta.need("embedding_length")), int(meta.need("attention.head_count"))
    kv_heads = meta.get("attention.head_count_kv", heads)
    if isinstance(kv_heads, list):
        raise JobError(f"{path.name}: per-layer head counts are not supported")
    head_dim = int(meta.get("attention.key_length", hidden // heads))
    rope_dim = int(meta.get("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise JobError(f"{path.name}: partial rotary embeddings ({rope_dim} of {head_dim}) are not supported")
    return ModelConfig(
        architecture=architecture,
        vocab_size=_vocab_size(header, meta),
        hidden_size=hidden,
        intermediate_size=int(meta.need("feed_forward_length")),
        num_layers=int(meta.need("block_count")),
        num_heads=heads,
        num_kv_heads=int(kv_heads),
        head_dim=head_dim,
        rms_norm_eps=float(meta.get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(meta.get("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(meta),
        max_position_embeddings=int(meta.need("context_length")),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names,
        eos_token_ids=_eos_token_ids(header.metadata),
        bos_token_id=header.metadata.get("tokenizer.ggml.bos_token_id"),
        o_proj_bias="blk.0.attn_output.bias" in names,
    )


def load_gguf_tokenizer(path: Path) -> Any:
    """The tokenizer and chat template the GGUF's metadata describes, built by transformers.

    ``PreTrainedTokenizerFast`` directly rather than ``AutoTokenizer``: the latter first parses the
    whole file with ``gguf.GGUFReader`` to pick a class, which takes seconds; the result is the same.
    """
    from transformers import PreTrainedTokenizerFast

    try:
        return PreTrainedTokenizerFast.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # transformers raises many types for a tokenizer it cannot build
        reason = " ".join(str(e).split())[:300]
        raise JobError(f"cannot build the tokenizer from {path.name}: {reason}") from e


@torch.no_grad()
def fill_from_gguf(model: CausalLM, config: ModelConfig, path: Path) -> None:
    """Dequantize every tensor of the file into ``model``, casting to the model's dtype on the way."""
    header = read_header(path)
    _, permuted = _architecture(header)
    check_dequantizable(header)
    params, targets, data = dict(model.named_parameters()), weight_targets(config), TensorData(path)
    loaded: set[str] = set()
    for tensor in header.tensors:
        if tensor.name == ROPE_FREQS:
            factors = data.dequantized(tensor).to(model.inv_freq)
            model.inv_freq = model.inv_freq / factors
            continue
        hf_name = hf_tensor_name(tensor.name)
        target = targets.get(hf_name or "")
        if hf_name is None or target is None:
            logger.debug("ignoring GGUF tensor %s", tensor.name)
            continue
        weight = data.dequantized(tensor)
        if permuted and ".self_attn.q_proj." in hf_name:
            weight = _unpermute(weight, config.num_heads)
        elif permuted and ".self_attn.k_proj." in hf_name:
            weight = _unpermute(weight, config.num_kv_heads)
        _copy_into(params[target.param], target, weight, tensor.name)
        loaded.add(hf_name)
    missing = sorted(set(targets) - loaded)
    if missing:
        raise JobError(f"{path.name} is missing weights: {', '.join(missing[:5])}")


def hf_tensor_name(gguf_name: str) -> str | None:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; None for unknown names."""
    stem, _, kind = gguf_name.rpartition(".")
    if stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{kind}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{kind}"
    return None


def _unpermute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's ``permute``: per head, rows [half, 2] (interleaved) back to [2, half]."""
    half = weight.shape[0] // num_heads // 2
    rest = weight.shape[1:]
    return weight.reshape(num_heads, half, 2, *rest).transpose(1, 2).reshape(weight.shape)


class _ArchMetadata:
    """The ``<architecture>.*`` keys of the metadata, read without the prefix."""

    def __init__(self, header: GgufHeader) -> None:
        self.header, self.prefix = header, header.architecture + "."

    def get(self, key: str, default: Any = None) -> Any:
        return self.header.metadata.get(self.prefix + key, default)

    def need(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise JobError(f"{self.header.path.name}: GGUF metadata has no {self.prefix + key}")
        return value


def _architecture(header: GgufHeader) -> tuple[str, bool]:
    name = header.architecture
    if name not in _ARCHITECTURES:
        raise JobError(
            f"unsupported GGUF architecture {name!r} in {header.path.name}; "
            f"batchllm reads GGUF models of: {', '.join(_ARCHITECTURES)}"
        )
    architecture, permuted = _ARCHITECTURES[name]
    if name == "llama" and "mistral" in str(header.metadata.get("general.name", "")).lower():
        architecture = "MistralForCausalLM"  # llama.cpp files Mistral under llama; same decoder
    return architecture, permuted


def _vocab_size(header: GgufHeader, meta: _ArchMetadata) -> int:
    embed = next((t for t in header.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise JobError(f"{header.path.name} has no token_embd.weight tensor")
    return int(meta.get("vocab_size", embed.shape[0]))


def _rope_scaling(meta: _ArchMetadata) -> RopeScaling | None:
    kind = meta.get("rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind == "linear":
        return (("factor", float(meta.need("rope.scaling.factor"))), ("rope_type", "linear"))
    return (("rope_type", str(kind)),)  # ModelConfig refuses it with the list of supported types


def _eos_token_ids(metadata: dict[str, Any]) -> tuple[int, ...]:
    """End of generation: the EOS token and, as llama.cpp does, end-of-turn/-message tokens."""
    keys = ("eos_token_id", "eot_token_id", "eom_token_id")
    ids = [metadata.get(f"tokenizer.ggml.{key}") for key in keys]
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))
