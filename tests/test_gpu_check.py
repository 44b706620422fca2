"""benchmarks/gpu_check.sh and its python check module on CPU: gpu_parity.py's dry run (tiny shapes,
Triton interpreter) passes its kernel sections, skips what needs CUDA or is not built yet, and writes
its JSON; the shell script parses."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def parity():
    spec = importlib.util.spec_from_file_location("gpu_parity", BENCHMARKS / "gpu_parity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_parity"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_parity", None)


def test_parity_dry_run_passes_and_writes_json(parity, tmp_path: Path) -> None:
    out = tmp_path / "parity.json"
    assert parity.main(["--dry-run", "--sections", "attention,fused_ops,cuda_graph", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    sections = report["sections"]
    assert sections["attention"]["status"] == "pass"
    assert set(sections["attention"]["max_abs_error"]) == {
        f"{m}/{k}" for m in parity.MODELS for k in ("prefill", "decode", "prefix_decode", "merge")
    }
    assert sections["fused_ops"]["status"] == "pass"
    assert sections["cuda_graph"]["status"] == "skip"  # no CUDA here (or no graph switch yet)
    assert report["dry_run"] is True


def test_a_failing_check_is_reported_not_raised(parity, monkeypatch) -> None:
    def broken(*args):
        raise RuntimeError("boom")

    monkeypatch.setitem(parity.SECTIONS, "attention", broken)
    results = parity.run_sections(["attention"], parity.DRY, "cpu")
    assert results["attention"]["status"] == "fail" and "boom" in results["attention"]["error"]


def test_gpu_check_script_parses() -> None:
    subprocess.run(["bash", "-n", str(BENCHMARKS / "gpu_check.sh")], check=True)
