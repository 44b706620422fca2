"""Turns a StepPlan into tensors, runs the model over the paged KV cache, and samples."""

from __future__ import annotations

import numpy as np
import torch

from batchllm.config import SamplingParams
from batchllm.engine.sampling import sample
from batchllm.kernels.backend import AttentionBackend, KVCache
from batchllm.kernels.metadata import AttentionMetadata, build_metadata
from batchllm.scheduler.block_pool import blocks_for
from batchllm.scheduler.scheduler import Chunk, Step


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[KVCache],
        backend: AttentionBackend,
        block_size: int,
        sampling: SamplingParams,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.backend = backend
        self.block_size = block_size
        self.sampling = sampling
        self.device = kv_caches[0][0].device

    @torch.inference_mode()
    def execute(self, step: Step) -> list[int]:
        """Runs one step; returns the sampled token of every chunk with ``sample``, in step order."""
        self._copy_blocks(step.block_copies)
        input_ids, positions, meta = self._prepare(step.chunks)
        hidden = self.model(input_ids, positions, self.kv_caches, meta, self.backend)
        last = [i for i, c in enumerate(step.chunks) if c.sample]
        if not last:
            return []
        ends = meta.query_start_loc[1:].to(torch.long) - 1
        logits = self.model.compute_logits(hidden[ends[last]])
        sampled = [step.chunks[i] for i in last]
        keys = [c.seq.sample_key for c in sampled]
        steps = [c.seq.num_output for c in sampled]
        return sample(logits, self.sampling, keys, steps)

    def _copy_blocks(self, copies: tuple[tuple[int, int], ...]) -> None:
        """Give sequences their private copy of a shared prefix's last, partial block."""
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        for k_cache, v_cache in self.kv_caches:
            k_cache.index_copy_(0, dst, k_cache.index_select(0, src))
            v_cache.index_copy_(0, dst, v_cache.index_select(0, src))

    def _prepare(self, chunks: tuple[Chunk, ...]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        bs = self.block_size
        ids, positions, slots = [], [], []
        query_lens = np.fromiter((c.num_tokens for c in chunks), dtype=np.int64, count=len(chunks))
        seq_lens = np.fromiter((c.end for c in chunks), dtype=np.int64, count=len(chunks))
        max_blocks = max(blocks_for(c.end, bs) for c in chunks)
        tables = np.zeros((len(chunks), max_blocks), dtype=np.int32)
        for i, c in enumerate(chunks):
            table = c.seq.block_table[: blocks_for(c.end, bs)]
            tables[i, : len(table)] = table
            pos = np.arange(c.start, c.end, dtype=np.int64)
            ids.append(c.seq.token_ids[c.start : c.end])
            positions.append(pos)
            slots.append(tables[i, pos // bs].astype(np.int64) * bs + pos % bs)
        meta = build_metadata(
            query_lens, seq_lens, tables, np.concatenate(slots), self._groups(chunks), bs, self._to_device,
            chunk_plan=self.backend.wants_chunk_plan,
        )  # fmt: skip
        flat_ids = np.fromiter((t for seq_ids in ids for t in seq_ids), dtype=np.int64)
        return self._to_device(flat_ids), self._to_device(np.concatenate(positions)), meta

    def _groups(self, chunks: tuple[Chunk, ...]) -> tuple[np.ndarray, np.ndarray]:
        """Consecutive rows under the same prefix form a group that shares its borrowed blocks:
        (group starts over the step's sequences, shared blocks of each group)."""
        starts, shared = [0], []
        for i, c in enumerate(chunks):
            if i and c.seq.parent is not None and c.seq.parent is chunks[i - 1].seq.parent:
                continue
            if i:
                starts.append(i)
            shared.append(c.seq.num_borrowed_blocks)
        starts.append(len(chunks))
        return np.asarray(starts, dtype=np.int64), np.asarray(shared, dtype=np.int64)

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor
