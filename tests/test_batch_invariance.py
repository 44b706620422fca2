"""Batch invariance: a row's output does not depend on which rows share its step.

Unit level: the torch backend's chunked attention equals the float32 reference, and a row's bits are
the same alone, in a group sharing its prefix, and next to prefill chunks. End to end: bf16 greedy
outputs of 200 rows are identical across token budgets, windows, prefix sharing and a crash + resume.
"""

from __future__ import annotations

import math
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
from typer.testing import CliRunner

from batchllm.cli import app
from batchllm.kernels.metadata import AttentionMetadata, build_metadata
from batchllm.kernels.reference import paged_attention_ref
from batchllm.kernels.torch_chunked import chunked_attention

BS = 16


def _step(
    rows: list[tuple[int, int, int]], groups: list[tuple[int, int]], target: int | None = None
) -> AttentionMetadata:
    """rows: (seq_len, query_len, first own block column); the columns before it are the group's
    shared blocks 0, 1, 2, ...; groups: (first row, shared blocks). Row ``target`` owns blocks from
    1000 on, the others from 1100 on."""
    tables = np.zeros((len(rows), max(math.ceil(s / BS) for s, _, _ in rows)), dtype=np.int32)
    slots, next_block = [], 1100
    for i, (seq_len, query_len, own) in enumerate(rows):
        n = math.ceil(seq_len / BS)
        tables[i, :own] = np.arange(own)
        first = 1000 if i == target else next_block
        tables[i, own:n] = np.arange(first, first + n - own)
        next_block += (n - own) * (i != target)
        pos = np.arange(seq_len - query_len, seq_len)
        slots.append(tables[i, pos // BS].astype(np.int64) * BS + pos % BS)
    starts = np.array([g for g, _ in groups] + [len(rows)])
    shared = np.array([s for _, s in groups])
    return build_metadata(
        np.array([q for _, q, _ in rows]), np.array([s for s, _, _ in rows]), tables,
        np.concatenate(slots), (starts, shared), BS, torch.from_numpy, chunk_plan=True,
    )  # fmt: skip


ROWS = [(700, 1, 40), (650, 1, 40), (610, 1, 40), (300, 1, 0), (900, 37, 40), (20, 20, 0), (513, 1, 0)]
GROUPS = [(0, 40), (3, 0), (4, 40), (5, 0), (6, 0)]  # rows 0-2 share 640 positions; row 4 too, alone


@pytest.mark.parametrize("kv_heads, heads, window", [(2, 4, None), (1, 4, None), (2, 2, 300), (4, 4, None)])
def test_chunked_attention_equals_the_reference(kv_heads, heads, window):
    torch.manual_seed(0)
    meta = _step(ROWS, GROUPS)
    cache = (torch.randn(2000, BS, kv_heads, 16), torch.randn(2000, BS, kv_heads, 16))
    q = torch.randn(sum(q for _, q, _ in ROWS), heads, 16)
    got = chunked_attention(q, *cache, meta.chunk_plan, 0.25, window)
    torch.testing.assert_close(got, paged_attention_ref(q, cache, meta, 0.25, window))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rows_bits_do_not_depend_on_its_step(dtype):
    """Row (700, 1 token) alone; in a group reading 640 shared positions once; next to prefill."""
    torch.manual_seed(1)
    cache = (torch.randn(2000, BS, 2, 16).to(dtype), torch.randn(2000, BS, 2, 16).to(dtype))
    q_row = torch.randn(1, 6, 16).to(dtype)
    alone = chunked_attention(q_row, *cache, _step([(700, 1, 40)], [(0, 0)], 0).chunk_plan, 0.25)
    for rows, groups, row, at in [
        (ROWS, GROUPS, 0, 0),
        ([(650, 1, 40), (700, 1, 40)], [(0, 40)], 1, 1),
        ([(900, 37, 40), (20, 20, 0), (700, 1, 40)], [(0, 0), (1, 0), (2, 40)], 2, 57),
        ([(700, 1, 40)] * 9, [(0, 40)], 5, 5),
    ]:
        meta = _step(rows, groups, row)
        q = torch.randn(sum(q for _, q, _ in rows), 6, 16).to(dtype)
        q[at] = q_row[0]
        got = chunked_attention(q, *cache, meta.chunk_plan, 0.25)
        assert torch.equal(got[at], alone[0])


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_models, make_rows) -> dict:
    """200 rows (nested shared prefixes, 10 duplicates), bf16, and their uninterrupted outputs."""
    root = tmp_path_factory.mktemp("invariance")
    texts = make_rows(num_groups=10, rows_per_group=19, duplicates=10, seed=5)
    pq.write_table(pa.table({"text": texts}), root / "in.parquet")
    spec = {"root": root, "model": tiny_models["qwen2"]}
    assert _cli(spec, "reference") == 0
    spec["expected"] = _outputs(root / "reference.parquet")
    return spec


def _outputs(path: Path) -> pa.Table:
    """What a row's numerics decide (``cached_tokens`` rightly changes with prefix sharing)."""
    return pq.read_table(path, columns=["id", "output", "output_tokens", "finish_reason", "error"])


def _args(spec: dict, name: str, *extra: str) -> list[str]:
    root = spec["root"]
    return [
        "run", str(root / "in.parquet"), "--model", str(spec["model"]),
        "--output", str(root / f"{name}.parquet"), "--dtype", "bfloat16", "--device", "cpu",
        "--max-new-tokens", "4", "--quiet", "--checkpoint-rows", "20", "--deterministic", *extra,
    ]  # fmt: skip


def _cli(spec: dict, name: str, *extra: str) -> int:
    return CliRunner().invoke(app, _args(spec, name, *extra)).exit_code


@pytest.mark.parametrize(
    "extra", [("--token-budget", "96"), ("--no-prefix-sharing",), ("--window", "50")], ids=lambda e: e[0]
)
def test_bf16_outputs_do_not_depend_on_batching(job, extra):
    name = extra[0].strip("-")
    assert _cli(job, name, *extra) == 0
    assert _outputs(job["root"] / f"{name}.parquet").equals(job["expected"])


def test_bf16_crash_and_resume_gives_the_uninterrupted_output(job):
    env = {**os.environ, "BATCHLLM_CRASH_AT": "row:70", "PYTHONPATH": str(Path.cwd())}
    cmd = [sys.executable, "-m", "batchllm", *_args(job, "crashed", "--token-budget", "300")]
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert _cli(job, "crashed") == 0
    assert _outputs(job["root"] / "crashed.parquet").equals(job["expected"])


@pytest.mark.parametrize(
    "extra, changed", [(("--dtype", "float32"), "dtype"), (("--no-deterministic",), "deterministic")]
)
def test_a_resume_that_changes_the_numerics_is_refused(job, extra, changed):
    result = CliRunner().invoke(app, _args(job, "reference", *extra))
    assert result.exit_code == 2
    assert f"{changed} changed from" in result.output
