"""Mixture-of-experts as grouped matmuls: the step's (token, expert) pairs sorted by expert.

A token picks ``top_k`` experts, so a step of ``T`` tokens has ``P = T * top_k`` pairs; pair
``p`` is token ``p // top_k``'s ``p % top_k``-th choice. Sorting the pairs by expert and padding
each expert's run to a multiple of ``BLOCK_M`` gives tiles of one expert each::

    slots:   | e0 e0 e0 pad | e1 pad pad pad | e3 e3 e3 e3 | e3 pad pad pad | (unused tiles)
    tiles:   |   expert 0   |    expert 1    |   expert 3  |    expert 3    | expert = E: skipped

One program multiplies one tile of rows by one ``BLOCK_N`` slice of its expert's weight, so every
expert weight tile is read once per tile of its tokens. Two launches: gate/up (rows are tokens),
then down (rows are pairs, scaled by the routing weight). Built on the device, no host sync.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from batchllm.kernels.prefill_attention import dot_f32, needs_f32_dot

MOE_BLOCK_M = 16
MOE_BLOCK_N = 64
MOE_BLOCK_K = 32


class ExpertRoute(NamedTuple):
    pair_order: torch.Tensor  # [P] int64: pairs sorted by expert (stable)
    counts: torch.Tensor  # [E] int64: pairs per expert


class ExpertTiles(NamedTuple):
    slot_pair: torch.Tensor  # [num_tiles * block_m] int32: the pair in each slot, P for padding
    tile_expert: torch.Tensor  # [num_tiles] int32: each tile's expert, E for unused tiles


def sort_by_expert(experts: torch.Tensor, num_experts: int) -> ExpertRoute:
    """``experts``: [T, top_k] int64 choices -> the pairs in expert order and each expert's count."""
    flat = experts.flatten()
    return ExpertRoute(torch.argsort(flat, stable=True), torch.bincount(flat, minlength=num_experts))


def align_tiles(route: ExpertRoute, block_m: int) -> ExpertTiles:
    """Lay the sorted pairs out in slots, each expert's run padded to a multiple of ``block_m``."""
    num_pairs, num_experts = route.pair_order.shape[0], route.counts.shape[0]
    dev = route.counts.device
    padded = (route.counts + block_m - 1) // block_m * block_m  # [E]
    pad_start = torch.cumsum(padded, 0) - padded
    run_start = torch.cumsum(route.counts, 0) - route.counts
    # An upper bound on the slots needed, so the sizes stay static (no host sync).
    num_tiles = triton.cdiv(num_pairs, block_m) + num_experts
    expert_of = torch.repeat_interleave(
        torch.arange(num_experts, device=dev), route.counts, output_size=num_pairs
    )
    rank = torch.arange(num_pairs, device=dev) - run_start[expert_of]
    slot_pair = torch.full((num_tiles * block_m,), num_pairs, dtype=torch.int32, device=dev)
    slot_pair[pad_start[expert_of] + rank] = route.pair_order.to(torch.int32)
    tile_start = torch.arange(num_tiles, device=dev) * block_m
    tile_expert = torch.searchsorted(torch.cumsum(padded, 0), tile_start, right=True)
    return ExpertTiles(slot_pair, tile_expert.to(torch.int32))


