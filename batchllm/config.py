"""Frozen, validated settings: what to sample, how the engine runs, and the whole job."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int = 0
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if any(s == "" for s in self.stop):
            raise ValueError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class EngineConfig:
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    block_size: int = 16
    token_budget: int = 8192  # new tokens per step, prefill and decode together
    max_running: int = 1024  # rows decoding at once
    kv_cache_memory: str | None = None  # "4GB", "0.9" (fraction of free GPU memory), None: default
    attention_backend: str = "auto"  # auto | torch | triton
    prefix_sharing: bool = True
    deterministic: bool = False  # batch-invariant attention (torch backend): see kernels/torch_chunked.py
    load_format: str = "auto"  # auto | dummy

    def __post_init__(self) -> None:
        _check_choice("device", self.device, ("auto", "cpu", "cuda"))
        _check_choice("dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        _check_choice("attention_backend", self.attention_backend, ("auto", "torch", "triton"))
        _check_choice("load_format", self.load_format, ("auto", "dummy"))
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.token_budget < 1:
            raise ValueError(f"token_budget must be >= 1, got {self.token_budget}")
        if self.max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {self.max_running}")
        if self.kv_cache_memory is not None:
            parse_memory(self.kv_cache_memory)


@dataclass(frozen=True)
class JobSpec:
    input: Path
    model: str
    output: Path
    format: str | None = None  # parquet | jsonl; None: from the extension
    column: str = "text"
    id_column: str | None = None
    keep_columns: tuple[str, ...] = ()
    prefix: str | None = None  # the prefix text itself, already read from --prefix FILE
    chat: bool = False
    sampling: SamplingParams = field(default_factory=SamplingParams)
    engine: EngineConfig = field(default_factory=EngineConfig)
    report: Path | None = None
    progress: bool = True
    run_dir: Path | None = None  # None: <output>.run/ next to the output
    window_rows: int = 0  # rows planned and run together (one prefix tree each); 0: sized to memory
    checkpoint_rows: int = 10_000  # commit finished rows at least this often...
    checkpoint_seconds: float = 60.0  # ...and at least this often
    workers: int | None = None  # engine workers; None: 1, or every GPU of the Ray cluster at ray_address
    ray_address: str | None = None  # join this Ray cluster ("auto", "ray://host:10001"); None: local

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.ray_address is not None and not self.ray_address.strip():
            raise ValueError("ray-address must not be empty")
        if self.format is not None:
            _check_choice("format", self.format, ("parquet", "jsonl"))
        if self.checkpoint_rows < 1 or self.checkpoint_seconds <= 0:
            raise ValueError("checkpoint-rows must be >= 1 and checkpoint-seconds > 0")
        if self.window_rows < 0:
            raise ValueError(f"window must be >= 1 rows (or 0 to size it to memory), got {self.window_rows}")
        if self.window_rows == 0:
            object.__setattr__(self, "window_rows", default_window_rows())
        if self.run_dir is None:
            object.__setattr__(self, "run_dir", self.output.with_name(self.output.name + ".run"))


def parse_memory(text: str) -> float:
    """Bytes for "4GB" / "512MB"; a fraction in (0, 1] for "0.9" (of free GPU memory)."""
    t = text.strip().upper()
    units = {"GB": 1 << 30, "GIB": 1 << 30, "MB": 1 << 20, "MIB": 1 << 20, "G": 1 << 30, "M": 1 << 20}
    for unit, scale in units.items():
        if t.endswith(unit):
            try:
                value = float(t[: -len(unit)])
            except ValueError:
                break
            if value <= 0:
                break
            return value * scale
    else:
        try:
            value = float(t)
        except ValueError:
            value = -1.0
        if 0 < value <= 1:
            return value
    raise ValueError(f"kv-cache-memory must look like '4GB', '512MB' or a fraction like '0.9', got {text!r}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


BYTES_PER_WINDOW_ROW = 16 << 10  # text, token ids and plan of one ~1k-token row, with headroom


def default_window_rows() -> int:
    """Rows per window when none is given: a quarter of the memory available now, at 16 KiB a row,
    between 10,000 and 1,000,000 rows."""
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not POSIX
        available = 4 << 30
    return max(10_000, min(1_000_000, available // 4 // BYTES_PER_WINDOW_ROW))
