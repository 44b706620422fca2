"""CPU, shared prefix, end to end: batchllm vs transformers generate() and generate_batch(), one process.

    python benchmarks/bench_cpu.py                          # 8 groups x 8 rows, 32 new tokens
    python benchmarks/bench_cpu.py --threads 2 --json cpu.json --profile

Workload: a ~600-token shared instruction > 8 groups with a ~50-token group text > 8 rows each with
a ~15-token row text (opening with a "Question r:" template); rows shuffled; greedy, exactly 32 new
tokens per row (EOS ignored); a ~20M-parameter Llama-shaped random model (hidden 384, 8 layers,
6 heads, 2 KV heads, vocab 4096), float32, CPU.
Every system gets the same model files and the same prompt strings, and is warmed up once on 2 rows.

Timing rule (the same for every system): wall seconds from the prompt strings to the decoded output
texts, model load excluded. batchllm: `pipeline.run` (reading the Parquet input, tokenizing, planning,
generating, detokenizing, writing the output Parquet) minus the seconds its `load_model` call took.
transformers: tokenizing + the generate call(s) + decoding. Best of `--repeats` runs, taken
round-robin. generate_batch() builds a fresh manager (and an empty prefix cache) per call, as
batchllm builds a fresh KV pool per run, so the warm-up leaves neither system a cached prefix.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import logging
import os
import pstats
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching.cache import PagedAttentionCache

import batchllm.job.run
from batchllm.config import EngineConfig, JobSpec, SamplingParams
from batchllm.testing.tiny import make_tiny_model
from batchllm.testing.tiny_tokenizer import default_corpus, train_tokenizer

GROUPS, ROWS_PER_GROUP, NEW_TOKENS = 8, 8, 32
PREFIX_TOKENS, GROUP_TOKENS, ROW_TOKENS = 600, 50, 15
HF_STATIC_BATCH = 16
BLOCK = 16  # batchllm's default block size; generate_batch gets the same page size
TOKEN_BUDGET = 8192  # batchllm's default tokens per step; generate_batch gets the same max_batch_tokens
MODEL_SHAPE = dict(hidden_size=384, num_layers=8, num_heads=6, num_kv_heads=2, intermediate_size=1536)


@dataclass(frozen=True)
class Clock:
    wall: float
    cpu: float  # process CPU seconds, every thread

    @staticmethod
    def now() -> Clock:
        return Clock(time.perf_counter(), time.process_time())

    def __sub__(self, other: Clock) -> Clock:
        return Clock(self.wall - other.wall, self.cpu - other.cpu)


@dataclass(frozen=True)
class Workload:
    prefix: str  # the shared instruction (batchllm's --prefix)
    texts: list[str]  # group text + row text per row, shuffled (batchllm's text column)

    @property
    def prompts(self) -> list[str]:
        return [self.prefix + t for t in self.texts]


@dataclass(frozen=True)
class Run:
    seconds: float
    cpu_seconds: float  # this process's CPU time (all threads) over the same span: less hit by co-tenants
    outputs: list[str]  # decoded generated text per row, in input order
    output_tokens: int
    prefill_tokens: int  # prompt tokens run through the model (padding included for static batches)
    phases: dict[str, float] = field(default_factory=dict)  # batchllm's own phase seconds
    unique_prompt_tokens: int = 0  # batchllm's count of distinct prefix-tree tokens


@dataclass(frozen=True)
class Row:
    system: str
    seconds: float
    cpu_seconds: float
    requests_per_s: float
    input_tok_per_s: float
    output_tok_per_s: float
    total_tok_per_s: float
    prefill_tokens: int
    batchllm_speedup: float  # this system's seconds / batchllm's (prefix sharing) seconds
    match_vs_batchllm: float  # fraction of rows whose output text equals batchllm's


def _grow(rng: random.Random, tok, start: str, target: int, words: list[str], sep: str = " ") -> str:
    """`start` plus random corpus words until the text is at least `target` tokens long."""
    text = start
    while len(tok(text, add_special_tokens=False)["input_ids"]) < target:
        text += sep + rng.choice(words)
    return text


def make_workload(tok, seed: int = 0) -> Workload:
    rng = random.Random(seed)
    words = " ".join(default_corpus(500, seed=seed + 1)).split()
    prefix = _grow(
        rng, tok, "You are a product analyst. Read the product notes and answer.", PREFIX_TOKENS, words
    )
    texts = []
    for g in range(GROUPS):
        group = _grow(rng, tok, f"\nProduct {g}:", GROUP_TOKENS, words)
        texts += [_grow(rng, tok, f"{group}\nQuestion {r}:", GROUP_TOKENS + ROW_TOKENS, words)
                  for r in range(ROWS_PER_GROUP)]  # fmt: skip
    rng.shuffle(texts)
    return Workload(prefix + "\n", texts)


def make_model(workdir: Path) -> Path:
    train_tokenizer(workdir / "tokenizer", vocab_size=4096)
    return make_tiny_model(workdir / "model", "llama", tokenizer_dir=workdir / "tokenizer", **MODEL_SHAPE)


@contextlib.contextmanager
def _observed(owner: object, name: str, sink: Callable[[object, Clock], None]) -> Iterator[None]:
    """Temporarily wrap owner.name so that each call's result and (wall, CPU) seconds go to `sink`."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = Clock.now()
        result = original(*args, **kwargs)
        sink(result, Clock.now() - start)
        return result

    setattr(owner, name, wrapper)
    try:
        yield
    finally:
        setattr(owner, name, original)


