"""Short chunks of several sequences under one cached prefix, run as one-token rows through the
cascade (``kernels/short_chunks.py``), equal the reference attention over each sequence's context."""

from __future__ import annotations

import numpy as np
import torch
from paged_rows import paged_rows

from batchllm.kernels.metadata import AttentionMetadata, build_metadata
from batchllm.kernels.reference import paged_attention_ref
from batchllm.kernels.short_chunks import choose_short_rows, with_short_chunks
from batchllm.kernels.torch_backend import TorchAttention

A, B = [10, 11, 12], [20, 21]
# (shared block ids, seq_len, query_len), block size 4. Group A: choices-like chunks of 3, 3, 2 tokens,
# a decode row, and a chunk whose own positions are too long to read per token; a long chunk alone;
# group B: two short chunks; a short chunk under no prefix.
ROWS = [(A, 17, 3), (A, 16, 3), (A, 14, 1), (A, 15, 2), (A, 40, 8), ([], 30, 20), (B, 12, 3), (B, 10, 2)]
ROWS += [([], 5, 2)]
GROUPS = (np.array([0, 5, 6, 8, 9]), np.array([3, 0, 2, 0]))


def make_step(rows: list, groups: tuple[np.ndarray, np.ndarray], bs: int, to_device=torch.from_numpy):
    """The step's metadata and its device arrays, each row's blocks after its shared ones fresh."""
    q_lens, seq_lens, tables, slots = paged_rows(rows, bs, 16)
    meta = build_metadata(q_lens, seq_lens, tables, slots, groups, bs, to_device)
    dev = {f: getattr(meta, f) for f in ("query_start_loc", "seq_lens", "block_tables", "slot_mapping")}
    return meta, dev, q_lens, seq_lens


def short_meta(
    rows, groups, bs: int, to_device=torch.from_numpy
) -> tuple[AttentionMetadata, AttentionMetadata]:
    meta, dev, q_lens, seq_lens = make_step(rows, groups, bs, to_device)
    return meta, with_short_chunks(meta, q_lens, seq_lens, (groups[0], groups[1]), bs, dev)


def test_chosen_rows_and_their_groups():
    q_lens, seq_lens = np.array([r[2] for r in ROWS]), np.array([r[1] for r in ROWS])
    chosen = choose_short_rows(q_lens, seq_lens, GROUPS, 4)
    assert chosen.rows.tolist() == [0, 1, 2, 3, 6, 7]  # not the long suffix, the long chunk, the lone row
    assert chosen.group_starts.tolist() == [0, 9, 14] and chosen.shared_blocks.tolist() == [3, 2]
    # decode rows only (decode_part's case), or no prefix shared: nothing to do here
    assert choose_short_rows(np.ones_like(q_lens), seq_lens, GROUPS, 4) is None
    assert choose_short_rows(q_lens, seq_lens, (GROUPS[0], np.zeros(4, dtype=np.int64)), 4) is None


def test_short_chunks_in_a_mixed_step_equal_the_reference():
    torch.manual_seed(4)
    meta, short = short_meta(ROWS, GROUPS, 4)
    split = short.mixed_split
    assert split is not None and split.decode.one_token_each and split.decode.num_seqs == 14
    cache = (torch.randn(300, 4, 2, 8), torch.randn(300, 4, 2, 8))
    q = torch.randn(int(sum(r[2] for r in ROWS)), 6, 8)
    expected = paged_attention_ref(q, cache, meta, 0.3)
    torch.testing.assert_close(TorchAttention().attend(q, cache, short, 0.3), expected, atol=1e-5, rtol=1e-4)


def test_a_step_of_short_chunks_only_becomes_one_token_rows():
    """Every row chosen (a scoring step): the step's own metadata is one token per row, tokens in order."""
    torch.manual_seed(5)
    rows = [(A, 17, 3), (A, 16, 3), (A, 15, 2), (B, 12, 3), (B, 10, 2), (B, 11, 1)]
    groups = (np.array([0, 3, 6]), np.array([3, 2]))
    meta, short = short_meta(rows, groups, 4)
    assert short.one_token_each and short.mixed_split is None
    assert short.decode_groups.group_start_cpu == (0, 8, 14)
    assert torch.equal(short.slot_mapping, meta.slot_mapping)
    cache = (torch.randn(300, 4, 1, 16), torch.randn(300, 4, 1, 16))
    q = torch.randn(14, 4, 16)
    expected = paged_attention_ref(q, cache, meta, 0.25)
    torch.testing.assert_close(TorchAttention().attend(q, cache, short, 0.25), expected, atol=1e-5, rtol=1e-4)
