"""Cascade in mixed steps: the one-token rows of a step that also carries prefill chunks, run as a
decode step of their own so that each group's shared prefix is read once for all of them.

In steady-state continuous batching most steps admit a row or two: without this, every decoding row
of such a step would re-read its shared prefix on its own. The step's K/V are stored first for all
tokens; attention then runs twice, on two sub-batches with their own metadata::

    step rows:    d d P d d d P d          d: one new token, P: a prefill chunk
    decode part:  d d . d d d . d          groups restricted to these rows -> cascade decode
    rest:         . . P . . . P .          -> the backend's general (prefill) path

Both parts' metadata are built once per step, on the host arrays the step already has, and indexed
from the step's device tensors (no host sync).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from batchllm.kernels.metadata import AttentionMetadata, metadata_on_device, prefill_groups


@dataclass(frozen=True)
class MixedSplit:
    decode_tokens: torch.Tensor  # int64 [d], the decode rows' tokens (their index in the step's q)
    decode: AttentionMetadata  # one token each, with decode_groups
    rest_tokens: torch.Tensor  # int64, the other rows' tokens, in step order
    rest: AttentionMetadata


def split_mixed_step(
    query_lens: np.ndarray,  # [n] new tokens per row of a step that is not one-token-each
    seq_lens: np.ndarray,  # [n]
    groups: tuple[np.ndarray, np.ndarray],  # (starts over the step's rows, with n last; shared blocks)
    dev: Mapping[str, torch.Tensor],  # the step's device tensors (query_start_loc, seq_lens, ...)
) -> MixedSplit | None:
    """The split, or None when no two decode rows share a prefix (nothing to gain)."""
    one = query_lens == 1
    dec = np.flatnonzero(one)
    starts, shared = groups
    sub_starts = np.searchsorted(dec, starts)  # decode rows before each group start
    sizes = np.diff(sub_starts)
    if not dec.size or one.all() or not np.any((sizes >= 2) & (shared > 0)):
        return None
    keep = sizes > 0
    sub_groups = (np.append(sub_starts[:-1][keep], len(dec)), shared[keep])
    qsl = np.zeros(len(query_lens) + 1, dtype=np.int64)
    np.cumsum(query_lens, out=qsl[1:])
    rest = np.flatnonzero(~one)
    rest_tokens = np.concatenate([np.arange(qsl[i], qsl[i + 1]) for i in rest])
    device = dev["seq_lens"].device
    dec_tokens = torch.from_numpy(qsl[dec]).to(device)
    rest_tok = torch.from_numpy(rest_tokens).to(device)
    decode = _part(dev, dec, dec_tokens, query_lens, seq_lens, sub_groups)
    rest_meta = _part(dev, rest, rest_tok, query_lens, seq_lens, None)
    rest_starts = np.searchsorted(rest, starts)  # the prefill rows' groups, for the prefill cascade
    rest_meta = dataclasses.replace(rest_meta, prefill_groups=prefill_groups(rest_starts, shared))
    return MixedSplit(dec_tokens, decode, rest_tok, rest_meta)


def _part(
    dev: Mapping[str, torch.Tensor],
    rows: np.ndarray,
    tokens: torch.Tensor,
    query_lens: np.ndarray,
    seq_lens: np.ndarray,
    groups: tuple[np.ndarray, np.ndarray] | None,
) -> AttentionMetadata:
    device = dev["seq_lens"].device
    index = torch.from_numpy(rows).to(device)
    q = query_lens[rows]
    qsl = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(q, out=qsl[1:])
    part = {
        "query_start_loc": torch.from_numpy(qsl).to(device),
        "seq_lens": dev["seq_lens"][index],
        "block_tables": dev["block_tables"][index],
        "slot_mapping": dev["slot_mapping"][tokens],
    }
    if groups is not None:
        part["group_start_loc"] = torch.from_numpy(groups[0].astype(np.int32)).to(device)
        part["shared_blocks"] = torch.from_numpy(groups[1].astype(np.int32)).to(device)
    return metadata_on_device(q, seq_lens[rows], groups, part)


def attend_split(backend, q: torch.Tensor, kv_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """A backend's ``attend`` over a mixed step: each part through its own path, outputs in step order."""
    split = meta.mixed_split
    out = torch.empty_like(q)
    out[split.decode_tokens] = backend.attend(q[split.decode_tokens], kv_cache, split.decode, scale)
    out[split.rest_tokens] = backend.attend(q[split.rest_tokens], kv_cache, split.rest, scale)
    return out
