"""CPU, Ray scale-out with prefix sharing (#17): prefill computed and output tokens/s, 1 vs N workers.

    python benchmarks/bench_ray.py                         # both jobs, 1 and 2 workers
    python benchmarks/bench_ray.py --jobs issue --out 16 --json ray.json

Jobs (one instruction shared by every row > groups > rows; prompts are random token ids written as
the words of bench_gpu's word tokenizer, so token counts are exact):
  issue:    10 groups x 20 rows, 600-token instruction, 50-token group text, 20-token row text
  big:      16 groups x 64 rows, 2,000-token instruction, 100-token group text, 30-token row text
Model: a random Llama-shaped model (hidden 384, 8 layers, 6 heads, 2 KV heads, intermediate 1536,
vocab 4096; ~20M parameters), float32, `--load-format dummy`; greedy, exactly --out new tokens per row.

Each worker gets one torch thread: one worker runs in this process with torch.set_num_threads(1); N
workers are Ray actors on a local runtime started here with N CPUs (so the executor gives each one
thread). Ray start (ray.init) and the run's load phase (model load; for Ray also starting the actors)
are reported separately and excluded: "gen s" is the run's wall time minus its load phase, and output
tokens/s is output tokens / gen s. "read s" (reading and tokenizing, in the driver alone whatever N) is
inside gen s; "without read" is the speedup of gen s less read s, what the workers share. Goals checked
and printed:
  prefill(N) <= (prefill(1) + (N - 1) x instruction tokens) x 1.01, and out tok/s(N) >= 0.9 N x out tok/s(1).
`plan --workers N`'s estimate (job.estimate) is printed beside the measured prefill.

`big` is long on CPU: 2.2 M prompt tokens to tokenize and 34,320 to prefill under a 2,000-token context
(one worker at --out 4 took ~8 min on 2 loaded cores, most of it prefill attention; see
benchmarks/README.md "Why the big job is slow"). For the throughput goal on it, on a quiet machine:
    python benchmarks/bench_ray.py --jobs big --out 32 --json big.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_gpu import BYTE_TOKENS, make_model_dir, token_words  # noqa: E402

import batchllm.job.run  # noqa: E402
from batchllm.config import EngineConfig, JobSpec, SamplingParams  # noqa: E402
from batchllm.job.estimate import plan_job  # noqa: E402

VOCAB = 4096
MODEL = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 384,
    "num_hidden_layers": 8, "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 64,
    "intermediate_size": 1536, "vocab_size": VOCAB, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1,
    "eos_token_id": [2], "torch_dtype": "float32",
}  # fmt: skip


@dataclass(frozen=True)
class Job:
    groups: int
    rows: int  # per group
    instruction: int  # tokens shared by every row
    group: int  # tokens shared by a group's rows
    row: int  # each row's own tokens


JOBS = {"issue": Job(10, 20, 600, 50, 20), "big": Job(16, 64, 2000, 100, 30)}


def texts(job: Job, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = token_words(VOCAB)

    def draw(n: int) -> list[int]:
        return rng.integers(BYTE_TOKENS, VOCAB, n).tolist()

    head = draw(job.instruction)
    out = []
    for _ in range(job.groups):
        group = head + draw(job.group)
        out += ["".join(words[t] for t in group + draw(job.row)) for _ in range(job.rows)]
    return [out[i] for i in rng.permutation(len(out))]


def run(model: Path, src: Path, workdir: Path, workers: int, out: int, tag: str) -> dict:
    sampling = SamplingParams(max_new_tokens=out, ignore_eos=True)
    engine = EngineConfig(device="cpu", dtype="float32", load_format="dummy")
    spec = JobSpec(input=src, model=str(model), output=workdir / f"{tag}.parquet", sampling=sampling,
                   engine=engine, progress=False, workers=workers)  # fmt: skip
    estimate = plan_job(spec)
    t0 = time.perf_counter()
    o = batchllm.job.run.run(spec, fresh=True)
    wall = time.perf_counter() - t0
    gen = wall - o.phases.get("load", 0.0)
    return {
        "workers": workers, "wall_s": wall, "load_s": o.phases.get("load", 0.0), "gen_s": gen,
        "read_s": o.phases.get("read", 0.0),
        "output_tokens": o.counts.output_tokens, "output_tok_per_s": o.counts.output_tokens / gen,
        "prefill_tokens_computed": o.engine.prefill_tokens,
        "plan_estimate": estimate.get("prefill_tokens_with_workers", estimate["prefill_tokens_planned"]),
        "per_worker": {k: {key: v[key] for key in ("units", "prefill_tokens", "prefix_copy_tokens")}
                       for k, v in o.per_worker.items()},
        "output": pq.read_table(spec.output, columns=["output"]).column(0).to_pylist(),
    }  # fmt: skip


def bench(name: str, model: Path, workdir: Path, workers: list[int], out: int) -> dict:
    job = JOBS[name]
    src = workdir / f"{name}.parquet"
    pq.write_table(pa.table({"text": texts(job)}), src)
    runs = {w: run(model, src, workdir, w, out, f"{name}-{w}") for w in workers}
    one = runs[workers[0]]
    for w, r in runs.items():
        bound = (one["prefill_tokens_computed"] + (w - 1) * job.instruction) * 1.01
        r["prefill_goal"] = r["prefill_tokens_computed"] <= bound
        r["speedup"] = r["output_tok_per_s"] / one["output_tok_per_s"]
        # the driver reads and tokenizes alone, whatever N: the speedup of what the workers do
        r["speedup_without_read"] = (one["gen_s"] - one["read_s"]) / (r["gen_s"] - r["read_s"])
        r["same_output"] = r["output"] == one["output"]
    for r in runs.values():
        del r["output"]
    return {"job": job.__dict__, "runs": runs}


def print_table(name: str, result: dict) -> None:
    print(f"\n{name}: {result['job']}")
    print("| workers | prefill computed | plan estimate | prefix copies | goal | gen s | read s | load s "
          "| out tok/s | speedup | without read | same output |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for w, r in result["runs"].items():
        copies = sum(v["prefix_copy_tokens"] for v in r["per_worker"].values())
        print(f"| {w} | {r['prefill_tokens_computed']:,} | {r['plan_estimate']:,} | {copies:,} | "
              f"{'ok' if r['prefill_goal'] else 'MISSED'} | {r['gen_s']:.1f} | {r['read_s']:.1f} | "
              f"{r['load_s']:.1f} | {r['output_tok_per_s']:.0f} | {r['speedup']:.2f} | "
              f"{r['speedup_without_read']:.2f} | {r['same_output']} |")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", default="issue,big")
    p.add_argument("--workers", default="1,2", help="worker counts; the first is the baseline")
    p.add_argument("--out", type=int, default=32, help="new tokens per row")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    workers = [int(w) for w in args.workers.split(",")]
    torch.set_num_threads(1)
    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=max(workers), include_dashboard=False, logging_level="WARNING")
    report = {"ray_start_s": time.perf_counter() - t0, "machine": _machine(), "jobs": {}}
    print(f"ray.init: {report['ray_start_s']:.1f} s (excluded)")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model = make_model_dir(Path(tmp) / "model", MODEL)
            for name in args.jobs.split(","):
                report["jobs"][name] = bench(name, model, Path(tmp), workers, args.out)
                print_table(name, report["jobs"][name])
    finally:
        ray.shutdown()
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


def _machine() -> dict:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
    return {"cpu": model, "torch": torch.__version__, "threads_per_worker": 1}


if __name__ == "__main__":
    main()
