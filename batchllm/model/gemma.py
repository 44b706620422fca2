"""Gemma 3's decoder layer and its embedding and logit scaling.

It differs from the Llama layer in its norms, not its attention: every norm scales by
(1 + weight), and the attention and MLP outputs are normed again before they join the residual::

    x = x + post_attn_norm(attn(input_norm(x)))
    x = x + post_ff_norm(mlp(pre_ff_norm(x)))

Sliding-window layers use a rope of their own theta (``rope_local_base_freq``); the attention scale
is ``query_pre_attn_scalar ** -0.5``; embeddings are multiplied by sqrt(hidden_size).
"""

from __future__ import annotations

import torch
from torch import nn

from batchllm.kernels.backend import AttentionBackend, KVCache
from batchllm.kernels.metadata import AttentionMetadata
from batchllm.model.config import ModelConfig
from batchllm.model.layers import MLP, Attention, make_norm


class GemmaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device, layer: int) -> None:
        super().__init__()
        size = config.hidden_size
        self.input_norm = make_norm(config, size, dtype, device)
        self.attn = Attention(config, dtype, device, layer)
        self.post_attn_norm = make_norm(config, size, dtype, device)
        self.pre_ff_norm = make_norm(config, size, dtype, device)
        self.mlp = MLP(config, dtype, device)
        self.post_ff_norm = make_norm(config, size, dtype, device)

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        cos_sin: tuple[torch.Tensor, torch.Tensor],  # each [T, 1, head_dim]
        kv_cache: KVCache,
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:  # [T, hidden]
        attn_out = self.post_attn_norm(self.attn(self.input_norm(x), cos_sin, kv_cache, meta, backend))
        h, x = self.pre_ff_norm.add_forward(x, attn_out)
        return x + self.post_ff_norm(self.mlp(h))


def scale_embeddings(config: ModelConfig, x: torch.Tensor) -> torch.Tensor:
    """Gemma multiplies embeddings by sqrt(hidden_size), rounded to the model dtype first."""
    if config.gemma is None:
        return x
    return x * torch.tensor(config.hidden_size**0.5, dtype=x.dtype, device=x.device)


def softcap_logits(config: ModelConfig, logits: torch.Tensor) -> torch.Tensor:
    """cap * tanh(logits / cap) where the config sets ``final_logit_softcapping``."""
    cap = config.gemma.final_logit_softcapping if config.gemma else None
    if cap is None:
        return logits
    return torch.tanh(logits / cap) * cap
