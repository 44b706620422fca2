"""Structured output end to end (issue #14): constrained vs unconstrained batchllm on bench_cpu's workload.

    python benchmarks/bench_structured.py                   # best of 3, torch's thread count
    python benchmarks/bench_structured.py --threads 2 --json structured.json
    python benchmarks/bench_structured.py --rows 16 --repeats 1    # a busy machine

Run it from the repository root with `PYTHONPATH=$PWD` to time a worktree's batchllm.

Workload and model: `bench_cpu.py`'s (64 rows under one ~600-token instruction, 8 groups; a ~20M
Llama-shaped random model, vocab 4096, float32, CPU; greedy). Systems, each a whole `job.run.run`
(read, tokenize, plan, generate, detokenize, write; model load excluded, as in bench_cpu):

  json schema                 --json-schema with a 6-field schema (string, integer, boolean, two enums,
                              an array), jump-forward on (the default)
  json schema, no jump-fwd    the same, every forced token decoded in a step of its own (its mask
                              allowing only it): the same output, token for token
  unconstrained               no schema, --ignore-eos, max-new-tokens = the constrained run's longest
                              output: at least as many output tokens per row as the constrained run

Cost = constrained seconds / unconstrained seconds - 1 (the goal: <= 15% without jump-forward; with
it, below 0). Every constrained output is checked against the schema with `jsonschema`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import transformers
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_cpu  # noqa: E402

import batchllm.job.run  # noqa: E402
from batchllm.config import EngineConfig, JobSpec, SamplingParams  # noqa: E402
from batchllm.engine.grammar_spec import GrammarSpec  # noqa: E402
from batchllm.engine.model_host import ModelHost  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "active": {"type": "boolean"},
        "tier": {"enum": ["bronze", "silver", "gold"]},
        "score": {"enum": [1, 2, 3, 4, 5]},
        "tags": {"type": "array", "items": {"enum": ["new", "vip", "late"]}, "maxItems": 3},
    },
    "required": ["name", "age", "active", "tier", "score", "tags"],
    "additionalProperties": False,
}
MAX_NEW = 192


def job(model_dir: Path, work: bench_cpu.Workload, workdir: Path, tag: str, max_new: int) -> JobSpec:
    src = workdir / f"{tag}.parquet"
    pq.write_table(pa.table({"id": pa.array(range(len(work.texts))), "text": work.texts}), src)
    return JobSpec(
        input=src,
        model=str(model_dir),
        output=workdir / f"{tag}.out.parquet",
        id_column="id",
        prefix=work.prefix,
        sampling=SamplingParams(max_new_tokens=max_new),
        engine=EngineConfig(device="cpu", dtype="float32"),
        progress=False,
    )


@contextlib.contextmanager
def jump_forward(on: bool) -> Iterator[None]:
    saved = ModelHost.jump_forward
    ModelHost.jump_forward = on
    try:
        yield
    finally:
        ModelHost.jump_forward = saved


def timed(spec: JobSpec, jump: bool = True) -> dict:
    """One run: wall seconds less model load, output tokens, steps, and the outputs."""
    load: list = []
    with jump_forward(jump), bench_cpu._observed(batchllm.job.run, "load_model", lambda _, t: load.append(t)):
        start = bench_cpu.Clock.now()
        outcome = batchllm.job.run.run(spec, fresh=True)
        took = bench_cpu.Clock.now() - start
    for loading in load:
        took -= loading
    out = pq.read_table(spec.output).to_pydict()
    e = outcome.engine
    return {
        "seconds": took.wall, "output_tokens": sum(out["output_tokens"]), "steps": e.steps,
        "decode_tokens": e.decode_tokens, "forced_tokens": e.forced_tokens, "masked_steps": e.masked_steps,
        "max_output_tokens": max(out["output_tokens"]), "outputs": out["output"],
        "finish": sorted(set(out["finish_reason"])),
    }  # fmt: skip


def best(run: Callable[[], dict], repeats: int) -> dict:
    runs = [run() for _ in range(repeats)]
    return min(runs, key=lambda r: r["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per system; the best is kept")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument(
        "--rows", type=int, default=64, help="the first N rows of the workload (a busy machine)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model_dir = bench_cpu.make_model(workdir)
        work = bench_cpu.make_workload(AutoTokenizer.from_pretrained(model_dir))
        work = bench_cpu.Workload(work.prefix, work.texts[: args.rows])
        schema = replace(
            job(model_dir, work, workdir, "schema", MAX_NEW),
            grammar=GrammarSpec("json_schema", json.dumps(SCHEMA)),
        )
        timed(replace(schema, output=workdir / "warm.out.parquet", run_dir=workdir / "warm.run"))  # warm-up
        results = {"json schema": best(lambda: timed(schema), args.repeats)}
        results["json schema, no jump-fwd"] = best(lambda: timed(schema, jump=False), args.repeats)
        longest = results["json schema"]["max_output_tokens"]
        plain = job(model_dir, work, workdir, "plain", longest)
        plain = replace(plain, sampling=replace(plain.sampling, ignore_eos=True))
        results["unconstrained"] = best(lambda: timed(plain), args.repeats)
    check(results)
    report(results, args)


def check(results: dict) -> None:
    for name in ("json schema", "json schema, no jump-fwd"):
        for text in results[name]["outputs"]:
            jsonschema.validate(json.loads(text), SCHEMA)
    if results["json schema"]["outputs"] != results["json schema, no jump-fwd"]["outputs"]:
        print("warning: jump-forward changed an output")


def report(results: dict, args: argparse.Namespace) -> None:
    base = results["unconstrained"]["seconds"]
    print(f"machine: {bench_cpu.machine(torch.get_num_threads())}; best of {args.repeats}")
    print(f"{'system':<26} {'seconds':>8} {'vs unconstr.':>12} {'out tok':>8} {'steps':>6} {'forced':>7}")
    for name, r in results.items():
        cost = f"{100 * (r['seconds'] / base - 1):+.1f}%"
        counts = f"{r['output_tokens']:>8} {r['steps']:>6} {r['forced_tokens']:>7}"
        print(f"{name:<26} {r['seconds']:>8.2f} {cost:>12} {counts}")
    if args.json:
        slim = {k: {f: v for f, v in r.items() if f != "outputs"} for k, r in results.items()}
        args.json.write_text(
            json.dumps({"machine": bench_cpu.machine(torch.get_num_threads()), "results": slim}, indent=2)
        )


if __name__ == "__main__":
    main()
