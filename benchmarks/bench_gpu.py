"""GPU throughput: batchllm vs transformers generate_batch() and generate(), one process, one GPU.

    python benchmarks/bench_gpu.py --model llama-3.1-8b                   # all workloads and systems
    python benchmarks/bench_gpu.py --model qwen2.5-7b --workloads shared_prefix --scale 0.25
    python benchmarks/bench_gpu.py --dry-run --out /tmp/dry.json          # CPU plumbing check, seconds

Model: random bf16 weights (batchllm --load-format dummy; transformers from_config) of the shape in
benchmarks/configs/<model>/config.json: nothing is downloaded, and throughput depends on shape only.
Workloads (greedy, EOS ignored so every row makes exactly its output tokens; rows shuffled):
  shared_prefix   SGLang generated-shared-prefix: 64 groups x 16 rows, 2048-token group system
                  prompt + 128-token question, 256 out
  batchllm_micro  400 groups x 16 rows, 2000 shared + 200 distinct tokens, 100 out
  no_sharing      1024 rows of 512 random tokens, 256 out
Token ids, not text: the model directory gets a byte-level BPE tokenizer whose token i >= 256 is one
word, " " + 1-4 letters (breadth-first over a-zA-Z; each word's merge joins its prefix word and its last
letter), so a prompt written as the words of its random ids encodes back to exactly those ids: token
counts are exact, tokenizing costs what a real BPE does, and the Qwen2Tokenizer that transformers 5
forces on qwen2 directories (rebuilt from the same vocab and merges) gives the same ids.
Systems: batchllm; batchllm with prefix_sharing=False; transformers generate_batch() (continuous
batching with its prefix cache, HF's own automatic sizing); transformers generate() on static
batches of --hf-batch rows (left padding). The transformers systems run only the rows of the first
ceil(--hf-rows / rows per group) groups (whole groups, so sharing stays as in the full workload),
rows shuffled; their "rows" field says how many ran, and "scaled_seconds" extrapolates to all rows.
Timing rule (every system): wall seconds from the prompt texts to the decoded output texts, after
one warm-up on a few rows of the same workload; model load excluded. batchllm: pipeline.run (read
Parquet, tokenize, plan, generate, detokenize, write Parquet) minus its load_model call; generate_batch:
one call, its per-call setup (paged cache, CUDA-graph warm-up) included as batchllm's KV pool is.

Roofline (lower bound on batchllm's seconds), with the matmul rate F (FLOP/s, a large bf16 matmul)
and bandwidth B (bytes/s read+written by a large device copy) measured at start:
  t_bound = max(FLOPs / F, bytes / B)
  FLOPs = 2 * P_layers * U + 2 * P_head * R + 4 * L * q * K_prefill            (unique prefill)
        + R * (O - 1) * 2 * (P_layers + P_head) + 4 * L * q * K_decode          (decode)
  bytes = O * W + kv_tok * sum_{j=1..O-1} (G * S + R * (D + j))
with G groups, R rows, S shared and D distinct prompt tokens, O output tokens, U = G*S + R*D unique
prompt tokens, P_layers the parameters outside embedding and lm_head, P_head = vocab * hidden, L
layers, q = heads * head_dim, K_* the keys attended summed over tokens (prefill: each unique token
attends its position + 1 keys; decode step j: S + D + j), W the weight bytes read per forward pass
(all but the embedding, once per decode step and once for prefill), kv_tok = 2 * L * kv_heads *
head_dim * dtype bytes. The KV term assumes every row decodes in one batch and each group's shared
KV is read once per step. roofline_fraction = t_bound / batchllm seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import itertools
import json
import logging
import math
import re
import shutil
import string
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedTokenizerFast,
)
from transformers.generation.configuration_utils import ContinuousBatchingConfig

import batchllm.job.run
from batchllm.config import EngineConfig, JobSpec, SamplingParams
from batchllm.model.config import ModelConfig, load_model_config

log = logging.getLogger("bench_gpu")
CONFIGS = Path(__file__).parent / "configs"
RESULTS = Path(__file__).parent / "results"
SYSTEMS = ("batchllm", "batchllm_no_sharing", "hf_generate_batch", "hf_generate")
DRY_MODEL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "head_dim": 16, "intermediate_size": 128, "vocab_size": 512, "bos_token_id": 1,
             "eos_token_id": [2]}  # fmt: skip
DRY_ROW_SCALE, DRY_LENGTH_SCALE, DRY_HF_ROWS = 0.01, 1 / 64, 16
WARM_ROWS = 8
BYTE_TOKENS = 256  # ids below this are the byte-level alphabet; prompts use the word ids above it
CPU_PAGE, CPU_BATCH_TOKENS = 16, 8192  # generate_batch sizes on CPU, where it cannot size itself
System = Callable[[list[str]], "Measured"]  # prompt texts -> measured run


@dataclass(frozen=True)
class WorkloadSpec:
    groups: int
    per_group: int  # rows per group
    shared: int  # prompt tokens the rows of a group share (0: none)
    distinct: int  # prompt tokens of each row's own
    output: int  # new tokens per row

    @property
    def rows(self) -> int:
        return self.groups * self.per_group

    def scaled(self, rows: float, lengths: float = 1.0) -> WorkloadSpec:
        """Fewer (or more) whole groups; shorter prompts and outputs for a dry run."""

        def size(n: int, least: int) -> int:
            return max(least, round(n * lengths))

        return replace(self, groups=max(1, round(self.groups * rows)), shared=size(self.shared, 0),
                       distinct=size(self.distinct, 1), output=size(self.output, 2))  # fmt: skip


WORKLOADS = {
    "shared_prefix": WorkloadSpec(groups=64, per_group=16, shared=2048, distinct=128, output=256),
    "batchllm_micro": WorkloadSpec(groups=400, per_group=16, shared=2000, distinct=200, output=100),
    "no_sharing": WorkloadSpec(groups=1024, per_group=1, shared=0, distinct=512, output=256),
}


@dataclass(frozen=True)
class Measured:
    seconds: float
    rows: int
    input_tokens: int
    output_tokens: int
    extra: dict  # system-specific figures (batchllm: prefill tokens computed, phases)

    def figures(self, all_rows: int) -> dict:
        s, n_in, n_out = self.seconds, self.input_tokens, self.output_tokens
        return {"seconds": s, "rows": self.rows, "requests_per_second": self.rows / s,
                "input_tokens_per_second": n_in / s, "output_tokens_per_second": n_out / s,
                "total_tokens_per_second": (n_in + n_out) / s, "input_tokens": n_in, "output_tokens": n_out,
                "scaled_seconds": s * all_rows / self.rows, **self.extra}  # fmt: skip


@dataclass(frozen=True)
class Hardware:
    matmul_flops_per_second: float
    copy_bytes_per_second: float


@dataclass(frozen=True)
class Setup:
    device: str
    dtype: torch.dtype
    dry: bool
    hf_rows: int
    hf_batch: int
    seed: int


# ---- workload and model directory ----


def make_prompts(spec: WorkloadSpec, vocab: int, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Random token ids in group order (row i is in group i // per_group), and a shuffled row order."""
    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(spec.groups):
        shared = rng.integers(BYTE_TOKENS, vocab, spec.shared)
        prompts += [
            np.concatenate([shared, rng.integers(BYTE_TOKENS, vocab, spec.distinct)])
            for _ in range(spec.per_group)
        ]
    return prompts, rng.permutation(spec.rows)


