"""CPU: the cost of ``--logprobs 5`` and of ``--n 8`` (issue #13), batchllm in-process.

    python benchmarks/bench_samples.py --threads 2 --repeats 3 --json samples.json

1. ``--logprobs 5`` on ``bench_cpu.py``'s workload (64 rows under a ~600-token shared instruction,
   greedy, exactly 32 new tokens): wall with logprobs over wall without (goal <= 1.10).
2. ``--n 8``: 8 distinct ~200-token prompts, 8 samples each (temperature 1, exactly 32 new tokens),
   against the same 64 sequences given as independent rows (each prompt copied 8 times, ``--n 1``).
   Reports planned and computed prefill over unique prompt tokens (goal <= 1.05), planned prefill over
   that of ``--n 1`` (what the samples themselves add: one token each) and the wall ratio (goal <= 1.2).

Timing rule: wall seconds of ``batchllm.job.run.run`` less model loading, best of ``--repeats``,
variants run round-robin after one warm-up each. Model: bench_cpu's 20M-parameter random Llama, float32.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from bench_cpu import Clock, _grow, _observed, make_model, make_workload
from transformers import AutoTokenizer

import batchllm.job.run
from batchllm.config import EngineConfig, JobSpec, SamplingParams
from batchllm.job.estimate import plan_job
from batchllm.testing.tiny_tokenizer import default_corpus

NEW_TOKENS, SAMPLES, SAMPLE_ROWS, SAMPLE_PROMPT_TOKENS = 32, 8, 8, 200


def run_job(job: JobSpec) -> dict:
    """One timed run: wall and CPU seconds (model load excluded), prefill computed, plan figures."""
    load: list[Clock] = []
    with _observed(batchllm.job.run, "load_model", lambda _, took: load.append(took)):
        start = Clock.now()
        outcome = batchllm.job.run.run(job, fresh=True)
        took = Clock.now() - start
    for loading in load:
        took -= loading
    plan = outcome.plan
    return {
        "seconds": took.wall,
        "cpu_seconds": took.cpu,
        "prefill_computed": outcome.engine.prefill_tokens,
        "prefill_planned": plan.prefill_tokens_planned,
        "unique_prompt_tokens": plan.unique_prompt_tokens,
        "sequences": plan.rows,
        "groups": plan.groups,
    }


def job_for(
    workdir: Path, model: Path, tag: str, texts: list[str], prefix: str | None, **sampling
) -> JobSpec:
    src = workdir / f"{tag}.parquet"
    pq.write_table(pa.table({"id": pa.array(range(len(texts))), "text": texts}), src)
    return JobSpec(
        input=src,
        model=str(model),
        output=workdir / f"{tag}.out.parquet",
        id_column="id",
        prefix=prefix,
        sampling=SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True, **sampling),
        engine=EngineConfig(device="cpu", dtype="float32"),
        progress=False,
    )


def sample_prompts(tok) -> list[str]:
    rng = random.Random(3)
    words = " ".join(default_corpus(500, seed=4)).split()
    return [_grow(rng, tok, f"Note {r}:", SAMPLE_PROMPT_TOKENS, words) for r in range(SAMPLE_ROWS)]


def best_of(jobs: dict[str, JobSpec], repeats: int) -> dict[str, dict]:
    """Each job warmed up once, then run round-robin ``repeats`` times; the fastest run of each."""
    for job in jobs.values():
        run_job(job)
    best: dict[str, dict] = {}
    for _ in range(repeats):
        for name, job in jobs.items():
            got = run_job(job)
            if name not in best or got["seconds"] < best[name]["seconds"]:
                best[name] = got
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model = make_model(workdir)
        tok = AutoTokenizer.from_pretrained(model)
        work = make_workload(tok)
        logprobs = best_of({
            "plain": job_for(workdir, model, "plain", work.texts, work.prefix),
            "logprobs5": job_for(workdir, model, "lp5", work.texts, work.prefix, logprobs=5),
        }, args.repeats)  # fmt: skip
        prompts = sample_prompts(tok)
        copies = [p for p in prompts for _ in range(SAMPLES)]
        hot = {"temperature": 1.0, "seed": 1}
        n1_planned = plan_job(job_for(workdir, model, "n1", prompts, None))["prefill_tokens_planned"]
        samples = best_of({
            "n8": job_for(workdir, model, "n8", prompts, None, n=SAMPLES, **hot),
            "rows8": job_for(workdir, model, "rows8", copies, None, **hot),
        }, args.repeats)  # fmt: skip
    report = summarize(logprobs, samples, n1_planned)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


def summarize(logprobs: dict[str, dict], samples: dict[str, dict], n1_planned: int) -> dict:
    n8, rows8 = samples["n8"], samples["rows8"]
    return {
        "machine": f"{sys.platform}, torch threads {torch.get_num_threads()} (label figures 'under load')",
        "logprobs5_wall_ratio": logprobs["logprobs5"]["seconds"] / logprobs["plain"]["seconds"],
        "n8_planned_over_unique": n8["prefill_planned"] / n8["unique_prompt_tokens"],
        "n8_planned_over_n1_planned": n8["prefill_planned"] / n1_planned,  # the samples' own cost
        "n8_computed_over_unique": n8["prefill_computed"] / n8["unique_prompt_tokens"],
        "n8_wall_over_independent_rows": n8["seconds"] / rows8["seconds"],
        "runs": {**logprobs, **samples},
    }


if __name__ == "__main__":
    main()
