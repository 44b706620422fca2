"""Decode steps through CUDA-graph buckets (engine/cuda_graphs.py): static buffers, padding rows,
fixed-shape metadata. On the CPU the padded static-buffer path runs the model eagerly (what a replay
does, minus the replay) and must give the plain eager path's tokens; on CUDA, captured graphs must."""

from __future__ import annotations

import pytest
import torch
from test_engine_host import _host, _work

from batchllm.config import EngineConfig, SamplingParams
from batchllm.engine.cuda_graphs import decode_graph_mode, graph_buckets
from batchllm.engine.model_host import ModelHost
from batchllm.model.config import load_model_config
from batchllm.model.tokenizer import load_tokenizer
from batchllm.scheduler.seq import Seq


def test_buckets_cover_every_batch_up_to_the_cap():
    assert graph_buckets(512)[:8] == (1, 2, 4, 8, 16, 32, 64, 96)
    assert graph_buckets(512)[-1] == 512 and graph_buckets(6) == (1, 2, 4, 6)
    assert graph_buckets(100) == (1, 2, 4, 8, 16, 32, 64, 96, 100)


def test_graphs_only_on_cuda_with_triton_for_dense_models():
    on, off = EngineConfig(), EngineConfig(cuda_graphs=False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert decode_graph_mode(on, cuda, "triton", moe=False)
    assert not decode_graph_mode(off, cuda, "triton", moe=False)
    assert not decode_graph_mode(on, cpu, "triton", moe=False)
    assert not decode_graph_mode(on, cuda, "torch", moe=False)
    assert not decode_graph_mode(on, cuda, "triton", moe=True)
    with pytest.raises(ValueError, match="cuda-graph-max-batch"):
        EngineConfig(cuda_graph_max_batch=0)


def _small_work() -> tuple[list[Seq], list[Seq]]:
    """Three rows under one shared prefix (the interpreter's budget): decode steps of 3 rows in bucket 4."""
    prefix = Seq.prefix(0, [(7 * i) % 500 for i in range(9)])
    rows = [Seq.row(r, prefix.token_ids + [11 * r + 1, 13 * r + 2], prefix) for r in range(3)]
    prefix.pending_rows = 3
    return [prefix, *rows], rows


def _tokens(host, graphs: bool, small: bool = False) -> tuple[list, list[tuple[int, int]]]:
    """Greedy outputs of the test work, and (rows, bucket) of every step the buckets ran."""
    work, rows = _small_work() if small else _work(7)
    engine = host.engine(600, 15)
    engine.runner.graphs = host.graphs if graphs else None
    seen: list[tuple[int, int]] = []
    run = host.graphs.run
    host.graphs.run = lambda step: (
        seen.append((step.num_rows, host.graphs.bucket(step.num_rows))) or run(step)
    )
    engine.run(work, lambda seq: None)
    host.graphs.run = run
    assert engine.scheduler.pool.num_used == 0
    return [(r.output_ids, r.finish_reason) for r in rows], seen


def _padded_host(tiny_models, **engine):
    sampling = SamplingParams(max_new_tokens=engine.pop("max_new", 10))
    host = _host(tiny_models["llama"], sampling, block_size=4, token_budget=24, **engine)
    host.graph_mode = "padded"  # the graph path, the model called eagerly (no CUDA here)
    host.stopper.eos = frozenset({_work(7)[1][0].token_ids[-1] % 7 + 3})  # some rows stop early
    return host


def test_padded_static_buffers_give_the_eager_tokens(tiny_models):
    """Torch backend: padding rows, rows finishing mid-bucket and bucket changes between steps."""
    host = _padded_host(tiny_models, max_running=6, cuda_graph_max_batch=6, max_new=7)
    eager, none_seen = _tokens(host, graphs=False)
    padded, seen = _tokens(host, graphs=True)
    assert padded == eager and not none_seen
    assert {reason for _, reason in eager} == {"stop", "length"}
    assert any(n < size for n, size in seen), "no step had padding rows"
    assert len({size for _, size in seen}) >= 2, "no bucket change between steps"
    assert host.kv_caches[0][0].shape[0] == host.kv_blocks + 1  # the padding rows' scratch block


def test_steps_over_the_cap_run_eagerly(tiny_models):
    host = _padded_host(tiny_models, max_running=6, cuda_graph_max_batch=2, max_new=4)
    eager, _ = _tokens(host, graphs=False, small=True)
    padded, seen = _tokens(host, graphs=True, small=True)
    assert padded == eager
    assert host.graphs.buckets == (1, 2) and (3, None) in seen and host.graphs.replays == 0


def test_padded_static_buffers_triton_interpreter(tiny_models):
    """Triton backend (interpreted): the bucket's fixed split count, group count and max_seq_len."""
    host = _padded_host(tiny_models, max_running=4, attention_backend="triton", max_new=3)
    eager, _ = _tokens(host, graphs=False, small=True)
    padded, seen = _tokens(host, graphs=True, small=True)
    assert padded == eager and (3, 4) in seen


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_captured_graphs_give_the_eager_tokens(tiny_models):
    sampling = SamplingParams(max_new_tokens=10)
    cfg = EngineConfig(
        device="cuda",
        dtype="float32",
        attention_backend="triton",
        block_size=4,
        max_running=6,
        kv_cache_memory="64MB",
    )
    path = tiny_models["llama"]
    host = ModelHost(path, load_model_config(path), load_tokenizer(path), cfg, sampling)
    assert host.graph_mode == "capture"
    eager, _ = _tokens(host, graphs=False)
    graphed, seen = _tokens(host, graphs=True)
    assert graphed == eager and len({size for _, size in seen}) >= 2
