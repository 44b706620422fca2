"""Structured output end to end: --json-schema, --regex, --grammar and --schema-column through the CLI.

Tiny random models write garbage, so most of a constrained output is forced by the grammar; what these
tests check is that every output is valid by construction, and how rows end when it cannot be.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pyarrow.parquet as pq
import pytest
from test_run import run_cli, write_rows

from batchllm.engine.model_host import ModelHost

SCHEMA = {  # six fields, every one bounded, so a tiny model's output completes within the budget
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "active": {"type": "boolean"},
        "tier": {"enum": ["bronze", "silver", "gold"]},
        "score": {"enum": [1, 2, 3, 4, 5]},
        "tags": {"type": "array", "items": {"enum": ["new", "vip", "late"]}, "maxItems": 3},
    },
    "required": ["name", "age", "active", "tier", "score", "tags"],
    "additionalProperties": False,
}
MAX_NEW = 160  # a 10-character name can take 40 byte-level tokens
TEXTS = [f"Describe customer {i} as JSON." for i in range(5)]


def constrained(tmp: Path, model: Path, *flags: str, texts=TEXTS, **columns) -> tuple[int, str, list, dict]:
    inp = write_rows(tmp / "in.parquet", texts, **columns)
    out, report = tmp / "out.parquet", tmp / "report.json"
    if "--max-new-tokens" not in flags:
        flags = (*flags, "--max-new-tokens", str(MAX_NEW))
    code, text = run_cli(inp, "--model", model, "--output", out, "--report", report, *flags)
    if code not in (0, 1):
        return code, text, [], {}
    return code, text, pq.read_table(out).to_pylist(), json.loads(report.read_text())


def schema_file(tmp: Path, schema: dict | str = SCHEMA, name: str = "schema.json") -> Path:
    path = tmp / name
    path.write_text(schema if isinstance(schema, str) else json.dumps(schema))
    return path


@pytest.mark.parametrize("temperature", ["0", "0.9"])
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_every_output_validates_against_the_schema(tmp_path, tiny_models, family, temperature):
    flags = ("--json-schema", schema_file(tmp_path), "--temperature", temperature, "--seed", "7")
    code, text, rows, report = constrained(tmp_path, tiny_models[family], *map(str, flags))
    assert code == 0, text
    for row in rows:
        assert row["finish_reason"] == "stop" and row["error"] is None, row
        jsonschema.validate(json.loads(row["output"]), SCHEMA)
    assert report["constrained_rows"] == len(TEXTS)
    assert report["masked_steps"] > 0 and report["forced_tokens"] > 0


def test_regex_outputs_match_in_full(tmp_path, tiny_models):
    pattern = r"(yes|no), [a-z]{2,6} [0-9]{1,3}"
    code, text, rows, _ = constrained(
        tmp_path, tiny_models["llama"], "--regex", pattern, "--temperature", "1"
    )
    assert code == 0, text
    for row in rows:
        assert row["finish_reason"] == "stop" and re.fullmatch(pattern, row["output"]), row


def test_lark_and_gbnf_grammars(tmp_path, tiny_models):
    grammars = {
        "g.lark": 'start: "label=" LABEL\nLABEL: "pos" | "neg" | "mixed"',
        "g.gbnf": 'root ::= "n=" [0-9] [0-9]?',
    }
    patterns = {"g.lark": r"label=(pos|neg|mixed)", "g.gbnf": r"n=[0-9][0-9]?"}
    for name, grammar in grammars.items():
        path = schema_file(tmp_path, grammar, name)
        code, text, rows, _ = constrained(tmp_path, tiny_models["qwen2"], "--grammar", str(path), "--fresh")
        assert code == 0, text
        assert all(re.fullmatch(patterns[name], r["output"]) for r in rows), rows


def test_per_row_schemas_and_a_bad_one(tmp_path, tiny_models):
    small = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    schemas = [json.dumps(SCHEMA), json.dumps(small), "{not json", json.dumps({"type": "bogus"}), None]
    code, text, rows, report = constrained(
        tmp_path, tiny_models["mistral"], "--schema-column", "schema", schema=schemas
    )
    assert code == 1, text  # rows failed, the job did not
    for row, schema in zip(rows, schemas):
        if row["id"] < 2:
            assert row["finish_reason"] == "stop", row
            jsonschema.validate(json.loads(row["output"]), json.loads(schema))
        else:
            assert row["finish_reason"] == "error" and row["output"] is None
            assert row["error"].startswith("schema column 'schema'"), row
    assert report["constrained_rows"] == 2


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--json-schema", '{"type": "object", "properties": 3}', "--json-schema: invalid json_schema"),
        ("--json-schema", "{oops", "not JSON"),
        ("--regex", "[a-", "--regex: invalid regex"),
        ("--grammar", "start: undefined_rule", "--grammar: invalid grammar"),
    ],
)
def test_invalid_job_grammar_is_a_job_error_before_the_model_loads(
    tmp_path, tiny_models, monkeypatch, flag, value, message
):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model loaded before the grammar was checked")

    monkeypatch.setattr("batchllm.job.run.load_model", no_loading)
    arg = value if flag == "--regex" else str(schema_file(tmp_path, value))
    code, text, _, _ = constrained(tmp_path, tiny_models["llama"], flag, arg)
    assert code == 2, text
    assert message in text and len(text.strip().splitlines()) == 1, text
    assert not (tmp_path / "out.parquet.run").exists()


def test_a_budget_too_small_ends_with_length_and_an_error(tmp_path, tiny_models):
    code, text, rows, _ = constrained(
        tmp_path, tiny_models["qwen3"], "--json-schema", str(schema_file(tmp_path)), "--max-new-tokens", "6"
    )
    assert code == 0, text
    for row in rows:
        assert row["finish_reason"] == "length" and row["output_tokens"] == 6, row
        assert "output incomplete" in row["error"], row


@pytest.mark.parametrize("extra", [("--logprobs", "1"), ("--n", "2", "--temperature", "0.8")])
def test_an_incomplete_output_is_an_error_with_logprobs_and_samples(tmp_path, tiny_models, extra):
    """Rows gathered per sample (--logprobs, --n) keep the error of a sample cut by the budget."""
    schema = str(schema_file(tmp_path))
    code, text, rows, _ = constrained(
        tmp_path, tiny_models["qwen3"], "--json-schema", schema, "--max-new-tokens", "6", *extra
    )
    assert code == 0, text
    for row in rows:
        assert row["finish_reason"] == "length", row
        assert "output incomplete" in row["error"], row


def test_jump_forward_takes_fewer_steps_for_the_same_output(tmp_path, tiny_models, monkeypatch):
    flags = ("--json-schema", str(schema_file(tmp_path)), "--fresh")
    _, _, fast_rows, fast = constrained(tmp_path, tiny_models["llama"], *flags)
    monkeypatch.setattr(ModelHost, "jump_forward", False)
    _, _, slow_rows, slow = constrained(tmp_path, tiny_models["llama"], *flags)
    assert [r["output"] for r in fast_rows] == [r["output"] for r in slow_rows]
    assert [r["output_tokens"] for r in fast_rows] == [r["output_tokens"] for r in slow_rows]
    assert fast["forced_tokens"] > 0 and slow["forced_tokens"] == 0
    assert fast["steps"] < slow["steps"]


def test_resume_refuses_another_schema(tmp_path, tiny_models):
    code, text, _, _ = constrained(
        tmp_path, tiny_models["llama"], "--json-schema", str(schema_file(tmp_path))
    )
    assert code == 0, text
    other = schema_file(tmp_path, {**SCHEMA, "required": ["name"]}, "other.json")
    code, text, _, _ = constrained(tmp_path, tiny_models["llama"], "--json-schema", str(other))
    assert code == 2 and "grammar changed" in text, text


def test_schema_in_prompt_goes_into_the_system_message(tmp_path, tiny_models):
    model, schema = tiny_models["qwen2"], str(schema_file(tmp_path))
    _, text, plain, _ = constrained(tmp_path, model, "--chat", "--max-new-tokens", "4", "--fresh")
    _, _, guided, _ = constrained(tmp_path, model, "--chat", "--json-schema", schema, "--fresh")
    _, _, shown, _ = constrained(
        tmp_path, model, "--chat", "--json-schema", schema, "--schema-in-prompt", "--fresh"
    )
    assert [r["prompt_tokens"] for r in plain] == [r["prompt_tokens"] for r in guided], text
    assert all(s["prompt_tokens"] > p["prompt_tokens"] + 20 for s, p in zip(shown, plain))
    for row in shown:
        jsonschema.validate(json.loads(row["output"]), SCHEMA)


def test_triton_backend_with_a_schema(tmp_path, tiny_models):
    flags = ("--json-schema", str(schema_file(tmp_path)), "--attention-backend", "triton")
    code, text, rows, _ = constrained(tmp_path, tiny_models["qwen2"], *flags, texts=TEXTS[:2])
    assert code == 0, text
    for row in rows:
        jsonschema.validate(json.loads(row["output"]), SCHEMA)


def test_example_job_with_a_json_schema(tmp_path, tiny_models):
    jobs = Path(__file__).resolve().parent.parent / "jobs"
    out, schema = tmp_path / "facts.parquet", json.loads((jobs / "schemas" / "review.json").read_text())
    code, text = run_cli(
        "--job", jobs / "review_facts.toml", "--model", tiny_models["qwen2"], "--output", out,
        "--report", tmp_path / "r.json", "--max-new-tokens", "400",
    )  # fmt: skip
    assert code == 0, text
    rows = pq.read_table(out).to_pylist()
    assert len(rows) >= 3
    for row in rows:
        jsonschema.validate(json.loads(row["output"]), schema)


def test_per_row_schemas_in_the_prompt(tmp_path, tiny_models):
    small = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    small["additionalProperties"] = False
    schemas = [json.dumps(SCHEMA), json.dumps(small)] * 2
    flags = ("--chat", "--schema-column", "schema", "--fresh")
    _, _, hidden, _ = constrained(tmp_path, tiny_models["qwen2"], *flags, texts=TEXTS[:4], schema=schemas)
    code, text, shown, _ = constrained(
        tmp_path, tiny_models["qwen2"], *flags, "--schema-in-prompt", texts=TEXTS[:4], schema=schemas
    )
    assert code == 0, text
    for row, before, schema in zip(shown, hidden, schemas):
        assert row["prompt_tokens"] > before["prompt_tokens"] + len(schema) // 8, row
        jsonschema.validate(json.loads(row["output"]), json.loads(schema))


def test_stop_strings_still_end_constrained_rows(tmp_path, tiny_models):
    flags = ("--json-schema", str(schema_file(tmp_path)), "--stop", ',"tier"')
    code, text, rows, _ = constrained(tmp_path, tiny_models["llama"], *flags, texts=TEXTS[:2])
    assert code == 0, text
    for row in rows:
        assert row["finish_reason"] == "stop" and row["output"].startswith('{"name":"'), row
        assert '"active":' in row["output"] and "tier" not in row["output"], row


def test_a_missing_schema_column_is_a_job_error(tmp_path, tiny_models):
    code, text, _, _ = constrained(tmp_path, tiny_models["llama"], "--schema-column", "nope")
    assert code == 2 and "schema column 'nope' not found" in text, text