def run_batchllm(
    model_dir: Path, work: Workload, workdir: Path, sharing: bool, tag: str, deterministic: bool = False
) -> Run:
    src = workdir / f"{tag}.parquet"
    pq.write_table(pa.table({"id": pa.array(range(len(work.texts))), "text": work.texts}), src)
    job = JobSpec(
        input=src,
        model=str(model_dir),
        output=workdir / f"{tag}.out.parquet",
        id_column="id",
        prefix=work.prefix,
        sampling=SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True),
        engine=EngineConfig(
            device="cpu", dtype="float32", prefix_sharing=sharing, deterministic=deterministic
        ),
        progress=False,
    )
    load: list[Clock] = []
    with _observed(batchllm.job.run, "load_model", lambda _, took: load.append(took)):
        start = Clock.now()
        outcome = batchllm.job.run.run(job)
        took = Clock.now() - start
    if not load:  # the pipeline no longer loads through this name: the subtraction would be silently 0
        raise RuntimeError("batchllm.job.run.load_model was not called; update run_batchllm's load timing")
    for loading in load:
        took -= loading
    out = pq.read_table(job.output).to_pydict()
    phases = {k: round(v, 3) for k, v in outcome.phases.items()}
    prefill, unique = outcome.engine.prefill_tokens, outcome.plan.unique_prompt_tokens
    return Run(took.wall, took.cpu, out["output"], sum(out["output_tokens"]), prefill, phases, unique)


def _greedy_config() -> GenerationConfig:
    # eos -1: never stop (as --ignore-eos). eos None would fall back to the model's EOS ids, and
    # min_new_tokens would mask EOS out of the argmax, so outputs would differ from batchllm's.
    return GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=-1, pad_token_id=0)


