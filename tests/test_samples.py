"""--logprobs K and --n N: logprobs equal transformers' log-softmax, samples are the row's streams."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hf_reference import load_hf_model
from test_run import PREFIX, run_cli, run_job, write_rows
from transformers import AutoTokenizer

import batchllm.job.window_plan as window_plan
from batchllm.job.rows import RowBlock
from batchllm.job.samples import expand_samples, sample_key
from batchllm.job.units import PlannedRows, split_plan
from batchllm.prefix_tree.plan import make_plan
from batchllm.prefix_tree.seqs import TokenSeqs

SAMPLED = ("--temperature", "1.0", "--seed", "7")


def hf_logprobs(model_dir: Path, prompt: list[int], generated: list[int], k: int):
    """transformers' float32 log-softmax at each generated position: (chosen [n], top-k values, ids)."""
    with torch.no_grad():
        logits = load_hf_model(model_dir)(torch.tensor([prompt + generated])).logits[0].float()
    logp = torch.log_softmax(logits[len(prompt) - 1 : len(prompt) - 1 + len(generated)], dim=-1)
    chosen = logp.gather(1, torch.tensor(generated).view(-1, 1)).squeeze(1)
    top = logp.topk(k, dim=-1)
    return chosen.numpy(), top.values.numpy(), top.indices.numpy()


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_logprobs_are_transformers_raw_log_softmax(tmp_path, tiny_models, make_rows, family, sampled):
    model = tiny_models[family]
    texts = make_rows(num_groups=2, rows_per_group=2, duplicates=1, seed=3)
    flags = ("--logprobs", "3", *(("--temperature", "0.7", "--top-k", "20") if sampled else ()))
    rows, _ = run_job(tmp_path, model, texts, *flags)
    tok = AutoTokenizer.from_pretrained(model)
    for text, row in zip(texts, rows):
        tokens = row["output_logprobs"]
        generated = [t["id"] for t in tokens]
        assert len(generated) == row["output_tokens"] > 0
        chosen, top_values, top_ids = hf_logprobs(model, tok(PREFIX + text)["input_ids"], generated, 3)
        np.testing.assert_allclose([t["logprob"] for t in tokens], chosen, atol=1e-4)
        assert [[a["id"] for a in t["top"]] for t in tokens] == top_ids.tolist()
        np.testing.assert_allclose([[a["logprob"] for a in t["top"]] for t in tokens], top_values, atol=1e-4)
        assert [t["token"] for t in tokens] == [tok.decode([i]) for i in generated]
        assert row["output_logprob"] == pytest.approx(float(chosen.astype(np.float64).sum()), abs=1e-3)
        if not sampled:  # greedy picks the most likely token
            assert generated == [t["top"][0]["id"] for t in tokens]


def test_n_samples_differ_reproduce_and_sample_0_is_the_single_run(tmp_path, tiny_models, make_rows):
    model, texts = tiny_models["llama"], make_rows(num_groups=2, rows_per_group=3, seed=4)
    one, _ = run_job(tmp_path, model, texts, *SAMPLED, name="one.parquet")
    four, report = run_job(tmp_path, model, texts, *SAMPLED, "--n", "4", name="four.parquet")
    again, _ = run_job(tmp_path, model, texts, *SAMPLED, "--n", "4", name="again.parquet")
    two, _ = run_job(tmp_path, model, texts, *SAMPLED, "--n", "2", name="two.parquet")
    assert four == again
    assert "output_logprobs" not in one[0] and "outputs" not in one[0]  # the defaults add nothing
    for r1, r4, r2 in zip(one, four, two):
        assert r4["outputs"][0] == r4["output"] == r1["output"]
        assert r4["finish_reasons"][0] == r4["finish_reason"] == r1["finish_reason"]
        assert r4["outputs"][:2] == r2["outputs"]  # a sample's stream does not depend on N
        assert len(set(r4["outputs"])) > 1
        assert r4["output_tokens"] == sum(r4["sample_output_tokens"])
    assert report["rows"] == len(texts)
    assert report["output_tokens"] == sum(r["output_tokens"] for r in four)