@triton.jit
def _expert_matmul_kernel(
    out,  # [P, N]: one row per pair
    a,  # [rows, K]: rows are tokens (ROW_DIV = top_k) or pairs (ROW_DIV = 1)
    b,  # [E, N, K]: expert weights
    slot_pair,  # [num_tiles * BLOCK_M] int32
    tile_expert,  # [num_tiles] int32
    pair_weight,  # [P] float32, read when SCALE
    num_pairs, num_experts, N, K,
    stride_am, stride_be, stride_bn, stride_bk, stride_om,
    ROW_DIV: tl.constexpr, SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, F32_DOT: tl.constexpr,
):  # fmt: skip
    tile, col_tile = tl.program_id(0), tl.program_id(1)
    expert = tl.load(tile_expert + tile)
    if expert < num_experts:
        pairs = tl.load(slot_pair + tile * BLOCK_M + tl.arange(0, BLOCK_M))
        ok = pairs < num_pairs
        rows = (pairs // ROW_DIV).to(tl.int64)
        cols = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        weight = b + expert.to(tl.int64) * stride_be
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            a_tile = tl.load(
                a + rows[:, None] * stride_am + ks[None, :], mask=ok[:, None] & k_ok[None, :], other=0.0
            )
            b_offs = cols[None, :].to(tl.int64) * stride_bn + ks[:, None].to(tl.int64) * stride_bk
            b_tile = tl.load(
                weight + b_offs, mask=k_ok[:, None] & col_ok[None, :], other=0.0
            )  # [BLOCK_K, BLOCK_N]
            acc += dot_f32(a_tile, b_tile, F32_DOT)
        if SCALE:
            acc *= tl.load(pair_weight + pairs, mask=ok, other=0.0)[:, None]
        offs = pairs.to(tl.int64)[:, None] * stride_om + cols[None, :]
        tl.store(out + offs, acc.to(out.dtype.element_ty), mask=ok[:, None] & col_ok[None, :])


def expert_matmul(
    a: torch.Tensor,  # [rows, K]
    b: torch.Tensor,  # [E, N, K]
    tiles: ExpertTiles,
    num_pairs: int,
    row_div: int,
    pair_weight: torch.Tensor | None = None,  # [P] float32: scale each output row by it
) -> torch.Tensor:  # [P, N], a.dtype
    """``out[p] = a[p // row_div] @ b[expert of p].T`` (times ``pair_weight[p]``) for every pair."""
    if a.dim() != 2 or b.dim() != 3 or a.shape[1] != b.shape[2] or a.dtype != b.dtype:
        raise ValueError(
            f"expert_matmul needs a [rows, K] and b [E, N, K] of one dtype, got {a.shape}, {b.shape}"
        )
    a = a if a.stride(1) == 1 else a.contiguous()
    out = torch.empty((num_pairs, b.shape[1]), dtype=a.dtype, device=a.device)
    if num_pairs == 0:
        return out
    scale = pair_weight is not None
    grid = (tiles.tile_expert.shape[0], triton.cdiv(b.shape[1], MOE_BLOCK_N))
    _expert_matmul_kernel[grid](
        out, a, b, tiles.slot_pair, tiles.tile_expert, pair_weight if scale else out,
        num_pairs, b.shape[0], b.shape[1], b.shape[2],
        a.stride(0), *b.stride(), out.stride(0),
        ROW_DIV=row_div, SCALE=scale, BLOCK_M=MOE_BLOCK_M, BLOCK_N=MOE_BLOCK_N, BLOCK_K=MOE_BLOCK_K,
        F32_DOT=needs_f32_dot(_expert_matmul_kernel, a.dtype),
    )  # fmt: skip
    return out


def fused_moe(
    x: torch.Tensor,  # [T, hidden]
    w13: torch.Tensor,  # [E, 2 * inter, hidden], gate rows then up rows
    w2: torch.Tensor,  # [E, hidden, inter]
    weights: torch.Tensor,  # [T, top_k] float32 routing weights
    experts: torch.Tensor,  # [T, top_k] int64, each row in increasing expert order
    act: str,
) -> torch.Tensor:  # [T, hidden], x.dtype
    """The sparse MLP on Triton: gate/up grouped matmul, activation, down grouped matmul, then each
    token's k weighted outputs added in expert order (as transformers adds them)."""
    num_tokens, top_k = experts.shape
    num_pairs = num_tokens * top_k
    tiles = align_tiles(sort_by_expert(experts, w13.shape[0]), MOE_BLOCK_M)
    gate_up = expert_matmul(x, w13, tiles, num_pairs, row_div=top_k)  # [P, 2 * inter]
    gate, up = gate_up.chunk(2, dim=-1)
    hidden = (F.gelu(gate, approximate="tanh") if act == "gelu_pytorch_tanh" else F.silu(gate)) * up
    flat_weights = weights.flatten().float().contiguous()
    down = expert_matmul(hidden, w2, tiles, num_pairs, row_div=1, pair_weight=flat_weights)  # [P, hidden]
    per_token = down.view(num_tokens, top_k, -1)
    out = torch.zeros_like(per_token[:, 0])
    for k in range(top_k):
        out += per_token[:, k]
    return out
