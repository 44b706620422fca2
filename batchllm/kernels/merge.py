"""Log-sum-exp merge of partial attention states.

Attention over positions ``A ∪ B`` (disjoint) is a weighted mix of attention over ``A`` and over
``B``: with ``lse`` the log of each part's softmax denominator,

    lse = log(exp(lse_a) + exp(lse_b))
    out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)

so a shared prefix, nested prefix levels and split-KV chunks can each be attended separately.
``lse`` here is always the NATURAL log of ``sum(exp(scale * q.k))``, float32, ``[num_tokens,
num_heads]``. A part that saw no position has ``lse = -inf`` (its ``out`` is ignored).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

# Globals a kernel reads must be constexpr.
LOG2E = tl.constexpr(math.log2(math.e))
LN2 = tl.constexpr(math.log(2.0))


class AttentionState(NamedTuple):
    out: torch.Tensor  # [num_tokens, num_heads, head_dim], normalised over the part's positions
    lse: torch.Tensor  # [num_tokens, num_heads] float32, natural log of the softmax denominator


@triton.jit
def _merge_kernel(
    out,  # [num_tokens, num_heads, head_dim]
    lse_out,  # [num_tokens, num_heads] float32
    states,  # [num_states, num_tokens, num_heads, head_dim]
    lses,  # [num_states, num_tokens, num_heads] float32
    num_states,
    num_heads,
    stride_ss,
    stride_st,
    stride_sh,
    stride_ls,
    stride_lt,
    stride_lh,
    stride_ot,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    heads = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
    dims = tl.arange(0, D_PAD)
    head_ok = heads < num_heads
    mask = head_ok[:, None] & (dims < HEAD_DIM)[None, :]
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, D_PAD], tl.float32)
    for s in range(num_states):
        lse_ptrs = lses + s * stride_ls + token * stride_lt + heads * stride_lh
        lse2 = tl.load(lse_ptrs, mask=head_ok, other=float("-inf")) * LOG2E  # [BLOCK_H], base 2
        seen = lse2 > float("-inf")
        s_offs = s * stride_ss + token * stride_st + (heads * stride_sh)[:, None] + dims[None, :]
        o = tl.load(states + s_offs, mask=mask & seen[:, None], other=0.0).to(tl.float32)
        m_new = tl.maximum(m, lse2)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        w = tl.exp2(lse2 - m_safe)
        acc = acc * alpha[:, None] + o * w[:, None]
        l_sum = l_sum * alpha + w
        m = m_new
    seen_any = l_sum > 0
    merged = acc / tl.where(seen_any, l_sum, 1.0)[:, None]
    o_offs = token * stride_ot + (heads * stride_oh)[:, None] + dims[None, :]
    tl.store(out + o_offs, merged.to(out.dtype.element_ty), mask=mask)
    lse = tl.where(seen_any, (m + tl.log2(tl.where(seen_any, l_sum, 1.0))) * LN2, float("-inf"))
    tl.store(lse_out + token * num_heads + heads, lse, mask=head_ok)


def merge_state_stack(
    outs: torch.Tensor,  # [num_states, num_tokens, num_heads, head_dim]
    lses: torch.Tensor,  # [num_states, num_tokens, num_heads] float32
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim], written if given
) -> AttentionState:
    """Merge ``num_states`` partial states of the same tokens into one (split-KV reduction)."""
    if outs.dim() != 4 or lses.shape != outs.shape[:3] or lses.dtype != torch.float32:
        raise ValueError(
            "expected outs [num_states, num_tokens, num_heads, head_dim] and float32 lses [num_states, "
            f"num_tokens, num_heads], got {tuple(outs.shape)} and {lses.dtype} {tuple(lses.shape)}"
        )
    if outs.stride(-1) != 1:
        outs = outs.contiguous()
    num_states, num_tokens, num_heads, head_dim = outs.shape
    if out is None:
        out = torch.empty(outs.shape[1:], dtype=outs.dtype, device=outs.device)
    elif out.shape != outs.shape[1:] or out.stride(-1) != 1:
        raise ValueError(
            f"out must be {tuple(outs.shape[1:])} with a contiguous last dim, got {tuple(out.shape)}"
        )
    lse = torch.empty((num_tokens, num_heads), dtype=torch.float32, device=outs.device)
    if num_tokens == 0:
        return AttentionState(out, lse)
    block_h = min(triton.next_power_of_2(num_heads), 16)
    _merge_kernel[(num_tokens, triton.cdiv(num_heads, block_h))](
        out, lse, outs, lses, num_states, num_heads, outs.stride(0), outs.stride(1), outs.stride(2),
        *lses.stride(), out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, D_PAD=triton.next_power_of_2(head_dim), BLOCK_H=block_h,
    )  # fmt: skip
    return AttentionState(out, lse)
