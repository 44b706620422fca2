"""The torch backend's prefill cascade (a group's shared prefix read once for all its rows' new
tokens, each row's own context causally, merged by log-sum-exp) equals attention over each row's
whole context: the general path and the plain reference."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from paged_rows import paged_rows

from batchllm.kernels import kv_gather, torch_prefill_cascade
from batchllm.kernels.decode_part import split_mixed_step
from batchllm.kernels.metadata import build_metadata
from batchllm.kernels.reference import paged_attention_ref
from batchllm.kernels.torch_backend import TorchAttention, varlen_attention
from batchllm.kernels.torch_prefill_cascade import prefill_cascade_plan

BS = 4
# (shared block ids, seq_len, query_len) per row; groups (starts with n last, shared blocks).
# Group 0: three rows under blocks 10-12, chunks of 5, 1 and 9 tokens; the second row starts at
# position 14, mid-block (after a copied partial prefix block); the third has earlier own tokens.
# Rows 3 and 4 are in no group; group 2 (rows 5-7) under blocks 20-21; row 8 claims 2 shared blocks
# of which its chunk starts inside the second: only the first block is read as its group's prefix.
ROWS = [
    ([10, 11, 12], 19, 5), ([10, 11, 12], 15, 1), ([10, 11, 12], 30, 9),
    ([], 9, 9), ([], 6, 2),
    ([20, 21], 17, 7), ([20, 21], 10, 2), ([20, 21], 26, 16),
    ([30, 31], 11, 5), ([30, 31], 9, 3),
]  # fmt: skip
GROUPS = (np.array([0, 3, 4, 5, 8, 10]), np.array([3, 0, 0, 2, 2]))


@pytest.fixture(autouse=True)
def _every_group_pays(monkeypatch):
    """The tiny groups here would stay on the general path under the default threshold."""
    monkeypatch.setattr(torch_prefill_cascade, "MIN_SHARED_READS", 0)


def _step(rows=ROWS, groups=GROUPS):
    q_lens, seq_lens, tables, slots = paged_rows(rows, BS, 10)
    return build_metadata(q_lens, seq_lens, tables, slots, groups, BS, torch.from_numpy)


def _inputs(meta, kv_heads: int, heads: int, d: int = 8):
    cache = (torch.randn(200, BS, kv_heads, d), torch.randn(200, BS, kv_heads, d))
    return torch.randn(int(sum(meta.query_lens_cpu)), heads, d), cache


def _assert_matches_reference(q, cache, meta) -> None:
    expected = paged_attention_ref(q, cache, meta, 0.3)
    torch.testing.assert_close(TorchAttention().attend(q, cache, meta, 0.3), expected)


@pytest.mark.parametrize("kv_heads, heads", [(1, 1), (2, 6), (2, 2)])
def test_prefill_cascade_equals_the_general_path(kv_heads, heads):
    torch.manual_seed(0)
    meta = _step()
    plan = prefill_cascade_plan(meta, BS)
    assert plan is not None and plan.other_rows == (3, 4)
    assert [g.prefix_table.tolist() for g in plan.groups] == [[[10, 11, 12]], [[20, 21]], [[30]]]
    q, cache = _inputs(meta, kv_heads, heads)
    got = TorchAttention().attend(q, cache, meta, 0.3)
    torch.testing.assert_close(got, varlen_attention(q, *cache, meta, 0.3))
    torch.testing.assert_close(got, paged_attention_ref(q, cache, meta, 0.3))


def test_prefill_cascade_reads_a_bounded_number_of_rows_at_a_time(monkeypatch):
    """A small gather budget: suffix rows a few at a time, the prefix's queries in slices."""
    monkeypatch.setattr(kv_gather, "GATHER_ELEMENTS", 64)
    monkeypatch.setattr("batchllm.kernels.torch_prefill_cascade.GATHER_ELEMENTS", 64)
    torch.manual_seed(1)
    meta = _step()
    q, cache = _inputs(meta, 2, 4)
    _assert_matches_reference(q, cache, meta)


