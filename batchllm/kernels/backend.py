"""The attention backend protocol and how one is chosen."""

from __future__ import annotations

from typing import Protocol

import torch

from batchllm.kernels.metadata import AttentionMetadata

# (k_cache, v_cache), each [num_blocks, block_size, kv_heads, head_dim]
KVCache = tuple[torch.Tensor, torch.Tensor]


class AttentionBackend(Protocol):
    name: str
    wants_chunk_plan: bool  # the step's metadata should carry a ChunkPlan

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: KVCache,
        meta: AttentionMetadata,
        scale: float,
        window: int | None = None,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """Store k/v of the new tokens at ``meta.slot_mapping``, then attend each new token
        causally over its sequence's whole context (cached + new); with a sliding ``window``, over
        its last ``window`` positions only (itself included)."""
        ...
