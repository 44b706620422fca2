"""Write the new tokens' K and V into their paged cache slots.

Token ``t`` goes to slot ``slot_mapping[t] = block * block_size + offset``, i.e. to
``cache[block, offset]``. ``kv_offsets`` is the one place that turns (block, offset, head, dim)
into an element offset; the attention kernels read the cache through it too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

KV_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def kv_offsets(block_ids, in_block, kv_heads, dims, stride_b, stride_s, stride_h, stride_d):
    """Element offsets ``[N, D_PAD]`` (int64) of cache entries.

    block_ids, in_block, kv_heads: [N]; dims: [D_PAD]. The products are taken in int64: a block id
    times the block stride passes 2**31 in caches of a few GiB.
    """
    row = block_ids.to(tl.int64) * stride_b + in_block.to(tl.int64) * stride_s
    row += kv_heads.to(tl.int64) * stride_h
    return row[:, None] + dims.to(tl.int64)[None, :] * stride_d


@triton.jit
def _store_kv_kernel(
    k,  # [num_tokens, num_kv_heads, head_dim]
    v,  # [num_tokens, num_kv_heads, head_dim]
    k_cache,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping,  # [num_tokens] int64
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cb,
    stride_cs,
    stride_ch,
    stride_cd,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    H_PAD: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, H_PAD)
    dims = tl.arange(0, D_PAD)
    mask = (heads < NUM_KV_HEADS)[:, None] & (dims < HEAD_DIM)[None, :]
    src = heads.to(tl.int64)[:, None]
    k_tile = tl.load(k + token * stride_kt + src * stride_kh + dims[None, :], mask=mask)
    v_tile = tl.load(v + token * stride_vt + src * stride_vh + dims[None, :], mask=mask)

    slot = tl.load(slot_mapping + token).to(tl.int64)
    block = tl.full([H_PAD], 0, tl.int64) + slot // BLOCK_SIZE
    dst = kv_offsets(block, slot % BLOCK_SIZE, heads, dims, stride_cb, stride_cs, stride_ch, stride_cd)
    tl.store(k_cache + dst, k_tile, mask=mask)
    tl.store(v_cache + dst, v_tile, mask=mask)


def store_kv(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64
) -> None:
    """Write ``k``/``v`` into the caches in place at ``slot_mapping``."""
    _check_store_inputs(k, v, k_cache, v_cache, slot_mapping)
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    k, v = _last_dim_contiguous(k), _last_dim_contiguous(v)
    _store_kv_kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        *k_cache.stride(),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        H_PAD=triton.next_power_of_2(num_kv_heads),
        D_PAD=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=k_cache.shape[1],
    )


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_store_inputs(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            "k_cache and v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim], "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache and v_cache must have the same strides")
    if k.dim() != 3 or k.shape != v.shape or k.shape[1:] != k_cache.shape[2:]:
        raise ValueError(
            f"k and v must be [num_tokens, {k_cache.shape[2]}, {k_cache.shape[3]}] to match the cache, "
            f"got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if not (k.dtype == v.dtype == k_cache.dtype == v_cache.dtype) or k.dtype not in KV_DTYPES:
        raise ValueError(
            f"k, v and the caches must share one dtype of {KV_DTYPES}, got {k.dtype}, {v.dtype}, "
            f"{k_cache.dtype}, {v_cache.dtype}"
        )
    if slot_mapping.shape != (k.shape[0],) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"slot_mapping must be an integer tensor of shape [{k.shape[0]}], "
            f"got {slot_mapping.dtype} {tuple(slot_mapping.shape)}"
        )
    if len({t.device for t in (k, v, k_cache, v_cache, slot_mapping)}) != 1:
        raise ValueError("k, v, the caches and slot_mapping must be on one device")
