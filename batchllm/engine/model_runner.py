"""Runs a scheduled Step on the model over the paged KV cache and samples, without waiting for it.

``launch`` enqueues the step's work and returns its sampled token ids as a device tensor; nothing in
it waits for the device, so the engine can schedule and prepare the next step meanwhile. A row whose
input is the token the previous step sampled reads it on the device (``prev_sampled``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from batchllm.config import SamplingParams
from batchllm.engine.cuda_graphs import DecodeGraphs, step_arrays
from batchllm.engine.logprobs import gather_logprobs
from batchllm.engine.row_sampling import sample_rows
from batchllm.engine.sampled import Sampled
from batchllm.engine.sampling import sample
from batchllm.engine.score_positions import ScoreSpans, score_spans
from batchllm.engine.staging import Staging
from batchllm.engine.step_inputs import step_inputs
from batchllm.engine.token_mask import apply_mask
from batchllm.kernels.backend import AttentionBackend, KVCache
from batchllm.kernels.chunk_plan import build_chunk_plan
from batchllm.kernels.decode_part import split_mixed_step
from batchllm.kernels.metadata import AttentionMetadata, metadata_on_device, prefill_groups
from batchllm.kernels.short_chunks import with_short_chunks
from batchllm.scheduler.step import Step


@dataclasses.dataclass(frozen=True)
class StepOutput:
    """A launched step's results, still on the device until the engine reads them (one sync)."""

    sampled: Sampled  # the sampled rows' tokens (int64 [rows sampled]), and logprobs if asked for
    scored: torch.Tensor | None = None  # float32 [scored positions], in ``spans`` order
    spans: ScoreSpans | None = None


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
        self.staging = Staging(self.device)
        self.graphs: DecodeGraphs | None = None  # decode steps through CUDA graphs (set by ModelHost)

    def launch(
        self, step: Step, prev_sampled: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> Sampled:
        """Enqueues ``step``; returns the sampled token of every row with ``sample``, in step order (int64,
        on the device), with their raw logprobs under ``--logprobs`` (``Sampled.read`` is the one sync).
        ``mask``: allowed tokens of the sampled rows, a packed CPU bitmask (structured output), or None."""
        return self.launch_step(step, prev_sampled, mask).sampled

    @torch.inference_mode()
    def launch_step(
        self, step: Step, prev_sampled: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> StepOutput:
        """``launch``, and the log-probs of the step's scored positions (see ``score_positions``)."""
        self._copy_blocks(step.block_copies)
        spans = score_spans(step)
        inputs = step_inputs(step, self.block_size, spans)
        dev = self.staging.send(inputs.host_arrays())
        input_ids = dev["input_ids"]
        if prev_sampled is not None and len(step.prev_rows):
            rows = torch.from_numpy(inputs.query_start_loc[1:][step.prev_rows] - 1).to(self.device)
            input_ids[rows] = prev_sampled[torch.from_numpy(step.prev_index).to(self.device)]
        hidden = self._graph_forward(inputs, input_ids, dev)
        if hidden is None:  # not a decode step a graph bucket takes: eager
            meta = self._metadata(step, inputs, dev)
            hidden = self.model(input_ids, dev["positions"], self.kv_caches, meta, self.backend)
        scored = None
        if spans is not None:
            logits = self.model.compute_logits(hidden[dev["score_rows"]])
            scored = gather_logprobs(logits, dev["score_targets"]).chosen
        if not len(inputs.logit_rows):
            none = torch.empty(0, dtype=torch.long, device=self.device)
            return StepOutput(Sampled(none, scored=scored), scored, spans)
        logits = self.model.compute_logits(hidden[dev["logit_rows"]])
        k = self.sampling.logprobs
        raw = logits.clone() if k and mask is not None else logits  # logprobs are the model's, unmasked
        tokens = self._sample(step, logits, mask)
        sampled = Sampled.of(tokens, gather_logprobs(raw, tokens, k)) if k else Sampled(tokens)
        if scored is not None:  # read back with the tokens, in one copy
            sampled = dataclasses.replace(sampled, scored=scored)
        return StepOutput(sampled, scored, spans)

    def _graph_forward(self, inputs, input_ids: torch.Tensor, dev: dict) -> torch.Tensor | None:
        """The decode step's hidden states through ``engine.cuda_graphs``, or None: run it eagerly."""
        if self.graphs is None or inputs.group_start_loc is None or self.backend.wants_chunk_plan:
            return None
        return self.graphs.run(step_arrays(inputs, input_ids, dev))

    def _sample(self, step: Step, logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is not None:
            apply_mask(logits, mask)
        if step.own_params:  # rows with their own settings (--params-column)
            seqs = step.sampled_seqs
            rows = [seq.params or self.sampling for seq in seqs]
            return sample_rows(logits, rows, [seq.sample_key for seq in seqs], step.num_output)
        keys = [seq.sample_key for seq in step.sampled_seqs] if not self.sampling.greedy else []
        return sample(logits, self.sampling, keys, step.num_output)

    def _metadata(self, step: Step, inputs, dev: dict[str, torch.Tensor]) -> AttentionMetadata:
        """Everything that depends only on the step, built once for all layers."""
        groups = None
        if inputs.group_start_loc is not None:
            groups = (inputs.group_start_loc, inputs.shared_blocks)
        plan = self._chunk_plan(step, inputs) if self.backend.wants_chunk_plan else None
        meta = metadata_on_device(step.query_lens, inputs.seq_lens, groups, dev, plan)
        if groups is None and plan is None:  # a mixed step: decode rows may still share prefixes
            starts = np.append(step.group_starts, len(step.query_lens))
            short = with_short_chunks(
                meta, step.query_lens, inputs.seq_lens, (starts, step.shared_blocks), self.block_size, dev
            )
            if short is not None:  # short chunks under shared prefixes: one-token rows (short_chunks.py)
                return short
            split = split_mixed_step(step.query_lens, inputs.seq_lens, (starts, step.shared_blocks), dev)
            # Rows prefilling under a shared prefix: the torch backend reads it once per group.
            prefill = prefill_groups(starts, step.shared_blocks)
            meta = dataclasses.replace(meta, mixed_split=split, prefill_groups=prefill)
        return meta

    def _chunk_plan(self, step: Step, inputs):
        """The batch-invariant torch path's plan (``--deterministic``): every step, groups included."""
        starts = np.append(step.group_starts, len(step.query_lens)).astype(np.int64)
        shared = step.shared_blocks.astype(np.int64)
        return build_chunk_plan(
            step.query_lens, inputs.seq_lens, inputs.block_tables, starts, shared, self.block_size,
            lambda a: torch.from_numpy(a).to(self.device),
        )  # fmt: skip

    def _copy_blocks(self, copies: tuple[tuple[int, int], ...]) -> None:
        """Give sequences their private copy of a shared prefix's last, partial block."""
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        for k_cache, v_cache in self.kv_caches:
            k_cache.index_copy_(0, dst, k_cache.index_select(0, src))
            v_cache.index_copy_(0, dst, v_cache.index_select(0, src))
