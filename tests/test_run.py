"""End to end: `batchllm run` against transformers' own greedy generate(), errors, formats, sampling."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hf_reference import hf_greedy
from transformers import AutoTokenizer
from typer.testing import CliRunner

from batchllm.cli import app

PREFIX = "Answer in a few words.\n"
MAX_NEW = 10


def run_cli(*args: str | Path) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["run", *map(str, args), "--quiet"])
    return result.exit_code, result.output


def write_rows(path: Path, texts: list, **extra) -> Path:
    table = pa.table({"text": texts, **extra})
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in table.to_pylist()))
    else:
        pq.write_table(table, path)
    return path


def run_job(
    tmp: Path, model: Path, texts: list, *flags: str, name: str = "in.parquet"
) -> tuple[list[dict], dict]:
    inp = write_rows(tmp / name, texts)
    prefix = tmp / "prefix.txt"
    prefix.write_text(PREFIX)
    out, report = tmp / f"{name}.out.parquet", tmp / f"{name}.report.json"
    if "--max-new-tokens" not in flags:
        flags = (*flags, "--max-new-tokens", str(MAX_NEW))
    code, text = run_cli(
        inp, "--model", model, "--prefix", prefix, "--output", out, "--report", report, *flags
    )
    assert code in (0, 1), text
    return pq.read_table(out).to_pylist(), json.loads(report.read_text())


def expected(model: Path, texts: list[str], max_new: int = MAX_NEW) -> list[tuple[str, int, str]]:
    tok = AutoTokenizer.from_pretrained(model)
    prompts = [tok(PREFIX + t)["input_ids"] for t in texts]
    outs = hf_greedy(model, prompts, max_new)
    eos = set(hf_eos(model))
    return [
        (tok.decode(ids, skip_special_tokens=True), len(ids), "stop" if ids and ids[-1] in eos else "length")
        for ids in outs
    ]


def hf_eos(model: Path) -> list[int]:
    eos = json.loads((model / "generation_config.json").read_text())["eos_token_id"]
    return eos if isinstance(eos, list) else [eos]


def got(rows: list[dict]) -> list[tuple[str, int, str]]:
    return [(r["output"], r["output_tokens"], r["finish_reason"]) for r in rows]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_greedy_matches_transformers(tmp_path, tiny_models, make_rows, family):
    texts = make_rows(num_groups=3, rows_per_group=4, duplicates=2, seed=1)
    rows, report = run_job(tmp_path, tiny_models[family], texts)
    assert got(rows) == expected(tiny_models[family], texts)
    assert [r["id"] for r in rows] == list(range(len(texts)))
    assert report["rows"] == len(texts) and report["rows_failed"] == 0
    assert report["cached_tokens"] > 0 and report["prefill_tokens_computed"] < report["prompt_tokens"]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_sharing_on_and_off_give_identical_outputs(tmp_path, tiny_models, make_rows, family):
    texts = make_rows(num_groups=4, rows_per_group=5, duplicates=3, seed=2)
    shared, rep_on = run_job(tmp_path, tiny_models[family], texts, "--token-budget", "64", name="a.parquet")
    plain, rep_off = run_job(tmp_path, tiny_models[family], texts, "--no-prefix-sharing", name="b.parquet")
    assert got(shared) == got(plain)
    assert all(r["cached_tokens"] == 0 for r in plain)
    assert sum(r["cached_tokens"] for r in shared) == rep_on["cached_tokens"] > 0
    assert rep_off["prefill_tokens_computed"] == rep_off["prompt_tokens"]
    assert rep_on["prefill_tokens_computed"] <= 1.05 * rep_on["unique_prompt_tokens"]


def test_tiny_kv_pool_preempts_and_stays_exact(tmp_path, tiny_models, make_rows):
    from batchllm.config import EngineConfig, JobSpec, SamplingParams
    from batchllm.job.run import run
    from batchllm.model.config import load_model_config
    from batchllm.model.decoder import kv_bytes_per_block

    model = tiny_models["llama"]
    texts = make_rows(num_groups=2, rows_per_group=6, seed=3)
    inp = write_rows(tmp_path / "in.parquet", texts)
    per_block = kv_bytes_per_block(load_model_config(model), 16, __import__("torch").float32)
    job = JobSpec(
        input=inp,
        model=str(model),
        output=tmp_path / "out.parquet",
        prefix=PREFIX,
        sampling=SamplingParams(max_new_tokens=MAX_NEW),
        engine=EngineConfig(device="cpu", kv_cache_memory=f"{40 * per_block / 2**20}MB"),
        progress=False,
    )
    outcome = run(job)  # raises if a block leaked
    assert outcome.preemptions > 0
    assert got(pq.read_table(job.output).to_pylist()) == expected(model, texts)


def test_bad_rows_become_error_rows(tmp_path, tiny_models):
    model = tiny_models["qwen2"]
    texts = ["A fine product.", None, "word " * 3000, "Broken on arrival."]
    rows, report = run_job(tmp_path, model, texts)
    assert [r["finish_reason"] for r in rows][1:3] == ["error", "error"]
    assert "null" in rows[1]["error"] and "exceeds" in rows[2]["error"]
    assert rows[1]["output"] is None
    assert got([rows[0], rows[3]]) == expected(model, [texts[0], texts[3]])
    assert report["rows_failed"] == 2
    code, _ = run_cli(tmp_path / "in.parquet", "--model", model, "--output", tmp_path / "o2.parquet")
    assert code == 1


def test_parquet_and_jsonl_give_the_same_output(tmp_path, tiny_models, make_rows):
    texts = make_rows(num_groups=2, rows_per_group=3, seed=4)
    a, _ = run_job(tmp_path, tiny_models["mistral"], texts, name="in.parquet")
    b, _ = run_job(tmp_path, tiny_models["mistral"], texts, name="in.jsonl")
    assert a == b


def test_sampling_depends_on_seed_not_on_token_budget(tmp_path, tiny_models, make_rows):
    texts = make_rows(num_groups=2, rows_per_group=4, seed=5)
    flags = ("--temperature", "1.0", "--top-p", "0.9", "--top-k", "50", "--seed", "7")
    a, _ = run_job(tmp_path, tiny_models["qwen2"], texts, *flags, "--token-budget", "16", name="a.parquet")
    b, _ = run_job(tmp_path, tiny_models["qwen2"], texts, *flags, "--token-budget", "4096", name="b.parquet")
    c, _ = run_job(tmp_path, tiny_models["qwen2"], texts, *flags[:-1], "8", name="c.parquet")
    assert got(a) == got(b)
    assert got(a) != got(c)


def test_stop_string_cuts_output(tmp_path, tiny_models, make_rows):
    model = tiny_models["llama"]
    texts = make_rows(num_groups=1, rows_per_group=4, seed=6)
    base = expected(model, texts, max_new=16)
    stop = next(t[2:5] for t, _, _ in base if len(t) > 6)
    rows, _ = run_job(tmp_path, model, texts, "--stop", stop, "--max-new-tokens", "16")
    for r, (full, _, _) in zip(rows, base):
        assert r["output"] == full.split(stop)[0]
        if stop in full:
            assert r["finish_reason"] == "stop"


def test_ids_and_keep_columns_pass_through(tmp_path, tiny_models):
    inp = write_rows(tmp_path / "in.parquet", ["good", "bad"], rid=["r1", "r2"], stars=[5, 1])
    out = tmp_path / "out.parquet"
    code, text = run_cli(
        inp,
        "--model",
        tiny_models["qwen3"],
        "--id-column",
        "rid",
        "--keep-columns",
        "stars",
        "--output",
        out,
        "--max-new-tokens",
        "3",
    )
    assert code == 0, text
    table = pq.read_table(out)
    assert table.column_names == [
        "id",
        "output",
        "prompt_tokens",
        "output_tokens",
        "cached_tokens",
        "finish_reason",
        "error",
        "stars",
    ]
    assert table["id"].to_pylist() == ["r1", "r2"] and table["stars"].to_pylist() == [5, 1]
    assert table.schema.field("prompt_tokens").type == pa.int32()


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_input", "does not exist"),
        ("unknown_column", "text"),
        ("bad_jsonl", "line 2"),
        ("missing_model", "no_model_here"),
        ("unwritable_output", "writ"),
    ],
)
def test_job_errors_exit_2_with_one_clear_line(tmp_path, tiny_models, case, message):
    model, inp, out = tiny_models["llama"], write_rows(tmp_path / "in.parquet", ["a"]), tmp_path / "o.parquet"
    args: list = [inp, "--model", model, "--output", out]
    if case == "missing_input":
        args[0] = tmp_path / "nope.parquet"
    elif case == "unknown_column":
        args += ["--column", "body"]
    elif case == "bad_jsonl":
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"text": "ok"}\n{"text": broken\n')
        args[0] = bad
    elif case == "missing_model":
        args[2] = tmp_path / "no_model_here"
    else:
        args[4] = inp / "o.parquet"  # its parent is a file (permissions would not stop root)
    code, text = run_cli(*args)
    assert code == 2, text
    assert message in text and "Traceback" not in text
