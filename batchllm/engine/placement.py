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


def backend_name(cfg: EngineConfig, device: torch.device) -> str:
    """auto: Triton on CUDA, torch elsewhere."""
    if cfg.attention_backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return cfg.attention_backend


def resolved_settings(cfg: EngineConfig) -> dict:
    """What ``auto`` becomes here: the device, dtype and attention backend a run gets, and whether
    its attention is batch-invariant. All of them change a row's bits."""
    place = resolve_placement(cfg)
    return {
        "device": place.device.type,
        "dtype": str(place.dtype).removeprefix("torch."),
        "attention_backend": backend_name(cfg, place.device),
        "deterministic": cfg.deterministic,
    }


def make_backend(cfg: EngineConfig, device: torch.device) -> AttentionBackend:
    """Triton on CPU needs TRITON_INTERPRET=1."""
    name = backend_name(cfg, device)
    if name == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise JobError("--attention-backend triton on CPU needs TRITON_INTERPRET=1 in the environment")
        from batchllm.kernels.triton_backend import TritonAttention

        return TritonAttention()
    from batchllm.kernels.torch_backend import TorchAttention

    return TorchAttention(deterministic=cfg.deterministic)


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
