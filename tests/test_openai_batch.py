"""OpenAI batch files: OpenAI's and vLLM run-batch's documented examples run unmodified and give the
documented output shape; bad requests go to the errors file; job errors; job files; resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from crash_runs import kill_then_resume_job
from hf_reference import hf_greedy
from transformers import AutoTokenizer
from typer.testing import CliRunner

from batchllm.cli import app

DATA = Path(__file__).parent / "data"
MAX_NEW = "6"


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_models) -> dict:
    """The tiny qwen2 model under the names the documented examples ask for."""
    root = tmp_path_factory.mktemp("openai")
    (root / "meta-llama").mkdir()
    (root / "meta-llama" / "Meta-Llama-3-8B-Instruct").symlink_to(tiny_models["qwen2"])
    (root / "gpt-3.5-turbo-0125").symlink_to(tiny_models["qwen2"])
    return {"root": root, "llama": root / "meta-llama" / "Meta-Llama-3-8B-Instruct",
            "gpt": root / "gpt-3.5-turbo-0125", "tiny": tiny_models["qwen2"]}  # fmt: skip


def cli(*args: str | Path) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["run", *map(str, args), "--max-new-tokens", MAX_NEW, "--quiet"])
    return result.exit_code, result.output


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def expected(model: Path, requests: list[dict]) -> list[str]:
    tok = AutoTokenizer.from_pretrained(model)
    prompts = [list(tok.apply_chat_template(r["body"]["messages"], add_generation_prompt=True, tokenize=True,
                                            return_dict=False)) for r in requests]  # fmt: skip
    return [tok.decode(ids, skip_special_tokens=True) for ids in hf_greedy(model, prompts, int(MAX_NEW))]


@pytest.mark.parametrize("example, model", [("openai_batch.jsonl", "gpt"), ("vllm_batch.jsonl", "llama")])
def test_documented_examples_run_unmodified(models, example, model):
    out = models["root"] / f"{example}.results.jsonl"
    code, text = cli(DATA / example, "--model", models[model], "--output", out)
    assert code == 0, text
    got = lines(out)
    requests = lines(DATA / example)
    assert [g["custom_id"] for g in got] == ["request-1", "request-2"]
    assert lines(out.with_name(f"{example}.results.errors.jsonl")) == []
    contents = [g["response"]["body"]["choices"][0]["message"]["content"] for g in got]
    assert contents == expected(models["tiny"], requests)
    for g in got:
        assert set(g) == {"id", "custom_id", "response", "error"} and g["error"] is None
        assert g["id"].startswith("batch_req_") and g["response"]["status_code"] == 200
        body = g["response"]["body"]
        assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
        assert body["choices"][0]["finish_reason"] in ("stop", "length")
        usage = body["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert usage["completion_tokens"] <= int(MAX_NEW)  # max_tokens 1000 capped to --max-new-tokens
        assert "cached_tokens" in usage["prompt_tokens_details"]


def request(custom_id: str, body: dict, url: str = "/v1/chat/completions") -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body}) + "\n"


def test_requests_it_cannot_serve_go_to_the_errors_file(models):
    root, hi = models["root"], [{"role": "user", "content": "Hello world!"}]
    (root / "mixed.jsonl").write_text(
        request("ok", {"messages": hi, "temperature": 0.7, "seed": 1, "max_tokens": 3})
        + request("parts", {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]})
        + request("other-model", {"model": "gpt-4o", "messages": hi})
        + request("completions", {"prompt": "Hello"}, url="/v1/completions")
        + request("n", {"messages": hi, "n": 2})
        + request("no-role", {"messages": [{"content": "Hello"}]})
        + request("bad-temperature", {"messages": hi, "temperature": "hot"})
    )
    out = root / "mixed.out.jsonl"
    code, text = cli(root / "mixed.jsonl", "--model", models["gpt"], "--output", out)
    assert code == 1, text
    assert [g["custom_id"] for g in lines(out)] == ["ok", "parts", "completions"]
    assert lines(out)[0]["response"]["body"]["usage"]["completion_tokens"] <= 3
    errors = {
        e["custom_id"]: e["response"]["body"]["error"]["message"]
        for e in lines(root / "mixed.out.errors.jsonl")
    }
    assert errors == {
        "other-model": f"body asks for model 'gpt-4o', but this job runs {str(models['gpt'])!r}",
        "n": "params n > 1 needs --temperature > 0 (greedy samples are equal), got 2",
        "no-role": "message 1 has no role",
        "bad-temperature": "params temperature must be a number, got 'hot'",
    }
    assert all(e["response"]["status_code"] == 400 for e in lines(root / "mixed.out.errors.jsonl"))


@pytest.mark.parametrize(
    "content, message",
    [
        (request("a", {}) + request("a", {}), "custom_id 'a' of line 2 repeats line 1"),
        (request("a", {}) + '{"custom_id": "b", "body": \n', "line 2 is not valid JSON"),
        (
            request("a", {}) + json.dumps({"body": {}, "url": "/v1/chat/completions"}) + "\n",
            "line 2 has no custom_id",
        ),
    ],
)
def test_bad_batch_files_are_one_line_job_errors(models, content, message):
    path = models["root"] / "bad.jsonl"
    path.write_text(content)
    code, text = cli(
        path, "--model", models["gpt"], "--format", "openai", "--output", models["root"] / "b.jsonl"
    )
    assert code == 2 and message in text and len(text.strip().splitlines()) == 1


def test_a_parquet_output_is_refused(models):
    code, text = cli(
        DATA / "openai_batch.jsonl", "--model", models["gpt"], "--output", models["root"] / "x.parquet"
    )
    assert code == 2 and "give --output NAME.jsonl" in text


def test_a_job_file_run_killed_and_resumed_writes_the_same_lines(models):
    root = models["root"]
    rows = "".join(request(f"r{i}", {"messages": [{"role": "user", "content": f"Review {i}: fine."}]})
                   for i in range(6))  # fmt: skip
    (root / "many.jsonl").write_text(rows)
    settings = ['input = "many.jsonl"', f'model = "{models["gpt"]}"', 'format = "openai"',
                'output = "many.out.jsonl"', f"max-new-tokens = {MAX_NEW}",
                "checkpoint-rows = 2"]  # fmt: skip
    (root / "job.toml").write_text("\n".join(settings) + "\n")
    kill_then_resume_job(root / "job.toml")
    code, text = cli(root / "many.jsonl", "--model", models["gpt"], "--output", root / "straight.jsonl")
    assert code == 0, text

    def content(path: Path) -> list:
        return [(g["custom_id"], g["id"], g["response"]["body"]["choices"]) for g in lines(path)]

    assert content(root / "many.out.jsonl") == content(root / "straight.jsonl")
