"""Host milliseconds per engine step: schedule + prepare + sample + stop checks + bookkeeping.

The model is a stub that returns correctly shaped zeros, so every millisecond measured is host work.
Rows sit under shared prefixes nested two deep (one system prefix, groups of 16 rows) with contexts
of about 2k tokens. Two step kinds are timed once every row is decoding:

  decode  every running row decodes one token
  mixed   the same, plus one fresh row's 512-token prefill chunk in the step

Usage: python benchmarks/bench_step.py [--rows 256 1024 4096] [--steps 40] [--model stub|one-layer]
``--model one-layer`` runs a real one-layer, 64-wide Llama (random weights, float32, torch attention
backend) instead of the stub: host work plus the model's own arithmetic, cascade decode included.
A step is timed between consecutive ``should_stop`` calls of ``Engine.run``, so the figure covers the
whole loop body, whatever the engine does inside it.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from batchllm.config import SamplingParams
from batchllm.engine.loop import Engine
from batchllm.engine.model_runner import ModelRunner
from batchllm.engine.stopping import StopChecker
from batchllm.errors import Interrupted
from batchllm.kernels.torch_backend import TorchAttention
from batchllm.scheduler.block_pool import BlockPool
from batchllm.scheduler.scheduler import Scheduler
from batchllm.scheduler.seq import Seq

BLOCK_SIZE = 16
SYSTEM, GROUP, OWN, PER_GROUP, MIXED_CHUNK = 1536, 256, 256, 16, 512
HIDDEN, VOCAB = 64, 256
MAX_NEW = 1024  # rows never finish while they are timed; the scheduler reserves room for this


class StubModel(torch.nn.Module):
    """Zeros of the right shapes: hidden [T, HIDDEN], logits [N, VOCAB] (greedy picks token 0).
    Slices of zeros made once: allocating the model's outputs is the model's cost, not the host's."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden, self.logits = torch.zeros(0, HIDDEN), torch.zeros(0, VOCAB)

    def forward(self, input_ids, positions, kv_caches, meta, backend):  # noqa: ARG002
        if len(self.hidden) < input_ids.shape[0]:
            self.hidden = torch.zeros(2 * input_ids.shape[0], HIDDEN)
        return self.hidden[: input_ids.shape[0]]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if len(self.logits) < hidden.shape[0]:
            self.logits = torch.zeros(2 * hidden.shape[0], VOCAB)
        return self.logits[: hidden.shape[0]]


def work(num_rows: int) -> list[Seq]:
    """A system prefix, group prefixes beneath it, rows beneath those: depth-first execution order."""
    system = Seq.prefix(0, [1] * SYSTEM, pending_rows=num_rows)
    out = [system]
    for g in range(-(-num_rows // PER_GROUP)):
        rows = min(PER_GROUP, num_rows - g * PER_GROUP)
        group = Seq.prefix(1 + g, system.token_ids + [2 + g % 50] * GROUP, system, pending_rows=rows)
        out.append(group)
        for r in range(rows):
            out.append(Seq.row(g * PER_GROUP + r, group.token_ids + [3 + r] * OWN, group))
    return out


def one_layer_model() -> torch.nn.Module:
    """A real decoder, small enough that its matmuls take a few ms a step at 1,024 rows."""
    from pathlib import Path

    from batchllm.model.config import ModelConfig
    from batchllm.model.loader import load_model

    config = ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN,
        num_layers=1, num_heads=4, num_kv_heads=2, head_dim=HIDDEN // 4, rms_norm_eps=1e-6,
        rope_theta=10000.0, rope_scaling=None, max_position_embeddings=8192, tie_word_embeddings=True,
        attention_bias=False, qk_norm=False, eos_token_ids=(), bos_token_id=None,
    )  # fmt: skip
    return load_model(Path("."), config, torch.float32, torch.device("cpu"), dummy=True)


def make_engine(num_rows: int, model: str = "stub") -> Engine:
    sampling = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)
    own_blocks = -(-(OWN + MAX_NEW) // BLOCK_SIZE) + 1
    num_blocks = num_rows * (own_blocks + 2) + 4096
    pool = BlockPool(num_blocks)
    scheduler = Scheduler(pool, BLOCK_SIZE, num_rows + MIXED_CHUNK, 2 * num_rows, sampling.max_new_tokens)
    if model == "stub":
        net, cache_shape = StubModel(), (num_blocks, 1, 1, 1)
    else:
        net, cache_shape = one_layer_model(), (num_blocks, BLOCK_SIZE, 2, HIDDEN // 4)
    caches = [(torch.zeros(cache_shape), torch.zeros(cache_shape))]
    runner = ModelRunner(net, caches, TorchAttention(), BLOCK_SIZE, sampling)
    return Engine(scheduler, runner, StopChecker(None, (), sampling))


class Clock:
    """``should_stop`` for Engine.run: records step times once all rows decode; stops after ``steps``."""

    def __init__(self, engine: Engine, num_rows: int, steps: int, mixed: bool) -> None:
        self.engine, self.num_rows, self.steps, self.mixed = engine, num_rows, steps, mixed
        self.times: list[float] = []
        self.extra = 0

    def __call__(self) -> bool:
        now = time.perf_counter()
        sched = self.engine.scheduler
        decoding = len(sched.running) >= self.num_rows and not sched.waiting
        if not self.times and not decoding:
            return False  # still prefilling
        self.times.append(now)
        if self.mixed:  # one fresh 512-token row for the next step to admit
            self.extra += 1
            sched.add(Seq.row(10**9 + self.extra, [7] * MIXED_CHUNK))
        return len(self.times) > self.steps + 5


def measure(num_rows: int, steps: int, mixed: bool, model: str = "stub") -> float:
    engine = make_engine(num_rows, model)
    clock = Clock(engine, num_rows, steps, mixed)
    try:
        engine.run(work(num_rows), lambda seq: None, clock)
    except Interrupted:
        pass
    gaps = [b - a for a, b in zip(clock.times, clock.times[1:])][5:]  # the first steps warm up
    return statistics.median(gaps) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--model", choices=("stub", "one-layer"), default="stub")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = []
    for rows in args.rows:
        for mixed in (False, True):
            ms = measure(rows, args.steps, mixed, args.model)
            step = "mixed" if mixed else "decode"
            results.append({"rows": rows, "step": step, "model": args.model, "ms": round(ms, 2)})
            print(json.dumps(results[-1]), flush=True)
    print(json.dumps({"machine": platform.processor() or platform.machine(), "results": results}))


if __name__ == "__main__":
    main()
