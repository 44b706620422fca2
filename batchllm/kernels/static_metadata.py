"""Decode-step attention metadata with fixed shapes: what a CUDA graph captures and replays.

A captured graph bakes in every tensor's address and shape and every host value a kernel launch
reads (grids, split counts). So a decode step of ``n`` rows runs in a *bucket* of ``size >= n`` rows
whose tensors are views of buffers allocated once at the largest bucket; the step's inputs are copied
into their first ``n`` rows and the rest are *padding rows*::

    row:            0 ........ n-1 | n ............. size-1
    input_ids:      the step's     | 0
    positions:      the step's     | 0
    slot_mapping:   the step's     | scratch_block * block_size     (a block no row owns)
    seq_lens:       the step's     | 1                              (each reads its own scratch slot)
    block_tables:   the step's [n, w], then scratch_block up to the fixed width W
    groups:         the step's g groups | [n, size) (shared 0) | empty groups [size, size) up to size + 1

A padding row writes its K/V to the scratch slot and attends to it alone; its output is discarded.
The empty groups make the group count fixed (``size + 1``: a step has at most ``n`` groups, plus the
padding one). Host values are fixed per bucket too: ``max_seq_len`` is the table's whole width,
``max_group_size`` the bucket size, and the prefix decode's KV split count is chosen once per bucket.
Only the host copies the torch backend reads (``seq_lens_cpu``, the groups' tuples) follow the step:
that backend runs the same padded layout eagerly, but is never captured.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from batchllm.kernels.metadata import AttentionMetadata, DecodeGroups


@dataclass(frozen=True)
class StepArrays:
    """One decode step's inputs: device tensors of its ``n`` rows and the host copies of its groups."""

    input_ids: torch.Tensor  # int64 [n]
    positions: torch.Tensor  # int64 [n]
    slot_mapping: torch.Tensor  # int64 [n]
    seq_lens: torch.Tensor  # int32 [n]
    block_tables: torch.Tensor  # int32 [n, w], w <= the buffers' width
    group_start_loc: torch.Tensor  # int32 [g + 1], last entry n
    shared_blocks: torch.Tensor  # int32 [g]
    seq_lens_host: np.ndarray  # [n]
    group_start_host: np.ndarray  # [g + 1]
    shared_blocks_host: np.ndarray  # [g]

    @property
    def num_rows(self) -> int:
        return int(self.input_ids.shape[0])


class StaticDecodeBuffers:
    """Device buffers for decode steps of up to ``max_rows`` rows, each block table ``width`` wide."""

    def __init__(
        self, max_rows: int, width: int, block_size: int, scratch_block: int, device: torch.device
    ) -> None:
        self.max_rows, self.width, self.block_size = max_rows, width, block_size
        self.scratch_block = scratch_block
        i32, i64 = torch.int32, torch.int64
        self.input_ids = torch.zeros(max_rows, dtype=i64, device=device)
        self.positions = torch.zeros(max_rows, dtype=i64, device=device)
        self.slot_mapping = torch.full((max_rows,), scratch_block * block_size, dtype=i64, device=device)
        self.query_start_loc = torch.arange(max_rows + 1, dtype=i32, device=device)
        self.seq_lens = torch.ones(max_rows, dtype=i32, device=device)
        self.block_tables = torch.full((max_rows, width), scratch_block, dtype=i32, device=device)
        self.group_start_loc = torch.full((max_rows + 2,), max_rows, dtype=i32, device=device)
        self.shared_blocks = torch.zeros(max_rows + 1, dtype=i32, device=device)

    def fits(self, num_rows: int, table_width: int) -> bool:
        return num_rows <= self.max_rows and table_width <= self.width

    def fill(self, size: int, step: StepArrays) -> None:
        """Copy ``step`` into the first rows of the ``size`` bucket and pad the rest (device copies only)."""
        n, w = step.num_rows, int(step.block_tables.shape[1])
        g = int(step.shared_blocks.shape[0])
        self.input_ids[:n].copy_(step.input_ids)
        self.input_ids[n:size].zero_()
        self.positions[:n].copy_(step.positions)
        self.positions[n:size].zero_()
        self.slot_mapping[:n].copy_(step.slot_mapping)
        self.slot_mapping[n:size].fill_(self.scratch_block * self.block_size)
        self.seq_lens[:n].copy_(step.seq_lens)
        self.seq_lens[n:size].fill_(1)
        self.block_tables[:size].fill_(self.scratch_block)
        self.block_tables[:n, :w].copy_(step.block_tables)
        self.group_start_loc[: g + 1].copy_(step.group_start_loc)
        self.group_start_loc[g + 1 : size + 2].fill_(size)
        self.shared_blocks[:g].copy_(step.shared_blocks)
        self.shared_blocks[g : size + 1].zero_()

    def pad(self, size: int) -> None:
        """Make every row of the ``size`` bucket a padding row (what a capture runs on)."""
        self.input_ids[:size].zero_()
        self.positions[:size].zero_()
        self.slot_mapping[:size].fill_(self.scratch_block * self.block_size)
        self.seq_lens[:size].fill_(1)
        self.block_tables[:size].fill_(self.scratch_block)
        self.group_start_loc[0] = 0
        self.group_start_loc[1 : size + 2].fill_(size)
        self.shared_blocks[: size + 1].zero_()

    def metadata(self, size: int, num_splits: int, step: StepArrays | None = None) -> AttentionMetadata:
        """The ``size`` bucket's metadata over the buffers. ``step``: the step now in them, for the
        host copies only the torch backend reads (None while capturing: every row is padding)."""
        seq_lens, starts, shared = _host_layout(size, step)
        groups = DecodeGroups(
            group_start_loc=self.group_start_loc[: size + 2],
            shared_blocks=self.shared_blocks[: size + 1],
            max_group_size=size,
            group_start_cpu=tuple(starts.tolist()),
            shared_blocks_cpu=tuple(shared.tolist()),
        )
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size],
            slot_mapping=self.slot_mapping[:size],
            max_query_len=1,
            max_seq_len=self.width * self.block_size,
            query_lens_cpu=(1,) * size,
            seq_lens_cpu=tuple(seq_lens.tolist()),
            decode_groups=groups,
            num_splits=num_splits,
        )


def _host_layout(size: int, step: StepArrays | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Host copies of the padded seq_lens, group starts and shared blocks (see the module's diagram)."""
    seq_lens = np.ones(size, dtype=np.int64)
    starts = np.full(size + 2, size, dtype=np.int64)
    shared = np.zeros(size + 1, dtype=np.int64)
    starts[0] = 0
    if step is not None:
        n, g = step.num_rows, len(step.shared_blocks_host)
        seq_lens[:n] = step.seq_lens_host
        starts[: g + 1] = step.group_start_host
        shared[:g] = step.shared_blocks_host
    return seq_lens, starts, shared
