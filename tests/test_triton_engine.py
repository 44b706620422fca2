"""The Triton attention backend inside the engine: greedy output token-identical to transformers.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py), so the job is small.
"""

from __future__ import annotations

import pytest
from test_run import expected, got, run_job


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_triton_backend_matches_transformers(tmp_path, tiny_models, make_rows, family):
    texts = make_rows(num_groups=2, rows_per_group=3, duplicates=1, seed=8, instruction_words=20)
    flags = ("--attention-backend", "triton", "--max-new-tokens", "6")
    rows, report = run_job(tmp_path, tiny_models[family], texts, *flags)
    assert got(rows) == expected(tiny_models[family], texts, max_new=6)
    assert report["cached_tokens"] > 0  # the prefix-aware paths were exercised