def test_cascade_only_where_shared_blocks_come_before_the_chunks():
    """A group's prefix stops at its rows' first new token; groups of one row, no shared blocks, or
    a row whose chunk starts at 0 leave the rows on the general path."""
    rows = [([10], 6, 6), ([10], 7, 3), ([], 5, 5), ([20, 21], 9, 2), ([20, 21], 9, 2)]
    meta = _step(rows, (np.array([0, 2, 3, 5]), np.array([1, 0, 2])))
    plan = prefill_cascade_plan(meta, BS)
    assert plan.other_rows == (0, 1, 2) and [g.prefix_table.tolist() for g in plan.groups] == [[[20]]]
    q, cache = _inputs(meta, 2, 4)
    _assert_matches_reference(q, cache, meta)
    assert prefill_cascade_plan(_step(rows, (np.array([0, 2, 3, 5]), np.array([1, 0, 0]))), BS) is None
    assert _step(rows, (np.arange(6), np.array([1, 1, 0, 2, 2]))).prefill_groups is None


def test_windowed_layers_keep_the_general_path():
    torch.manual_seed(2)
    meta = _step()
    q, cache = _inputs(meta, 2, 4)
    got = TorchAttention().attend(q, cache, meta, 0.3, window=6)
    torch.testing.assert_close(got, paged_attention_ref(q, cache, meta, 0.3, window=6))


def test_mixed_step_rest_part_uses_the_prefill_cascade():
    """Decode rows among the groups: they run apart (cascade decode); the prefill rows' groups,
    restricted to them, reach the rest part's metadata; the whole equals the reference."""
    torch.manual_seed(3)
    rows = [*ROWS[:3], ([10, 11, 12], 18, 1), ([10, 11, 12], 22, 1), *ROWS[3:]]
    groups = (np.array([0, 5, 6, 7, 10, 12]), np.array([3, 0, 0, 2, 2]))
    meta = _step(rows, groups)
    dev = {f: getattr(meta, f) for f in ("query_start_loc", "seq_lens", "block_tables", "slot_mapping")}
    q_lens, seq_lens = np.array(meta.query_lens_cpu), np.array(meta.seq_lens_cpu)
    split = split_mixed_step(q_lens, seq_lens, groups, dev)
    assert split is not None and split.rest.prefill_groups.starts == (0, 2, 3, 4, 7, 9)
    assert prefill_cascade_plan(split.rest, BS).other_rows == (2, 3)
    q, cache = _inputs(meta, 2, 4)
    got = TorchAttention().attend(q, cache, dataclasses.replace(meta, mixed_split=split), 0.3)
    torch.testing.assert_close(got, paged_attention_ref(q, cache, meta, 0.3))


def test_small_groups_and_groups_past_the_cap_keep_the_general_path(monkeypatch):
    """Groups whose rows would re-read few shared positions are not worth their per-layer ops; past
    MAX_GROUPS, the groups that save most are kept."""
    meta = _step()  # saved reads: group 0: 2 * 12, group 3: 2 * 8, group 4: 1 * 4
    monkeypatch.setattr(torch_prefill_cascade, "MIN_SHARED_READS", 16)
    assert prefill_cascade_plan(meta, BS).other_rows == (3, 4, 8, 9)
    monkeypatch.setattr(torch_prefill_cascade, "MIN_SHARED_READS", 0)
    monkeypatch.setattr(torch_prefill_cascade, "MAX_GROUPS", 1)
    plan = prefill_cascade_plan(_step(), BS)
    assert plan.other_rows == (3, 4, 5, 6, 7, 8, 9) and len(plan.groups) == 1
    q, cache = _inputs(meta, 2, 4)
    expected = paged_attention_ref(q, cache, meta, 0.3)
    torch.testing.assert_close(TorchAttention().attend(q, cache, _step(), 0.3), expected)
    monkeypatch.setattr(torch_prefill_cascade, "MIN_SHARED_READS", 10**6)
    assert prefill_cascade_plan(_step(), BS) is None


def test_run_through_the_prefill_cascade_matches_transformers(tmp_path, tiny_models, make_rows, monkeypatch):
    """End to end, in process: a run whose prefill steps take the cascade gives transformers' tokens."""
    from test_run import expected, got, run_job

    calls = []
    monkeypatch.setattr(torch_prefill_cascade, "_plan", _counted(torch_prefill_cascade._plan, calls))
    texts = make_rows(num_groups=2, rows_per_group=4, duplicates=0, seed=3)
    rows, _ = run_job(tmp_path, tiny_models["llama"], texts, "--max-new-tokens", "4")
    assert any(plan is not None for plan in calls)
    assert got(rows) == expected(tiny_models["llama"], texts, 4)


def _counted(fn, calls: list):
    def wrapper(*args):
        calls.append(fn(*args))
        return calls[-1]

    return wrapper
