"""Triton kernels against their torch references; on a machine without CUDA through Triton's interpreter.

Shapes are tiny and the sweep is a list of cases, not a cartesian product: together the cases cover
query lengths 1 and many, contexts that are not block multiples, 0-3 nested prefix levels, GQA 1/3/4/8,
head dims 64/80/96/128, block sizes 4/8/16 and float32/bfloat16/float16.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import TypeVar

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

import pytest  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from batchllm.kernels.decode_attention import paged_decode_attention
from batchllm.kernels.kv_store import kv_offsets, store_kv  # noqa: E402
from batchllm.kernels.merge import AttentionState, merge_state_stack  # noqa: E402
from batchllm.kernels.metadata import AttentionMetadata, DecodeGroups  # noqa: E402
from batchllm.kernels.prefill_attention import prefill_attention  # noqa: E402
from batchllm.kernels.prefix_decode_attention import prefix_decode_attention  # noqa: E402
from batchllm.kernels.reference import (  # noqa: E402
    attention_state_ref,
    gather_kv_ref,
    paged_attention_ref,
    prefix_decode_ref,
    store_kv_ref,
)
from batchllm.kernels.torch_merge import merge_attention_states  # noqa: E402
from batchllm.kernels.triton_backend import TritonAttention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Batch:
    q: torch.Tensor  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim], new tokens not stored
    v_cache: torch.Tensor
    meta: AttentionMetadata
    scale: float

    def stored(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the caches with the new tokens written by the reference."""
        k_cache, v_cache = self.k_cache.clone(), self.v_cache.clone()
        store_kv_ref(self.k, self.v, k_cache, v_cache, self.meta.slot_mapping)
        return k_cache, v_cache


