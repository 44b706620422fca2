"""Per-step attention metadata: what every attention backend reads, built once per engine step.

A step runs a flat batch of new tokens from several sequences. Sequence ``i`` owns the new
tokens ``query_start_loc[i]:query_start_loc[i+1]``; they sit at positions
``context_len[i] .. seq_lens[i]-1`` of that sequence, where ``context_len = seq_lens - query_len``
is what is already in the KV cache::

    positions of seq i:  0 ........ context_len-1 | context_len ...... seq_len-1
                         cached KV (block table)   | new tokens (this step)

The KV cache of one layer is a pair ``(k_cache, v_cache)``, each
``[num_blocks, block_size, num_kv_heads, head_dim]``. Position ``p`` of seq ``i`` lives in block
``block_tables[i, p // block_size]`` at offset ``p % block_size``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from batchllm.kernels.chunk_plan import ChunkPlan, build_chunk_plan

if TYPE_CHECKING:
    from batchllm.kernels.decode_part import MixedSplit


@dataclass(frozen=True)
class DecodeGroups:
    """Rows of a decode step that share leading KV blocks (a shared prefix).

    Sequences of one group are contiguous in the batch. Every sequence in group ``g`` has the
    same first ``shared_blocks[g]`` block-table entries (full blocks only), so a prefix-aware
    kernel may read those blocks once for the whole group.
    """

    group_start_loc: torch.Tensor  # [num_groups + 1] int32, over sequences
    shared_blocks: torch.Tensor  # [num_groups] int32
    max_group_size: int
    group_start_cpu: tuple[int, ...] = ()  # host copies, so torch paths loop without a device sync
    shared_blocks_cpu: tuple[int, ...] = ()
    # What backends derive from the groups, computed by the first layer and reused by the others.
    _per_step: dict[Any, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def once(self, key: Any, build: Callable[[], Any]) -> Any:
        """``build()``'s result, computed the first time ``key`` is asked for in this step."""
        if key not in self._per_step:
            self._per_step[key] = build()
        return self._per_step[key]

    def row_shared_blocks(self, num_seqs: int) -> torch.Tensor:
        """int32 [num_seqs]: ``shared_blocks`` of each row's group, 0 outside every group; no host sync."""
        return self.once(("row_shared", num_seqs), lambda: self._row_shared_blocks(num_seqs))

    def _row_shared_blocks(self, num_seqs: int) -> torch.Tensor:
        starts, shared = self.group_start_loc, self.shared_blocks
        if shared.shape[0] == 0:
            return torch.zeros(num_seqs, dtype=torch.int32, device=starts.device)
        rows = torch.arange(num_seqs, device=starts.device, dtype=starts.dtype)
        group_of_row = torch.searchsorted(starts[1:].contiguous(), rows, right=True)
        in_group = (rows >= starts[0]) & (group_of_row < shared.shape[0])
        return torch.where(in_group, shared[group_of_row.clamp(max=shared.shape[0] - 1)], 0).to(torch.int32)


