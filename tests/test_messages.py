"""--messages-column: conversations rendered with the chat template, against transformers; shared first
turns share KV; bad conversations are row errors; job files and resume."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from crash_runs import kill_then_resume_job
from hf_reference import hf_greedy
from transformers import AutoTokenizer
from typer.testing import CliRunner

from batchllm.cli import app
from batchllm.io.prompts import Prompter
from batchllm.io.reader import open_input
from batchllm.prefix_tree.plan import make_plan
from batchllm.prefix_tree.seqs import TokenSeqs

DATA = Path(__file__).parent / "data"
SYSTEM = "You are a careful assistant that labels reviews.\n"
MAX_NEW = "8"


def conversations() -> list[dict]:
    return [json.loads(line) for line in (DATA / "messages.jsonl").read_text().splitlines()]


def cli(*args: str | Path) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["run", *map(str, args), "--max-new-tokens", MAX_NEW, "--quiet"])
    return result.exit_code, result.output


def expected(model: Path, rows: list[dict]) -> list[str]:
    """transformers' own rendering and greedy generate(); the prefix is the system message if none."""
    tok = AutoTokenizer.from_pretrained(model)
    prompts = []
    for row in rows:
        messages = row["messages"]
        if not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": SYSTEM}, *messages]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        prompts.append(list(ids))
    return [tok.decode(ids, skip_special_tokens=True) for ids in hf_greedy(model, prompts, int(MAX_NEW))]


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_models) -> dict:
    root = tmp_path_factory.mktemp("messages")
    (root / "system.txt").write_text(SYSTEM)
    rows = conversations()
    pq.write_table(pa.Table.from_pylist(rows), root / "messages.parquet")  # list<struct<role, content>>
    model = tiny_models["qwen2"]
    return {"root": root, "rows": rows, "model": model, "expected": expected(model, rows)}


@pytest.mark.parametrize("name", ["messages.parquet", "messages.jsonl"])
def test_conversations_match_transformers(job, name):
    root = job["root"]
    inp = root / name if name.endswith(".parquet") else DATA / name
    out = root / f"{name}.out.parquet"
    code, text = cli(inp, "--model", job["model"], "--messages-column", "messages", "--id-column", "id",
                     "--prefix", root / "system.txt", "--output", out)  # fmt: skip
    assert code == 0, text
    table = pq.read_table(out)
    assert table.column("output").to_pylist() == job["expected"]
    assert table.column("id").to_pylist() == [r["id"] for r in job["rows"]]
    assert sum(table.column("cached_tokens").to_pylist()) > 0  # shared first turns were reused


def test_shared_first_turns_are_one_group_in_the_plan(job, tiny_models):
    source = open_input(DATA / "messages.jsonl", None, "messages", None, (), messages=True)
    (batch,) = source.iter_batches()
    prompter = Prompter(AutoTokenizer.from_pretrained(tiny_models["qwen2"]), SYSTEM, False, messages=True)
    prompts = prompter.encode(batch.texts, batch.text_errors).token_ids
    stats = make_plan(TokenSeqs.from_lists(prompts)).stats
    # kettle-0..2 share system + two turns, phones-0..1 their own system + two turns
    assert stats.groups >= 2 and stats.avg_prefix_tokens > 40
    assert stats.prefill_tokens_planned < stats.prompt_tokens


def test_bad_conversations_are_row_errors(job):
    root = job["root"]
    out = root / "bad.out.jsonl"
    code, text = cli(DATA / "messages_bad.jsonl", "--model", job["model"], "--messages-column", "messages",
                     "--id-column", "id", "--output", out)  # fmt: skip
    assert code == 1, text  # some rows failed, the rest ran
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert rows["ok"]["error"] is None and rows["ok"]["finish_reason"] != "error"
    assert rows["no-role"]["error"] == "message 1 has no role"
    assert rows["content-int"]["error"] == "message 1: content is not a string (int64)"
    assert rows["not-a-list"]["error"] == "messages is not a list of {role, content} (string)"
    assert rows["null"]["error"] == "messages is null"


def test_wrong_struct_field_type_in_parquet_is_a_row_error(job):
    root = job["root"]
    kind = pa.list_(pa.struct([("role", pa.int64()), ("content", pa.string())]))
    pq.write_table(
        pa.table({"messages": pa.array([[{"role": 1, "content": "hi"}]], kind)}), root / "int.parquet"
    )
    code, text = cli(root / "int.parquet", "--model", job["model"], "--messages-column", "messages",
                     "--output", root / "int.out.parquet")  # fmt: skip
    assert code == 1, text
    assert pq.read_table(root / "int.out.parquet").column("error").to_pylist() == [
        "message 1: role is not a string (int64)"
    ]


def test_a_malformed_line_and_a_missing_column_are_job_errors(job):
    root = job["root"]
    (root / "broken.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": [\n')
    code, text = cli(root / "broken.jsonl", "--model", job["model"], "--messages-column", "messages")
    assert code == 2 and "line 2 is not valid JSON" in text and len(text.strip().splitlines()) == 1
    code, text = cli(DATA / "messages.jsonl", "--model", job["model"], "--messages-column", "turns")
    assert code == 2 and "column 'turns' not found" in text


def test_a_job_file_and_a_killed_run_give_the_same_output(job):
    root = job["root"]
    settings = [f'input = "{DATA / "messages.jsonl"}"', f'model = "{job["model"]}"', 'output = "job.parquet"',
                'messages-column = "messages"', 'prefix = "system.txt"', f"max-new-tokens = {MAX_NEW}",
                "checkpoint-rows = 2"]  # fmt: skip
    (root / "job.toml").write_text("\n".join(settings) + "\n")
    kill_then_resume_job(root / "job.toml")
    assert pq.read_table(root / "job.parquet").column("output").to_pylist() == job["expected"]


def test_batchllm_plan_groups_conversations(job):
    args = ["plan", str(DATA / "messages.jsonl"), "--model", str(job["model"]), "--json",
            "--messages-column", "messages", "--prefix", str(job["root"] / "system.txt")]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output)
    assert figures["rows"] == len(job["rows"]) and figures["groups"] >= 2
    assert figures["prefill_tokens_planned"] < figures["prompt_tokens"]
