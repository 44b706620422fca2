"""Plain torch references for every kernel: loops over rows, float32 math, easy to read.

``lse`` is the natural log of the softmax denominator, as in ``batchllm.kernels.merge``.
"""

from __future__ import annotations

import torch

from batchllm.kernels.backend import KVCache
from batchllm.kernels.metadata import AttentionMetadata
from batchllm.kernels.torch_merge import merge_attention_states


def store_kv_ref(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens]
) -> None:
    block_size = k_cache.shape[1]
    for token, slot in enumerate(slot_mapping.tolist()):
        k_cache[slot // block_size, slot % block_size] = k[token]
        v_cache[slot // block_size, slot % block_size] = v[token]


def gather_kv_ref(
    cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_table: torch.Tensor,  # [max_blocks_per_seq]
    positions: range,
) -> torch.Tensor:  # [len(positions), num_kv_heads, head_dim]
    block_size = cache.shape[1]
    table = block_table.tolist()
    rows = [cache[table[p // block_size], p % block_size] for p in positions]
    if not rows:
        return cache.new_zeros((0, *cache.shape[2:]))
    return torch.stack(rows)


def attention_state_ref(
    q: torch.Tensor,  # [num_queries, num_heads, head_dim]
    k: torch.Tensor,  # [num_keys, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_keys, num_kv_heads, head_dim]
    scale: float,
    visible: torch.Tensor | None = None,  # [num_queries, num_keys] bool; None: all
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention and its log-sum-exp: (out [num_queries, num_heads, head_dim] float32,
    lse [num_queries, num_heads]). A query that sees no key gets out 0 and lse -inf."""
    group = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [num_heads, num_queries]
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
    out = torch.einsum("hqk,khd->qhd", probs, v)
    return out, lse.transpose(0, 1).contiguous()


def paged_attention_ref(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    kv_cache: KVCache,
    meta: AttentionMetadata,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim], q.dtype
    """Each new token attends causally over its sequence's whole context (prefill and decode), or,
    with a sliding ``window``, over its last ``window`` positions (itself included)."""
    k_cache, v_cache = kv_cache
    out = torch.empty_like(q)
    start = 0
    for seq, (q_len, seq_len) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu, strict=True)):
        context_len = seq_len - q_len
        k = gather_kv_ref(k_cache, meta.block_tables[seq], range(seq_len))
        v = gather_kv_ref(v_cache, meta.block_tables[seq], range(seq_len))
        last_visible = context_len + torch.arange(q_len)[:, None]
        visible = torch.arange(seq_len)[None, :] <= last_visible
        if window is not None:
            visible &= torch.arange(seq_len)[None, :] > last_visible - window
        rows, _ = attention_state_ref(q[start : start + q_len], k, v, scale, visible.to(q.device))
        out[start : start + q_len] = rows.to(q.dtype)
        start += q_len
    return out


def prefix_decode_ref(
    q: torch.Tensor,  # [num_seqs, num_heads, head_dim], one new token per row
    kv_cache: KVCache,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [num_seqs, num_heads, head_dim], q.dtype
    """Cascade decode: a group's rows attend together to the shared prefix, each row to its own
    remaining blocks, and the two states are merged. Equals ``paged_attention_ref``."""
    groups = meta.decode_groups
    if groups is None:
        raise ValueError("prefix_decode_ref needs meta.decode_groups")
    k_cache, v_cache = kv_cache
    block_size = k_cache.shape[1]
    row_shared = [0] * meta.num_seqs
    shared_states: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    starts, shared_blocks = groups.group_start_loc.tolist(), groups.shared_blocks.tolist()
    for g, n_blocks in enumerate(shared_blocks):
        rows = range(starts[g], starts[g + 1])
        prefix = range(n_blocks * block_size)
        k = gather_kv_ref(k_cache, meta.block_tables[rows.start], prefix)
        v = gather_kv_ref(v_cache, meta.block_tables[rows.start], prefix)
        out, lse = attention_state_ref(q[rows.start : rows.stop], k, v, scale)
        for i, row in enumerate(rows):
            row_shared[row] = len(prefix)
            shared_states[row] = (out[i : i + 1], lse[i : i + 1])
    result = torch.empty_like(q)
    for row, seq_len in enumerate(meta.seq_lens_cpu):
        own = range(row_shared[row], seq_len)
        k = gather_kv_ref(k_cache, meta.block_tables[row], own)
        v = gather_kv_ref(v_cache, meta.block_tables[row], own)
        state = attention_state_ref(q[row : row + 1], k, v, scale)
        if row in shared_states:
            state = merge_attention_states(shared_states[row], state)
        result[row] = state[0][0].to(q.dtype)
    return result


def fused_moe_ref(
    x: torch.Tensor,  # [T, hidden]
    w13: torch.Tensor,  # [E, 2 * inter, hidden], gate rows then up rows
    w2: torch.Tensor,  # [E, hidden, inter]
    weights: torch.Tensor,  # [T, top_k]
    experts: torch.Tensor,  # [T, top_k]
    act: str,
) -> torch.Tensor:  # [T, hidden] float32
    """Token by token: the weighted sum of its experts' gated MLPs, in float32."""
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        for w, e in zip(weights[t].tolist(), experts[t].tolist(), strict=True):
            gate, up = (w13[e].float() @ x[t].float()).chunk(2)
            act_gate = (
                torch.nn.functional.gelu(gate, approximate="tanh")
                if act == "gelu_pytorch_tanh"
                else gate * torch.sigmoid(gate)
            )
            out[t] += w * (w2[e].float() @ (act_gate * up))
    return out


def rms_norm_ref(
    x: torch.Tensor,  # [..., N]
    weight: torch.Tensor,  # [N]
    eps: float,
    offset: bool = False,
) -> torch.Tensor:  # [..., N], x.dtype
    """Normalise in float32; plain: cast, then scale by the weight; offset (Gemma): scale by (1 + weight)
    in float32, then cast."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        return (normed * (1.0 + weight.float())).to(x.dtype)
    return weight * normed.to(x.dtype)


def add_rms_norm_ref(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float, offset: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:  # (norm(x + delta), x + delta)
    summed = x + delta
    return rms_norm_ref(summed, weight, eps, offset), summed


def rope_ref(
    x: torch.Tensor,  # [num_tokens, heads, head_dim]
    cos: torch.Tensor,  # [num_tokens, head_dim]
    sin: torch.Tensor,  # [num_tokens, head_dim]
) -> torch.Tensor:
    """Neox rotation of the two halves, in x's dtype."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def rope_store_kv_ref(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    cos: torch.Tensor,  # [num_tokens, head_dim]
    sin: torch.Tensor,  # [num_tokens, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens]
) -> torch.Tensor:  # rotated q
    store_kv_ref(rope_ref(k, cos, sin), v, k_cache, v_cache, slot_mapping)
    return rope_ref(q, cos, sin)
