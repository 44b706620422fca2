"""The reference attention backend in plain torch: runs on CPU and CUDA, no custom kernels.

Each call stores the new tokens' k/v into the paged cache, then attends every new token over
its sequence's whole context, read back from the cache through the block table::

    seq i:   cached (context_len) | new tokens (query_len)      new token j sits at context_len + j
    keys:    blocks block_tables[i, :ceil(seq_len / block_size)], trimmed to seq_len

With a sliding ``window``, the token at position p sees only positions p - window + 1 .. p.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from batchllm.kernels.backend import KVCache
from batchllm.kernels.decode_part import attend_split
from batchllm.kernels.kv_gather import KVGather, row_chunks
from batchllm.kernels.metadata import AttentionMetadata
from batchllm.kernels.torch_cascade import cascade_decode_attention
from batchllm.kernels.torch_chunked import chunked_attention
from batchllm.kernels.torch_prefill_cascade import prefill_cascade_attention, prefill_cascade_plan


class TorchAttention:
    """``deterministic``: batch-invariant chunked attention (``torch_chunked.py``) on the step's chunk
    plan; otherwise padded SDPA, bucketed by query length, and cascade decode in one-token steps."""

    name = "torch"

    def __init__(self, deterministic: bool = False) -> None:
        self.deterministic = deterministic
        self.gather = KVGather()  # one reusable copy of the K/V a layer reads, shared by all layers

    @property
    def wants_chunk_plan(self) -> bool:
        return self.deterministic

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
        """``forward`` for new tokens whose K/V are already in the cache."""
        k_cache, v_cache = kv_cache
        if window is not None and window >= meta.max_seq_len:
            window = None  # no row has outgrown it: the window changes nothing
        if meta.mixed_split is not None and window is None and meta.chunk_plan is None:
            return attend_split(self, q, kv_cache, meta, scale)
        if meta.chunk_plan is not None:
            return chunked_attention(q, k_cache, v_cache, meta.chunk_plan, scale, window)
        groups = meta.decode_groups
        # A window cuts each row's shared prefix at a different place: those rows read it on their own.
        if meta.one_token_each and window is None and groups is not None and any(groups.shared_blocks_cpu):
            return cascade_decode_attention(q, k_cache, v_cache, meta, scale, self.gather)
        if meta.one_token_each:
            return decode_attention(q, k_cache, v_cache, meta, scale, window, self.gather)
        plan = prefill_cascade_plan(meta, k_cache.shape[1]) if window is None else None
        if plan is None:
            return varlen_attention(q, k_cache, v_cache, meta, scale, window, self.gather)
        # Rows prefilling under a shared prefix read it once per group; the others as before.
        out = varlen_attention(q, k_cache, v_cache, meta, scale, None, self.gather, plan.other_rows)
        prefill_cascade_attention(q, k_cache, v_cache, plan, scale, self.gather, out)
        return out


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
    window: int | None = None,
    gather: KVGather | None = None,
    rows: Sequence[int] | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """General path (prefill, chunked prefill, mixed batches). Sequences are bucketed by query length
    (powers of two), so padding stays small when decode rows share a step with long prefill chunks;
    each bucket is one padded, masked SDPA. ``rows``: only these sequences' tokens are written."""
    out, gather = torch.empty_like(q), gather or KVGather()
    buckets: dict[int, list[int]] = {}
    for i in range(meta.num_seqs) if rows is None else rows:
        buckets.setdefault(max(meta.query_lens_cpu[i] - 1, 0).bit_length(), []).append(i)
    starts = [0, *itertools.accumulate(meta.query_lens_cpu)]
    for seqs in buckets.values():
        tokens = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in seqs]).to(q.device)
        out[tokens] = _padded_attention(q[tokens], k_cache, v_cache, meta, seqs, scale, window, gather)
    return out


