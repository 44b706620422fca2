"""OpenAI batch requests with n, logprobs / top_logprobs, response_format and /v1/completions lines run
(per request, in one file) and come back in OpenAI's documented shapes; requests' max_tokens widen the
job; a run interrupted part-way resumes to the same lines. All in this process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hf_reference import hf_greedy
from transformers import AutoTokenizer
from typer.testing import CliRunner

from batchllm.cli import app
from batchllm.config import JobSpec, SamplingParams
from batchllm.errors import JobError
from batchllm.io.openai_batch import open_batch_file
from batchllm.job.batch_job import batch_job

DATA = Path(__file__).parent / "data"
FEATURES = DATA / "openai_features.jsonl"


@pytest.fixture(scope="module")
def gpt(tmp_path_factory, tiny_models) -> Path:
    """The tiny qwen2 model under the name the requests ask for."""
    root = tmp_path_factory.mktemp("openai_requests")
    (root / "gpt-3.5-turbo-0125").symlink_to(tiny_models["qwen2"])
    return root / "gpt-3.5-turbo-0125"


@pytest.fixture(scope="module")
def results(gpt) -> dict[str, dict]:
    """custom_id -> response body of the features file, run once (no --max-new-tokens: the requests')."""
    out = gpt.parent / "features.out.jsonl"
    result = CliRunner().invoke(
        app, ["run", str(FEATURES), "--model", str(gpt), "--output", str(out), "--quiet"]
    )
    assert result.exit_code == 0, result.output
    done = [json.loads(line) for line in out.read_text().splitlines()]
    failed = [
        json.loads(line) for line in out.with_name("features.out.errors.jsonl").read_text().splitlines()
    ]
    return {g["custom_id"]: g["response"]["body"] for g in done + failed}


def greedy_text(model: Path, ids: list[int], max_new: int) -> str:
    tok = AutoTokenizer.from_pretrained(model)
    return tok.decode(hf_greedy(model, [ids], max_new)[0], skip_special_tokens=True)


def test_n_gives_a_choice_per_sample_and_usage_counts_them_all(results):
    body = results["samples"]
    assert body["object"] == "chat.completion"
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert all(c["message"]["role"] == "assistant" and c["logprobs"] is None for c in body["choices"])
    assert all(c["finish_reason"] in ("stop", "length") for c in body["choices"])
    assert 2 <= body["usage"]["completion_tokens"] <= 10  # both samples' tokens (max_tokens 5 each)


def test_chat_logprobs_have_openais_shape_and_the_requests_own_top_k(results, gpt):
    body, tok = results["logprobs"], AutoTokenizer.from_pretrained(gpt)
    (choice,) = body["choices"]
    content = choice["logprobs"]["content"]
    assert set(choice["logprobs"]) == {"content", "refusal"}
    assert len(content) == body["usage"]["completion_tokens"] <= 4
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["bytes"] == list(entry["token"].encode("utf-8")) and entry["logprob"] <= 0
        assert len(entry["top_logprobs"]) == 2  # the request's own K
        assert entry["top_logprobs"][0]["token"] == entry["token"]  # greedy: the most likely
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hello!"},
    ]
    ids = list(
        tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    )
    assert choice["message"]["content"] == greedy_text(gpt, ids, 4)
    assert results["plain"]["choices"][0]["logprobs"] is None  # a request that did not ask has none


def test_response_formats_constrain_the_output(results):
    assert json.loads(results["schema"]["choices"][0]["message"]["content"]) in (
        {"answer": "yes"},
        {"answer": "no"},
    )
    # The random model opens a string it never closes within max_tokens: incomplete JSON is an error.
    error = results["json-object"]["error"]["message"]
    assert error == "output incomplete: json_schema not complete within max_new_tokens=20"


def test_completions_lines_give_text_completions(results, gpt):
    body, tok = results["completion"], AutoTokenizer.from_pretrained(gpt)
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    (choice,) = body["choices"]
    assert set(choice) == {"index", "text", "logprobs", "finish_reason"}
    assert choice["text"] == greedy_text(gpt, tok("Say this is a test")["input_ids"], 4)
    logprobs = choice["logprobs"]
    assert set(logprobs) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == body["usage"]["completion_tokens"]
    assert all(len(top) <= 2 for top in logprobs["top_logprobs"])
    assert logprobs["text_offset"][0] == 0


def test_requests_widen_the_job_unless_max_new_tokens_is_given(tmp_path, gpt):
    path = tmp_path / "big.jsonl"
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4000, "n": 3, "temperature": 1.0}
    path.write_text(json.dumps({"custom_id": "a", "url": "/v1/chat/completions", "body": body}) + "\n")
    source = open_batch_file(path, str(gpt))
    job = JobSpec(
        input=path, model=str(gpt), output=tmp_path / "o.jsonl", sampling=SamplingParams(max_new_tokens=16)
    )
    run, _ = batch_job(job, source, 8192)
    assert (run.sampling.max_new_tokens, run.sampling.n, run.sampling.temperature) == (4000, 3, 1.0)
    capped, capped_source = batch_job(JobSpec(**{**job.__dict__, "max_new_tokens_given": True}), source, 8192)
    assert capped.sampling.max_new_tokens == 16 and capped_source.caps_max_tokens
    assert batch_job(job, source, 2048)[0].sampling.max_new_tokens == 2048  # never past the positions
    with pytest.raises(JobError, match="--explode-samples does not apply"):
        batch_job(JobSpec(**{**job.__dict__, "explode_samples": True}), source, 2048)


def test_an_interrupted_run_resumes_to_the_same_lines(gpt, results, monkeypatch):
    """Stopped after its first commit (every row commits alone), then run again: the same bodies."""
    out = gpt.parent / "resumed.out.jsonl"
    argv = [
        "run",
        str(FEATURES),
        "--model",
        str(gpt),
        "--output",
        str(out),
        "--quiet",
        "--checkpoint-rows",
        "1",
    ]
    commits = []

    def stop_after_first(point: str) -> None:
        commits.append(point)
        if len(commits) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr("batchllm.job.run.crash_point", stop_after_first)
    first = CliRunner().invoke(app, argv)
    assert first.exit_code != 0 and not out.exists()
    monkeypatch.undo()
    assert CliRunner().invoke(app, argv).exit_code == 0
    errors = out.with_name("resumed.out.errors.jsonl")
    got = [json.loads(line) for line in (out.read_text() + errors.read_text()).splitlines()]

    def same(body: dict) -> dict:
        return {k: v for k, v in body.items() if k != "created"}  # the time of writing

    assert {g["custom_id"]: same(g["response"]["body"]) for g in got} == {
        k: same(v) for k, v in results.items()
    }