def test_each_sample_equals_a_single_run_with_its_stream(tmp_path, tiny_models, make_rows, monkeypatch):
    model, texts = tiny_models["qwen2"], make_rows(num_groups=2, rows_per_group=2, seed=5)
    many, _ = run_job(tmp_path, model, texts, *SAMPLED, "--n", "3", name="many.parquet")
    for s in range(3):

        def keys(seed: int, ids: pa.Array, rows: np.ndarray, params=None, s: int = s) -> list[int]:
            return [sample_key(seed, v, s) for v in ids.take(pa.array(rows)).to_pylist()]

        monkeypatch.setattr(window_plan, "row_keys", keys)
        single, _ = run_job(tmp_path, model, texts, *SAMPLED, name=f"single{s}.parquet")
        assert [r["output"] for r in single] == [r["outputs"][s] for r in many]
        assert [r["finish_reason"] for r in single] == [r["finish_reasons"][s] for r in many]


def test_explode_samples_gives_one_row_per_sample(tmp_path, tiny_models, make_rows):
    model, texts = tiny_models["llama"], [*make_rows(num_groups=1, rows_per_group=3, seed=6), None]
    flags = (*SAMPLED, "--n", "3", "--logprobs", "1")
    lists, _ = run_job(tmp_path, model, texts, *flags, name="lists.parquet")
    rows, report = run_job(tmp_path, model, texts, *flags, "--explode-samples", name="rows.parquet")
    assert len(rows) == 3 * 3 + 1 and report["rows"] == 4 and report["rows_failed"] == 1
    assert [r["id"] for r in rows] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]
    assert [r["sample_index"] for r in rows] == [0, 1, 2] * 3 + [None]
    assert [r["output"] for r in rows[:9]] == [o for r in lists[:3] for o in r["outputs"]]
    assert [r["output_tokens"] for r in rows[:9]] == [t for r in lists[:3] for t in r["sample_output_tokens"]]
    assert all(len(r["output_logprobs"]) == r["output_tokens"] for r in rows[:9])
    assert rows[9]["finish_reason"] == "error" and rows[9]["output_logprobs"] is None
    assert "outputs" not in rows[0]


def test_job_file_and_bad_settings(tmp_path, tiny_models):
    inp = write_rows(tmp_path / "in.parquet", ["the review was", "fast shipping and"])
    job = tmp_path / "job.toml"
    out = tmp_path / "out.parquet"
    job.write_text(
        f'input = "in.parquet"\nmodel = "{tiny_models["llama"]}"\noutput = "out.parquet"\n'
        "max_new_tokens = 3\ntemperature = 1.0\nn = 2\nlogprobs = 2\nexplode_samples = true\n"
    )
    code, text = run_cli("--job", job)
    assert code == 0, text
    table = pq.read_table(out)
    assert table.num_rows == 4 and table["sample_index"].to_pylist() == [0, 1, 0, 1]
    assert all(len(t["top"]) == 2 for r in table["output_logprobs"].to_pylist() for t in r)
    model = tiny_models["llama"]
    for flags, message in [
        (("--n", "2"), "--n > 1 needs --temperature > 0"),
        (("--logprobs", "21"), "--logprobs must be in 0..20"),
        (("--n", "0", "--temperature", "1"), "--n must be >= 1"),
    ]:
        code, text = run_cli(inp, "--model", model, "--output", tmp_path / "bad.parquet", *flags)
        assert code == 2 and message in text and len(text.strip().splitlines()) == 1, text


