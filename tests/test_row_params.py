"""--params-column: each row's own max_tokens, temperature, top_p, top_k, seed and stop, in the same
steps as the other rows; the vectorised sampler against the per-job one; bad values are row errors."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from crash_runs import kill_then_resume_job
from typer.testing import CliRunner

from batchllm.cli import app
from batchllm.config import SamplingParams
from batchllm.engine.row_sampling import sample_rows
from batchllm.engine.sampling import sample
from batchllm.io.row_params import row_params
from batchllm.job.rows import RowBlock
from batchllm.job.units import PlannedRows, split_plan, unit_sequences
from batchllm.prefix_tree.plan import make_plan
from batchllm.prefix_tree.seqs import TokenSeqs

JOB = SamplingParams(max_new_tokens=8)
SETTINGS = [  # (params value, the flags of a whole job with those settings)
    ({"temperature": 0.9, "seed": 3, "top_k": 20}, ["--temperature", "0.9", "--seed", "3", "--top-k", "20"]),
    ({"temperature": 1.3, "top_p": 0.7}, ["--temperature", "1.3", "--top-p", "0.7"]),
    ({"max_tokens": 3}, ["--max-new-tokens", "3"]),
    (None, []),
]


def test_sample_rows_gives_each_row_what_sample_gives_it_alone():
    torch.manual_seed(0)
    logits = torch.randn(12, 97) * 3
    params = [SamplingParams(temperature=t, top_p=p, top_k=k) for t in (0.0, 0.7, 1.5) for p in (1.0, 0.6)
              for k in (0, 5)][:12]  # fmt: skip
    keys, steps = list(range(100, 112)), list(range(12))
    got = sample_rows(logits, params, keys, steps)
    for i, p in enumerate(params):
        alone = sample(logits[i : i + 1], p, keys[i : i + 1], steps[i : i + 1])
        assert int(got[i]) == int(alone[0]), (i, p)


@pytest.mark.parametrize(
    "value, error",
    [
        ("hot", "params is not an object (str)"),
        ({"temperature": "hot"}, "params temperature must be a number, got 'hot'"),
        ({"max_tokens": 2.5}, "params max_tokens must be an integer, got 2.5"),
        ({"max_tokens": 9}, "params max_tokens must be in [1, 8] (the job's --max-new-tokens), got 9"),
        ({"top_p": 0}, "params top_p must be in (0, 1], got 0"),
        ({"stop": [""]}, "params stop must be a non-empty string or a list of them, got ['']"),
        ({"temprature": 1}, "params has an unknown key 'temprature'"),
    ],
)
def test_wrong_values_are_named(value, error):
    params, problem = row_params(value, JOB)
    assert params is None and problem.startswith(error)


def test_null_fields_keep_the_jobs_settings():
    assert row_params({"temperature": None, "stop": None}, JOB) == (None, None)
    params, _ = row_params({"max_tokens": 4.0, "stop": "."}, JOB)
    assert params.max_new_tokens == 4 and params.stop == (".",) and params.temperature == 0


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_models, make_rows) -> dict:
    root = tmp_path_factory.mktemp("row_params")
    texts = make_rows(num_groups=2, rows_per_group=6, duplicates=0, seed=3)
    params = [SETTINGS[i % len(SETTINGS)][0] for i in range(len(texts))]
    fields = [("max_tokens", pa.int64()), ("temperature", pa.float64()), ("top_p", pa.float64()),
              ("top_k", pa.int64()), ("seed", pa.int64()), ("stop", pa.list_(pa.string()))]  # fmt: skip
    kind = pa.struct(fields)
    pq.write_table(pa.table({"text": texts, "params": pa.array(params, kind)}), root / "in.parquet")
    with open(root / "in.jsonl", "w") as f:
        f.writelines(json.dumps({"text": t, "params": p}) + "\n" for t, p in zip(texts, params))
    return {"root": root, "model": tiny_models["llama"], "texts": texts, "params": params}


def run(job: dict, name: str, *flags: str, inp: str = "in.parquet") -> list[dict]:
    root = job["root"]
    args = ["run", str(root / inp), "--model", str(job["model"]), "--output", str(root / name), "--quiet",
            "--max-new-tokens", "8", *flags]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code in (0, 1), result.output
    return pq.read_table(root / name).to_pylist()


def test_each_row_gets_what_a_job_of_its_settings_gives_it(job):
    mixed = run(job, "mixed.parquet", "--params-column", "params")
    assert all(r["error"] is None for r in mixed)
    assert sum(r["cached_tokens"] for r in mixed) > 0  # rows of different settings still share prefixes
    for value, flags in SETTINGS:
        uniform = run(job, f"uniform{flags}.parquet".replace(" ", ""), *flags)
        rows = [i for i, p in enumerate(job["params"]) if p == value]
        assert [mixed[i]["output"] for i in rows] == [uniform[i]["output"] for i in rows], flags
        assert [mixed[i]["output_tokens"] for i in rows] == [uniform[i]["output_tokens"] for i in rows]


def test_jsonl_params_and_a_stop_string(job):
    root = job["root"]
    rows = [{"text": t, "params": {"stop": ["e"]} if i % 2 else None} for i, t in enumerate(job["texts"])]
    (root / "stop.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    mixed = run(job, "stop.parquet", "--params-column", "params", inp="stop.jsonl")
    plain = run(job, "plain.parquet", inp="stop.jsonl")
    stopped = run(job, "stopped.parquet", "--stop", "e", inp="stop.jsonl")
    for i, row in enumerate(mixed):
        assert row["output"] == (stopped if i % 2 else plain)[i]["output"]


def test_bad_params_in_jsonl_are_row_errors(job):
    root = job["root"]
    values = [{"temperature": 0.5}, {"temperature": "hot"}, "fast", {"top_k": -1}, None]
    rows = [{"text": t, "params": v} for t, v in zip(job["texts"], values)]
    (root / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = run(job, "bad.parquet", "--params-column", "params", inp="bad.jsonl")
    assert [r["error"] for r in out] == [
        None, "params temperature must be a number, got 'hot'", "params is not an object (str)",
        "params top_k must be >= 0, got -1", None,
    ]  # fmt: skip
    result = CliRunner().invoke(app, ["run", str(root / "bad.jsonl"), "--model", str(job["model"]),
                                      "--params-column", "settings", "--quiet"])  # fmt: skip
    assert result.exit_code == 2 and "params column 'settings' not found" in result.output


def test_a_job_file_run_killed_and_resumed_gives_the_same_output(job):
    root = job["root"]
    expected = run(job, "reference.parquet", "--params-column", "params")
    settings = ['input = "in.parquet"', f'model = "{job["model"]}"', 'output = "job.parquet"',
                'params-column = "params"', "max-new-tokens = 8", "checkpoint-rows = 2"]  # fmt: skip
    (root / "job.toml").write_text("\n".join(settings) + "\n")
    kill_then_resume_job(root / "job.toml")
    got = pq.read_table(root / "job.parquet").to_pylist()
    assert [r["output"] for r in got] == [r["output"] for r in expected]
    changed = root / "changed.parquet"
    params = [{"temperature": 0.1}] * len(job["texts"])
    pq.write_table(pa.table({"text": job["texts"], "params": params}), changed)
    (root / "job.toml").write_text("\n".join(settings).replace("in.parquet", "changed.parquet") + "\n")
    result = CliRunner().invoke(app, ["run", "--job", str(root / "job.toml"), "--quiet"])
    assert result.exit_code == 2 and "input changed" in result.output  # params are part of the input


def test_a_parquet_struct_field_of_the_wrong_type_is_a_row_error(job):
    root = job["root"]
    kind = pa.struct([("temperature", pa.string()), ("max_tokens", pa.int64())])
    values = [{"temperature": "warm", "max_tokens": None}, {"temperature": None, "max_tokens": 2}]
    pq.write_table(
        pa.table({"text": job["texts"][:2], "params": pa.array(values, kind)}), root / "typed.parquet"
    )
    out = run(job, "typed.out.parquet", "--params-column", "params", inp="typed.parquet")
    assert out[0]["error"] == "params temperature must be a number, got 'warm'"
    assert out[1]["error"] is None and out[1]["output_tokens"] <= 2


def test_work_units_carry_each_rows_settings_through_cuts_and_resumes():
    rng = np.random.default_rng(0)
    head = rng.integers(0, 500, 40)
    prompts = [np.concatenate([head, rng.integers(0, 500, 5)]).astype(np.int32) for _ in range(12)]
    params = [SamplingParams(temperature=i / 10, max_new_tokens=8) for i in range(12)]
    n = len(prompts)
    block = RowBlock(np.arange(n, dtype=np.int64), pa.array(range(n)), None,
                     np.array([len(p) for p in prompts], np.int32), [None] * n)  # fmt: skip
    planned = PlannedRows(block, prompts, list(range(n)), 8, params)
    units = split_plan(make_plan(TokenSeqs.from_lists(prompts), dedup=False), planned, workers=3)
    for unit in units + [u.without(u.rows.row_index[:2]) for u in units if len(u) > 2]:
        rows = [s for s in unit_sequences(unit) if s.is_row]
        assert all(s.params is params[int(unit.rows.row_index[s.index])] for s in rows)
