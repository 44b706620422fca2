"""Scoring jobs end to end (``--choices``, ``--choices-column``, ``--score-column``): every log-prob
equals transformers' float32 forward log-softmax over prompt + continuation ids, rows sharing
prefixes; bad rows are row errors, bad settings one-line job errors."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from hf_reference import hf_continuation_logprobs
from test_run import PREFIX, run_cli, write_rows
from transformers import AutoTokenizer
from typer.testing import CliRunner

from batchllm.cli import app

CHOICES = ["positive", " negative", "neutral mostly"]  # different lengths; exact text, spaces kept


def score_job(tmp: Path, model: Path, texts: list, *flags: str, name: str = "in.parquet", **cols) -> tuple:
    inp = write_rows(tmp / name, texts, **cols)
    prefix = tmp / "prefix.txt"
    prefix.write_text(PREFIX)
    out, report = tmp / f"{name}.out.parquet", tmp / f"{name}.report.json"
    code, text = run_cli(
        inp, "--model", model, "--prefix", prefix, "--output", out, "--report", report, *flags
    )
    assert code in (0, 1), text
    return pq.read_table(out), json.loads(report.read_text())


def expected_logprob(model: Path, text: str, continuation: str, chat: bool = False) -> list[float]:
    tok = AutoTokenizer.from_pretrained(model)
    if chat:
        messages = [{"role": "system", "content": PREFIX}, {"role": "user", "content": text}]
        rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt = tok(rendered, add_special_tokens=False)["input_ids"]
    else:
        prompt = tok(PREFIX + text)["input_ids"]
    return hf_continuation_logprobs(model, prompt, tok(continuation, add_special_tokens=False)["input_ids"])


def check_choices(model: Path, rows: list[dict], texts: list[str], choices: list[list[str]], mean=False):
    for row, text, row_choices in zip(rows, texts, choices):
        tokens = [expected_logprob(model, text, c) for c in row_choices]
        want = [math.fsum(t) / (len(t) if mean else 1) for t in tokens]
        assert row["label_logprobs"] == pytest.approx(want, abs=1e-4)
        assert row["label"] == row["output"] == row_choices[max(range(len(want)), key=want.__getitem__)]
        assert (row["finish_reason"], row["output_tokens"], row["error"]) == ("scored", 0, None)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_choices_match_transformers(tmp_path, tiny_models, make_rows, family):
    texts = make_rows(num_groups=3, rows_per_group=4, duplicates=2, seed=5)
    tok = AutoTokenizer.from_pretrained(tiny_models[family])
    table, report = score_job(tmp_path, tiny_models[family], texts, "--choices", ",".join(CHOICES))
    assert table.schema.field("label_logprobs").type.value_type == "double"
    check_choices(tiny_models[family], table.to_pylist(), texts, [CHOICES] * len(texts))
    assert report["rows_failed"] == 0 and report["output_tokens"] == 0
    choice_tokens = [len(tok(c, add_special_tokens=False)["input_ids"]) for c in CHOICES]
    reps = len(set(texts))  # duplicate rows copy their original's scores
    assert report["scored_rows"] == len(texts) and report["scored_tokens"] == reps * sum(choice_tokens)
    assert report["cached_tokens"] > 0  # the rows' shared instruction was computed once
    assert report["prefill_tokens_computed"] < report["prompt_tokens"]


def test_choices_mean_and_job_file(tmp_path, tiny_models, make_rows):
    model, texts = tiny_models["mistral"], make_rows(num_groups=2, rows_per_group=3, seed=6)
    job = tmp_path / "job.toml"
    choices = [*CHOICES, "yes, mostly"]  # a job file's list may hold commas
    job.write_text(f'choices = {json.dumps(choices)}\nchoice-score = "mean"\n')
    table, _ = score_job(tmp_path, model, texts, "--job", str(job))
    check_choices(model, table.to_pylist(), texts, [choices] * len(texts), mean=True)


@pytest.mark.parametrize("name", ["in.parquet", "in.jsonl"])
def test_choices_column_with_bad_rows(tmp_path, tiny_models, make_rows, name):
    model, texts = tiny_models["qwen3"], make_rows(num_groups=2, rows_per_group=3, seed=7)
    options = [["yes", "no"], ["a", "bb", "ccc", "dddd"], [], None, ["x y z"], [" up", " down"]]
    table, report = score_job(
        tmp_path, model, texts, "--choices-column", "options", name=name, options=options
    )
    rows = table.to_pylist()
    assert "options" not in table.column_names  # read for scoring, not kept
    assert [r["finish_reason"] for r in rows] == ["scored", "scored", "error", "error", "scored", "scored"]
    assert "empty list" in rows[2]["error"] and "null" in rows[3]["error"]
    assert rows[2]["label"] is None and rows[3]["label_logprobs"] is None
    good = [0, 1, 4, 5]
    check_choices(model, [rows[i] for i in good], [texts[i] for i in good], [options[i] for i in good])
    assert report["rows_failed"] == 2


def test_score_column_matches_transformers(tmp_path, tiny_models, make_rows):
    model, texts = tiny_models["llama"], make_rows(num_groups=2, rows_per_group=3, seed=8)
    answers = [" great value", "broken", None, " it was fine and quiet", "", " slow"]
    table, _ = score_job(
        tmp_path, model, texts, "--score-column", "answer", "--keep-columns", "answer", answer=answers
    )
    rows = table.to_pylist()
    for row, text, answer in zip(rows, texts, answers):
        assert row["answer"] == answer
        if not answer:
            assert row["finish_reason"] == "error" and row["score_logprob"] is None
            continue
        want = expected_logprob(model, text, answer)
        assert row["score_logprob"] == pytest.approx(math.fsum(want), abs=1e-4)
        assert (row["score_tokens"], row["output"], row["finish_reason"]) == (len(want), None, "scored")


def test_choices_with_chat(tmp_path, tiny_models, make_rows):
    model, texts = tiny_models["qwen2"], make_rows(num_groups=2, rows_per_group=2, seed=9)
    table, _ = score_job(tmp_path, model, texts, "--choices", "yes,no", "--chat")
    for row, text in zip(table.to_pylist(), texts):
        want = [math.fsum(expected_logprob(model, text, c, chat=True)) for c in ("yes", "no")]
        assert row["label_logprobs"] == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--choices", "a,b", "--choices-column", "c"], "cannot be combined"),
        (["--choices", "a,,b"], "empty choice"),
        (["--choices", "a,a"], "twice"),
        (["--choices", "a,b", "--temperature", "0.7"], "scores instead of generating"),
        (["--score-column", "text"], "also the text"),
        (["--choices", "a", "--choice-score", "max"], "sum, mean"),
        (["--choices", "a", "--keep-columns", "label"], "clash"),
    ],
)
def test_bad_scoring_settings_are_job_errors(tmp_path, tiny_models, flags, message):
    inp = write_rows(tmp_path / "in.parquet", ["one", "two"], label=["x", "y"])
    code, out = run_cli(inp, "--model", tiny_models["llama"], "--output", tmp_path / "o.parquet", *flags)
    assert code == 2, out
    assert message in out and len(out.strip().splitlines()) == 1


def test_killed_scoring_job_resumes_and_refuses_changed_choices(tmp_path, tiny_models, make_rows):
    texts = make_rows(num_groups=3, rows_per_group=5, duplicates=2, seed=10)
    inp = write_rows(tmp_path / "in.parquet", texts, options=[["yes", " no", "maybe"]] * len(texts))
    base = ["run", str(inp), "--model", str(tiny_models["qwen2"]), "--quiet", "--checkpoint-rows", "2"]
    flags = ["--choices-column", "options", "--window", "8"]

    def cli(name: str, *extra: str, env: dict | None = None):
        cmd = [*base, "--output", str(tmp_path / f"{name}.parquet"), *flags, *extra]
        if env is None:
            return CliRunner().invoke(app, cmd).exit_code
        proc = [sys.executable, "-m", "batchllm", *cmd]
        return subprocess.run(proc, env={**os.environ, **env}, capture_output=True, timeout=300).returncode

    assert cli("reference") == 0
    assert cli("resumed", env={"BATCHLLM_CRASH_AT": "commit:3"}) == -signal.SIGKILL
    assert not (tmp_path / "resumed.parquet").exists()
    assert cli("resumed", "--token-budget", "64") == 0  # speed settings may change on resume
    got, want = (pq.read_table(tmp_path / f"{n}.parquet") for n in ("resumed", "reference"))
    # batches differ after a resume, so float sums may differ in their last bits; the rest is exact
    assert got.drop_columns(["label_logprobs"]).equals(want.drop_columns(["label_logprobs"]))
    for a, b in zip(got["label_logprobs"].to_pylist(), want["label_logprobs"].to_pylist()):
        assert a == pytest.approx(b, abs=1e-5)
    result = CliRunner().invoke(
        app,
        [
            *base,
            "--output",
            str(tmp_path / "resumed.parquet"),
            "--choices-column",
            "options",
            "--choice-score",
            "mean",
        ],
    )
    assert result.exit_code == 2 and "scoring changed" in result.output


def test_plan_counts_choice_sequences_and_the_run_computes_them(tmp_path, tiny_models, make_rows):
    """Each prompt once (its shared prefixes once per window) and each choice's own tokens once."""
    model, texts = tiny_models["llama"], make_rows(num_groups=2, rows_per_group=4, seed=12)
    table, report = score_job(tmp_path, model, texts, "--choices", "yes,no,maybe")
    args = ["plan", str(tmp_path / "in.parquet"), "--model", str(model), "--choices", "yes,no,maybe"]
    result = CliRunner().invoke(app, [*args, "--prefix", str(tmp_path / "prefix.txt"), "--json"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output)
    tok = AutoTokenizer.from_pretrained(model)
    own = sum(len(tok(c, add_special_tokens=False)["input_ids"]) for c in ("yes", "no", "maybe"))
    assert figures["score_sequences"] == 3 * len(texts) and figures["score_tokens"] == own * len(texts)
    planned = figures["prefill_tokens_planned"] - len(texts) + own * len(texts)
    assert figures["prefill_tokens_planned_scoring"] == planned == report["prefill_tokens_computed"]
    assert planned <= report["unique_prompt_tokens"] + own * len(texts)


def test_choices_on_the_triton_backend(tmp_path, tiny_models, make_rows):
    """The Triton kernels (interpreted on CPU) give the same log-probs; prefix-aware paths included."""
    model = tiny_models["qwen3"]
    texts = make_rows(num_groups=2, rows_per_group=2, seed=13, instruction_words=20)
    flags = ("--choices", "yes, no", "--attention-backend", "triton")
    table, report = score_job(tmp_path, model, texts, *flags)
    check_choices(model, table.to_pylist(), texts, [["yes", " no"]] * len(texts))
    assert report["cached_tokens"] > 0


def test_resume_refuses_a_changed_choices_column(tmp_path, tiny_models):
    """The input fingerprint covers the choices column's contents, not only the text column."""
    inp, out = tmp_path / "in.parquet", tmp_path / "out.parquet"
    texts = ["the film was fine", "the food was cold"]
    args = [inp, "--model", tiny_models["llama"], "--output", out, "--choices-column", "options"]
    args += ["--checkpoint-rows", "1"]
    write_rows(inp, texts, options=[["yes", "no"], ["yes", "no"]])
    assert run_cli(*args)[0] == 0
    assert run_cli(*args)[0] == 0  # the same input resumes (nothing left to do)
    write_rows(inp, texts, options=[["yes", "no"], ["yes", "maybe"]])
    code, text = run_cli(*args)
    assert code == 2 and len(text.strip().splitlines()) == 1, text
    assert "different job" in text and "choices or score columns differ" in text
