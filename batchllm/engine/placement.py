"""Where and how the model runs: device, dtype, attention backend and the size of the KV pool."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from batchllm.config import EngineConfig, parse_memory
from batchllm.errors import JobError
from batchllm.kernels.backend import AttentionBackend

log = logging.getLogger(__name__)

CPU_DEFAULT_KV_BYTES = 2 << 30
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype


def resolve_placement(cfg: EngineConfig) -> Placement:
    cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not cuda:
        raise JobError("--device cuda was asked for but no CUDA GPU is available")
    device = torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and cuda) else "cpu")
    if cfg.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = DTYPES[cfg.dtype]
    return Placement(device, dtype)


def make_backend(cfg: EngineConfig, device: torch.device) -> AttentionBackend:
    """auto: Triton on CUDA, torch elsewhere. Triton on CPU needs TRITON_INTERPRET=1."""
    name = cfg.attention_backend
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise JobError("--attention-backend triton on CPU needs TRITON_INTERPRET=1 in the environment")
        from batchllm.kernels.triton_backend import TritonAttention

        return TritonAttention()
    from batchllm.kernels.torch_backend import TorchAttention

    return TorchAttention()


def kv_pool_blocks(
    cfg: EngineConfig, device: torch.device, bytes_per_block: int, blocks_needed: int | None
) -> int:
    """Blocks the KV pool gets: the memory setting's worth, never more than ``blocks_needed`` (None:
    no cap). On CUDA, call it before the KV cache is allocated: it reads the free memory."""
    setting = parse_memory(cfg.kv_cache_memory) if cfg.kv_cache_memory else None
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = free * (setting if setting is not None and setting <= 1 else 0.9)
        if setting is not None and setting > 1:
            budget = setting
    else:
        budget = setting if setting is not None and setting > 1 else CPU_DEFAULT_KV_BYTES
    blocks = int(budget // bytes_per_block)
    return max(1, blocks if blocks_needed is None else min(blocks, blocks_needed))
