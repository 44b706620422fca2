"""The causal decoder shared by Llama, Mistral, Qwen2/3, their MoE variants and Gemma 3, and its
paged KV cache.

One forward runs a flat, varlen batch of new tokens from many sequences; attention goes
through an AttentionBackend that reads and writes the paged KV cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from batchllm.kernels.backend import AttentionBackend, KVCache
from batchllm.kernels.metadata import AttentionMetadata
from batchllm.model.config import ModelConfig
from batchllm.model.gemma import GemmaDecoderLayer, scale_embeddings, softcap_logits
from batchllm.model.layers import (
    MLP,
    Attention,
    RMSNorm,
    empty_param,
    make_norm,
    rope_cos_sin,
    rope_inv_freq,
)
from batchllm.model.moe import SparseMoE


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device, layer: int = 0) -> None:
        super().__init__()
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.attn = Attention(config, dtype, device, layer)
        self.post_attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.mlp: nn.Module = (
            SparseMoE(config, dtype, device) if config.is_sparse(layer) else MLP(config, dtype, device)
        )

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        cos_sin: tuple[torch.Tensor, torch.Tensor],  # each [T, 1, head_dim]
        kv_cache: KVCache,
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:  # [T, hidden]
        attn_out = self.attn(self.input_norm(x), cos_sin, kv_cache, meta, backend)
        h, x = self.post_attn_norm.add_forward(x, attn_out)
        return x + self.mlp(h)


class CausalLM(nn.Module):
    """Parameters start empty on ``device``; ``batchllm.model.loader.load_model`` fills them."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = empty_param(config.vocab_size, config.hidden_size, dtype=dtype, device=device)
        layer_class = GemmaDecoderLayer if config.gemma else DecoderLayer
        self.layers = nn.ModuleList(layer_class(config, dtype, device, i) for i in range(config.num_layers))
        self.norm = make_norm(config, config.hidden_size, dtype, device)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else empty_param(config.vocab_size, config.hidden_size, dtype=dtype, device=device)
        )
        # A plain attribute, not a buffer: it is computed, never loaded, and stays float32.
        self.inv_freq = rope_inv_freq(config).to(device)
        # Gemma's sliding-window layers rotate with a theta of their own.
        self.local_inv_freq = rope_inv_freq(config, local=True).to(device) if config.gemma else None

    @property
    def lm_head_weight(self) -> torch.Tensor:  # [vocab, hidden]
        return self.embed_tokens if self.lm_head is None else self.lm_head

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:  # [T, hidden], after the final norm
        x = scale_embeddings(self.config, F.embedding(input_ids, self.embed_tokens))
        cos_sin = rope_cos_sin(positions, self.inv_freq, x.dtype)
        local = cos_sin
        if self.local_inv_freq is not None:
            local = rope_cos_sin(positions, self.local_inv_freq, x.dtype)
        for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
            x = layer(x, cos_sin if self.config.window(i) is None else local, kv_cache, meta, backend)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, vocab] float32
        return softcap_logits(self.config, F.linear(hidden, self.lm_head_weight)).float()


def allocate_kv_caches(
    config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> list[KVCache]:
    """One (k_cache, v_cache) per layer, each [num_blocks, block_size, kv_heads, head_dim].

    Zero-filled, not empty: padded gathers read unused slots under a zero attention weight, and
    0 * NaN from uninitialised memory would still poison the output.
    """
    shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
    return [
        (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(config.num_layers)
    ]


def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes across all layers, K and V together."""
    element_size = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * element_size