@dataclass(frozen=True)
class PrefillGroups:
    """Runs of a prefill (or mixed) step's rows under one parent, as host arrays: rows
    ``starts[g]:starts[g+1]`` share their first ``shared_blocks[g]`` block-table entries (full
    blocks). The torch backend's prefill cascade (``torch_prefill_cascade.py``) plans from them."""

    starts: tuple[int, ...]  # [num_groups + 1] over sequences, the last is num_seqs
    shared_blocks: tuple[int, ...]  # [num_groups]
    _per_step: dict[Any, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def once(self, key: Any, build: Callable[[], Any]) -> Any:
        """``build()``'s result, computed the first time ``key`` is asked for in this step."""
        if key not in self._per_step:
            self._per_step[key] = build()
        return self._per_step[key]


def prefill_groups(starts: np.ndarray, shared: np.ndarray) -> PrefillGroups | None:
    """``starts`` [groups + 1] (num_seqs last), ``shared`` [groups]; None when no two rows share a
    block (nothing for a cascade to gain)."""
    if not np.any((np.diff(starts) >= 2) & (shared > 0)):
        return None
    return PrefillGroups(tuple(int(s) for s in starts), tuple(int(b) for b in shared))


@dataclass(frozen=True)
class AttentionMetadata:
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32, cumulative new-token counts
    seq_lens: torch.Tensor  # [num_seqs] int32, cached + new tokens
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32, padded with 0
    slot_mapping: torch.Tensor  # [num_tokens] int64, block * block_size + offset of each new token
    max_query_len: int
    max_seq_len: int
    query_lens_cpu: tuple[int, ...]  # host copies, so loops need no device sync
    seq_lens_cpu: tuple[int, ...]
    decode_groups: DecodeGroups | None = None  # set only when one_token_each
    chunk_plan: ChunkPlan | None = None  # batch-invariant attention's plan (torch, deterministic)
    mixed_split: MixedSplit | None = None  # mixed steps: decode rows apart, for cascade (decode_part.py)
    num_splits: int | None = None  # prefix decode's KV splits, fixed per CUDA-graph bucket (None: auto)
    prefill_groups: PrefillGroups | None = None  # steps with a chunk longer than one token (torch)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def one_token_each(self) -> bool:
        """Every sequence has exactly one new token: decode rows, and prompts' one-token chunks."""
        return self.max_query_len == 1


def build_metadata(
    query_lens: np.ndarray,  # [num_seqs] int, new tokens of each sequence
    seq_lens: np.ndarray,  # [num_seqs] int, cached + new tokens
    block_tables: np.ndarray,  # [num_seqs, max_blocks] int32
    slot_mapping: np.ndarray,  # [num_tokens] int64
    groups: tuple[np.ndarray, np.ndarray],  # (group starts over sequences, shared blocks per group)
    block_size: int,
    to_device: Callable[[np.ndarray], torch.Tensor],
    chunk_plan: bool = False,
) -> AttentionMetadata:
    """The step's metadata from plain host arrays (``to_device`` moves each one). Decode groups are
    kept only in one-token steps (the kernels' cascade path), prefill groups in the others; the chunk
    plan uses them in every step."""
    qsl = np.zeros(len(query_lens) + 1, dtype=np.int32)
    np.cumsum(query_lens, out=qsl[1:])
    starts, shared = groups
    host = {"query_start_loc": qsl, "seq_lens": seq_lens.astype(np.int32), "block_tables": block_tables}
    host["slot_mapping"] = slot_mapping
    one_token_each = int(query_lens.max()) == 1
    if one_token_each:
        host.update(group_start_loc=starts.astype(np.int32), shared_blocks=shared.astype(np.int32))
    plan = None
    if chunk_plan:
        plan = build_chunk_plan(query_lens, seq_lens, block_tables, starts, shared, block_size, to_device)
    dev = {name: to_device(a) for name, a in host.items()}
    meta = metadata_on_device(query_lens, seq_lens, groups if one_token_each else None, dev, plan)
    if one_token_each:
        return meta
    return dataclasses.replace(meta, prefill_groups=prefill_groups(starts, shared))


def metadata_on_device(
    query_lens: np.ndarray,  # [num_seqs] host copies of what ``dev`` holds
    seq_lens: np.ndarray,
    groups: tuple[np.ndarray, np.ndarray] | None,  # (group starts, shared blocks), one-token steps only
    dev: Mapping[str, torch.Tensor],  # query_start_loc, seq_lens, block_tables, slot_mapping (+ groups')
    chunk_plan: ChunkPlan | None = None,
) -> AttentionMetadata:
    """The one place a step's AttentionMetadata is put together, from arrays already on the device."""
    decode_groups = None
    if groups is not None:
        starts, shared = groups
        decode_groups = DecodeGroups(
            group_start_loc=dev["group_start_loc"],
            shared_blocks=dev["shared_blocks"],
            max_group_size=int(np.diff(starts).max()),
            group_start_cpu=tuple(starts.tolist()),
            shared_blocks_cpu=tuple(shared.tolist()),
        )
    q_cpu, lens_cpu = query_lens.tolist(), seq_lens.tolist()
    return AttentionMetadata(
        query_start_loc=dev["query_start_loc"],
        seq_lens=dev["seq_lens"],
        block_tables=dev["block_tables"],
        slot_mapping=dev["slot_mapping"],
        max_query_len=max(q_cpu),
        max_seq_len=max(lens_cpu),
        query_lens_cpu=tuple(q_cpu),
        seq_lens_cpu=tuple(lens_cpu),
        decode_groups=decode_groups,
        chunk_plan=chunk_plan,
    )


MIN_SPLIT_TOKENS = 256  # a shared-prefix KV split shorter than this costs more to merge than it saves


def auto_splits(device: torch.device, programs_per_split: int, max_seq_len: int) -> int:
    """Prefix KV splits for decode: about two programs per SM, none shorter than MIN_SPLIT_TOKENS."""
    if device.type != "cuda":
        return 1
    sms = _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    wanted = -(-2 * sms // max(programs_per_split, 1))
    return max(1, min(wanted, max_seq_len // MIN_SPLIT_TOKENS))


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count
