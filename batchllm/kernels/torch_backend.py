"""The reference attention backend in plain torch: runs on CPU and CUDA, no custom kernels.

Each call stores the new tokens' k/v into the paged cache, then attends every new token over
its sequence's whole context, read back from the cache through the block table::

    seq i:   cached (context_len) | new tokens (query_len)      new token j sits at context_len + j
    keys:    blocks block_tables[i, :ceil(seq_len / block_size)], trimmed to seq_len
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from batchllm.kernels.backend import KVCache
from batchllm.kernels.metadata import AttentionMetadata

# Elements of K gathered at once in the decode path; bounds its padded copy of the context.
_DECODE_GATHER_ELEMENTS = 1 << 27


class TorchAttention:
    name = "torch"

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: KVCache,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        k_cache, v_cache = kv_cache
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.is_decode:
            return decode_attention(q, k_cache, v_cache, meta, scale)
        return varlen_attention(q, k_cache, v_cache, meta, scale)


def store_kv(
    k: torch.Tensor,  # [num_tokens, kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64
) -> None:
    slots = k_cache.shape[0] * k_cache.shape[1]
    k_cache.view(slots, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(slots, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def varlen_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """General path (prefill, chunked prefill, mixed batches): one SDPA per sequence."""
    outs = []
    start = 0
    for i, (query_len, seq_len) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu, strict=True)):
        if query_len == 0:
            continue
        table = meta.block_tables[i, : math.ceil(seq_len / k_cache.shape[1])]
        keys = k_cache[table].flatten(0, 1)[:seq_len]  # [seq_len, kv_heads, head_dim]
        values = v_cache[table].flatten(0, 1)[:seq_len]
        outs.append(_causal_sdpa(q[start : start + query_len], keys, values, seq_len - query_len, scale))
        start += query_len
    return torch.cat(outs) if outs else q.new_empty(q.shape)


def _causal_sdpa(
    q: torch.Tensor,  # [query_len, num_heads, head_dim]
    keys: torch.Tensor,  # [seq_len, kv_heads, head_dim]
    values: torch.Tensor,  # [seq_len, kv_heads, head_dim]
    context_len: int,
    scale: float,
) -> torch.Tensor:  # [query_len, num_heads, head_dim]
    query_len, seq_len = q.shape[0], keys.shape[0]
    group = q.shape[1] // keys.shape[1]
    qh = q.transpose(0, 1)[None]  # [1, heads, query_len, head_dim]
    kh = keys.transpose(0, 1).repeat_interleave(group, dim=0)[None]  # [1, heads, seq_len, head_dim]
    vh = values.transpose(0, 1).repeat_interleave(group, dim=0)[None]
    if context_len == 0:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
    elif query_len == 1:  # the last position sees everything
        out = F.scaled_dot_product_attention(qh, kh, vh, scale=scale)
    else:
        key_pos = torch.arange(seq_len, device=q.device)
        query_pos = torch.arange(context_len, seq_len, device=q.device)
        mask = key_pos[None, :] <= query_pos[:, None]  # [query_len, seq_len]
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
    return out[0].transpose(0, 1)


def decode_attention(
    q: torch.Tensor,  # [num_seqs, num_heads, head_dim], one new token per sequence
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [num_seqs, num_heads, head_dim]
    """Batched decode: pad every context to max_seq_len, mask by length, one SDPA per row chunk."""
    num_seqs, num_heads, head_dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    max_len = meta.max_seq_len
    table = meta.block_tables[:, : math.ceil(max_len / block_size)].long()
    # GQA without copying K/V per head: the q heads of one kv head act as its query rows.
    qg = q.reshape(num_seqs, kv_heads, num_heads // kv_heads, head_dim)
    mask = torch.arange(max_len, device=q.device)[None, :] < meta.seq_lens[:, None]  # [num_seqs, max_len]
    rows = max(1, _DECODE_GATHER_ELEMENTS // (max_len * kv_heads * head_dim))
    outs = []
    for lo in range(0, num_seqs, rows):
        hi = min(lo + rows, num_seqs)
        keys = k_cache[table[lo:hi]].flatten(1, 2)[:, :max_len].transpose(1, 2)  # [n, kv_heads, L, head_dim]
        values = v_cache[table[lo:hi]].flatten(1, 2)[:, :max_len].transpose(1, 2)
        row_mask = mask[lo:hi, None, None, :]  # [n, 1, 1, max_len]
        outs.append(F.scaled_dot_product_attention(qg[lo:hi], keys, values, attn_mask=row_mask, scale=scale))
    return torch.cat(outs).reshape(num_seqs, num_heads, head_dim)
