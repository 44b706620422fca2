"""Host side of the step loop: persistent batch state, vectorised step inputs, the overlapped loop
(run on the CPU as logic) and the KV cache allocated once per model host."""

from __future__ import annotations

import random

import numpy as np
import pytest

from batchllm.config import EngineConfig, SamplingParams
from batchllm.engine import model_host
from batchllm.engine.loop import Engine
from batchllm.engine.model_host import ModelHost
from batchllm.engine.step_inputs import step_inputs
from batchllm.model.config import load_model_config
from batchllm.model.tokenizer import load_tokenizer
from batchllm.scheduler.batch_state import DEFER_TOKENS, BatchState
from batchllm.scheduler.block_pool import BlockPool
from batchllm.scheduler.scheduler import Scheduler
from batchllm.scheduler.seq import Seq


def _host(path, sampling: SamplingParams, **engine) -> ModelHost:
    cfg = EngineConfig(device="cpu", **engine)
    return ModelHost(path, load_model_config(path), load_tokenizer(path), cfg, sampling)


def _work(seed: int, vocab: int = 500) -> tuple[list[Seq], list[Seq]]:
    """A system prefix, two group prefixes beneath it, rows under each and two rows on their own."""
    rng = random.Random(seed)
    system = Seq.prefix(0, [rng.randrange(vocab) for _ in range(21)])
    work, rows = [system], []
    for g in range(2):
        group = Seq.prefix(1 + g, system.token_ids + [rng.randrange(vocab) for _ in range(9)], system)
        work.append(group)
        for _ in range(4):
            row = Seq.row(len(rows), group.token_ids + [rng.randrange(vocab) for _ in range(5)], group)
            work.append(row)
            rows.append(row)
            group.pending_rows += 1
            system.pending_rows += 1
    for _ in range(2):
        row = Seq.row(len(rows), [rng.randrange(vocab) for _ in range(7)])
        work.append(row)
        rows.append(row)
    return work, rows


def test_batch_state_keeps_order_through_removals():
    batch = BatchState(capacity=2, width=1)
    seqs = [Seq.row(i, [i, i + 1]) for i in range(7)]
    for i, seq in enumerate(seqs):
        seq.block_table = list(range(10 * i, 10 * i + 1 + i % 3))
        batch.add(seq)
    for i in (1, 4, 6):  # 6 is the last slot: popped at once, no hole
        batch.remove(seqs[i])
    batch.compact()
    batch.check_invariants()
    kept = [seqs[i] for i in (0, 2, 3, 5)]
    assert batch.seqs == kept and [s.slot for s in kept] == [0, 1, 2, 3]
    assert [batch.block_table(s.slot) for s in kept] == [s.block_table for s in kept]
    assert batch.last_token[:4].tolist() == [s.token_ids[-1] for s in kept]


def test_deferred_tokens_join_their_rows_in_order():
    """Sampled tokens held in the batch state reach each row's token list in order: when enough have
    gathered (DEFER_TOKENS), when a row leaves, and across a compaction that moves rows' slots."""
    batch = BatchState(capacity=2, width=1)
    seqs = [Seq.row(i, [100 + i]) for i in range(4)]
    for seq in seqs:
        seq.block_table = [seq.index]
        batch.add(seq)
    want = {seq.index: list(seq.token_ids) for seq in seqs}
    for step in range(2 * DEFER_TOKENS + 5):
        if step == 10:
            batch.remove(seqs[1])  # leaves mid-way: its 10 held tokens are written back
            batch.compact()
        live = [seq for seq in seqs if seq.slot is not None]
        slots = np.array([seq.slot for seq in live])
        tokens = np.array([1000 * seq.index + step for seq in live])
        batch.defer_tokens(slots, tokens)
        for seq, token in zip(live, tokens.tolist()):
            want[seq.index].append(token)
        batch.check_invariants()
    assert seqs[1].token_ids == want[1]
    for seq in seqs[2:]:
        batch.remove(seq)
    assert [seq.token_ids for seq in seqs[2:]] == [want[2], want[3]]
    assert len(seqs[0].token_ids) == 1 + 2 * DEFER_TOKENS  # two flushes so far, 5 tokens still held
    batch.remove(seqs[0])
    assert seqs[0].token_ids == want[0]


