"""Prefix-affine assignment of work units to workers, and a worker keeping prefix KV between units."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_distributed import nested_prompts, planned_rows

from batchllm.config import EngineConfig, JobSpec, SamplingParams
from batchllm.io.writer import RunDir
from batchllm.job.assignment import Assignment, simulate
from batchllm.job.unit_worker import UnitCalls, UnitWorker
from batchllm.job.units import largest_kv_blocks, split_plan
from batchllm.prefix_tree.plan import make_plan
from batchllm.prefix_tree.seqs import TokenSeqs

SYSTEM = 60  # tokens of the prompt every row shares


def units_of(workers: int, groups: int = 12, rows: int = 6, seed: int = 0, max_new: int = 64):
    prompts = nested_prompts(np.random.default_rng(seed), system=SYSTEM, groups=groups, rows=rows)
    plan = make_plan(TokenSeqs.from_lists(prompts))
    return plan, split_plan(plan, planned_rows(prompts, max_new), workers), prompts


def drain(assignment: Assignment, order: list[str]) -> list[tuple[str, str]]:
    """Hand out every unit, asking the workers in turn; (worker, unit id) per handout."""
    out = []
    while assignment:
        for worker in order:
            handout = assignment.next_for(worker)
            assignment.check_invariants()
            if handout is not None:
                out.append((worker, handout.unit.unit_id))
    return out


@pytest.mark.parametrize("workers", [2, 3, 4])
def test_each_worker_prefills_the_shared_prompt_once_and_no_group_twice(workers):
    plan, units, _ = units_of(workers)
    per_worker = simulate(units, workers)
    assert sum(w["units"] for w in per_worker.values()) == len(units)
    busy = sum(1 for w in per_worker.values() if w["units"])
    total = sum(w["prefill_tokens"] for w in per_worker.values())
    copies = sum(w["prefix_copy_tokens"] for w in per_worker.values())
    assert total == plan.stats.prefill_tokens_planned + copies
    assert copies == (busy - 1) * SYSTEM and busy == workers


def test_queues_are_contiguous_runs_of_the_plan_order():
    _, units, _ = units_of(2)
    assignment = Assignment(units, ["a", "b"])
    assignment.check_invariants()
    ids = [u.unit_id for u in units]
    assert [u.unit_id for u in assignment.queues["a"]] + [u.unit_id for u in assignment.queues["b"]] == ids
    work = [sum(u.work for u in assignment.queues[w]) for w in "ab"]
    assert abs(work[0] - work[1]) <= max(u.work for u in units)


def test_keep_holds_only_prefixes_a_queued_unit_needs():
    _, units, _ = units_of(2)
    assignment = Assignment(units, ["a", "b"])
    system = None
    while assignment:
        handout = assignment.next_for("a") or assignment.next_for("b")
        edges = handout.unit.prefix_edges()
        system = system or next(k for k, t in edges.items() if t == SYSTEM)
        assert (system in handout.keep) == bool(assignment)  # kept while any unit still waits for it
        assert handout.keep <= {system}  # every group runs whole in one unit: none is kept


def test_an_idle_worker_steals_the_tail_of_the_busiest_queue():
    _, units, _ = units_of(2, groups=16)
    assignment = Assignment(units, ["a", "b"])
    b_queue = [u.unit_id for u in assignment.queues["b"]]
    while assignment.queues["a"]:
        assignment.next_for("a")
    stolen = assignment.next_for("a")  # a's queue is empty: it takes the tail of b's
    assignment.check_invariants()
    taken = [stolen.unit.unit_id] + [u.unit_id for u in assignment.queues["a"]]
    kept = [u.unit_id for u in assignment.queues["b"]]
    assert kept + taken == b_queue and kept and taken


def test_a_dead_workers_units_go_to_the_others_once_each():
    _, units, _ = units_of(3)
    assignment = Assignment(units, ["a", "b", "c"])
    running = assignment.next_for("b").unit
    assignment.retire("b")
    assignment.give_back(running)
    assignment.check_invariants()
    handed = [u for _, u in drain(assignment, ["a", "c", "d"])]  # "d": a fresh worker
    assert sorted(handed) == sorted(u.unit_id for u in units)


def test_a_worker_keeps_the_shared_prompt_between_units(tmp_path, tiny_models):
    """Units run one after another on one worker, told what to keep: the shared prompt and every group is
    prefilled once over all of them, and the output equals one unit holding the whole plan."""
    plan, units, prompts = units_of(3, groups=6, rows=3, max_new=4)
    assert len(units) > 2
    outputs = []
    for name, pieces in (("split", units), ("whole", split_plan(plan, planned_rows(prompts, 4), 1))):
        job = JobSpec(
            input=tmp_path / "unused.parquet", model=str(tiny_models["llama"]),
            output=tmp_path / f"{name}.parquet", sampling=SamplingParams(max_new_tokens=4),
            engine=EngineConfig(device="cpu"), progress=False,
        )  # fmt: skip
        run_dir = RunDir(job.run_dir)
        run_dir.ensure_writable(job.output)
        worker = UnitWorker.open(job, run_dir, name)
        assignment = Assignment(pieces, [name])
        stats, blocks = [], largest_kv_blocks(pieces, job.engine.block_size, 4)
        while (handout := assignment.next_for(name)) is not None:
            stats.append(worker.run(handout.unit, UnitCalls(), handout.keep, blocks))
            assert len(worker.live) == len(handout.keep)
        prefixes = [key for s in stats for key, _ in s.prefixes]
        assert len(prefixes) == len(set(prefixes)) == plan.num_nodes - 1
        assert sum(s.engine.prefill_tokens for s in stats) == plan.stats.prefill_tokens_planned
        assert not worker.live and worker._engine.scheduler.pool.num_used == 0
        run_dir.assemble(job.output, len(prompts))
        outputs.append(pq.read_table(job.output))
    assert outputs[0].equals(outputs[1])


def issue_units(workers: int, groups: int = 10, rows: int = 20) -> tuple[int, list]:
    """#17's job shape: a 600-token instruction > groups of a 50-token text > rows of 20 tokens, 32 out."""
    rng = np.random.default_rng(17)
    head = rng.integers(0, 4000, 600)
    prompts = []
    for _ in range(groups):
        group = np.concatenate([head, rng.integers(0, 4000, 50)])
        prompts += [np.concatenate([group, rng.integers(0, 4000, 20)]) for _ in range(rows)]
    plan = make_plan(TokenSeqs.from_lists(prompts))
    return plan.stats.prefill_tokens_planned, split_plan(plan, planned_rows(prompts, 32), workers)


@pytest.mark.parametrize("workers", [2, 3, 4])
def test_plan_workers_estimate_keeps_within_one_instruction_copy_per_worker(workers):
    """`plan --workers N` (simulate): groups go whole to workers, so prefill stays within one worker's
    + (N - 1) x the instruction + 1%; 10 groups over 4 workers once cut two groups across workers."""
    planned, units = issue_units(workers)
    assignment = Assignment(units, [f"w{i}" for i in range(workers)])
    queues = assignment.queues.values()
    first = [{k for u in q for k, t in u.prefix_edges().items() if t == 50} for q in queues]
    assert all(not (a & b) for i, a in enumerate(first) for b in first[i + 1 :])  # whole groups
    per_worker = simulate(units, workers)
    total = sum(w["prefill_tokens"] for w in per_worker.values())
    assert all(w["units"] for w in per_worker.values())
    assert total <= (planned + (workers - 1) * 600) * 1.01
    assert total - planned - (workers - 1) * 600 <= 0.01 * planned  # deeper copies within the budget
