"""K/V blocks gathered out of the paged cache into memory that is reused from call to call.

The torch attention paths read a row's context as one contiguous [positions, kv_heads, head_dim]
slab: they copy its blocks out of the paged cache first. Copying into a fresh tensor each time costs
more than the copy itself on a CPU (the allocator hands back new pages, which the kernel zeroes on
first touch), and it happens in every layer of every step. ``KVGather`` keeps one buffer per name and
grows it only when a step needs more, so steady-state steps copy into memory that is already mapped.
``index_select`` along the block axis copies whole blocks (a contiguous run each), which is several
times faster than advanced indexing's element-by-element gather.
"""

from __future__ import annotations

import torch

# Elements of K (or V) gathered at once: callers split their rows into chunks of at most this much.
GATHER_ELEMENTS = 1 << 24
_GROWTH = 1.25  # a bigger buffer gets this much headroom, so slowly growing steps rarely reallocate


class KVGather:
    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def blocks(self, name: str, cache: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        """``cache[tables]``: [*tables.shape, block_size, kv_heads, head_dim], in the buffer ``name``.
        The result is valid until the next call with the same name."""
        flat = tables.reshape(-1)
        block_shape = cache.shape[1:]
        need = flat.numel() * cache[0].numel()
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < need or buf.dtype != cache.dtype or buf.device != cache.device:
            buf = torch.empty(int(need * _GROWTH) + 1, dtype=cache.dtype, device=cache.device)
            self._buffers[name] = buf
        out = buf[:need].view(flat.numel(), *block_shape)
        torch.index_select(cache, 0, flat, out=out)
        return out.view(*tables.shape, *block_shape)

    def context(self, name: str, cache: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        """Each table row's blocks as one run of positions, heads first: [rows, kv_heads, W * block_size,
        head_dim] (a strided view of the buffer)."""
        return self.blocks(name, cache, tables).flatten(1, 2).transpose(1, 2)


def row_chunks(num_rows: int, elements_per_row: int) -> list[slice]:
    """Consecutive row ranges whose gathered K (or V) stays within ``GATHER_ELEMENTS``."""
    step = max(1, GATHER_ELEMENTS // max(elements_per_row, 1))
    return [slice(lo, min(lo + step, num_rows)) for lo in range(0, num_rows, step)]
