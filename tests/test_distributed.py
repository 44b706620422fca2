"""Scale-out: work units cut from a plan, and `--workers N` on a local Ray runtime (CPU), with faults."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from batchllm.cli import app
from batchllm.job.rows import RowBlock
from batchllm.job.units import PlannedRows, split_plan, unit_sequences
from batchllm.prefix_tree.plan import make_plan
from batchllm.prefix_tree.seqs import TokenSeqs
from batchllm.scheduler.seq import SeqKind

# --- units: no Ray needed -------------------------------------------------------------------------


def planned_rows(prompts: list[np.ndarray], max_new: int = 64) -> PlannedRows:
    n = len(prompts)
    block = RowBlock(
        np.arange(n, dtype=np.int64), pa.array(range(n)), None,
        np.array([len(p) for p in prompts], np.int32), [None] * n,
    )  # fmt: skip
    return PlannedRows(block, prompts, list(range(n)), max_new)


def nested_prompts(rng: np.random.Generator, system: int, groups: int, rows: int) -> list[np.ndarray]:
    """One shared system prompt > `groups` group texts > `rows` rows each, plus exact duplicates."""
    head = rng.integers(0, 500, system)
    out = []
    for _ in range(groups):
        group = np.concatenate([head, rng.integers(0, 500, 40)])
        out += [np.concatenate([group, rng.integers(0, 500, rng.integers(1, 9))]) for _ in range(rows)]
    out += [out[i].copy() for i in rng.integers(0, len(out), 5)]
    return [out[i] for i in rng.permutation(len(out))]


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_units_cover_every_row_once_and_keep_groups_whole(workers):
    prompts = nested_prompts(np.random.default_rng(workers), system=60, groups=12, rows=6)
    plan = make_plan(TokenSeqs.from_lists(prompts))
    units = split_plan(plan, planned_rows(prompts), workers)
    rows = np.concatenate([u.rows.row_index for u in units])
    assert sorted(rows.tolist()) == list(range(len(prompts)))
    assert len(units) == 1 if workers == 1 else len(units) > workers
    computed = 0
    group_units: dict[bytes, int] = {}
    for unit in units:
        seqs = list(unit_sequences(unit))
        for s in seqs:
            if s.kind is SeqKind.PREFIX:
                key = bytes(np.asarray(s.token_ids))
                group_units[key] = group_units.get(key, 0) + 1
        computed += sum(s.prompt_len - (s.parent.prompt_len if s.parent else 0) for s in seqs)
        rows_here = [s for s in seqs if s.is_row]
        assert sorted(s.index for s in rows_here) == sorted(set(unit.rep.tolist()))
    # Only the system prompt is repeated (once per unit); every group below it runs in one unit.
    repeated = [k for k, n in group_units.items() if n > 1]
    assert len(repeated) <= (1 if workers > 1 else 0)
    extra = (len(units) - 1) * 60 if repeated else 0
    assert computed == plan.stats.prefill_tokens_planned + extra


def test_without_drops_committed_rows_and_promotes_a_duplicate():
    prompts = nested_prompts(np.random.default_rng(0), system=10, groups=2, rows=3)
    plan = make_plan(TokenSeqs.from_lists(prompts))
    (unit,) = split_plan(plan, planned_rows(prompts), 1)
    dup = int(np.flatnonzero(unit.rep != np.arange(len(unit)))[0])
    original = int(unit.rep[dup])
    committed = np.array([unit.rows.row_index[original], unit.rows.row_index[unit.order[-1]]])
    rest = unit.without(committed)
    assert len(rest) == len(unit) - 2 and not np.isin(rest.rows.row_index, committed).any()
    heir = int(np.flatnonzero(rest.rows.row_index == unit.rows.row_index[dup])[0])
    assert rest.rep[heir] == heir and heir in rest.order.tolist()
    assert sum(s.is_row for s in unit_sequences(rest)) == len(set(rest.rep.tolist()))
    assert unit.without(unit.rows.row_index) is None


# --- runs on a local Ray runtime ------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_runtime():
    """One local runtime for the module: every run joins it instead of starting its own (seconds)."""
    ray = pytest.importorskip("ray")
    term = signal.getsignal(signal.SIGTERM)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()
    signal.signal(signal.SIGTERM, term)  # ray.init replaced pytest's


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_models, make_rows) -> dict:
    """12 instruction families (each a group under the root) of 4 rows, with duplicates, one worker."""
    root = tmp_path_factory.mktemp("distributed")
    texts = [t for k in range(12) for t in make_rows(num_groups=1, rows_per_group=4, seed=100 + k)]
    texts += texts[:4]
    pq.write_table(pa.table({"text": texts}), root / "in.parquet")
    spec = {"root": root, "model": tiny_models["qwen2"], "rows": len(texts)}
    code, out = cli(spec, "reference")
    assert code == 0, out
    spec["expected"] = pq.read_table(root / "reference.parquet")
    spec["report"] = json.loads((root / "reference.json").read_text())
    return spec


def args(spec: dict, name: str, *extra: str) -> list[str]:
    root = spec["root"]
    return [
        "run", str(root / "in.parquet"), "--model", str(spec["model"]),
        "--output", str(root / f"{name}.parquet"), "--report", str(root / f"{name}.json"),
        "--max-new-tokens", "6", "--quiet", "--checkpoint-rows", "2", *extra,
    ]  # fmt: skip


def cli(spec: dict, name: str, *extra: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, args(spec, name, *extra))
    return result.exit_code, result.output


def test_two_workers_give_the_one_worker_output(ray_runtime, job):
    code, out = cli(job, "two", "--workers", "2")
    assert code == 0, out
    assert pq.read_table(job["root"] / "two.parquet").equals(job["expected"])
    report = json.loads((job["root"] / "two.json").read_text())
    # No group was computed twice: every prefix group ran on exactly one worker.
    assert report["prefill_tokens_computed"] == job["report"]["prefill_tokens_computed"]
    assert set(report["workers"]) == {"w0", "w1"} and report["worker_retries"] == 0
    assert sum(w["rows"] for w in report["workers"].values()) == job["rows"]
    assert all(w["output_tokens_per_second"] > 0 for w in report["workers"].values())


def test_a_shared_instruction_is_prefilled_once_per_worker(ray_runtime, job):
    """Under one instruction (--prefix) the plan is cut inside it; each worker prefills it once and keeps
    it between its units, as `plan --workers 2` predicts; the output equals one worker's."""
    root = job["root"]
    (root / "instruction.txt").write_text("You rate product reviews. " * 12)
    instruction = ["--prefix", str(root / "instruction.txt")]
    code, out = cli(job, "instr1", *instruction)
    assert code == 0, out
    code, out = cli(job, "instr2", *instruction, "--workers", "2")
    assert code == 0, out
    assert pq.read_table(root / "instr2.parquet").equals(pq.read_table(root / "instr1.parquet"))
    one, two = (json.loads((root / f"instr{n}.json").read_text()) for n in (1, 2))
    copies = sum(w["prefix_copy_tokens"] for w in two["workers"].values())
    assert two["prefill_tokens_computed"] == one["prefill_tokens_computed"] + copies
    assert sum(w["prefill_tokens"] for w in two["workers"].values()) == two["prefill_tokens_computed"]
    plan = CliRunner().invoke(app, [
        "plan", str(root / "in.parquet"), "--model", str(job["model"]), *instruction,
        "--max-new-tokens", "6", "--workers", "2", "--json",
    ])  # fmt: skip
    assert plan.exit_code == 0, plan.output
    estimate = json.loads(plan.output)
    assert estimate["prefill_tokens_planned"] == one["prefill_tokens_computed"]
    assert estimate["prefill_tokens_with_workers"] == two["prefill_tokens_computed"]
    assert 0 < copies == estimate["prefix_copy_tokens"] < estimate["avg_prefix_tokens"] * 2