def texts_of(prompts: list[np.ndarray], order: np.ndarray, first_rows: int, words: list[str]) -> list[str]:
    """The texts of the rows < first_rows, in the shuffled order: token i is the text words[i]."""
    return ["".join(map(words.__getitem__, prompts[i].tolist())) for i in order if i < first_rows]


def _letter_strings() -> Iterator[str]:
    """a, b, ..., Z, aa, ab, ...: every string's prefix comes before it."""
    for length in itertools.count(1):
        for letters in itertools.product(string.ascii_letters, repeat=length):
            yield "".join(letters)


def token_words(vocab_size: int) -> list[str]:
    """The text of each token id: " " + its letters ("" for the byte tokens, never drawn)."""
    letters = itertools.islice(_letter_strings(), vocab_size - BYTE_TOKENS)
    return [""] * BYTE_TOKENS + [" " + s for s in letters]


def word_tokenizer(vocab_size: int) -> Tokenizer:
    """Byte-level BPE: the 256 byte tokens, then the words; "Ġ" is how byte-level BPE writes a space."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = []
    for i, s in enumerate(itertools.islice(_letter_strings(), vocab_size - BYTE_TOKENS)):
        vocab["Ġ" + s] = BYTE_TOKENS + i
        merges.append(("Ġ" + s[:-1], s[-1]))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def make_model_dir(out: Path, config: dict) -> Path:
    """config.json, the word tokenizer (see word_tokenizer) and generation_config.json."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    PreTrainedTokenizerFast(tokenizer_object=word_tokenizer(config["vocab_size"])).save_pretrained(out)
    gen = {"bos_token_id": config.get("bos_token_id"), "eos_token_id": config["eos_token_id"]}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return out


