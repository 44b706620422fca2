"""Per-row parameters (--params-column) vs a uniform job of the same rows, on bench_cpu.py's workload.

    python benchmarks/bench_params.py [--threads 2] [--repeats 3] [--json params.json]

Systems (same model, prompts and 32 new tokens per row, EOS ignored, float32 CPU):
  uniform      the job's own --temperature 0.8 --top-p 0.9 --top-k 50 (the per-job sampler)
  same_params  every row's params column says the same (the vectorised per-row sampler and stop check)
  mixed        rows cycle through four settings (greedy, 0.8/0.9/50, 1.2/1.0/0, 0.5/0.7/20)
Timing: wall and process-CPU seconds of ``batchllm.job.run.run`` less its model load; best of repeats.
The issue's goal: per-row parameters cost <= 5% over a uniform job.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_cpu  # noqa: E402
from bench_cpu import Clock, _observed, machine, make_model, make_workload  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

import batchllm.job.run  # noqa: E402
from batchllm.config import EngineConfig, JobSpec, SamplingParams  # noqa: E402

UNIFORM = {"temperature": 0.8, "top_p": 0.9, "top_k": 50}
MIXED = [{"temperature": 0.0}, UNIFORM, {"temperature": 1.2, "top_p": 1.0, "top_k": 0},
         {"temperature": 0.5, "top_p": 0.7, "top_k": 20}]  # fmt: skip


def run_once(model: Path, work, workdir: Path, system: str) -> tuple[float, float]:
    n = len(work.texts)
    params = {"uniform": None, "same_params": [UNIFORM] * n, "mixed": [MIXED[i % 4] for i in range(n)]}[
        system
    ]
    columns = {"id": pa.array(range(n)), "text": work.texts}
    if params is not None:
        columns["params"] = params
    src = workdir / f"{system}.parquet"
    pq.write_table(pa.table(columns), src)
    sampling = SamplingParams(max_new_tokens=bench_cpu.NEW_TOKENS, ignore_eos=True, **UNIFORM)
    job = JobSpec(
        input=src, model=str(model), output=workdir / f"{system}.out.parquet", id_column="id",
        prefix=work.prefix, sampling=sampling, engine=EngineConfig(device="cpu", dtype="float32"),
        progress=False, params_column=None if params is None else "params",
    )  # fmt: skip
    load: list[Clock] = []
    with _observed(batchllm.job.run, "load_model", lambda _, took: load.append(took)):
        start = Clock.now()
        batchllm.job.run.run(job, fresh=True)
        took = Clock.now() - start
    for loading in load:
        took -= loading
    return took.wall, took.cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    systems = ("uniform", "same_params", "mixed")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model = make_model(workdir)
        work = make_workload(AutoTokenizer.from_pretrained(model))
        run_once(model, work, workdir, "uniform")  # warm-up
        best = {s: (float("inf"), float("inf")) for s in systems}
        for _ in range(args.repeats):
            for s in systems:
                wall, cpu = run_once(model, work, workdir, s)
                best[s] = (min(best[s][0], wall), min(best[s][1], cpu))
    result = {"machine": machine(torch.get_num_threads()), "rows": len(work.texts)}
    for s in systems:
        result[s] = {"seconds": best[s][0], "cpu_seconds": best[s][1],
                     "over_uniform": best[s][0] / best["uniform"][0],
                     "cpu_over_uniform": best[s][1] / best["uniform"][1]}  # fmt: skip
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
