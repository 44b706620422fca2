"""Scheduler and block pool without a model: block accounting, sharing, preemption."""

from __future__ import annotations

import random

import pytest

from batchllm.scheduler.block_pool import BlockPool
from batchllm.scheduler.scheduler import Scheduler
from batchllm.scheduler.seq import Seq


def test_block_pool_refcounts():
    pool = BlockPool(4)
    a = pool.allocate(3)
    assert a is not None and pool.num_free == 1
    assert pool.allocate(2) is None
    pool.retain(a[:2])
    pool.release(a)
    assert pool.num_free == 2
    pool.check_invariants()
    pool.release(a[:2])
    assert pool.num_free == 4
    pool.check_invariants()
    with pytest.raises(RuntimeError):
        pool.retain([0])


def _work(rng: random.Random, block_size: int, nested: bool):
    """Prefix nodes (nested when asked) with rows beneath, in depth-first order."""
    work, rows = [], []
    system = Seq.prefix(1000, [1] * rng.randint(1, 3 * block_size))
    work.append(system)
    for g in range(3):
        parent = system
        if nested:
            group = Seq.prefix(2000 + g, parent.token_ids + [2] * rng.randint(1, 9), parent)
            work.append(group)
            parent = group
        for _ in range(rng.randint(1, 4)):
            tokens = parent.token_ids + [3] * rng.randint(1, 2 * block_size)
            row = Seq.row(len(rows), tokens, parent)
            rows.append(row)
            work.append(row)
            node = parent
            while node is not None:
                node.pending_rows += 1
                node = node.parent
    return work, rows


def _drive(sched: Scheduler, rng: random.Random, max_new: int) -> int:
    steps = 0
    while sched.has_work():
        step = sched.schedule()
        sched.check_invariants()
        for chunk in step.chunks:
            seq = chunk.seq
            if seq.parent is not None and chunk.start < seq.parent.prompt_len:
                raise AssertionError("a sequence recomputed tokens of its shared prefix")
        sched.after_step(step)
        for chunk in step.chunks:
            if chunk.sample:
                chunk.seq.token_ids.append(rng.randint(0, 9))
                if len(chunk.seq.output_ids) >= max_new:
                    sched.finish(chunk.seq, "length")
        sched.check_invariants()
        steps += 1
    return steps


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("num_blocks", [12, 200])
def test_scheduler_frees_everything(seed: int, num_blocks: int):
    rng = random.Random(seed)
    block_size = 4
    work, rows = _work(rng, block_size, nested=seed % 2 == 0)
    pool = BlockPool(num_blocks)
    sched = Scheduler(
        pool, block_size, token_budget=rng.choice([3, 16, 64]), max_running=8, max_new_tokens=12
    )
    for seq in work:
        sched.add(seq)
    _drive(sched, rng, max_new=12)
    assert pool.num_free == num_blocks, "KV pool leaked blocks"
    assert not sched.live_prefixes
    assert all(r.finish_reason == "length" for r in rows)
    assert all(r.cached_tokens == r.parent.prompt_len for r in rows)


def test_tiny_pool_forces_preemption():
    rng = random.Random(0)
    rows = [Seq.row(i, [1] * 6) for i in range(6)]
    pool = BlockPool(8)
    sched = Scheduler(pool, block_size=4, token_budget=64, max_running=6, max_new_tokens=10)
    for r in rows:
        sched.add(r)
    _drive(sched, rng, max_new=10)
    assert sched.num_preemptions > 0
    assert pool.num_free == 8
    assert all(len(r.output_ids) == 10 for r in rows)


def test_prefix_freed_when_its_last_row_finishes():
    pool = BlockPool(32)
    sched = Scheduler(pool, block_size=4, token_budget=64, max_running=4, max_new_tokens=8)
    prefix = Seq.prefix(0, [5] * 10, pending_rows=2)
    a = Seq.row(0, [5] * 10 + [1, 2], prefix)
    b = Seq.row(1, [5] * 10 + [3], prefix)
    for s in (prefix, a, b):
        sched.add(s)
    step = sched.schedule()  # the prefix alone: rows wait until it is prefilled
    assert [c.seq for c in step.chunks] == [prefix]
    sched.after_step(step)
    step = sched.schedule()
    assert {c.seq for c in step.chunks} == {a, b}
    assert len(step.block_copies) == 2  # each row copies the prefix's partial last block
    assert all(c.start == 10 for c in step.chunks)
    sched.after_step(step)
    sched.finish(a, "stop")
    assert prefix in sched.live_prefixes
    sched.finish(b, "stop")
    assert prefix not in sched.live_prefixes
    assert pool.num_free == 32
    sched.check_invariants()


@pytest.mark.parametrize("seed", range(40))
def test_smallest_allowed_pool_never_deadlocks(seed: int):
    """The engine accepts a pool that holds the longest row plus one block per prefix level; idle
    shared prefixes must never starve the rows ahead of them there."""
    rng = random.Random(100 + seed)
    block_size, max_new = rng.choice([1, 2, 4]), rng.randint(1, 20)
    work, rows = _work(rng, block_size, nested=seed % 2 == 0)
    longest = max(-(-(r.prompt_len + max_new) // block_size) for r in rows)
    pool = BlockPool(longest + 2 + 1)
    sched = Scheduler(
        pool, block_size, rng.choice([2, 7, 64]), rng.choice([1, 3, 16]), max_new_tokens=max_new
    )
    for seq in work:
        sched.add(seq)
    _drive(sched, rng, max_new=max_new)
    assert pool.num_free == pool.num_blocks
    assert all(len(r.output_ids) == max_new for r in rows)