def test_a_killed_worker_has_its_units_finished_by_the_other(ray_runtime, job, monkeypatch):
    monkeypatch.setenv("BATCHLLM_WORKER_CRASH_AT", "0:row:3")  # worker 0 SIGKILLs itself at its 3rd row
    code, out = cli(job, "killed", "--workers", "2")
    assert code == 0, out
    assert pq.read_table(job["root"] / "killed.parquet").equals(job["expected"])
    report = json.loads((job["root"] / "killed.json").read_text())
    assert report["worker_retries"] >= 1 and report["rows_done"] == job["rows"]


@pytest.mark.parametrize(
    "flags",
    [("--choices", "yes,no,maybe"), ("--n", "4", "--temperature", "0.8", "--seed", "7")],
    ids=["choices", "samples"],
)
def test_scoring_and_samples_on_two_workers_survive_a_killed_worker(ray_runtime, job, monkeypatch, flags):
    """#13 with Ray: choice scores and seeded samples on 2 workers, one of them killed mid-unit, equal
    one worker's output row for row (a sample's stream depends on its row and index, not its worker).
    Log-probs are equal to float32 rounding: which rows share a forward pass changes the matmuls' sums."""
    name = flags[0].strip("-")
    code, out = cli(job, f"{name}1", *flags)
    assert code == 0, out
    monkeypatch.setenv("BATCHLLM_WORKER_CRASH_AT", "0:row:3")  # worker 0 SIGKILLs itself at its 3rd row
    code, out = cli(job, f"{name}2", *flags, "--workers", "2")
    assert code == 0, out
    one, two = (pq.read_table(job["root"] / f"{name}{n}.parquet") for n in (1, 2))
    assert two.column_names == one.column_names and one.num_rows == job["rows"]
    for column in one.column_names:
        if "logprob" in column:
            assert np.allclose(flat(two[column]), flat(one[column]), rtol=0, atol=1e-4), column
        else:
            assert two[column].equals(one[column]), column
    report = json.loads((job["root"] / f"{name}2.json").read_text())
    assert report["worker_retries"] >= 1 and report["rows_done"] == job["rows"]


