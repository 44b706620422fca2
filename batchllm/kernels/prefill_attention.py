"""Paged prefill attention over a varlen batch of query chunks, plus the jit helpers decode reuses.

Sequence ``i`` owns the new tokens ``query_start_loc[i]:query_start_loc[i+1]`` at positions
``context_len .. seq_len-1``. ``store_kv`` has already written their K/V, so new token ``j``
attends over positions ``[0, context_len + j]``, all read through the block table::

    positions:  0 ........ context_len-1 | context_len ... context_len+j ... seq_len-1
                cached (any length, any   | new tokens: causal
                shared-prefix nesting)    |

One program covers one KV head and a tile of ``BLOCK_M`` query rows, a row being a pair
(new token, query head of that KV head): the GQA heads that share a KV head share each K/V tile.
Softmax is online and in base 2: scores are multiplied by ``scale * log2(e)`` once, then ``exp2``.
A sliding ``window`` limits new token ``j`` further to positions after ``context_len + j - window``;
tiles start at the window of their first token, so skipped blocks are never read.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from batchllm.kernels.kv_store import KV_DTYPES, kv_offsets
from batchllm.kernels.metadata import AttentionMetadata

LOG2E = math.log2(math.e)  # launchers fold it into the scale: kernels use exp2
PREFILL_BLOCK_M = 64
BLOCK_N = 64
MIN_DOT = 16  # tl.dot needs every dimension >= 16
NO_WINDOW = 1 << 30  # the kernels' window when there is none: longer than any sequence


def kernel_window(window: int | None) -> int:
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    return NO_WINDOW if window is None else min(window, NO_WINDOW)


@triton.jit
def dot_f32(a, b, F32_DOT: tl.constexpr):
    """``a @ b`` accumulated in float32.

    F32_DOT multiplies in float32 (IEEE): float32 inputs then stay exact instead of going through
    tf32, and it sidesteps the Triton interpreter's bfloat16 dot, which multiplies the raw bits.
    """
    if F32_DOT:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


@triton.jit
def attend_paged_range(
    acc,  # [BLOCK_M, D_PAD] float32, unnormalised output so far
    m_i,  # [BLOCK_M] float32, running max of the base-2 scores
    l_i,  # [BLOCK_M] float32, running softmax denominator
    q,  # [BLOCK_M, D_PAD] query rows
    last_pos,  # [BLOCK_M] int32, the last position each row may see (causal limit)
    block_table,  # [max_blocks_per_seq] int32, the block table row to read through
    lo,  # first position to attend
    hi,  # one past the last position to attend
    k_cache,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache,  # [num_blocks, block_size, num_kv_heads, head_dim]
    stride_cb,
    stride_cs,
    stride_ch,
    stride_cd,
    kv_head,
    qk_scale,  # softmax scale * log2(e)
    window,  # each row sees positions (last_pos - window, last_pos]
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    F32_DOT: tl.constexpr,
):
    """Online-softmax pass of ``q`` over positions ``[lo, hi)`` (each row up to its ``last_pos``,
    and no further back than its window)."""
    dims = tl.arange(0, D_PAD)
    dim_ok = dims < HEAD_DIM
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        in_range = pos < hi
        block_ids = tl.load(block_table + pos // BLOCK_SIZE, mask=in_range, other=0)
        offs = kv_offsets(
            block_ids, pos % BLOCK_SIZE, kv_head, dims, stride_cb, stride_cs, stride_ch, stride_cd
        )
        kv_mask = in_range[:, None] & dim_ok[None, :]
        k = tl.load(k_cache + offs, mask=kv_mask, other=0.0)  # [BLOCK_N, D_PAD]
        s = dot_f32(q, tl.trans(k), F32_DOT) * qk_scale  # [BLOCK_M, BLOCK_N]
        visible = in_range[None, :] & (pos[None, :] <= last_pos[:, None])
        visible = visible & (pos[None, :] > last_pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen nothing yet keeps m = -inf; shift by 0 so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache + offs, mask=kv_mask, other=0.0)  # [BLOCK_N, D_PAD]
        acc = acc * alpha[:, None] + dot_f32(p.to(v.dtype), v, F32_DOT)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _prefill_kernel(
    out,  # [num_tokens, num_heads, head_dim]
    q,  # [num_tokens, num_heads, head_dim]
    k_cache,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache,  # [num_blocks, block_size, num_kv_heads, head_dim]
    query_start_loc,  # [num_seqs + 1] int32
    seq_lens,  # [num_seqs] int32
    block_tables,  # [num_seqs, max_blocks_per_seq] int32
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_bt,
    stride_cb,
    stride_cs,
    stride_ch,
    stride_cd,
    qk_scale,
    window,
    QUERY_GROUP: tl.constexpr,  # query heads per KV head
    TOKENS_PER_TILE: tl.constexpr,  # BLOCK_M // QUERY_GROUP
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    F32_DOT: tl.constexpr,
):
    tile, seq, kv_head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(query_start_loc + seq)
    q_len = tl.load(query_start_loc + seq + 1) - q_start
    first = tile * TOKENS_PER_TILE
    if first < q_len:
        context_len = tl.load(seq_lens + seq) - q_len
        rows = tl.arange(0, BLOCK_M)
        tokens = first + rows // QUERY_GROUP
        heads = (kv_head * QUERY_GROUP + rows % QUERY_GROUP).to(tl.int64)
        row_ok = (rows < TOKENS_PER_TILE * QUERY_GROUP) & (tokens < q_len)
        dims = tl.arange(0, D_PAD)
        mask = row_ok[:, None] & (dims < HEAD_DIM)[None, :]
        flat = (q_start + tokens).to(tl.int64)
        q_offs = (flat * stride_qt + heads * stride_qh)[:, None] + dims[None, :]
        q_tile = tl.load(q + q_offs, mask=mask, other=0.0)

        acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        hi = context_len + tl.minimum(q_len, first + TOKENS_PER_TILE)
        lo = tl.maximum(context_len + first - window + 1, 0)  # the window of the tile's first token
        acc, m_i, l_i = attend_paged_range(
            acc, m_i, l_i, q_tile, context_len + tokens, block_tables + seq.to(tl.int64) * stride_bt,
            lo, hi, k_cache, v_cache, stride_cb, stride_cs, stride_ch, stride_cd, kv_head, qk_scale, window,
            HEAD_DIM, D_PAD, BLOCK_N, BLOCK_SIZE, F32_DOT,
        )  # fmt: skip
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_offs = (flat * stride_ot + heads * stride_oh)[:, None] + dims[None, :]
        tl.store(out + o_offs, o.to(out.dtype.element_ty), mask=mask)


def prefill_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    meta: AttentionMetadata,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Each new token attends causally over its sequence's context (cached + new, already stored),
    or over its last ``window`` positions."""
    check_paged_inputs(q, k_cache, v_cache, meta)
    q = q if q.stride(-1) == 1 else q.contiguous()
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    num_tokens, num_heads, head_dim = q.shape
    group = num_heads // k_cache.shape[2]
    block_m = max(PREFILL_BLOCK_M, triton.next_power_of_2(group))
    tokens_per_tile = block_m // group
    if num_tokens == 0:
        return out
    grid = (triton.cdiv(meta.max_query_len, tokens_per_tile), meta.num_seqs, k_cache.shape[2])
    _prefill_kernel[grid](
        out, q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), meta.block_tables.stride(0),
        *k_cache.stride(), scale * LOG2E, kernel_window(window),
        QUERY_GROUP=group, TOKENS_PER_TILE=tokens_per_tile, HEAD_DIM=head_dim,
        D_PAD=max(MIN_DOT, triton.next_power_of_2(head_dim)), BLOCK_M=block_m, BLOCK_N=BLOCK_N,
        BLOCK_SIZE=k_cache.shape[1], F32_DOT=needs_f32_dot(_prefill_kernel, q.dtype),
    )  # fmt: skip
    return out


