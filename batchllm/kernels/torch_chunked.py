"""Batch-invariant attention in plain torch: every token's arithmetic is the same in every batch.

The step's ``ChunkPlan`` cuts each token's context into fixed KV chunks and puts the tokens that read
a chunk into tiles of exactly ``TILE`` tokens. Per tile, one float32 ``bmm`` of a fixed shape gives
the scores (``[TILE * heads per kv head, head_dim] @ [head_dim, chunk]``), a masked softmax over the
whole chunk gives the chunk's (out, lse), and the chunks are merged in chunk order, 0 first. Measured
on CPU: such a ``bmm`` gives each row the same bits whatever the other rows of the tile and however
many tiles run together (from two up: a single one takes another path, so one is never run alone).
So a token's result depends neither on padding width, nor on which rows share its step, nor on
whether its shared prefix is read once for a group or by the row alone.
"""

from __future__ import annotations

import torch

from batchllm.kernels.chunk_plan import TILE, ChunkPlan
from batchllm.kernels.torch_merge import merge_attention_states

# Elements of K gathered at once; bounds the per-tile copies of the chunks.
_GATHER_ELEMENTS = 1 << 24


def chunked_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    plan: ChunkPlan,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim], q.dtype
    num_tokens, num_heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    qf = q.float().view(num_tokens, kv_heads, num_heads // kv_heads, head_dim)
    out = qf.new_zeros(num_tokens, num_heads, head_dim)
    lse = qf.new_full((num_tokens, num_heads), float("-inf"))
    step = max(1, _GATHER_ELEMENTS // (plan.chunk * kv_heads * head_dim))
    for c, (lo, hi) in enumerate(plan.chunk_tiles):
        parts = [_tile_states(qf, k_cache, v_cache, plan, (a, min(a + step, hi)), scale, window)
                 for a in range(lo, hi, step)]  # fmt: skip
        new_out = torch.cat([p[0] for p in parts])[plan.chunk_slots[c]]
        new_lse = torch.cat([p[1] for p in parts])[plan.chunk_slots[c]]
        tokens = plan.chunk_tokens[c]
        out[tokens], lse[tokens] = merge_attention_states((out[tokens], lse[tokens]), (new_out, new_lse))
    return out.to(q.dtype)


def _tile_states(
    qf: torch.Tensor,  # [num_tokens, kv_heads, group, head_dim] float32
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    plan: ChunkPlan,
    tiles: tuple[int, int],
    scale: float,
    window: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:  # out [n * TILE, heads, head_dim], lse [n * TILE, heads]
    lo, hi = tiles
    n, (_, kv_heads, group, head_dim), chunk = hi - lo, qf.shape, plan.chunk
    qt = qf[plan.tile_tokens[lo:hi]].permute(0, 2, 1, 3, 4).reshape(n * kv_heads, TILE * group, head_dim)
    blocks = plan.tile_blocks[lo:hi]
    keys = _chunk_rows(k_cache, blocks, chunk)
    values = _chunk_rows(v_cache, blocks, chunk)
    scores = _bmm(qt, keys.transpose(1, 2)) * scale  # [n * kv_heads, TILE * group, chunk]
    visible = plan.tile_visible[lo:hi]  # [n, TILE, chunk]
    if window is not None:
        key_pos = plan.tile_key_start[lo:hi, None, None] + torch.arange(chunk, device=qf.device)
        visible = visible & (key_pos > plan.tile_qpos[lo:hi, :, None] - window)
    mask = visible[:, None, :, None, :].expand(n, kv_heads, TILE, group, chunk).reshape(scores.shape)
    scores = scores.masked_fill(~mask, float("-inf"))
    top = scores.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    probs = torch.exp(scores - top)
    total = probs.sum(-1, keepdim=True)
    # total >= 1 wherever a key is visible (the top score gives exp(0)); 0 where none is.
    out = _bmm(probs, values) / total.clamp(min=1.0)
    lse = (top + torch.log(total)).squeeze(-1)
    out = out.view(n, kv_heads, TILE, group, head_dim).permute(0, 2, 1, 3, 4)
    lse = lse.view(n, kv_heads, TILE, group).permute(0, 2, 1, 3)
    return out.reshape(n * TILE, kv_heads * group, head_dim), lse.reshape(n * TILE, kv_heads * group)


def _chunk_rows(
    cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    blocks: torch.Tensor,  # [n, chunk // block_size]
    chunk: int,
) -> torch.Tensor:  # [n * kv_heads, chunk, head_dim] float32, contiguous
    n, kv_heads, head_dim = blocks.shape[0], cache.shape[2], cache.shape[3]
    rows = cache[blocks].reshape(n, chunk, kv_heads, head_dim).transpose(1, 2)
    return rows.float().contiguous().view(n * kv_heads, chunk, head_dim)


def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.bmm`` never on a batch of one: that goes through another kernel, with other rounding."""
    if a.shape[0] > 1:
        return torch.bmm(a, b)
    return torch.bmm(torch.cat([a, a]), torch.cat([b, b]))[:1]