def run_hf_generate(model, tok, work: Workload) -> Run:
    start = Clock.now()
    prompts, outputs, prefill = work.prompts, [], 0
    for i in range(0, len(prompts), HF_STATIC_BATCH):
        enc = tok(prompts[i : i + HF_STATIC_BATCH], return_tensors="pt", padding=True)
        prefill += enc.input_ids.numel()
        with torch.inference_mode():
            ids = model.generate(**enc, generation_config=_greedy_config())
        outputs += tok.batch_decode(ids[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
        new_tokens = ids.shape[1] - enc.input_ids.shape[1]
    took = Clock.now() - start
    return Run(took.wall, took.cpu, outputs, new_tokens * len(prompts), prefill)


def run_hf_generate_batch(model, tok, work: Workload) -> Run:
    start = Clock.now()
    inputs = tok(work.prompts)["input_ids"]
    blocks = sum(-(-(len(p) + NEW_TOKENS) // BLOCK) for p in inputs) + 8
    cb = ContinuousBatchingConfig(
        page_size=BLOCK, num_blocks=blocks, max_batch_tokens=TOKEN_BUDGET, allow_block_sharing=True
    )
    matched: list[int] = []  # prompt tokens generate_batch took from its prefix cache
    count = _observed(PagedAttentionCache, "search_prefix_match", lambda n, _: matched.append(int(n)))
    with count, torch.inference_mode():
        results = model.generate_batch(
            inputs, generation_config=_greedy_config(), continuous_batching_config=cb
        )
    if len(results) != len(inputs) or any(r.error for r in results.values()):
        raise RuntimeError(f"generate_batch returned {len(results)} results for {len(inputs)} prompts")
    gen = [r.generated_tokens for r in results.values()]  # in input order
    outputs = tok.batch_decode(gen, skip_special_tokens=True)
    took = Clock.now() - start
    return Run(took.wall, took.cpu, outputs, sum(map(len, gen)), sum(map(len, inputs)) - sum(matched))


def measure(
    systems: dict[str, Callable[[Workload, str], Run]], work: Workload, repeats: int
) -> dict[str, Run]:
    """Warm each system up on 2 rows, then time them round-robin (so that a slow spell of a shared
    machine hits every system alike) and keep each one's best run."""
    warm = Workload(work.prefix, work.texts[:2])
    for i, fn in enumerate(systems.values()):
        fn(warm, f"warm{i}")
    best: dict[str, Run] = {}
    for rep in range(repeats):
        for i, (name, fn) in enumerate(systems.items()):
            run = fn(work, f"run{rep}-{i}")
            print(f"  run {rep + 1}/{repeats} {name}: {run.seconds:.2f} s", file=sys.stderr, flush=True)
            if name not in best or run.seconds < best[name].seconds:
                best[name] = run
    return best


def table_rows(runs: dict[str, Run], input_tokens: int, rows: int) -> list[Row]:
    ref = runs["batchllm"]
    out = []
    for name, r in runs.items():
        if r.output_tokens != rows * NEW_TOKENS:
            raise RuntimeError(f"{name} generated {r.output_tokens} tokens, not {rows} x {NEW_TOKENS}")
        same = sum(a == b for a, b in zip(r.outputs, ref.outputs)) / rows
        t = r.seconds
        out.append(Row(
            name, t, r.cpu_seconds, rows / t, input_tokens / t, r.output_tokens / t,
            (input_tokens + r.output_tokens) / t, r.prefill_tokens, t / ref.seconds, same,
        ))  # fmt: skip
    return out


def print_table(rows: list[Row]) -> None:
    head = ("system", "s", "CPU s", "req/s", "in tok/s", "out tok/s", "tot tok/s", "prefill computed",
            "batchllm speedup", "same text")  # fmt: skip
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        print(
            f"| {r.system} | {r.seconds:.2f} | {r.cpu_seconds:.1f} | {r.requests_per_s:.1f} | "
            f"{r.input_tok_per_s:.0f} | {r.output_tok_per_s:.0f} | {r.total_tok_per_s:.0f} | "
            f"{r.prefill_tokens} | {r.batchllm_speedup:.2f} | {r.match_vs_batchllm:.0%} |"
        )


def machine(threads: int) -> dict[str, str | int]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "unknown")  # fmt: skip
    return {"cpu": cpu, "cpus": os.cpu_count() or 0, "torch_threads": threads,
            "torch": torch.__version__, "transformers": transformers.__version__}  # fmt: skip


def profile_batchllm(model_dir: Path, work: Workload, workdir: Path) -> None:
    prof = cProfile.Profile()
    prof.runcall(run_batchllm, model_dir, work, workdir, True, "profile")
    print("\ncProfile of one batchllm (prefix sharing) run, top 15 by own time:")
    pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    print("top 15 by cumulative time:")
    pstats.Stats(prof).sort_stats("cumulative").print_stats(15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per system; the best is kept")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--profile", action="store_true", help="cProfile one more batchllm run")
    parser.add_argument("--skip-hf", action="store_true", help="time batchllm's settings only")
    parser.add_argument(
        "--whole-process", action="store_true", help="also time `batchllm run` as a whole process"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model_dir = make_model(workdir)
        tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
        work = make_workload(tok)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        systems: dict[str, Callable[[Workload, str], Run]] = {
            "batchllm": lambda w, t: run_batchllm(model_dir, w, workdir, True, t),
            "batchllm --no-prefix-sharing": lambda w, t: run_batchllm(model_dir, w, workdir, False, t),
            "batchllm --deterministic": lambda w, t: run_batchllm(model_dir, w, workdir, True, t, True),
            "batchllm --deterministic --no-prefix-sharing": lambda w, t: run_batchllm(
                model_dir, w, workdir, False, t, True
            ),
        }
        if not args.skip_hf:
            systems[f"transformers generate() static {HF_STATIC_BATCH}"] = lambda w, t: run_hf_generate(
                model, tok, w
            )
            systems["transformers generate_batch()"] = lambda w, t: run_hf_generate_batch(model, tok, w)
        runs = measure(systems, work, args.repeats)
        report(runs, work, tok, model.num_parameters(), args)
        if args.whole_process:
            whole_process(model_dir, work, workdir, runs, args.repeats)
        if args.profile:
            profile_batchllm(model_dir, work, workdir)


def whole_process(model_dir: Path, work: Workload, workdir: Path, runs: dict[str, Run], repeats: int) -> None:
    """``batchllm run`` as its own process, Python start-up, imports and model load included (the
    in-process figures above exclude the load), against the in-process transformers figures."""
    src, prefix = workdir / "whole.parquet", workdir / "prefix.txt"
    pq.write_table(pa.table({"id": pa.array(range(len(work.texts))), "text": work.texts}), src)
    prefix.write_text(work.prefix)
    command = [
        sys.executable, "-m", "batchllm", "run", str(src), "--model", str(model_dir), "--prefix", str(prefix),
        "--id-column", "id", "--max-new-tokens", str(NEW_TOKENS), "--ignore-eos", "--device", "cpu",
        "--dtype", "float32", "--quiet", "--fresh", "--output", str(workdir / "whole.out.parquet"),
    ]  # fmt: skip
    best = min(_timed(command) for _ in range(repeats))
    print(f"\nbatchllm run, whole process (best of {repeats}): {best:.2f} s")
    for name, run in runs.items():
        if name.startswith("transformers"):
            print(f"  {name} (in process, load excluded) / whole process: {run.seconds / best:.2f}x")


def _timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    return time.perf_counter() - start


def report(runs: dict[str, Run], work: Workload, tok, params: int, args: argparse.Namespace) -> None:
    lens = [len(ids) for ids in tok(work.prompts)["input_ids"]]
    rows = table_rows(runs, sum(lens), len(lens))
    info = machine(torch.get_num_threads())
    print(f"machine: {info}\nmodel: Llama-shaped, {params / 1e6:.1f}M parameters, float32")
    print(f"rows {len(lens)}, prompt tokens {sum(lens)} (mean {sum(lens) / len(lens):.0f}, "
          f"{runs['batchllm'].unique_prompt_tokens} distinct), {NEW_TOKENS} new tokens per row, "
          f"best of {args.repeats}\n")  # fmt: skip
    print_table(rows)
    phases = {name: r.phases for name, r in runs.items() if r.phases}
    for name, ph in phases.items():
        print(f"{name} phases (s): {ph}")
    if args.json:
        result = {"machine": info, "params": params, "prompt_tokens": sum(lens), "repeats": args.repeats,
                  "rows": [asdict(r) for r in rows], "batchllm_phases": phases}  # fmt: skip
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