def _subprocess(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path.cwd()), **(env or {})}
    cmd = [sys.executable, "-m", "batchllm", "run", *args, "--quiet"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_resume_mid_job_gives_the_same_samples(tmp_path, tiny_models, make_rows):
    inp = write_rows(tmp_path / "in.parquet", make_rows(num_groups=2, rows_per_group=4, seed=8))
    base = [str(inp), "--model", str(tiny_models["qwen2"]), "--max-new-tokens", "6", *SAMPLED]
    base += ["--n", "3", "--logprobs", "2", "--checkpoint-rows", "2"]
    ref = _subprocess([*base, "--output", str(tmp_path / "ref.parquet")])
    assert ref.returncode == 0, ref.stderr
    out = ["--output", str(tmp_path / "out.parquet")]
    killed = _subprocess([*base, *out], env={"BATCHLLM_CRASH_AT": "row:5"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    changed = _subprocess([*base[:-6], "--n", "2", "--logprobs", "2", "--checkpoint-rows", "2", *out])
    assert changed.returncode == 2 and "different job" in changed.stderr
    resumed = _subprocess([*base, *out])
    assert resumed.returncode == 0, resumed.stderr
    got, want = pq.read_table(tmp_path / "out.parquet"), pq.read_table(tmp_path / "ref.parquet")
    exact = [c for c in want.column_names if c not in ("output_logprobs", "output_logprob")]
    assert got.select(exact).equals(want.select(exact))  # the texts and tokens: exactly
    # logprobs: to float32 noise (the resumed rows run in another batch, which reorders sums)
    np.testing.assert_allclose(_flat_logprobs(got), _flat_logprobs(want), atol=1e-4)


def _flat_logprobs(table: pa.Table) -> np.ndarray:
    tokens = [t for row in table["output_logprobs"].to_pylist() for sample in row for t in sample]
    ids = [[t["id"], *(a["id"] for a in t["top"])] for t in tokens]
    values = [[t["logprob"], *(a["logprob"] for a in t["top"])] for t in tokens]
    return np.concatenate([np.asarray(ids, dtype=np.float64), np.asarray(values)], axis=1)


def test_triton_backend_samples_and_logprobs(tmp_path, tiny_models):
    model, texts = tiny_models["llama"], ["the battery was poor and", "fast shipping with a box"]
    flags = (*SAMPLED, "--n", "2", "--logprobs", "2", "--max-new-tokens", "3")
    torch_rows, _ = run_job(tmp_path, model, texts, *flags, name="torch.parquet")
    triton_rows, _ = run_job(
        tmp_path, model, texts, *flags, "--attention-backend", "triton", name="triton.parquet"
    )
    for a, b in zip(torch_rows, triton_rows):
        assert a["outputs"] == b["outputs"]
        np.testing.assert_allclose(a["output_logprob"], b["output_logprob"], atol=1e-4)


def _planned(prompts: list[np.ndarray], n: int) -> tuple[PlannedRows, object]:
    rows = len(prompts)
    lengths = np.asarray([len(p) for p in prompts], dtype=np.int32)
    block = RowBlock(np.arange(rows), pa.array(range(rows)), None, lengths, [None] * rows)
    block, prompts, keys = expand_samples(block, prompts, list(range(rows)), n, seed=0)
    plan = make_plan(TokenSeqs.from_lists(prompts), dedup=False)  # sampled: no duplicates merged
    plan.check_invariants()
    return PlannedRows(block, prompts, keys, 16), plan


@pytest.mark.parametrize(("rows", "n"), [(8, 1), (1, 8)], ids=["8-identical-prompts", "n=8"])
def test_identical_prompts_and_samples_share_all_but_the_last_token(rows, n):
    prompt = np.arange(1, 201, dtype=np.int64)
    planned, plan = _planned([prompt] * rows, n)
    stats = plan.stats
    assert stats.rows == 8 and stats.unique_prompt_tokens == 200
    assert stats.groups == 1 and stats.avg_sharing_degree == 8 and stats.avg_prefix_tokens == 199
    assert stats.prefill_tokens_planned == 199 + 8 <= 1.05 * stats.unique_prompt_tokens
    assert len({k for k in planned.keys}) == 8  # every sample its own stream


def test_units_never_split_a_rows_samples():
    rng = np.random.default_rng(0)
    planned, plan = _planned([rng.integers(1, 500, size=60) for _ in range(12)], 5)
    units = split_plan(plan, planned, workers=3)
    assert len(units) > 1
    for unit in units:
        counts = np.bincount(unit.rows.row_index)
        assert set(counts[counts > 0].tolist()) == {5}
        assert sorted(unit.rows.sample.tolist()) == sorted(list(range(5)) * (len(unit) // 5))


def test_plan_command_counts_sample_sequences(tmp_path, tiny_models, make_rows):
    from typer.testing import CliRunner

    from batchllm.cli import app

    texts = make_rows(num_groups=2, rows_per_group=3, seed=9)
    inp = write_rows(tmp_path / "in.parquet", texts)
    model = str(tiny_models["llama"])
    figures = {}
    for n in (1, 4):
        result = CliRunner().invoke(app, ["plan", str(inp), "--model", model, "--n", str(n), "--json"])
        assert result.exit_code == 0, result.output
        figures[n] = json.loads(result.output)
    assert figures[4]["rows"] == figures[1]["rows"] == len(texts)
    assert figures[4]["sequences"] == 4 * len(texts)
    assert figures[4]["unique_prompt_tokens"] == figures[1]["unique_prompt_tokens"]
    # shared prefixes are still computed once (a row's few own tokens may be computed per sample)
    assert figures[4]["prefill_tokens_planned"] < 1.5 * figures[1]["prefill_tokens_planned"]


def test_packed_readback_and_growing_log():
    from batchllm.engine.logprobs import gather_logprobs
    from batchllm.engine.sampled import LogprobLog, Sampled

    logits = torch.randn(3, 50_000)
    tokens = torch.tensor([49_999, 0, 12_345])
    assert Sampled(tokens).read() == (tokens.tolist(), None)  # --logprobs 0: the tokens alone
    got, step = Sampled.of(tokens, gather_logprobs(logits, tokens, 4)).read()
    want = torch.log_softmax(logits, dim=-1)
    assert got == tokens.tolist()
    np.testing.assert_allclose(step.chosen, want[torch.arange(3), tokens].numpy(), atol=1e-6)
    assert step.top_ids.tolist() == want.topk(4).indices.tolist()
    log = LogprobLog(4, capacity=2)
    for t in range(37):  # past several doublings
        log.append(t, step, t % 3)
    assert log.size == 37 and log.ids[:37].tolist() == list(range(37))
    np.testing.assert_array_equal(log.top_ids[:37], step.top_ids[np.arange(37) % 3])
    assert log.total() == pytest.approx(float(step.chosen[np.arange(37) % 3].astype(np.float64).sum()))


def test_explode_with_one_sample_adds_the_index():
    from batchllm.io.sample_columns import explode_samples

    table = pa.table({"id": [0, 1], "output": ["a", None], "finish_reason": ["stop", "error"]})
    assert explode_samples(table).to_pylist() == [
        {"id": 0, "sample_index": 0, "output": "a", "finish_reason": "stop"},
        {"id": 1, "sample_index": None, "output": None, "finish_reason": "error"},
    ]


def test_manifest_names_n_and_logprobs_only_when_set(tmp_path):
    """A run directory written before --n and --logprobs existed (no such keys) still resumes a job
    that uses neither; a job that sets them records them."""
    from batchllm.config import JobSpec, SamplingParams
    from batchllm.io.manifest import output_settings

    job = JobSpec(input=tmp_path / "in.parquet", model="m", output=tmp_path / "out.parquet")
    plain = output_settings(job, tmp_path, None, {})["sampling"]
    assert "n" not in plain and "logprobs" not in plain
    sampled = dataclasses.replace(job, sampling=SamplingParams(temperature=1.0, n=2, logprobs=3))
    recorded = output_settings(sampled, tmp_path, None, {})["sampling"]
    assert (recorded["n"], recorded["logprobs"]) == (2, 3)


def test_samples_are_planned_over_the_windows_own_buffer(tmp_path):
    """--n N plans each prompt's N samples as spans of the window's one token buffer: no token copied,
    the same plan as over copied rows."""
    from batchllm.config import JobSpec, SamplingParams
    from batchllm.io.piece_encoder import row_views
    from batchllm.job.windows import Window
    from batchllm.prefix_tree.seqs import TokenSpans

    rng = np.random.default_rng(1)
    rows = [np.concatenate([np.arange(1, 41), rng.integers(50, 90, size=k)]) for k in (5, 9, 1, 7)]
    buffer = TokenSeqs.from_lists([r.astype(np.int32) for r in rows])
    n = len(rows)
    views = row_views(buffer)
    window = Window(0, pa.array(range(n)), None, views, [None] * n, np.zeros(n, dtype=bool), packed=buffer)
    sampling = SamplingParams(n=3, temperature=1.0)
    job = JobSpec(input=tmp_path / "in.jsonl", model="m", output=tmp_path / "o.parquet", sampling=sampling)
    planned = window_plan.plan_window(job, window)
    seqs = planned.plan.seqs
    assert isinstance(seqs, TokenSpans) and np.shares_memory(seqs.tokens, buffer.tokens)
    assert seqs.starts.tolist() == np.repeat(buffer.starts, 3).tolist()
    copied = make_plan(TokenSeqs.from_lists([r for r in rows for _ in range(3)]), dedup=False)
    planned.plan.check_invariants()
    assert planned.plan.stats == copied.stats
    assert np.array_equal(planned.plan.row_order, copied.row_order)
    assert np.array_equal(planned.plan.row_node, copied.row_node)
