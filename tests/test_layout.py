"""The package's shape: few top-level modules, short files and functions, and a single-process run
that never touches the Ray code."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

PACKAGE = Path(__file__).resolve().parents[1] / "batchllm"
MAX_FILE_LINES = 300
MAX_FUNCTION_LINES = 40  # a function's body; kernels and the CLI's option lists (signatures) aside


def test_at_most_four_top_level_modules():
    modules = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert len(modules) <= 4, modules


def test_files_and_functions_are_short():
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        if len(source.splitlines()) > MAX_FILE_LINES:
            too_long.append(f"{path.relative_to(PACKAGE)}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            if any("jit" in ast.unparse(d) for d in node.decorator_list):
                continue  # a Triton kernel
            body = node.end_lineno - node.body[0].lineno + 1
            if body > MAX_FUNCTION_LINES:
                too_long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}(): {body} lines")
    assert not too_long, "\n".join(too_long)


def test_a_single_process_run_imports_nothing_from_distributed_or_testing(tmp_path, tiny_models):
    pq.write_table(pa.table({"text": ["a review", "another review"]}), tmp_path / "in.parquet")
    code = f"""
import sys
from pathlib import Path
from batchllm.config import EngineConfig, JobSpec, SamplingParams
from batchllm.job.run import run
spec = JobSpec(input=Path({str(tmp_path / "in.parquet")!r}), model={str(tiny_models["llama"])!r},
               output=Path({str(tmp_path / "out.parquet")!r}), progress=False,
               sampling=SamplingParams(max_new_tokens=2), engine=EngineConfig(device="cpu"))
run(spec)
loaded = sorted(m for m in sys.modules if m.startswith(("batchllm.distributed", "batchllm.testing", "ray")))
print("LOADED", loaded)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "LOADED []" in out, out
