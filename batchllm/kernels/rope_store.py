"""Rotary embedding of q and k fused with the paged KV store, one program per new token.

Token ``t``'s query heads are rotated into a new q; its key heads are rotated and, with its value heads,
written straight into their cache slot (``slot_mapping[t]``, as ``kv_store.store_kv``): the rotated k
never goes back to memory on its own. The rotation is neox style, on the two halves of each head::

    out[:half] = x[:half] * cos[:half] - x[half:] * sin[:half]
    out[half:] = x[half:] * cos[half:] + x[:half] * sin[half:]

each product and the sum rounded to the dtype, as the torch ``apply_rope`` rounds them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from batchllm.kernels.kv_store import _check_store_inputs, kv_offsets


@triton.jit
def _round(x, dt: tl.constexpr):
    """Round float32 ``x`` to ``dt`` and widen it back: one torch op's result in ``dt``."""
    return x.to(dt).to(tl.float32)


@triton.jit
def _rotate(x1, x2, c1, s1, c2, s2):
    """The two rotated halves. Each product and sum is taken in float32 and rounded to the input dtype,
    as torch computes elementwise ops in half precision (and the interpreter has no bfloat16 math)."""
    dt: tl.constexpr = x1.dtype
    x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
    c1, s1, c2, s2 = c1.to(tl.float32), s1.to(tl.float32), c2.to(tl.float32), s2.to(tl.float32)
    lo = _round(x1 * c1, dt) + _round(-x2 * s1, dt)
    hi = _round(x2 * c2, dt) + _round(x1 * s2, dt)
    return lo.to(dt), hi.to(dt)


@triton.jit
def _rope_store_kernel(
    q_out,  # [num_tokens, num_heads, head_dim]
    q,  # [num_tokens, num_heads, head_dim]
    k,  # [num_tokens, num_kv_heads, head_dim]
    v,  # [num_tokens, num_kv_heads, head_dim]
    cos,  # [num_tokens, head_dim]
    sin,  # [num_tokens, head_dim]
    k_cache,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping,  # [num_tokens] int32 or int64
    stride_ot, stride_oh, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cos, stride_sin, stride_cb, stride_cs, stride_ch, stride_cd,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr,
    QH_PAD: tl.constexpr, KH_PAD: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)
    dims = tl.arange(0, HALF_PAD)
    dim_ok = dims < HALF
    c1 = tl.load(cos + token * stride_cos + dims, mask=dim_ok, other=0.0)[None, :]
    c2 = tl.load(cos + token * stride_cos + HALF + dims, mask=dim_ok, other=0.0)[None, :]
    s1 = tl.load(sin + token * stride_sin + dims, mask=dim_ok, other=0.0)[None, :]
    s2 = tl.load(sin + token * stride_sin + HALF + dims, mask=dim_ok, other=0.0)[None, :]

    qh = tl.arange(0, QH_PAD).to(tl.int64)
    q_mask = (qh < NUM_HEADS)[:, None] & dim_ok[None, :]
    src = q + token * stride_qt + (qh * stride_qh)[:, None] + dims[None, :]
    q1, q2 = _rotate(tl.load(src, mask=q_mask), tl.load(src + HALF, mask=q_mask), c1, s1, c2, s2)
    dst = q_out + token * stride_ot + (qh * stride_oh)[:, None] + dims[None, :]
    tl.store(dst, q1, mask=q_mask)
    tl.store(dst + HALF, q2, mask=q_mask)

    kh = tl.arange(0, KH_PAD)
    kv_mask = (kh < NUM_KV_HEADS)[:, None] & dim_ok[None, :]
    k_src = k + token * stride_kt + (kh.to(tl.int64) * stride_kh)[:, None] + dims[None, :]
    k1, k2 = _rotate(tl.load(k_src, mask=kv_mask), tl.load(k_src + HALF, mask=kv_mask), c1, s1, c2, s2)
    v_src = v + token * stride_vt + (kh.to(tl.int64) * stride_vh)[:, None] + dims[None, :]
    slot = tl.load(slot_mapping + token).to(tl.int64)
    block = tl.full([KH_PAD], 0, tl.int64) + slot // BLOCK_SIZE
    lo = kv_offsets(block, slot % BLOCK_SIZE, kh, dims, stride_cb, stride_cs, stride_ch, stride_cd)
    hi = lo + HALF * stride_cd
    tl.store(k_cache + lo, k1, mask=kv_mask)
    tl.store(k_cache + hi, k2, mask=kv_mask)
    tl.store(v_cache + lo, tl.load(v_src, mask=kv_mask), mask=kv_mask)
    tl.store(v_cache + hi, tl.load(v_src + HALF, mask=kv_mask), mask=kv_mask)


def rope_store_kv(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    cos: torch.Tensor,  # [num_tokens, head_dim] or [num_tokens, 1, head_dim], q's dtype
    sin: torch.Tensor,  # as cos
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens]
) -> torch.Tensor:  # rotated q, [num_tokens, num_heads, head_dim]
    """Rotate q and k; write rotated k and v into the caches at ``slot_mapping``; return rotated q."""
    _check_store_inputs(k, v, k_cache, v_cache, slot_mapping)
    cos, sin = cos.reshape(cos.shape[0], -1), sin.reshape(sin.shape[0], -1)
    _check_rope_inputs(q, k, cos, sin)
    num_tokens, num_heads, head_dim = q.shape
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return q_out
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (cos, sin))
    _rope_store_kernel[(num_tokens,)](
        q_out, q, k, v, cos, sin, k_cache, v_cache, slot_mapping,
        q_out.stride(0), q_out.stride(1), q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), cos.stride(0), sin.stride(0), *k_cache.stride(),
        NUM_HEADS=num_heads, NUM_KV_HEADS=k.shape[1], HALF=head_dim // 2,
        QH_PAD=triton.next_power_of_2(num_heads), KH_PAD=triton.next_power_of_2(k.shape[1]),
        HALF_PAD=triton.next_power_of_2(head_dim // 2), BLOCK_SIZE=k_cache.shape[1],
    )  # fmt: skip
    return q_out


def _check_rope_inputs(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if q.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[2] % 2:
        raise ValueError(
            f"q must be [{k.shape[0]}, num_heads, {k.shape[2]}] with an even head_dim, got {tuple(q.shape)}"
        )
    if cos.shape != (q.shape[0], q.shape[2]) or sin.shape != cos.shape:
        raise ValueError(
            f"cos and sin must be [{q.shape[0]}, {q.shape[2]}], got {tuple(cos.shape)} and {tuple(sin.shape)}"
        )
    if not (q.dtype == k.dtype == cos.dtype == sin.dtype):
        raise ValueError(f"q, k, cos and sin must share one dtype, got {q.dtype}, {k.dtype}, {cos.dtype}")
    if len({t.device for t in (q, k, cos, sin)}) != 1:
        raise ValueError("q, k, cos and sin must be on one device")
