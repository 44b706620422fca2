"""Decode attention (one new token per row), per row: each row reads its own context through its block
table. ``attend_rows`` is the inner loop the prefix-aware decode (``prefix_decode_attention.py``) shares."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from batchllm.kernels.metadata import AttentionMetadata
from batchllm.kernels.prefill_attention import (
    BLOCK_N,
    LOG2E,
    MIN_DOT,
    attend_paged_range,
    check_decode_inputs,
    kernel_window,
    needs_f32_dot,
)


@triton.jit
def attend_rows(
    q,  # [num_seqs, num_heads, head_dim]
    seqs,  # [M] int32, the row of each query row
    heads,  # [M] int32, the query head of each query row
    row_ok,  # [M] bool
    block_table,  # [max_blocks_per_seq] int32
    lo,
    hi,
    k_cache,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache,  # [num_blocks, block_size, num_kv_heads, head_dim]
    stride_qt, stride_qh, stride_cb, stride_cs, stride_ch, stride_cd, kv_head, qk_scale, window,
    M: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, F32_DOT: tl.constexpr,
):  # fmt: skip
    """Unnormalised attention of the given query rows over positions ``[lo, hi)`` of one block table
    (and within ``window`` of position ``hi - 1``)."""
    dims = tl.arange(0, D_PAD)
    mask = row_ok[:, None] & (dims < HEAD_DIM)[None, :]
    q_offs = (seqs.to(tl.int64) * stride_qt + heads.to(tl.int64) * stride_qh)[:, None] + dims[None, :]
    q_tile = tl.load(q + q_offs, mask=mask, other=0.0)
    acc = tl.zeros([M, D_PAD], tl.float32)
    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    last = tl.full([M], 0, tl.int32) + hi - 1
    return attend_paged_range(
        acc, m_i, l_i, q_tile, last, block_table, lo, hi, k_cache, v_cache,
        stride_cb, stride_cs, stride_ch, stride_cd, kv_head, qk_scale, window,
        HEAD_DIM, D_PAD, BLOCK_N, BLOCK_SIZE, F32_DOT,
    )  # fmt: skip


@triton.jit
def _decode_kernel(
    out,  # [num_seqs, num_heads, head_dim]
    q,  # [num_seqs, num_heads, head_dim]
    k_cache,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache,  # [num_blocks, block_size, num_kv_heads, head_dim]
    seq_lens,  # [num_seqs] int32
    block_tables,  # [num_seqs, max_blocks_per_seq] int32
    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
    stride_cb, stride_cs, stride_ch, stride_cd, qk_scale, window,
    QUERY_GROUP: tl.constexpr, OWN_M: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, F32_DOT: tl.constexpr,
):  # fmt: skip
    seq, kv_head = tl.program_id(0), tl.program_id(1)
    seq_len = tl.load(seq_lens + seq)
    rows = tl.arange(0, OWN_M)
    heads = kv_head * QUERY_GROUP + rows
    row_ok = rows < QUERY_GROUP
    table = block_tables + seq.to(tl.int64) * stride_bt
    lo = tl.maximum(seq_len - window, 0)
    acc, m_i, l_i = attend_rows(
        q, tl.full([OWN_M], 0, tl.int32) + seq, heads, row_ok, table, lo, seq_len,
        k_cache, v_cache, stride_qt, stride_qh, stride_cb, stride_cs, stride_ch, stride_cd, kv_head, qk_scale,
        window, OWN_M, HEAD_DIM, D_PAD, BLOCK_N, BLOCK_SIZE, F32_DOT,
    )  # fmt: skip
    dims = tl.arange(0, D_PAD)
    offs = (seq.to(tl.int64) * stride_ot + heads.to(tl.int64) * stride_oh)[:, None] + dims[None, :]
    mask = row_ok[:, None] & (dims < HEAD_DIM)[None, :]
    tl.store(out + offs, (acc / l_i[:, None]).to(out.dtype.element_ty), mask=mask)


def paged_decode_attention(
    q: torch.Tensor,  # [num_seqs, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    meta: AttentionMetadata,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:  # [num_seqs, num_heads, head_dim]
    """Per-row paged decode: each row reads its whole context (or its last ``window`` positions)
    on its own (the baseline)."""
    q = check_decode_inputs(q, k_cache, v_cache, meta)
    out = torch.empty_like(q)
    num_seqs, num_heads, head_dim = q.shape
    if num_seqs == 0:
        return out
    group = num_heads // k_cache.shape[2]
    _decode_kernel[(num_seqs, k_cache.shape[2])](
        out, q, k_cache, v_cache, meta.seq_lens, meta.block_tables,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), meta.block_tables.stride(0),
        *k_cache.stride(), scale * LOG2E, kernel_window(window),
        QUERY_GROUP=group, OWN_M=max(MIN_DOT, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        D_PAD=max(MIN_DOT, triton.next_power_of_2(head_dim)), BLOCK_N=BLOCK_N, BLOCK_SIZE=k_cache.shape[1],
        F32_DOT=needs_f32_dot(_decode_kernel, q.dtype),
    )  # fmt: skip
    return out