def workload_texts(spec: WorkloadSpec, vocab: int, setup: Setup) -> tuple[list[str], list[str]]:
    """All rows' texts (batchllm), and the rows of the first whole groups (transformers, --hf-rows)."""
    prompts, order = make_prompts(spec, vocab, setup.seed)
    words = token_words(vocab)
    hf_rows = min(spec.groups, -(-setup.hf_rows // spec.per_group)) * spec.per_group
    return texts_of(prompts, order, spec.rows, words), texts_of(prompts, order, hf_rows, words)


# ---- systems ----


@contextlib.contextmanager
def _timed_attr(owner: object, name: str, sink: list[float]) -> Iterator[None]:
    """Temporarily wrap owner.name so that each call's wall seconds are appended to `sink`."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            sink.append(time.perf_counter() - t0)

    setattr(owner, name, wrapper)
    try:
        yield
    finally:
        setattr(owner, name, original)


def run_batchllm(
    model_dir: Path, workdir: Path, out: int, sharing: bool, dry: bool, texts: list[str]
) -> Measured:
    workdir = workdir / f"run-{time.monotonic_ns()}"  # removed afterwards: the micro workload's is ~0.3 GB
    workdir.mkdir()
    try:
        return _run_batchllm(model_dir, workdir, out, sharing, dry, texts)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run_batchllm(
    model_dir: Path, workdir: Path, out: int, sharing: bool, dry: bool, texts: list[str]
) -> Measured:
    src = workdir / "in.parquet"
    pq.write_table(pa.table({"id": pa.array(range(len(texts))), "text": texts}), src)
    engine = EngineConfig(device="cpu" if dry else "cuda", dtype="float32" if dry else "bfloat16",
                          prefix_sharing=sharing, load_format="dummy")  # fmt: skip
    sampling = SamplingParams(max_new_tokens=out, ignore_eos=True)
    job = JobSpec(input=src, model=str(model_dir), output=workdir / "out.parquet", id_column="id",
                  sampling=sampling, engine=engine, progress=False)  # fmt: skip
    load: list[float] = []
    with _timed_attr(batchllm.job.run, "load_model", load):
        _sync()
        t0 = time.perf_counter()
        o = batchllm.job.run.run(job, fresh=True)
        seconds = time.perf_counter() - t0 - sum(load)
    extra = {"prefill_tokens_computed": o.engine.prefill_tokens, "preemptions": o.preemptions,
             "unique_prompt_tokens": o.plan.unique_prompt_tokens, "phase_seconds": o.phases,
             "load_seconds": sum(load)}  # fmt: skip
    c = o.counts
    return Measured(seconds, c.rows - c.failed, c.prompt_tokens, c.output_tokens, extra)


def _greedy(out: int) -> GenerationConfig:
    # eos -1: never stop (as ignore_eos); pad 0 only ever sits under attention mask 0.
    return GenerationConfig(max_new_tokens=out, do_sample=False, eos_token_id=-1, pad_token_id=0)


def run_hf_generate(model, tok, out: int, batch: int, texts: list[str]) -> Measured:
    _sync()
    t0, n_rows, n_in, n_out = time.perf_counter(), 0, 0, 0
    for start in range(0, len(texts), batch):
        ids = tok(texts[start : start + batch], return_attention_mask=False)["input_ids"]
        input_ids, mask = _left_pad(ids, model.device)
        with torch.inference_mode():
            gen = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=_greedy(out))
        new = gen[:, input_ids.shape[1] :].tolist()
        tok.batch_decode(new)  # to text, as batchllm does
        n_rows, n_in, n_out = n_rows + len(new), n_in + sum(map(len, ids)), n_out + sum(map(len, new))
    return Measured(time.perf_counter() - t0, n_rows, n_in, n_out, {"batch": batch})


def _left_pad(ids: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """[batch, longest] input ids (pad 0) and attention mask, padded on the left."""
    width = max(map(len, ids))
    input_ids = torch.zeros(len(ids), width, dtype=torch.long)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    for row, seq in enumerate(ids):
        input_ids[row, width - len(seq) :] = torch.tensor(seq)
        mask[row, width - len(seq) :] = 1
    return input_ids.to(device), mask.to(device)


def run_hf_generate_batch(model, tok, out: int, texts: list[str]) -> Measured:
    _sync()
    t0 = time.perf_counter()
    ids = tok(texts, return_attention_mask=False)["input_ids"]
    cb = None  # on CUDA, transformers sizes its paged cache and batches from free memory itself
    if model.device.type != "cuda":
        blocks = sum(-(-(len(p) + out) // CPU_PAGE) for p in ids) + 8
        cb = ContinuousBatchingConfig(
            page_size=CPU_PAGE, num_blocks=blocks, max_batch_tokens=CPU_BATCH_TOKENS
        )
    with torch.inference_mode():
        results = model.generate_batch(ids, generation_config=_greedy(out), continuous_batching_config=cb)
    if len(results) != len(ids) or any(r.error for r in results.values()):
        raise RuntimeError(f"generate_batch returned {len(results)} results for {len(ids)} prompts")
    new = [r.generated_tokens for r in results.values()]
    tok.batch_decode(new)
    return Measured(time.perf_counter() - t0, len(new), sum(map(len, ids)), sum(map(len, new)), {})


def load_hf_model(model_dir: Path, dtype: torch.dtype, device: str):
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device(device):  # random init straight on the GPU: no 16 GB pass through host memory
        return AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()


def measure_systems(systems: dict[str, System], texts: list[str], all_rows: int) -> dict[str, dict]:
    """Each system's figures after one warm-up on a few rows, or {"skipped": why} when it fails."""
    results = {}
    for name, run in systems.items():
        try:
            run(texts[:WARM_ROWS])
            _free()  # the warm-up's model and KV pool must not shrink the timed run's pool
            results[name] = run(texts).figures(all_rows)
            log.info("%s: %.2f s for %d rows", name, results[name]["seconds"], results[name]["rows"])
        except Exception as exc:  # one system failing (OOM, unsupported) must not lose the others' figures
            log.exception("%s failed", name)
            results[name] = {"skipped": f"failed: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"}
        finally:
            _free()
    return results


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _free() -> None:
    """Give the GPU memory of finished runs back (reference cycles hold models); on CPU nothing to do."""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


# ---- roofline ----


def measure_hardware(device: str, dtype: torch.dtype, dry: bool) -> Hardware:
    n, copy_bytes, reps = (256, 8 << 20, 3) if dry else (8192, 2 << 30, 20)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    src = torch.empty(copy_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    matmul = _best_seconds(lambda: torch.matmul(a, b), reps)
    copy = _best_seconds(lambda: dst.copy_(src), reps)
    return Hardware(2 * n**3 / matmul, 2 * copy_bytes / copy)  # a copy reads and writes every byte


def _best_seconds(fn: Callable[[], object], reps: int) -> float:
    fn()
    best = math.inf
    for _ in range(reps):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        best = min(best, time.perf_counter() - t0)
    return best


def roofline(spec: WorkloadSpec, m: ModelConfig, dtype_bytes: int, hw: Hardware) -> dict:
    """The time lower bound of the module docstring, with its terms."""
    g, r, s, d, o, n_layers = spec.groups, spec.rows, spec.shared, spec.distinct, spec.output, m.num_layers
    head = m.vocab_size * m.hidden_size
    layers = m.num_params - head - (0 if m.tie_word_embeddings else head)
    # A sparse (MoE) model: a token's FLOPs cover its top-k experts, but a batched step reads them all.
    active = layers - (m.num_params - m.active_params)
    attn = 4 * n_layers * m.q_size  # FLOPs per (query, key) pair: scores and values
    keys_prefill = g * s * (s + 1) / 2 + r * (d * s + d * (d + 1) / 2)
    keys_decode = r * ((o - 1) * (s + d) + (o - 1) * o / 2)
    prefill = 2 * active * (g * s + r * d) + 2 * head * r + attn * keys_prefill
    decode = r * (o - 1) * 2 * (active + head) + attn * keys_decode
    kv_tok = 2 * n_layers * m.kv_size * dtype_bytes
    kv_bytes = kv_tok * ((o - 1) * g * s + r * ((o - 1) * d + (o - 1) * o / 2))
    flops, nbytes = prefill + decode, o * (layers + head) * dtype_bytes + kv_bytes
    compute, memory = flops / hw.matmul_flops_per_second, nbytes / hw.copy_bytes_per_second
    return {"flops": flops, "bytes": nbytes, "compute_seconds": compute, "memory_seconds": memory,
            "seconds": max(compute, memory)}  # fmt: skip


# ---- the run ----


def run_all(specs: dict[str, WorkloadSpec], systems: list[str], model_dir: Path, setup: Setup) -> dict:
    """workload -> system -> figures. batchllm runs first: each run loads and frees its own model, so
    the transformers model is not resident then."""
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    texts = {w: workload_texts(s, vocab, setup) for w, s in specs.items()}
    runs = {}
    for w, spec in specs.items():
        bench = partial(run_batchllm, model_dir, model_dir.parent, spec.output)
        chosen = {
            "batchllm": partial(bench, True, setup.dry),
            "batchllm_no_sharing": partial(bench, False, setup.dry),
        }
        runs[w] = measure_systems({k: v for k, v in chosen.items() if k in systems}, texts[w][0], spec.rows)
    if not {"hf_generate_batch", "hf_generate"} & set(systems):
        return runs
    model, tok = load_hf_model(model_dir, setup.dtype, setup.device), AutoTokenizer.from_pretrained(model_dir)
    for w, spec in specs.items():
        chosen = {
            "hf_generate_batch": partial(run_hf_generate_batch, model, tok, spec.output),
            "hf_generate": partial(run_hf_generate, model, tok, spec.output, setup.hf_batch),
        }
        runs[w] |= measure_systems({k: v for k, v in chosen.items() if k in systems}, texts[w][1], spec.rows)
    return runs


def workload_figures(spec: WorkloadSpec, systems: dict[str, dict], bound: dict) -> dict:
    """W of the JSON: every system (skipped ones say why), ratios to batchllm, the roofline."""
    ordered = {name: systems.get(name, {"skipped": "not selected (--systems)"}) for name in SYSTEMS}
    ref = ordered["batchllm"].get("requests_per_second")
    for figures in ordered.values():
        if "seconds" in figures and ref:
            figures["ratio_to_batchllm"] = figures["requests_per_second"] / ref
    seconds = ordered["batchllm"].get("seconds")
    return {"rows": spec.rows, "systems": ordered, "roofline_seconds": bound["seconds"],
            "roofline_fraction": bound["seconds"] / seconds if seconds else None,
            "roofline": bound, "spec": vars(spec)}  # fmt: skip


def print_table(name: str, w: dict) -> None:
    frac = w["roofline_fraction"]
    print(f"\n{name}: {w['rows']} rows, time lower bound {w['roofline_seconds']:.2f} s"
          + (f", batchllm at {frac:.1%} of it" if frac else ""))  # fmt: skip
    head = ("system", "rows", "s", "req/s", "in tok/s", "out tok/s", "tot tok/s", "x batchllm")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for system, f in w["systems"].items():
        if "skipped" in f:
            print(f"| {system} | {f['skipped']} |")
            continue
        ratio = f"{f['ratio_to_batchllm']:.2f}" if "ratio_to_batchllm" in f else "-"
        print(f"| {system} | {f['rows']} | {f['seconds']:.2f} | {f['requests_per_second']:.2f} | "
              f"{f['input_tokens_per_second']:.0f} | {f['output_tokens_per_second']:.0f} | "
              f"{f['total_tokens_per_second']:.0f} | {ratio} |")  # fmt: skip


def model_config(name: str, dry: bool) -> dict:
    path = CONFIGS / name / "config.json"
    if not path.is_file():
        known = ", ".join(sorted(p.name for p in CONFIGS.iterdir() if p.is_dir()))
        raise SystemExit(f"unknown --model {name!r}; known: {known}")
    config = json.loads(path.read_text())
    return config | DRY_MODEL if dry else config


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3.1-8b", help="a directory name under benchmarks/configs/")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated subset")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset")
    p.add_argument("--hf-rows", type=int, default=256, help="most rows each transformers system runs")
    p.add_argument("--hf-batch", type=int, default=64, help="rows per static generate() batch")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every workload's row count")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny model, float32, tiny workloads")
    p.add_argument("--out", type=Path, help="JSON path (default: benchmarks/results/<date>-<gpu>.json)")
    args = p.parse_args(argv)
    for key, known in (("workloads", WORKLOADS), ("systems", SYSTEMS)):
        chosen = [s.strip() for s in getattr(args, key).split(",") if s.strip()]
        if not chosen or any(s not in known for s in chosen):
            p.error(f"--{key} must be a comma-separated subset of {', '.join(known)}")
        setattr(args, key, chosen)
    if args.scale <= 0 or args.hf_rows < 1 or args.hf_batch < 1:
        p.error("--scale, --hf-rows and --hf-batch must be positive")
    if args.dry_run and args.out is None:
        p.error("--dry-run needs --out (dry-run figures do not belong in benchmarks/results/)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("needs CUDA (or --dry-run for a CPU plumbing check)")
        return 0
    hf_rows = min(args.hf_rows, DRY_HF_ROWS) if dry else args.hf_rows
    dtype = torch.float32 if dry else torch.bfloat16
    setup = Setup("cpu" if dry else "cuda", dtype, dry, hf_rows, args.hf_batch, args.seed)
    hw = measure_hardware(setup.device, setup.dtype, dry)
    _free()  # batchllm sizes its KV pool from the GPU memory free when it starts
    row_scale, length_scale = (args.scale * DRY_ROW_SCALE, DRY_LENGTH_SCALE) if dry else (args.scale, 1.0)
    specs = {w: WORKLOADS[w].scaled(row_scale, length_scale) for w in args.workloads}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model_dir(Path(tmp) / "model", model_config(args.model, dry))
        mcfg = load_model_config(model_dir)
        runs = run_all(specs, args.systems, model_dir, setup)
    bounds = {w: roofline(s, mcfg, dtype.itemsize, hw) for w, s in specs.items()}
    report = {"gpu": "cpu (dry run)" if dry else torch.cuda.get_device_name(), "model": args.model,
              "dtype": str(dtype).removeprefix("torch."),
              "workloads": {w: workload_figures(s, runs[w], bounds[w]) for w, s in specs.items()},
              "matmul_tflops": hw.matmul_flops_per_second / 1e12,
              "copy_gb_per_second": hw.copy_bytes_per_second / 1e9,
              "scale": args.scale, "dry_run": dry, "hf_rows": hf_rows, "hf_batch": args.hf_batch,
              "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "transformers": transformers.__version__}  # fmt: skip
    write_report(report, args.out)
    return 0


def write_report(report: dict, out: Path | None) -> None:
    """Print the tables; write the JSON to `out` or benchmarks/results/<date>-<gpu-slug>.json."""
    print(f"{report['gpu']}: matmul {report['matmul_tflops']:.1f} TFLOP/s, "
          f"copy {report['copy_gb_per_second']:.0f} GB/s")  # fmt: skip
    for name, w in report["workloads"].items():
        print_table(name, w)
    slug = re.sub(r"[^a-z0-9]+", "-", report["gpu"].lower()).strip("-")
    out = out or RESULTS / f"{report['date']}-{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")


def _quiet_libraries() -> None:
    """Progress lines of ours only (as a script: under pytest the process's logging is left alone)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("batchllm").setLevel(logging.WARNING)
    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.WARNING)
    transformers.logging.set_verbosity_error()


if __name__ == "__main__":
    _quiet_libraries()
    raise SystemExit(main())