def _padded_attention(
    q: torch.Tensor,  # [tokens of seqs, num_heads, head_dim], in seqs order
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    seqs: list[int],
    scale: float,
    window: int | None,
    gather: KVGather,
) -> torch.Tensor:
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group, dev, n = num_heads // kv_heads, q.device, len(seqs)
    q_lens = [meta.query_lens_cpu[i] for i in seqs]
    max_q, max_len = max(q_lens), max(meta.seq_lens_cpu[i] for i in seqs)
    index = torch.tensor(seqs, device=dev)
    query_lens = torch.tensor(q_lens, device=dev)
    seq_lens = meta.seq_lens.long()[index]
    # (row, j) of every real new token: scatter q into the padded batch and gather the output back.
    row_of = torch.repeat_interleave(torch.arange(n, device=dev), query_lens)
    j_of = torch.arange(q.shape[0], device=dev) - (torch.cumsum(query_lens, 0) - query_lens)[row_of]
    qp = q.new_zeros(n, max_q, num_heads, head_dim)
    qp[row_of, j_of] = q
    qp = (
        qp.reshape(n, max_q, kv_heads, group, head_dim)
        .permute(0, 2, 3, 1, 4)
        .reshape(n, kv_heads, -1, head_dim)
    )
    key_pos = torch.arange(max_len, device=dev)
    query_pos = (seq_lens - query_lens)[:, None] + torch.arange(max_q, device=dev)  # [n, max_q]
    mask = (key_pos <= query_pos[:, :, None]) & (key_pos < seq_lens[:, None, None])  # [n, max_q, max_len]
    if window is not None:
        mask &= key_pos > query_pos[:, :, None] - window
    mask = mask.repeat(1, group, 1)[:, None]  # [n, 1, group * max_q, max_len], rows ordered like qp
    table = meta.block_tables[index, : math.ceil(max_len / block_size)].long()
    outs = []
    for rows in row_chunks(n, max(max_len, max_q * group) * kv_heads * head_dim):
        keys = gather.context("k", k_cache, table[rows])[:, :, :max_len]  # [m, kv_heads, L, head_dim]
        values = gather.context("v", v_cache, table[rows])[:, :, :max_len]
        outs.append(F.scaled_dot_product_attention(qp[rows], keys, values, attn_mask=mask[rows], scale=scale))
    out = torch.cat(outs).reshape(n, kv_heads, group, max_q, head_dim).permute(0, 3, 1, 2, 4)
    return out.reshape(n, max_q, num_heads, head_dim)[row_of, j_of]


def decode_attention(
    q: torch.Tensor,  # [num_seqs, num_heads, head_dim], one new token per sequence
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    meta: AttentionMetadata,
    scale: float,
    window: int | None = None,
    gather: KVGather | None = None,
) -> torch.Tensor:  # [num_seqs, num_heads, head_dim]
    """Batched decode: pad every context to max_seq_len, mask by length (and window), one SDPA per
    row chunk."""
    gather = gather or KVGather()
    num_seqs, num_heads, head_dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    max_len = meta.max_seq_len
    table = meta.block_tables[:, : math.ceil(max_len / block_size)].long()
    # GQA without copying K/V per head: the q heads of one kv head act as its query rows.
    qg = q.reshape(num_seqs, kv_heads, num_heads // kv_heads, head_dim)
    key_pos = torch.arange(max_len, device=q.device)[None, :]
    mask = key_pos < meta.seq_lens[:, None]  # [num_seqs, max_len]
    if window is not None:
        mask &= key_pos >= meta.seq_lens[:, None] - window
    outs = []
    for rows in row_chunks(num_seqs, max_len * kv_heads * head_dim):
        keys = gather.context("k", k_cache, table[rows])[:, :, :max_len]  # [n, kv_heads, L, head_dim]
        values = gather.context("v", v_cache, table[rows])[:, :, :max_len]
        row_mask = mask[rows, None, None, :]  # [n, 1, 1, max_len]
        outs.append(F.scaled_dot_product_attention(qg[rows], keys, values, attn_mask=row_mask, scale=scale))
    return torch.cat(outs).reshape(num_seqs, num_heads, head_dim)