def needs_f32_dot(kernel: object, dtype: torch.dtype) -> bool:
    """Whether ``kernel`` must multiply in float32 (see ``dot_f32``)."""
    interpreted = type(kernel).__name__ == "InterpretedFunction"
    return dtype == torch.float32 or (interpreted and dtype == torch.bfloat16)


def check_paged_inputs(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata
) -> None:
    """Raise ValueError unless q, the caches and ``meta`` fit together."""
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError(
            "k_cache and v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim] with the "
            f"same strides, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    _, _, num_kv_heads, head_dim = k_cache.shape
    if q.dim() != 3 or q.shape[2] != head_dim or q.shape[1] % num_kv_heads:
        raise ValueError(
            f"q must be [num_tokens, num_heads, {head_dim}] with num_heads a multiple of "
            f"num_kv_heads={num_kv_heads}, got {tuple(q.shape)}"
        )
    if not (q.dtype == k_cache.dtype == v_cache.dtype) or q.dtype not in KV_DTYPES:
        raise ValueError(
            f"q and the caches must share one dtype of {KV_DTYPES}, got {q.dtype} and {k_cache.dtype}"
        )
    if q.shape[0] != sum(meta.query_lens_cpu):
        raise ValueError(f"q has {q.shape[0]} tokens but the metadata schedules {sum(meta.query_lens_cpu)}")
    if meta.block_tables.dtype != torch.int32 or meta.block_tables.shape[0] != meta.num_seqs:
        raise ValueError(f"block_tables must be int32 [{meta.num_seqs}, max_blocks_per_seq]")
    if len({t.device for t in (q, k_cache, v_cache, meta.block_tables, meta.seq_lens)}) != 1:
        raise ValueError("q, the caches and the metadata tensors must be on one device")


def check_decode_inputs(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata
) -> torch.Tensor:
    """``check_paged_inputs``, and exactly one new token per sequence; q with a contiguous last dim."""
    check_paged_inputs(q, k_cache, v_cache, meta)
    if not meta.one_token_each or q.shape[0] != meta.num_seqs:
        raise ValueError("decode attention needs exactly one new token per sequence (max_query_len == 1)")
    return q if q.stride(-1) == 1 else q.contiguous()