def _reference_inputs(step, block_size: int):
    """The per-row build the vectorised one replaced."""
    ids, positions, slots = [], [], []
    for c in step.chunks:
        table = step.tables[step.seqs.index(c.seq)]
        pos = np.arange(c.start, c.end)
        ids += c.seq.token_ids[c.start : c.end]
        positions += pos.tolist()
        slots += (table[pos // block_size].astype(np.int64) * block_size + pos % block_size).tolist()
    return ids, positions, slots


@pytest.mark.parametrize("budget", [3, 16, 64])
def test_step_inputs_equal_the_per_row_build(budget: int):
    work, rows = _work(budget)
    sched = Scheduler(BlockPool(400), 4, budget, max_running=6, max_new_tokens=5)
    for seq in work:
        sched.add(seq)
    rng = random.Random(budget)
    while sched.has_work():
        step = sched.schedule()
        inputs = step_inputs(step, 4)
        ids, positions, slots = _reference_inputs(step, 4)
        assert inputs.input_ids.tolist() == ids
        assert inputs.positions.tolist() == positions and inputs.slot_mapping.tolist() == slots
        assert inputs.seq_lens.tolist() == [c.end for c in step.chunks]
        sched.after_step(step)
        for seq, token in zip(step.sampled_seqs, range(len(step.sampled_seqs))):
            seq.token_ids.append(token)
            sched.batch.last_token[seq.slot] = token
            if seq.num_output >= 5 or rng.random() < 0.1:
                sched.finish(seq, "length")
        sched.check_invariants()
    assert all(r.finish_reason for r in rows)


@pytest.mark.parametrize("kv_memory", [None, "0.035MB"])  # 0.035MB: 17 blocks of 4 tokens
def test_overlap_gives_the_same_tokens(tiny_models, kv_memory):
    """The overlapped loop (CUDA's), run on the CPU: the same greedy tokens and finish reasons, with
    EOS stops, length stops and (with the small pool) preemptions."""
    sampling = SamplingParams(max_new_tokens=12)
    host = _host(
        tiny_models["llama"],
        sampling,
        kv_cache_memory=kv_memory,
        block_size=4,
        token_budget=24,
        max_running=6,
    )
    eos = host.stopper.eos
    results, preemptions = [], []
    for overlap in (False, True):
        work, rows = _work(7)
        host.stopper.eos = frozenset({rows[0].token_ids[-1] % 7 + 3})  # some rows stop early
        plain = host.engine(600, 15)
        engine = Engine(plain.scheduler, plain.runner, host.stopper, overlap=overlap)
        engine.run(work, lambda seq: None)
        results.append([(r.output_ids, r.finish_reason) for r in rows])
        assert engine.scheduler.pool.num_used == 0
        preemptions.append(engine.scheduler.num_preemptions)
    host.stopper.eos = eos
    assert results[0] == results[1]
    assert {reason for _, reason in results[0]} == {"stop", "length"}
    assert (min(preemptions) > 0) == (kv_memory is not None)


def test_second_unit_gets_the_same_kv_cache(tiny_models, monkeypatch):
    calls = []
    sizing = model_host.kv_pool_blocks
    monkeypatch.setattr(model_host, "kv_pool_blocks", lambda *a: calls.append(a) or sizing(*a))
    host = _host(tiny_models["llama"], SamplingParams(max_new_tokens=4))
    host.engine(64, 8)
    first = [k.data_ptr() for k, _ in host.kv_caches]
    engine = host.engine(32, 8)
    assert [k.data_ptr() for k, _ in host.kv_caches] == first
    assert engine.runner.kv_caches is host.kv_caches and engine.scheduler.pool.num_blocks == 64
    assert len(calls) == 1, "free memory was read again while the first cache was allocated"
