"""CPU decode: a mixture-of-experts model against a dense model with the same active parameters.

    python benchmarks/bench_moe.py                       # batch 1, 8 and 32; 2 threads
    python benchmarks/bench_moe.py --batch 16 --experts 64 --top-k 8 --json moe.json

Models: random (dummy) float32 weights, Qwen3-shaped (q/k norms, GQA); the MoE model has
``--experts`` experts of ``--expert-inter`` each, ``--top-k`` per token; the dense baseline has one
MLP of ``top_k * expert_inter``, so a token runs through the same number of weights in both.
Each row holds a ``--context``-token prompt (prefilled once, not timed); then ``--steps`` decode
steps of the whole batch are timed, through batchllm's own decoder and the torch attention backend,
best of ``--repeats`` rounds taken round-robin. Reported: milliseconds per decode step and the
ratio MoE / dense (the goal: at most 1.5). On a shared machine the figures are noisy.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch

from batchllm.kernels.metadata import AttentionMetadata
from batchllm.kernels.torch_backend import TorchAttention
from batchllm.model.config import ModelConfig
from batchllm.model.decoder import CausalLM, allocate_kv_caches
from batchllm.model.families import MoEConfig
from batchllm.model.loader import load_model

BLOCK = 16


def dense_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(
        architecture="Qwen3ForCausalLM",
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.top_k * args.expert_inter,
        num_layers=args.layers,
        num_heads=8,
        num_kv_heads=2,
        head_dim=args.hidden // 8,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        rope_scaling=None,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        attention_bias=False,
        qk_norm=True,
        eos_token_ids=(),
        bos_token_id=None,
    )


def moe_config(args: argparse.Namespace) -> ModelConfig:
    moe = MoEConfig(
        num_experts=args.experts,
        top_k=args.top_k,
        intermediate_size=args.expert_inter,
        norm_topk_prob=True,
        sparse_layers=tuple(range(args.layers)),
    )
    return replace(dense_config(args), architecture="Qwen3MoeForCausalLM", moe=moe)


def step_meta(
    lens: list[int], query_len: int, tables: list[list[int]]
) -> tuple[AttentionMetadata, torch.Tensor]:
    """Metadata for ``query_len`` new tokens per row after ``lens[i]`` cached ones; and positions."""
    seq_lens = [n + query_len for n in lens]
    positions = [p for n in lens for p in range(n, n + query_len)]
    slots = [
        tables[i][p // BLOCK] * BLOCK + p % BLOCK for i, n in enumerate(lens) for p in range(n, n + query_len)
    ]
    meta = AttentionMetadata(
        query_start_loc=torch.arange(0, (len(lens) + 1) * query_len, query_len, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor(tables, dtype=torch.int32),
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        max_query_len=query_len,
        max_seq_len=max(seq_lens),
        query_lens_cpu=(query_len,) * len(lens),
        seq_lens_cpu=tuple(seq_lens),
    )
    return meta, torch.tensor(positions)


@torch.no_grad()
def decode_seconds(model: CausalLM, batch: int, args: argparse.Namespace) -> float:
    """Prefill ``batch`` rows, then time ``args.steps`` greedy decode steps of them all."""
    per_row = math.ceil((args.context + args.steps) / BLOCK)
    caches = allocate_kv_caches(model.config, batch * per_row, BLOCK, torch.float32, torch.device("cpu"))
    tables = [list(range(i * per_row, (i + 1) * per_row)) for i in range(batch)]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (batch * args.context,), generator=gen)
    backend, lens = TorchAttention(), [0] * batch
    meta, positions = step_meta(lens, args.context, tables)
    hidden = model(ids, positions, caches, meta, backend)
    next_ids = model.compute_logits(hidden[args.context - 1 :: args.context]).argmax(-1)
    lens = [args.context] * batch
    start = time.perf_counter()
    for _ in range(args.steps):
        meta, positions = step_meta(lens, 1, tables)
        next_ids = model.compute_logits(model(next_ids, positions, caches, meta, backend)).argmax(-1)
        lens = [n + 1 for n in lens]
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-inter", type=int, default=512)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    models = {
        name: load_model(Path("."), cfg, torch.float32, cpu, dummy=True)
        for name, cfg in (("moe", moe_config(args)), ("dense", dense_config(args)))
    }
    active = {name: m.config.active_params for name, m in models.items()}
    print(f"machine: {platform.processor() or platform.machine()}, {args.threads} threads (shared: noisy)")
    print(f"active params: moe {active['moe'] / 1e6:.1f}M, dense {active['dense'] / 1e6:.1f}M; "
          f"moe total {models['moe'].config.num_params / 1e6:.1f}M")  # fmt: skip
    results = []
    for batch in args.batch:
        best = {name: math.inf for name in models}
        for _ in range(args.repeats):
            for name, model in models.items():
                best[name] = min(best[name], decode_seconds(model, batch, args))
        ms = {name: 1e3 * t / args.steps for name, t in best.items()}
        ratio = ms["moe"] / ms["dense"]
        results.append(
            {"batch": batch, "moe_ms_per_step": ms["moe"], "dense_ms_per_step": ms["dense"], "ratio": ratio}
        )
        print(
            f"batch {batch:3d}: moe {ms['moe']:7.2f} ms/step, dense {ms['dense']:7.2f} ms/step, "
            f"ratio {ratio:.2f}"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": results}, indent=2)
        )


if __name__ == "__main__":
    main()