def flat(column: pa.ChunkedArray) -> np.ndarray:
    """A float column's values, list columns flattened (nulls as NaN)."""
    values = column.combine_chunks()
    while pa.types.is_list(values.type):
        values = values.flatten()
    return values.to_numpy(zero_copy_only=False)


@pytest.mark.slow
def test_when_every_worker_dies_new_ones_finish_the_job(ray_runtime, job, monkeypatch):
    monkeypatch.setenv("BATCHLLM_WORKER_CRASH_AT", "*:row:2")  # both first workers die at their 2nd row
    code, out = cli(job, "all_died", "--workers", "2")
    assert code == 0, out
    assert pq.read_table(job["root"] / "all_died.parquet").equals(job["expected"])
    report = json.loads((job["root"] / "all_died.json").read_text())
    assert report["worker_retries"] >= 2 and not {"w0", "w1"} & set(report["workers"])


@pytest.mark.slow
def test_sigkilled_driver_resumes_with_another_worker_count(ray_runtime, job):
    cmd = [sys.executable, "-m", "batchllm", *args(job, "driver", "--workers", "2")]
    env = {**os.environ, "BATCHLLM_CRASH_AT": "commit:4"}
    # A session of its own: its Ray workers outlive it by seconds and are ended with the session.
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=300)
    finally:
        kill_session(proc.pid)
    assert proc.returncode == -signal.SIGKILL, stderr
    assert not (job["root"] / "driver.parquet").exists()
    code, out = cli(job, "driver", "--workers", "1")
    assert code == 0, out
    assert pq.read_table(job["root"] / "driver.parquet").equals(job["expected"])
    report = json.loads((job["root"] / "driver.json").read_text())
    assert report["attempts"] == 2 and report["rows_done"] == job["rows"]


def kill_session(sid: int) -> None:
    """SIGKILL every process of the session ``sid`` (one this test started)."""
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and os.getsid(int(entry)) == sid:
                os.kill(int(entry), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def test_workers_without_ray_say_how_to_install_it(job, monkeypatch):
    from batchllm.config import JobSpec
    from batchllm.errors import JobError
    from batchllm.job.run import run

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    spec = JobSpec(
        input=job["root"] / "in.parquet", model=str(job["model"]), output=job["root"] / "no_ray_api.parquet",
        workers=2, progress=False,
    )  # fmt: skip
    with pytest.raises(JobError, match=r'pip install "batchllm\[ray\]"'):
        run(spec)
    code, out = cli(job, "no_ray", "--workers", "2")
    assert code == 2 and "need Ray: pip install" in out


# Here, not in test_structured_output.py: Ray tests share one test process (the README's -n 2 runs
# each file in one process; two Ray clusters at once on two cores take minutes).
def test_ray_workers_compile_their_own_grammars(tmp_path, tiny_models):
    pytest.importorskip("ray")
    import jsonschema
    from test_structured_output import SCHEMA, TEXTS, constrained

    small = {"type": "object", "properties": {"n": {"enum": [1, 2]}}, "required": ["n"]}
    small["additionalProperties"] = False
    schemas = [json.dumps(SCHEMA), json.dumps(small)] * 2
    flags = ("--schema-column", "schema", "--workers", "2", "--temperature", "0.8")
    code, text, rows, report = constrained(
        tmp_path, tiny_models["qwen3"], *flags, texts=TEXTS[:4], schema=schemas
    )
    assert code == 0, text
    for row, schema in zip(rows, schemas):
        jsonschema.validate(json.loads(row["output"]), json.loads(schema))
    assert report["constrained_rows"] == 4 and len(report["workers"]) == 2
