"""The torch backend's cascade decode (shared prefix once per group + each row's suffix, merged by
log-sum-exp) equals plain decode attention over each row's whole context."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from paged_rows import paged_rows

from batchllm.kernels import kv_gather
from batchllm.kernels.decode_part import split_mixed_step
from batchllm.kernels.metadata import AttentionMetadata, DecodeGroups, build_metadata
from batchllm.kernels.torch_backend import TorchAttention, decode_attention, varlen_attention
from batchllm.kernels.torch_cascade import cascade_decode_attention


def _meta(
    rows: list[tuple[list[int], int]], starts: list[int], shared: list[int], bs: int
) -> AttentionMetadata:
    """rows: (shared block ids, seq_len); each row gets fresh blocks after its shared ones."""
    tables, lens, nxt = [], [], 100
    for shared_ids, seq_len in rows:
        table = list(shared_ids)
        while len(table) < math.ceil(seq_len / bs):
            table.append(nxt)
            nxt += 1
        tables.append(table)
        lens.append(seq_len)
    bt = torch.zeros(len(rows), max(map(len, tables)), dtype=torch.int32)
    for i, t in enumerate(tables):
        bt[i, : len(t)] = torch.tensor(t)
    n = len(rows)
    groups = DecodeGroups(
        torch.tensor(starts, dtype=torch.int32), torch.tensor(shared, dtype=torch.int32),
        max(b - a for a, b in zip(starts, starts[1:])), tuple(starts), tuple(shared),
    )  # fmt: skip
    return AttentionMetadata(
        torch.arange(n + 1, dtype=torch.int32), torch.tensor(lens, dtype=torch.int32), bt,
        torch.zeros(n, dtype=torch.long), 1, max(lens), (1,) * n, tuple(lens), groups,
    )  # fmt: skip


@pytest.mark.parametrize("kv_heads, heads", [(1, 1), (2, 6), (2, 2)])
def test_cascade_decode_equals_plain_decode(kv_heads, heads):
    torch.manual_seed(0)
    bs, d = 4, 16
    k_cache, v_cache = torch.randn(200, bs, kv_heads, d), torch.randn(200, bs, kv_heads, d)
    a, b = [10, 11, 12], [20]
    rows = [
        (a, 17),
        (a, 13),
        (a, 20),
        ([], 20),
        ([], 3),
        (b, 9),
        (b, 5),
    ]  # (a, 20): suffix ends in the last column
    meta = _meta(rows, starts=[0, 3, 4, 5, 7], shared=[3, 0, 0, 1], bs=bs)
    q = torch.randn(len(rows), heads, d)
    expected = decode_attention(q, k_cache, v_cache, meta, 0.3)
    torch.testing.assert_close(cascade_decode_attention(q, k_cache, v_cache, meta, 0.3), expected)


@pytest.mark.parametrize("gather_elements", [None, 100])
def test_cascade_decode_many_groups_of_mixed_sizes(gather_elements, monkeypatch):
    """Groups of sizes 1..9 and prefixes of 1..4 blocks (several padded buckets), rows outside any
    group at both ends: still equal to plain decode. ``gather_elements``: a small gather budget
    forces the rows and groups to be read a few at a time, through one reused buffer."""
    if gather_elements is not None:
        monkeypatch.setattr(kv_gather, "GATHER_ELEMENTS", gather_elements)
    torch.manual_seed(1)
    bs, d, kv_heads, heads = 4, 8, 2, 4
    k_cache, v_cache = torch.randn(400, bs, kv_heads, d), torch.randn(400, bs, kv_heads, d)
    rows, starts, shared, block = [([], 7)], [1], [], 10
    for g, size in enumerate([1, 9, 2, 5, 3, 8, 4, 1, 6]):
        prefix = list(range(block, block + 1 + g % 4))
        block += len(prefix)
        rows += [(prefix, len(prefix) * bs + 1 + (r * 3) % 11) for r in range(size)]
        shared.append(len(prefix) if g != 4 else 0)  # one group leaves its prefix to its rows
        starts.append(len(rows))
    rows.append(([], 5))
    meta = _meta(rows, starts=starts, shared=shared, bs=bs)
    q = torch.randn(len(rows), heads, d)
    expected = decode_attention(q, k_cache, v_cache, meta, 0.3)
    torch.testing.assert_close(cascade_decode_attention(q, k_cache, v_cache, meta, 0.3), expected)


def _mixed_step(bs: int):
    """Rows (shared block ids, seq_len, query_len): decode rows of two groups around prefill chunks."""
    a, b = [10, 11, 12], [20, 21]
    rows = [(a, 17, 1), (a, 20, 6), (a, 14, 1), (a, 19, 1), ([], 9, 9), (b, 12, 1), (b, 10, 1), ([], 5, 1)]
    starts, shared = np.array([0, 4, 5, 7, 8]), np.array([3, 0, 2, 0])
    return (*paged_rows(rows, bs, 8), (starts, shared))


@pytest.mark.parametrize("kv_heads, heads", [(1, 2), (2, 4)])
def test_mixed_step_split_equals_the_general_path(kv_heads, heads):
    """Decode rows of a mixed step run apart (cascade over their groups), prefill chunks through the
    general path: the outputs equal the general path over the whole step."""
    torch.manual_seed(2)
    bs, d = 4, 8
    q_lens, seq_lens, tables, slots, groups = _mixed_step(bs)
    meta = build_metadata(q_lens, seq_lens, tables, slots, groups, bs, torch.from_numpy)
    dev = {f: getattr(meta, f) for f in ("query_start_loc", "seq_lens", "block_tables", "slot_mapping")}
    split = split_mixed_step(q_lens, seq_lens, groups, dev)
    assert split is not None and split.decode.decode_groups.group_start_cpu == (0, 3, 5, 6)
    cache = (torch.randn(200, bs, kv_heads, d), torch.randn(200, bs, kv_heads, d))
    q = torch.randn(int(q_lens.sum()), heads, d)
    expected = varlen_attention(q, *cache, meta, 0.3)
    got = TorchAttention().attend(q, cache, dataclasses.replace(meta, mixed_split=split), 0.3)
    torch.testing.assert_close(got, expected)


def test_no_split_when_no_two_decode_rows_share():
    q_lens, seq_lens, tables, slots, (starts, shared) = _mixed_step(4)
    meta = build_metadata(q_lens, seq_lens, tables, slots, (starts, shared), 4, torch.from_numpy)
    dev = {f: getattr(meta, f) for f in ("query_start_loc", "seq_lens", "block_tables", "slot_mapping")}
    assert split_mixed_step(q_lens, seq_lens, (starts, np.zeros_like(shared)), dev) is None
    assert split_mixed_step(np.ones_like(q_lens), seq_lens, (starts, shared), dev) is None
