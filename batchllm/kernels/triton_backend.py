"""The Triton attention backend: store the new K/V, then the kernel that fits the step."""

from __future__ import annotations

import torch

from batchllm.kernels.backend import KVCache
from batchllm.kernels.decode_attention import paged_decode_attention
from batchllm.kernels.decode_part import attend_split
from batchllm.kernels.kv_store import store_kv
from batchllm.kernels.metadata import AttentionMetadata
from batchllm.kernels.prefill_attention import prefill_attention
from batchllm.kernels.prefix_decode_attention import prefix_decode_attention


class TritonAttention:
    """AttentionBackend on Triton kernels.

    Steps with any query longer than one token run the paged prefill kernel (decode rows in such a
    step are just queries of length 1). Pure decode steps run the prefix-aware decode kernel when
    the step carries ``decode_groups``, else plain per-row paged decode. A sliding window that some
    row has outgrown cuts each row's shared prefix at a different place, so such steps decode per row.
    """

    name = "triton"
    wants_chunk_plan = False

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
        k_cache, v_cache = kv_cache
        if k.shape[0] != q.shape[0]:
            raise ValueError(f"q has {q.shape[0]} tokens but k has {k.shape[0]}")
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        return self.attend(q, kv_cache, meta, scale, window)

    def attend(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        kv_cache: KVCache,
        meta: AttentionMetadata,
        scale: float,
        window: int | None = None,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """``forward`` for new tokens whose K/V are already in the cache (``kernels.rope_store``)."""
        k_cache, v_cache = kv_cache
        if window is not None and window >= meta.max_seq_len:
            window = None  # no row has outgrown it: the window changes nothing
        if meta.mixed_split is not None and window is None:
            return attend_split(self, q, kv_cache, meta, scale)
        if not meta.one_token_each:
            return prefill_attention(q, k_cache, v_cache, meta, scale, window)
        if meta.decode_groups is not None and window is None:
            return prefix_decode_attention(q, k_cache, v_cache, meta, scale)
        return paged_decode_attention(q, k_cache, v_cache, meta, scale, window)
