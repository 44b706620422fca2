"""Host arrays to the device: one copy per dtype per step, through pinned buffers used in turn.

A step's buffer is written again two steps later; by then the engine has synchronised on the step
in between (its sampled tokens), so the earlier copy out of it has finished. On the CPU the arrays
are wrapped as tensors without a copy.
"""

from __future__ import annotations

import numpy as np
import torch

TURNS = 2


class Staging:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._buffers: dict[np.dtype, list[torch.Tensor]] = {}
        self._turn = 0

    def send(self, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """The same arrays as device tensors (non-blocking on CUDA)."""
        if self.device.type != "cuda":
            return {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in arrays.items()}
        self._turn = (self._turn + 1) % TURNS
        out: dict[str, torch.Tensor] = {}
        for dtype in {a.dtype for a in arrays.values()}:
            names = [name for name, a in arrays.items() if a.dtype == dtype]
            out.update(self._send_one_dtype(names, [arrays[name] for name in names]))
        return out

    def _send_one_dtype(self, names: list[str], arrays: list[np.ndarray]) -> dict[str, torch.Tensor]:
        sizes = [a.size for a in arrays]
        host = self._buffer(arrays[0].dtype, sum(sizes))
        flat = host.numpy()
        offset = 0
        for a, size in zip(arrays, sizes):
            flat[offset : offset + size] = a.reshape(-1)
            offset += size
        device = host[:offset].to(self.device, non_blocking=True)
        pieces = torch.split(device, sizes)
        return {name: p.view(a.shape) for name, p, a in zip(names, pieces, arrays)}

    def _buffer(self, dtype: np.dtype, size: int) -> torch.Tensor:
        turns = self._buffers.setdefault(dtype, [torch.empty(0)] * TURNS)
        if turns[self._turn].numel() < size:
            torch_dtype = torch.from_numpy(np.empty(0, dtype=dtype)).dtype
            size = max(size, 2 * turns[self._turn].numel())
            turns[self._turn] = torch.empty(size, dtype=torch_dtype).pin_memory()
        return turns[self._turn]
