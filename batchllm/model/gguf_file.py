"""A GGUF file's header (metadata and tensor table) and its tensors, dequantized to float32.

The header is parsed here with ``struct`` rather than by ``gguf.GGUFReader``, which builds a numpy
view per vocabulary string and takes seconds on a 49k-token vocabulary; string arrays (the
vocabulary, the merges) are skipped and kept only as their length. Tensor data is memory-mapped
and dequantized one tensor at a time (``gguf_dequant``).

Layout (GGUF v2/v3, little-endian):
    "GGUF" | u32 version | u64 tensor_count | u64 kv_count
    kv_count   x (string key | u32 type | value)
    tensor_count x (string name | u32 n_dims | u64 dims[n_dims] (fastest first) | u32 type | u64 offset)
    padding to general.alignment | tensor data (offsets relative to here)
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from batchllm.errors import JobError

if TYPE_CHECKING:  # reading a GGUF's config and tokenizer needs no torch (``batchllm plan``)
    import torch

GGUF_SUFFIX = ".gguf"
# metadata value type -> struct format (8 is a string, 9 an array)
_SCALARS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}  # fmt: skip
_STRING, _ARRAY = 8, 9
_DEFAULT_ALIGNMENT = 32


@dataclass(frozen=True)
class GgufTensor:
    name: str
    shape: tuple[int, ...]  # torch order: slowest dimension first
    ggml_type: int
    offset: int  # from the start of the file


@dataclass(frozen=True)
class GgufHeader:
    path: Path
    metadata: dict[str, Any]  # string arrays are kept as their length only
    tensors: tuple[GgufTensor, ...]

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))


def find_gguf(path: Path) -> Path | None:
    """The .gguf file ``path`` names: the file itself, or the only one in a dir without config.json."""
    if path.is_file():
        return path if path.suffix == GGUF_SUFFIX else None
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    files = sorted(path.glob(f"*{GGUF_SUFFIX}"))
    if len(files) > 1:
        names = ", ".join(f.name for f in files)
        raise JobError(f"{path} holds several .gguf files ({names}); pass one of them as --model")
    return files[0] if files else None


def is_gguf(path: Path) -> bool:
    return path.suffix == GGUF_SUFFIX and path.is_file()


def read_header(path: Path) -> GgufHeader:
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(path, buf)
    except (OSError, ValueError, struct.error, UnicodeDecodeError) as e:
        raise JobError(f"cannot read GGUF file {path}: {type(e).__name__}: {e}") from e


def _parse(path: Path, buf: mmap.mmap) -> GgufHeader:
    if buf[:4] != b"GGUF":
        raise ValueError("no GGUF magic bytes at the start")
    version, tensor_count, kv_count = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} (batchllm reads versions 2 and 3)")
    pos, metadata = 24, {}
    for _ in range(kv_count):
        key, pos = _string(buf, pos)
        (kind,) = struct.unpack_from("<I", buf, pos)
        metadata[key], pos = _value(buf, pos + 4, kind)
    entries = []
    for _ in range(tensor_count):
        name, pos = _string(buf, pos)
        (ndim,) = struct.unpack_from("<I", buf, pos)
        dims = struct.unpack_from(f"<{ndim}Q", buf, pos + 4)
        ggml_type, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * ndim)
        pos += 4 + 8 * ndim + 12
        entries.append((name, tuple(reversed(dims)), ggml_type, offset))
    align = int(metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
    data_start = -(-pos // align) * align
    tensors = tuple(GgufTensor(n, s, t, data_start + o) for n, s, t, o in entries)
    return GgufHeader(path, metadata, tensors)


def _string(buf: mmap.mmap, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", buf, pos)
    end = pos + 8 + length
    return buf[pos + 8 : end].decode("utf-8"), end


def _value(buf: mmap.mmap, pos: int, kind: int) -> tuple[Any, int]:
    if kind in _SCALARS:
        fmt = _SCALARS[kind]
        return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
    if kind == _STRING:
        return _string(buf, pos)
    if kind != _ARRAY:
        raise ValueError(f"unknown metadata value type {kind}")
    item, count = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if item in _SCALARS:
        fmt = _SCALARS[item]
        return list(struct.unpack_from(f"<{count}{fmt[1]}", buf, pos)), pos + count * struct.calcsize(fmt)
    if item != _STRING:
        raise ValueError(f"metadata array of type {item} (only scalars and strings are read)")
    for _ in range(count):  # walk past the strings: the vocabulary is the tokenizer's business
        (length,) = struct.unpack_from("<Q", buf, pos)
        pos += 8 + length
    return count, pos


def quant_type_name(ggml_type: int) -> str:
    from gguf import GGMLQuantizationType

    try:
        return GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"type {ggml_type}"


def check_dequantizable(header: GgufHeader) -> None:
    """Fail before loading anything if some tensor's quant type has no dequantizer."""
    for ggml_type in sorted({t.ggml_type for t in header.tensors}):
        try:
            _dequantize(np.zeros(_row_bytes(ggml_type, _block_size(ggml_type)), np.uint8), ggml_type)
        except (KeyError, ValueError, NotImplementedError) as e:
            raise JobError(
                f"{header.path.name}: quantization {quant_type_name(ggml_type)} is not supported "
                f"(gguf {_gguf_version()} cannot dequantize it)"
            ) from e


class TensorData:
    """The file memory-mapped copy-on-write (so numpy views are writable without copying)."""

    def __init__(self, path: Path) -> None:
        self._data = np.memmap(path, dtype=np.uint8, mode="c")

    def dequantized(self, tensor: GgufTensor) -> torch.Tensor:  # tensor.shape, float (not always float32)
        from batchllm.model.gguf_dequant import dequantize

        rows, cols = tensor.shape[:-1], tensor.shape[-1]
        row_bytes = _row_bytes(tensor.ggml_type, cols)
        raw = self._data[tensor.offset : tensor.offset + prod(rows) * row_bytes]
        return dequantize(raw.reshape(*rows, row_bytes), tensor.ggml_type, tensor.shape)


def _dequantize(raw: np.ndarray, ggml_type: int) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    return dequantize(raw, GGMLQuantizationType(ggml_type))


def _block_size(ggml_type: int) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    return GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)][0]


def _row_bytes(ggml_type: int, cols: int) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    if cols % block:
        raise JobError(f"a row of {cols} values is not a whole number of {block}-value quant blocks")
    return cols // block * type_size


def _gguf_version() -> str:
    from importlib.metadata import version

    return version("gguf")
