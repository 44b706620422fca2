"""Attention kernel micro-benchmarks (GPU only), each against a baseline measured in the same run.

Decode: a 2,048-token shared prefix, 16/64/256 rows with 128-token suffixes, head dim 128, 32 query
heads / 8 KV heads, bfloat16. The prefix-aware kernel against our per-row paged decode and against
torch SDPA over the same KV already gathered into dense tensors (gathering not timed). The HBM bound
is the time to read the unique KV bytes once (shared prefix once + every row's suffix) at the
bandwidth of a large device-to-device copy.

Prefill: the paged prefill kernel against SDPA (causal boolean mask over the same KV, dense):
128-token suffixes over a cached 2,048-token shared prefix, and whole 2,176-token sequences.

    python benchmarks/bench_kernels.py
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from batchllm.kernels.decode_attention import paged_decode_attention
from batchllm.kernels.metadata import AttentionMetadata, DecodeGroups
from batchllm.kernels.prefill_attention import prefill_attention
from batchllm.kernels.prefix_decode_attention import prefix_decode_attention

PREFIX, SUFFIX, HEADS, KV_HEADS, HEAD_DIM, BLOCK = 2048, 128, 32, 8, 128, 16
DTYPE = torch.bfloat16


def shared_prefix_batch(rows: int, query_len: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Caches and metadata for ``rows`` sequences = the shared prefix + own SUFFIX tokens, the last
    ``query_len`` of which are this step's new tokens."""
    prefix_blocks, own_blocks = PREFIX // BLOCK, SUFFIX // BLOCK
    num_blocks = prefix_blocks + rows * own_blocks
    shape = (num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
    k_cache, v_cache = (torch.randn(shape, dtype=DTYPE, device="cuda") for _ in range(2))
    own = torch.arange(rows * own_blocks, device="cuda").view(rows, own_blocks) + prefix_blocks
    shared = torch.arange(prefix_blocks, device="cuda").expand(rows, -1)
    seq_len = PREFIX + SUFFIX
    meta = AttentionMetadata(
        query_start_loc=torch.arange(rows + 1, device="cuda", dtype=torch.int32) * query_len,
        seq_lens=torch.full((rows,), seq_len, device="cuda", dtype=torch.int32),
        block_tables=torch.cat([shared, own], dim=1).to(torch.int32).contiguous(),
        slot_mapping=torch.zeros(rows * query_len, device="cuda", dtype=torch.int64),  # unused here
        max_query_len=query_len,
        max_seq_len=seq_len,
        query_lens_cpu=(query_len,) * rows,
        seq_lens_cpu=(seq_len,) * rows,
        decode_groups=_one_group(rows) if query_len == 1 else None,
    )
    return k_cache, v_cache, meta


def _one_group(rows: int) -> DecodeGroups:
    return DecodeGroups(
        group_start_loc=torch.tensor([0, rows], device="cuda", dtype=torch.int32),
        shared_blocks=torch.tensor([PREFIX // BLOCK], device="cuda", dtype=torch.int32),
        max_group_size=rows,
    )


def dense_kv(cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """[rows, kv_heads, seq_len, head_dim]: each row's KV gathered through its block table."""
    blocks = cache[meta.block_tables.long()]  # [rows, blocks, BLOCK, kv_heads, head_dim]
    return blocks.flatten(1, 2).transpose(1, 2).contiguous()


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device-to-device copy (read + write)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3)


def bench(fn: Callable[[], object]) -> float:
    """Milliseconds per call."""
    return do_bench(fn, warmup=25, rep=100)


def bench_decode(rows: int, bandwidth: float) -> None:
    k_cache, v_cache, meta = shared_prefix_batch(rows, query_len=1)
    q = torch.randn(rows, HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    scale = HEAD_DIM**-0.5
    k, v = dense_kv(k_cache, meta), dense_kv(v_cache, meta)

    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(q[:, :, None], k, v, scale=scale, enable_gqa=True)[:, :, 0]

    ours = prefix_decode_attention(q, k_cache, v_cache, meta, scale)
    error = (ours.float() - sdpa().float()).abs().max().item()
    times = {
        "prefix-aware": bench(lambda: prefix_decode_attention(q, k_cache, v_cache, meta, scale)),
        "per-row paged": bench(lambda: paged_decode_attention(q, k_cache, v_cache, meta, scale)),
        "sdpa dense": bench(sdpa),
    }
    unique_bytes = (PREFIX + rows * SUFFIX) * KV_HEADS * HEAD_DIM * 2 * k_cache.element_size()
    bound_ms = unique_bytes / bandwidth * 1e3
    print(f"\ndecode, {rows} rows (max |ours - sdpa| = {error:.2e}); HBM bound {bound_ms * 1e3:.1f} us")
    for name, ms in times.items():
        speedup, of_bound = ms / times["prefix-aware"], bound_ms / ms
        print(
            f"  {name:14s} {ms * 1e3:9.1f} us  prefix-aware {speedup:5.2f}x faster  {of_bound:6.1%} of bound"
        )


def bench_prefill(rows: int, query_len: int) -> None:
    k_cache, v_cache, meta = shared_prefix_batch(rows, query_len)
    q = torch.randn(rows * query_len, HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    scale = HEAD_DIM**-0.5
    k, v = dense_kv(k_cache, meta), dense_kv(v_cache, meta)
    qd = q.view(rows, query_len, HEADS, HEAD_DIM).transpose(1, 2)
    seq_len = meta.max_seq_len
    last_visible = seq_len - query_len + torch.arange(query_len, device="cuda")
    visible = torch.arange(seq_len, device="cuda")[None, :] <= last_visible[:, None]  # causal

    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(qd, k, v, attn_mask=visible, scale=scale, enable_gqa=True)

    ours = prefill_attention(q, k_cache, v_cache, meta, scale)
    error = (ours.view(rows, query_len, HEADS, HEAD_DIM).transpose(1, 2).float() - sdpa().float()).abs().max()
    t_ours = bench(lambda: prefill_attention(q, k_cache, v_cache, meta, scale))
    t_sdpa = bench(sdpa)
    context = seq_len - query_len
    print(f"\nprefill, {rows} rows x {query_len} new tokens over {context} cached (max err {error:.2e})")
    print(f"  ours {t_ours * 1e3:9.1f} us   sdpa {t_sdpa * 1e3:9.1f} us   sdpa/ours {t_sdpa / t_ours:5.2f}x")


def main() -> int:
    if not torch.cuda.is_available():
        print("bench_kernels needs CUDA (a GPU): nothing measured on this machine.")
        return 0
    torch.manual_seed(0)
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}, copy bandwidth {bandwidth / 1e12:.2f} TB/s, {DTYPE}, "
          f"{HEADS} q heads / {KV_HEADS} kv heads, head dim {HEAD_DIM}, block size {BLOCK}")  # fmt: skip
    for rows in (16, 64, 256):
        bench_decode(rows, bandwidth)
    bench_prefill(rows=64, query_len=SUFFIX)  # suffixes over the cached shared prefix
    bench_prefill(rows=8, query_len=PREFIX + SUFFIX)  # whole sequences, no cached context
    return 0


if __name__ == "__main__":
    sys.exit(main())
