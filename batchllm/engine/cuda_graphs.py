"""CUDA graphs for decode-only steps: the model's forward captured once per batch-size bucket, replayed.

A decode step launches a few kernels per layer, each too small to hide its launch cost at small
batches; a graph replays the whole forward in one launch. Graphs need fixed shapes and addresses, so::

    step of n decode rows  ->  bucket = smallest of 1, 2, 4, 8, 16, 32, 64, 96, ... cap  with  >= n
    inputs  ->  StaticDecodeBuffers.fill(bucket, step)      (device copies; padding rows after row n)
    first time this bucket: pad, warm up, capture the model's forward into a graph (kernels.static_metadata)
    replay  ->  hidden states of the bucket's rows; the engine keeps rows [0, n)

Logits, sampling, masks and logprobs stay outside the graph (eager). Steps that do not fit run eagerly:
mixed and prefill steps, scoring steps, the batch-invariant torch path, more rows than the cap, a
block table wider than the buffers. Graphs are on only on CUDA with the Triton backend (the torch
backend's cascade plans on the host each step) and for dense models; ``--no-cuda-graphs``
(``EngineConfig.cuda_graphs``) turns them off.

``capture=False`` runs the very same padded static-buffer path with the model called eagerly: what
the CPU tests check against the plain eager path, token for token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from batchllm.config import EngineConfig
from batchllm.kernels.backend import AttentionBackend, KVCache
from batchllm.kernels.metadata import AttentionMetadata, auto_splits
from batchllm.kernels.static_metadata import StaticDecodeBuffers, StepArrays

SMALL_BUCKETS = (1, 2, 4, 8, 16, 32)
BUCKET_STEP = 32  # past the small buckets, every multiple of this up to the cap
WARMUP_RUNS = 2  # eager runs before a capture: Triton compiles and caches its kernels outside it
SHARED_ROWS_PER_PROGRAM = 64  # query rows a prefix-decode program takes (its SHARED_BLOCK_M)


def graph_buckets(cap: int) -> tuple[int, ...]:
    """Batch sizes with a graph of their own: the small buckets, multiples of BUCKET_STEP, the cap."""
    small = {b for b in SMALL_BUCKETS if b < cap}
    return tuple(sorted(small | set(range(BUCKET_STEP, cap, BUCKET_STEP)) | {cap}))


def decode_graph_mode(cfg: EngineConfig, device: torch.device, backend: str, moe: bool) -> bool:
    """Whether decode steps run through captured graphs: CUDA, Triton attention, dense model, not off
    (``EngineConfig.cuda_graphs``: ``--no-cuda-graphs``)."""
    if not cfg.cuda_graphs:
        return False
    return device.type == "cuda" and backend == "triton" and not moe


def step_arrays(inputs, input_ids: torch.Tensor, dev: dict[str, torch.Tensor]) -> StepArrays:
    """A decode step's arrays (``engine.step_inputs``: one token each, with groups) for the buffers."""
    return StepArrays(
        input_ids=input_ids,
        positions=dev["positions"],
        slot_mapping=dev["slot_mapping"],
        seq_lens=dev["seq_lens"],
        block_tables=dev["block_tables"],
        group_start_loc=dev["group_start_loc"],
        shared_blocks=dev["shared_blocks"],
        seq_lens_host=inputs.seq_lens,
        group_start_host=inputs.group_start_loc,
        shared_blocks_host=inputs.shared_blocks,
    )


@dataclass(frozen=True)
class _Captured:
    graph: torch.cuda.CUDAGraph
    hidden: torch.Tensor  # [bucket, hidden], the graph's output, overwritten by each replay


class DecodeGraphs:
    """Decode steps of up to ``max_rows`` rows through static buffers, captured (``capture``) or eager.

    ``scratch_block``: a KV block no sequence owns (the cache holds one block past the pool's) where
    padding rows write. ``width``: block-table columns the buffers hold (the longest context / block).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[KVCache],
        backend: AttentionBackend,
        block_size: int,
        max_rows: int,
        width: int,
        scratch_block: int,
        capture: bool,
    ) -> None:
        self.model, self.kv_caches, self.backend = model, kv_caches, backend
        self.capture = capture
        self.buckets = graph_buckets(max_rows)
        device = kv_caches[0][0].device
        self.buffers = StaticDecodeBuffers(max_rows, width, block_size, scratch_block, device)
        kv_heads = kv_caches[0][0].shape[2]
        self.splits = {
            size: auto_splits(device, -(-size // SHARED_ROWS_PER_PROGRAM) * kv_heads, width * block_size)
            for size in self.buckets
        }  # one big group per bucket: the case a split count matters for
        self._graphs: dict[int, _Captured] = {}
        self._pool = None
        self.replays = 0  # decode steps run through the buffers (captured or not)

    def bucket(self, num_rows: int) -> int | None:
        """The smallest bucket that holds ``num_rows`` rows, or None when none does."""
        i = int(np.searchsorted(self.buckets, num_rows))
        return self.buckets[i] if i < len(self.buckets) else None

    def run(self, step: StepArrays) -> torch.Tensor | None:
        """Hidden states of the step's rows ``[n, hidden]``, or None when the step does not fit."""
        size = self.bucket(step.num_rows)
        if size is None or not self.buffers.fits(step.num_rows, int(step.block_tables.shape[1])):
            return None
        if self.capture and size not in self._graphs:
            self._graphs[size] = self._capture(size)
        self.buffers.fill(size, step)
        self.replays += 1
        if self.capture:
            captured = self._graphs[size]
            captured.graph.replay()
            return captured.hidden[: step.num_rows]
        meta = self.buffers.metadata(size, self.splits[size], step)
        return self._forward(size, meta)[: step.num_rows]

    def _forward(self, size: int, meta: AttentionMetadata) -> torch.Tensor:
        b = self.buffers
        return self.model(b.input_ids[:size], b.positions[:size], self.kv_caches, meta, self.backend)

    def _capture(self, size: int) -> _Captured:
        """Warm up on a bucket of padding rows (only the scratch block is written), then capture.
        Each run gets fresh metadata: what a layer caches on it (``DecodeGroups.once``) must be
        computed inside the graph, not carried over from the warm-up."""
        self.buffers.pad(size)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_RUNS):
                self._forward(size, self.buffers.metadata(size, self.splits[size]))
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            hidden = self._forward(size, self.buffers.metadata(size, self.splits[size]))
        self._pool = graph.pool()
        return _Captured(graph, hidden)