def make_batch(
    query_lens: Sequence[int],
    own_lens: Sequence[int],  # tokens after the shared prefixes, new ones included
    paths: Sequence[tuple[int, ...]] = (),  # per row, one prefix id per level; rows sharing path[:l] share
    level_blocks: int = 1,  # full blocks per prefix level
    group_level: int = 0,  # decode groups = rows with equal path[:group_level]; 0: none
    heads: tuple[int, int] = (4, 2),
    head_dim: int = 64,
    block_size: int = 8,
    dtype: torch.dtype = F32,
    num_blocks: int | None = None,
    seed: int = 0,
) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    paths = list(paths) or [()] * len(query_lens)
    prefix_ids = sorted({p[: level + 1] for p in paths for level in range(len(p))})
    own_blocks = [triton.cdiv(n, block_size) for n in own_lens]
    needed = len(prefix_ids) * level_blocks + sum(own_blocks)
    ids = iter(torch.randperm(num_blocks or needed + 3, generator=gen)[:needed].tolist())
    prefix_blocks = {p: [next(ids) for _ in range(level_blocks)] for p in prefix_ids}
    tables = []
    for path, n_own in zip(paths, own_blocks, strict=True):
        shared = [b for level in range(len(path)) for b in prefix_blocks[path[: level + 1]]]
        tables.append(shared + [next(ids) for _ in range(n_own)])
    seq_lens = [len(p) * level_blocks * block_size + n for p, n in zip(paths, own_lens, strict=True)]
    slots = [
        tables[i][pos // block_size] * block_size + pos % block_size
        for i, (q_len, seq_len) in enumerate(zip(query_lens, seq_lens, strict=True))
        for pos in range(seq_len - q_len, seq_len)
    ]
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    groups = _decode_groups(paths, group_level, level_blocks) if max(query_lens) == 1 else None
    meta = AttentionMetadata(
        query_start_loc=torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=block_tables,
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_lens_cpu=tuple(query_lens),
        seq_lens_cpu=tuple(seq_lens),
        decode_groups=groups,
    )
    num_heads, num_kv_heads = heads
    cache_shape = (num_blocks or needed + 3, block_size, num_kv_heads, head_dim)
    tokens = sum(query_lens)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    return _to_device(
        Batch(
            q=randn(tokens, num_heads, head_dim),
            k=randn(tokens, num_kv_heads, head_dim),
            v=randn(tokens, num_kv_heads, head_dim),
            k_cache=randn(*cache_shape),
            v_cache=randn(*cache_shape),
            meta=meta,
            scale=head_dim**-0.5,
        )
    )


def _decode_groups(paths: Sequence[tuple[int, ...]], level: int, level_blocks: int) -> DecodeGroups | None:
    if level == 0:
        return None
    keys = [p[:level] for p in paths]
    starts = [0] + [i for i in range(1, len(keys)) if keys[i] != keys[i - 1]] + [len(keys)]
    sizes = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    return DecodeGroups(
        group_start_loc=torch.tensor(starts, dtype=torch.int32),
        shared_blocks=torch.full((len(sizes),), level * level_blocks, dtype=torch.int32),
        max_group_size=max(sizes),
    )


def _to_device(obj: T) -> T:
    if isinstance(obj, torch.Tensor):
        return obj.to(DEVICE)
    if dataclasses.is_dataclass(obj):
        return dataclasses.replace(
            obj, **{f.name: _to_device(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
        )
    return obj


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(actual.float(), expected.float(), atol=TOL[dtype], rtol=TOL[dtype])


PREFILL_CASES = [
    pytest.param(dict(query_lens=[1, 5, 19], own_lens=[13, 5, 30], heads=(4, 4)), id="f32-gqa1-d64-flat"),
    pytest.param(
        dict(
            query_lens=[3, 1, 17],
            own_lens=[7, 20, 17],
            paths=[(0,), (0,), (1,)],
            level_blocks=2,
            heads=(8, 2),
            head_dim=128,
            block_size=16,
            dtype=BF16,
        ),
        id="bf16-gqa4-d128-1level",
    ),
    pytest.param(
        dict(
            query_lens=[2, 9, 1],
            own_lens=[11, 9, 3],
            paths=[(0, 0), (0, 1), (1, 0)],
            heads=(8, 1),
            head_dim=80,
            dtype=F16,
        ),
        id="f16-gqa8-d80-2levels",
    ),
    pytest.param(
        dict(
            query_lens=[4, 1, 6],
            own_lens=[5, 2, 6],
            paths=[(0, 0, 0), (0, 0, 1), (0, 1, 0)],
            heads=(12, 4),
            head_dim=96,
            block_size=4,
        ),
        id="f32-gqa3-d96-3levels",
    ),
]


@pytest.mark.parametrize("case", PREFILL_CASES)
def test_prefill_matches_reference(case: dict) -> None:
    batch = make_batch(**case)
    k_cache, v_cache = batch.stored()
    out = prefill_attention(batch.q, k_cache, v_cache, batch.meta, batch.scale)
    expected = paged_attention_ref(batch.q, (k_cache, v_cache), batch.meta, batch.scale)
    assert out.dtype == batch.q.dtype
    assert_close(out, expected, case.get("dtype", F32))


DECODE_CASES = [
    pytest.param(
        dict(own_lens=[1, 5, 9, 3, 12], paths=[(0,)] * 3 + [(1,)] * 2, group_level=1, heads=(4, 4)),
        1,
        id="f32-gqa1-d64-1level",
    ),
    pytest.param(
        dict(
            own_lens=[2, 17, 30, 5],
            paths=[(0, 0), (0, 0), (0, 1), (1, 0)],
            level_blocks=2,
            group_level=2,
            heads=(8, 2),
            head_dim=128,
            block_size=16,
            dtype=BF16,
        ),
        2,
        id="bf16-gqa4-d128-2levels-2splits",
    ),
    pytest.param(
        dict(
            own_lens=[3 + i for i in range(10)] + [4],
            paths=[(0, i % 2, i % 3) for i in range(10)] + [(1, 0, 0)],
            group_level=1,
            heads=(8, 1),
            dtype=F16,
        ),
        3,
        id="f16-gqa8-d64-3levels-outer-group-2tiles-3splits",
    ),
    pytest.param(
        dict(
            own_lens=[6, 1, 9],
            paths=[(0, 0), (0, 0), (1, 1)],
            group_level=2,
            heads=(8, 2),
            head_dim=96,
            block_size=4,
        ),
        None,
        id="f32-gqa4-d96-2levels-auto-splits",
    ),
]


@pytest.mark.parametrize(("case", "num_splits"), DECODE_CASES)
def test_decode_kernels_match_reference(case: dict, num_splits: int | None) -> None:
    batch = make_batch(query_lens=[1] * len(case["own_lens"]), **case)
    k_cache, v_cache = batch.stored()
    expected = paged_attention_ref(batch.q, (k_cache, v_cache), batch.meta, batch.scale)
    dtype = case.get("dtype", F32)
    cascade = prefix_decode_ref(batch.q, (k_cache, v_cache), batch.meta, batch.scale)
    assert_close(cascade, expected, dtype)
    plain = paged_decode_attention(batch.q, k_cache, v_cache, batch.meta, batch.scale)
    assert_close(plain, expected, dtype)
    prefix = prefix_decode_attention(batch.q, k_cache, v_cache, batch.meta, batch.scale, num_splits)
    assert prefix.dtype == batch.q.dtype
    assert_close(prefix, expected, dtype)


def test_prefix_decode_handles_rows_outside_groups_and_empty_prefixes() -> None:
    batch = make_batch(query_lens=[1] * 5, own_lens=[3, 4, 5, 6, 7], paths=[(0,)] * 5, level_blocks=2)
    groups = DecodeGroups(  # rows 0 and 4 in no group; group 1 claims no shared block
        group_start_loc=torch.tensor([1, 3, 4], dtype=torch.int32, device=DEVICE),
        shared_blocks=torch.tensor([2, 0], dtype=torch.int32, device=DEVICE),
        max_group_size=2,
    )
    meta = dataclasses.replace(batch.meta, decode_groups=groups)
    k_cache, v_cache = batch.stored()
    out = prefix_decode_attention(batch.q, k_cache, v_cache, meta, batch.scale, num_splits=2)
    assert_close(out, paged_attention_ref(batch.q, (k_cache, v_cache), meta, batch.scale), F32)
    assert_close(prefix_decode_ref(batch.q, (k_cache, v_cache), meta, batch.scale), out, F32)


@pytest.mark.parametrize(("dtype", "head_dim", "num_kv_heads"), [(F32, 64, 2), (BF16, 128, 1), (F16, 80, 3)])
def test_store_kv_matches_reference_with_large_block_ids(
    dtype: torch.dtype, head_dim: int, num_kv_heads: int
) -> None:
    # 40k blocks of 2 slots: block ids run to ~40k while the cache stays a few MiB.
    batch = make_batch(
        [3, 2],
        [5, 9],
        heads=(num_kv_heads, num_kv_heads),
        head_dim=head_dim,
        block_size=2,
        dtype=dtype,
        num_blocks=40_000,
    )
    assert batch.meta.block_tables.max() > 30_000
    k_cache, v_cache = batch.k_cache.clone(), batch.v_cache.clone()
    store_kv(batch.k, batch.v, k_cache, v_cache, batch.meta.slot_mapping)
    expected_k, expected_v = batch.stored()
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


def test_attention_reads_large_block_ids() -> None:
    batch = make_batch(
        [1, 4], [9, 7], paths=[(0,), (0,)], heads=(4, 1), head_dim=16, block_size=2, num_blocks=60_000
    )
    k_cache, v_cache = batch.stored()
    out = prefill_attention(batch.q, k_cache, v_cache, batch.meta, batch.scale)
    assert_close(out, paged_attention_ref(batch.q, (k_cache, v_cache), batch.meta, batch.scale), F32)


@triton.jit
def _offsets_kernel(out, block_ids, stride_b, stride_s, stride_h, stride_d):  # out: [4, 4] int64
    r = tl.arange(0, 4)
    offs = kv_offsets(tl.load(block_ids + r), r, r, r, stride_b, stride_s, stride_h, stride_d)
    tl.store(out + r[:, None] * 4 + r[None, :], offs)


def test_kv_offsets_do_not_overflow_int32() -> None:
    # Only the address math runs: block id * block stride passes 2**31 without any big tensor.
    block_ids = torch.tensor([0, 70_000, 2**20, 2**31 - 1], dtype=torch.int32, device=DEVICE)
    strides = (2**16 + 3, 4096, 128, 1)
    out = torch.empty((4, 4), dtype=torch.int64, device=DEVICE)
    _offsets_kernel[(1,)](out, block_ids, *strides)
    expected = [
        [b * strides[0] + r * (strides[1] + strides[2]) + d for d in range(4)]
        for r, b in enumerate(block_ids.tolist())
    ]
    assert out.tolist() == expected
    assert max(map(max, expected)) > 2**31


def _random_state(
    tokens: int, heads: int, head_dim: int, dtype: torch.dtype, gen: torch.Generator
) -> AttentionState:
    lse = torch.randn(tokens, heads, generator=gen) * 3
    lse[0, :] = float("-inf")  # this part saw nothing for token 0
    out = torch.randn(tokens, heads, head_dim, generator=gen).to(dtype)
    return AttentionState(out.to(DEVICE), lse.to(DEVICE))


@pytest.mark.parametrize(("dtype", "head_dim"), [(F32, 64), (BF16, 128), (F16, 80)])
def test_merge_states_matches_reference(dtype: torch.dtype, head_dim: int) -> None:
    gen = torch.Generator().manual_seed(1)
    a, b = _random_state(5, 6, head_dim, dtype, gen), _random_state(5, 6, head_dim, dtype, gen)
    b.lse[1, 2] = float("-inf")
    a.lse[2, 3] = float("-inf")
    merged = merge_state_stack(torch.stack([a.out, b.out]), torch.stack([a.lse, b.lse]))
    expected_out, expected_lse = merge_attention_states(a, b)
    assert merged.out.dtype == dtype
    assert torch.all(merged.lse[0] == float("-inf")) and torch.all(merged.out[0] == 0)
    assert_close(merged.out, expected_out, dtype)
    torch.testing.assert_close(merged.lse, expected_lse)


def test_merging_nested_prefix_levels_equals_full_attention() -> None:
    batch = make_batch([1] * 3, [4, 9, 2], paths=[(0, 0, 0), (0, 0, 1), (0, 1, 1)], level_blocks=2)
    k_cache, v_cache = batch.stored()
    bounds = [0, 16, 32, 48]  # three prefix levels of 2 blocks x 8 slots, then each row's own tokens
    for row, seq_len in enumerate(batch.meta.seq_lens_cpu):
        q, table = batch.q[row : row + 1], batch.meta.block_tables[row]

        def state_over(span: range, q: torch.Tensor = q, table: torch.Tensor = table) -> AttentionState:
            k, v = gather_kv_ref(k_cache, table, span), gather_kv_ref(v_cache, table, span)
            return AttentionState(*attention_state_ref(q, k, v, batch.scale))

        parts = [state_over(range(lo, hi)) for lo, hi in zip(bounds, [*bounds[1:], seq_len], strict=True)]
        nested = parts[0]
        for part in parts[1:]:
            nested = AttentionState(*merge_attention_states(nested, part))
        stacked = merge_state_stack(torch.stack([p.out for p in parts]), torch.stack([p.lse for p in parts]))
        full = state_over(range(seq_len))
        for state in (nested, stacked):
            assert_close(state.out, full.out, F32)
            torch.testing.assert_close(state.lse, full.lse)


@pytest.mark.parametrize(
    ("query_lens", "own_lens", "group_level"),
    [([1, 6, 1, 3], [4, 8, 2, 3], 0), ([1, 1, 1, 1], [4, 8, 2, 3], 1), ([1, 1, 1, 1], [4, 8, 2, 3], 0)],
    ids=["mixed-prefill", "decode-grouped", "decode-plain"],
)
def test_triton_backend_matches_reference(
    query_lens: list[int], own_lens: list[int], group_level: int
) -> None:
    batch = make_batch(
        query_lens,
        own_lens,
        paths=[(0, 0), (0, 0), (0, 1), (1, 0)],
        group_level=group_level,
        heads=(8, 2),
        dtype=F16,
    )
    assert (batch.meta.decode_groups is not None) == (group_level > 0)
    k_cache, v_cache = batch.k_cache.clone(), batch.v_cache.clone()
    out = TritonAttention().forward(batch.q, batch.k, batch.v, (k_cache, v_cache), batch.meta, batch.scale)
    expected_cache = batch.stored()
    assert torch.equal(k_cache, expected_cache[0]) and torch.equal(v_cache, expected_cache[1])
    assert_close(out, paged_attention_ref(batch.q, expected_cache, batch.meta, batch.scale), F16)


def test_launchers_reject_mismatched_inputs() -> None:
    batch = make_batch([1, 1], [3, 4], paths=[(0,), (0,)], group_level=1)
    k_cache, v_cache = batch.stored()
    with pytest.raises(ValueError, match="dtype"):
        prefill_attention(batch.q.half(), k_cache, v_cache, batch.meta, batch.scale)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        prefill_attention(batch.q[:, :3], k_cache, v_cache, batch.meta, batch.scale)
    with pytest.raises(ValueError, match="decode_groups"):
        prefix_decode_attention(
            batch.q, k_cache, v_cache, dataclasses.replace(batch.meta, decode_groups=None), 1.0
        )
    prefill = make_batch([2, 1], [3, 4])
    with pytest.raises(ValueError, match="one new token"):
        paged_decode_attention(prefill.q, *prefill.stored(), prefill.meta, 1.0)
    with pytest.raises(ValueError, match="slot_mapping"):
        store_kv(batch.k, batch.v, k_cache, v_cache, batch.meta.slot_mapping[:1])


def test_triton_backend_splits_a_mixed_step():
    """The Triton backend runs a mixed step's decode rows through the prefix decode kernel and its
    prefill chunks through the prefill kernel: together equal to the torch general path."""
    import numpy as np
    from test_torch_attention import _mixed_step

    from batchllm.kernels.decode_part import split_mixed_step
    from batchllm.kernels.metadata import build_metadata
    from batchllm.kernels.torch_backend import varlen_attention

    torch.manual_seed(3)
    q_lens, seq_lens, tables, slots, groups = _mixed_step(4)
    to_dev = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(DEVICE)  # noqa: E731
    meta = build_metadata(q_lens, seq_lens, tables, slots, groups, 4, to_dev)
    dev = {f: getattr(meta, f) for f in ("query_start_loc", "seq_lens", "block_tables", "slot_mapping")}
    split = split_mixed_step(q_lens, seq_lens, groups, dev)
    cache = (torch.randn(200, 4, 2, 64, device=DEVICE), torch.randn(200, 4, 2, 64, device=DEVICE))
    q = torch.randn(int(q_lens.sum()), 4, 64, device=DEVICE)
    expected = varlen_attention(q, *cache, meta, 0.125)
    got = TritonAttention().attend(q, cache, dataclasses.replace(meta, mixed_split=split), 0.125)
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=2e-3)


def test_triton_backend_runs_short_chunks_as_one_token_rows():
    """Short chunks under shared prefixes (kernels/short_chunks.py) through the prefix decode kernel, the
    step's other rows through the prefill kernel: together equal to the reference."""
    import numpy as np
    from test_short_chunks import GROUPS, ROWS, short_meta

    torch.manual_seed(6)
    to_dev = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(DEVICE)  # noqa: E731
    meta, short = short_meta(ROWS, GROUPS, 4, to_dev)
    assert short.mixed_split is not None
    cache = (torch.randn(300, 4, 1, 32, device=DEVICE), torch.randn(300, 4, 1, 32, device=DEVICE))
    q = torch.randn(short.slot_mapping.shape[0], 2, 32, device=DEVICE)
    expected = paged_attention_ref(q, cache, meta, 0.125)
    got = TritonAttention().attend(q, cache, short, 0.125)
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=2e-3)
