"""RMSNorm, optionally fused with the residual add before it, one program per row.

Two weightings, matching the torch layers in ``batchllm.model.layers`` rounding for rounding:

    plain  (Llama, Qwen, Mistral, MoE):  weight * (x * rsqrt(mean(x^2) + eps)).to(dtype)
    OFFSET (Gemma 3):                   (x * rsqrt(mean(x^2) + eps) * (1 + weight)).to(dtype)

The fused form takes ``x`` and the ``delta`` a sublayer adds to it, writes ``x + delta`` (rounded to
the dtype, as torch's add is) and normalises that sum: one read of each input instead of three.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

NORM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class AddNorm(NamedTuple):
    normed: torch.Tensor  # norm(x + delta)
    summed: torch.Tensor  # x + delta, the new residual stream


@triton.jit
def _rms_norm_kernel(
    out,  # [rows, N]
    summed,  # [rows, N], written when HAS_DELTA
    x,  # [rows, N]
    delta,  # [rows, N], read when HAS_DELTA
    weight,  # [N]
    stride_o, stride_s, stride_x, stride_d, eps,
    N: tl.constexpr, BLOCK: tl.constexpr, HAS_DELTA: tl.constexpr, OFFSET: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    v = tl.load(x + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_DELTA:
        v = v.to(tl.float32) + tl.load(delta + row * stride_d + cols, mask=ok, other=0.0).to(tl.float32)
        v = v.to(summed.dtype.element_ty)
        tl.store(summed + row * stride_s + cols, v, mask=ok)
    v = v.to(tl.float32)
    normed = v * tl.rsqrt(tl.sum(v * v, 0) / N + eps)
    w = tl.load(weight + cols, mask=ok, other=0.0).to(tl.float32)
    if OFFSET:
        y = normed * (1.0 + w)
    else:
        y = normed.to(out.dtype.element_ty).to(tl.float32) * w  # torch casts before it scales
    tl.store(out + row * stride_o + cols, y.to(out.dtype.element_ty), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: bool = False) -> torch.Tensor:
    """RMSNorm over the last dim of ``x`` ([..., N]); ``offset``: scale by (1 + weight) (Gemma)."""
    return _launch(x, None, weight, eps, offset).normed


def add_rms_norm(
    x: torch.Tensor,  # [..., N]
    delta: torch.Tensor,  # [..., N]
    weight: torch.Tensor,  # [N]
    eps: float,
    offset: bool = False,
) -> AddNorm:
    """``(norm(x + delta), x + delta)`` in one pass."""
    if delta.shape != x.shape or delta.dtype != x.dtype:
        raise ValueError(f"x and delta must match, got {x.dtype} {tuple(x.shape)} and {delta.dtype} "
                         f"{tuple(delta.shape)}")  # fmt: skip
    return _launch(x, delta, weight, eps, offset)


def _launch(
    x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float, offset: bool
) -> AddNorm:
    _check_inputs(x, weight)
    n = x.shape[-1]
    rows_x = _rows(x)
    rows_d = _rows(delta) if delta is not None else rows_x
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    summed = torch.empty_like(out) if delta is not None else out
    if rows_x.shape[0] == 0:
        return AddNorm(out, summed)
    out2, summed2 = out.view(-1, n), summed.view(-1, n)
    block = triton.next_power_of_2(n)
    _rms_norm_kernel[(rows_x.shape[0],)](
        out2, summed2, rows_x, rows_d, weight,
        out2.stride(0), summed2.stride(0), rows_x.stride(0), rows_d.stride(0), eps,
        N=n, BLOCK=block, HAS_DELTA=delta is not None, OFFSET=offset, num_warps=norm_warps(block),
    )  # fmt: skip
    return AddNorm(out, summed)


def norm_warps(block: int) -> int:
    """Warps per row: 4 up to 2,048 columns, 8 up to 8,192, then 16."""
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as [rows, N] with a unit last stride (a view where it can be)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _check_inputs(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() < 1 or weight.shape != (x.shape[-1],):
        raise ValueError(f"weight must be [{x.shape[-1] if x.dim() else '?'}], got {tuple(weight.shape)}")
    if x.dtype not in NORM_DTYPES or weight.dtype != x.dtype:
        raise ValueError(f"x and weight must share one dtype of {NORM_DTYPES}, got {x.dtype}, {weight.dtype}")
    if x.device != weight.device:
        raise ValueError("x and weight must be on one device")
