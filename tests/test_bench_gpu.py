"""benchmarks/bench_gpu.py on CPU: the dry run writes a JSON of the promised shape, with exact token counts,
and its workload, tokenizer and roofline pieces do what the GPU run relies on."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from batchllm.model.config import load_model_config

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_gpu.py"
FIGURES = (
    "seconds",
    "rows",
    "requests_per_second",
    "input_tokens_per_second",
    "output_tokens_per_second",
    "total_tokens_per_second",
)


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_gpu", None)


@pytest.fixture(scope="module")
def dry_run(bench, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench_gpu") / "dry.json"
    assert bench.main(["--dry-run", "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_dry_run_json_has_the_promised_shape(dry_run: dict, bench) -> None:
    assert dry_run["model"] == "llama-3.1-8b"
    assert {"gpu", "dtype"} <= dry_run.keys()
    assert set(dry_run["workloads"]) == {"shared_prefix", "batchllm_micro", "no_sharing"}
    for name, w in dry_run["workloads"].items():
        assert set(w["systems"]) == set(bench.SYSTEMS), name
        assert w["roofline_seconds"] > 0 and 0 < w["roofline_fraction"]
        for system, s in w["systems"].items():
            assert "skipped" not in s, (name, system, s)
            assert all(s[key] > 0 for key in FIGURES), (name, system)
            assert s["rows"] <= w["rows"]
        assert w["systems"]["batchllm"]["rows"] == w["rows"]


def test_dry_run_token_counts_match_the_workload_exactly(dry_run: dict) -> None:
    for name, w in dry_run["workloads"].items():
        spec = w["spec"]
        per_row_in, per_row_out = spec["shared"] + spec["distinct"], spec["output"]
        for system, s in w["systems"].items():
            assert s["input_tokens"] == s["rows"] * per_row_in, (name, system)
            assert s["output_tokens"] == s["rows"] * per_row_out, (name, system)


def test_dry_run_batchllm_shares_prefixes_and_transformers_runs_whole_groups(dry_run: dict) -> None:
    w = dry_run["workloads"]["batchllm_micro"]
    shared, plain = w["systems"]["batchllm"], w["systems"]["batchllm_no_sharing"]
    assert shared["prefill_tokens_computed"] < plain["prefill_tokens_computed"]
    hf_rows = w["systems"]["hf_generate_batch"]["rows"]
    assert hf_rows < w["rows"] and hf_rows % w["spec"]["per_group"] == 0


@pytest.mark.parametrize("model", ["llama-3.1-8b", "qwen2.5-7b"])
def test_prompts_round_trip_through_the_word_tokenizer(bench, tmp_path: Path, model: str) -> None:
    config = bench.model_config(model, dry=True)
    model_dir = bench.make_model_dir(tmp_path / "model", config)
    spec = bench.WorkloadSpec(groups=3, per_group=4, shared=20, distinct=5, output=2)
    prompts, order = bench.make_prompts(spec, config["vocab_size"], seed=1)
    words = bench.token_words(config["vocab_size"])
    texts = bench.texts_of(prompts, order, first_rows=8, words=words)
    ids = AutoTokenizer.from_pretrained(model_dir)(texts)["input_ids"]
    assert ids == [prompts[i].tolist() for i in order if i < 8]
    assert all(np.array_equal(prompts[0][:20], prompts[j][:20]) for j in range(4))
    assert not np.array_equal(prompts[0][:20], prompts[4][:20])
    assert load_model_config(model_dir).eos_token_ids == tuple(config["eos_token_id"])


def test_roofline_counts_shared_prefixes_once(bench) -> None:
    model = load_model_config(BENCH.parent / "configs" / "llama-3.1-8b")
    hw = bench.Hardware(matmul_flops_per_second=1e15, copy_bytes_per_second=4e12)
    shared = bench.WorkloadSpec(groups=4, per_group=16, shared=2000, distinct=200, output=100)
    unshared = bench.WorkloadSpec(groups=64, per_group=1, shared=0, distinct=2200, output=100)
    a, b = bench.roofline(shared, model, 2, hw), bench.roofline(unshared, model, 2, hw)
    assert a["flops"] < b["flops"] and a["bytes"] < b["bytes"]
    # The layers' matmuls alone: 2 FLOPs per layer parameter for each unique prompt token and decode step.
    layers = model.num_params - 2 * model.vocab_size * model.hidden_size  # untied embedding and lm_head
    assert a["flops"] > 2 * layers * (4 * 2000 + 64 * 200 + 64 * 99)
    assert a["seconds"] == max(a["compute_seconds"], a["memory_seconds"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_without_cuda_it_says_so_and_exits_0(bench, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main([]) == 0
    assert "needs CUDA" in capsys.readouterr().out
