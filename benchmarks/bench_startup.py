"""Start-up + load of a small model, each figure from a fresh process: before (AutoConfig, AutoTokenizer)
vs after (config.json and tokenizer.json read directly; transformers not imported).

    python benchmarks/bench_startup.py                 # 3 repeats, the ~20M-parameter model of bench_cpu.py
    python benchmarks/bench_startup.py --repeats 5 --run --json startup.json

Per repeat and mode, one child process times: ``import`` (batchllm.cli and batchllm.job.run, torch
included), ``config+tokenizer`` (load_model_config + load_tokenizer + one encode/decode), ``load``
(the model's weights to the CPU, float32) and ``process`` (the child's whole wall time, interpreter
start and exit included, measured by the parent). ``torch`` is a bare ``python -c "import torch"``: the
floor no change here moves. ``--run`` also times ``batchllm run`` on 4 rows, 1 new token, as a whole
process (start-up + load + a token). Best of ``--repeats``; absolute seconds depend on the machine
(say which, and whether it was loaded).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(tempfile.gettempdir()) / "batchllm_bench_startup"

CHILD = """
import sys, time, json
t0 = time.perf_counter()
mode, path = sys.argv[1], __import__("pathlib").Path(sys.argv[2])
import batchllm.cli, batchllm.job.run
import torch
if mode == "before":
    import llguidance.hf  # engine.constraints imported it (and transformers) on every run before
from batchllm.model import config as config_module, tokenizer as tokenizer_module
if mode == "before":  # what start-up did before: AutoConfig and AutoTokenizer
    config_module.raw_config = lambda raw, arch: None
    tokenizer_module.plain_tokenizer_files = lambda path: None
t1 = time.perf_counter()
mcfg = config_module.load_model_config(path)
tok = tokenizer_module.load_tokenizer(path)
tok.decode(tok("Start-up check: one short text.")["input_ids"])
t2 = time.perf_counter()
from batchllm.model.loader import load_model
load_model(path, mcfg, torch.float32, torch.device("cpu"))
t3 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "config+tokenizer": t2 - t1, "load": t3 - t2,
                  "transformers_imported": "transformers" in sys.modules}))
"""


def model_dir() -> Path:
    """bench_cpu.py's model, made once and cached."""
    path = CACHE / "model"
    if not (path / "config.json").is_file():
        sys.path.insert(0, str(Path(__file__).parent))
        import bench_cpu

        bench_cpu.make_model(CACHE)
    return path


def _timed(cmd: list[str], cwd: Path | None = None) -> tuple[float, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, check=True).stdout
    return time.perf_counter() - t0, out


def one_mode(mode: str, path: Path) -> dict:
    wall, out = _timed([sys.executable, "-c", CHILD, mode, str(path)])
    return {**json.loads(out.strip().splitlines()[-1]), "process": wall}


def one_run(path: Path, work: Path) -> float:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [f"Row {i}: a short question?" for i in range(4)]}), work / "in.parquet")
    cmd = [sys.executable, "-m", "batchllm", "run", str(work / "in.parquet"), "--model", str(path)]
    cmd += ["--output", str(work / "out.parquet"), "--max-new-tokens", "1", "--quiet", "--fresh"]
    return _timed(cmd, cwd=ROOT)[0]


def best(runs: list[dict]) -> dict:
    return {k: min(r[k] for r in runs) if k != "transformers_imported" else runs[0][k] for k in runs[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--run", action="store_true", help="also time `batchllm run` on 4 rows as a whole process")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    path = model_dir()
    results: dict[str, object] = {
        "torch": min(_timed([sys.executable, "-c", "import torch"])[0] for _ in range(2))
    }
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for _ in range(args.repeats):  # round-robin, so load drifts hit both modes alike
        for mode in runs:
            runs[mode].append(one_mode(mode, path))
    results.update({mode: best(r) for mode, r in runs.items()})
    if args.run:
        with tempfile.TemporaryDirectory() as tmp:
            results["run_4_rows_1_token"] = min(one_run(path, Path(tmp)) for _ in range(args.repeats))
    print(f"{'':10s} {'import':>8s} {'cfg+tok':>8s} {'load':>8s} {'process':>8s}  transformers")
    for mode in runs:
        r = results[mode]
        seconds = " ".join(f"{r[k]:8.2f}" for k in ("import", "config+tokenizer", "load", "process"))
        print(f"{mode:10s} {seconds}  {'imported' if r['transformers_imported'] else 'not imported'}")
    print(f"bare `import torch`: {results['torch']:.2f} s")
    if "run_4_rows_1_token" in results:
        print(f"`batchllm run`, 4 rows, 1 token, whole process: {results['run_4_rows_1_token']:.2f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
