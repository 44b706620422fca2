"""Compile every Triton kernel ahead of time for sm_90 (H100/H200), no GPU needed.

    python tests/aot_kernels.py [--arch 90] [--jobs N]     # one JSON line per compile, then a summary

Each case is a kernel with the constexprs its launcher picks at a production shape (bf16, head dims
64/80/96/128, GQA 1-8, block size 16) and the specialisations Triton's launcher makes at run time
(16-byte aligned pointers, unit last strides). Compiled with Triton's own compiler for a CUDA target and
its bundled ptxas; a compile error or shared memory beyond the H100's 227 KB per block is a failure.
Must run WITHOUT TRITON_INTERPRET (tests/test_aot_compile.py starts it in a clean subprocess).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from batchllm.kernels import decode_attention as dec
from batchllm.kernels import fused_moe, kv_store, merge, rms_norm, rope_store
from batchllm.kernels import prefill_attention as pre
from batchllm.kernels import prefix_decode_attention as pdec

H100_SHARED_BYTES = 227 * 1024  # the most dynamic shared memory one block may have on sm_90
BLOCK_SIZE = 16  # EngineConfig's default KV block size
DT = "*bf16"
# (head_dim, num_heads, num_kv_heads): Llama-3.1-8B, Qwen2.5-7B, and the other head dims and GQA ends.
ATTENTION_SHAPES = [(128, 32, 8), (128, 28, 4), (64, 8, 8), (80, 32, 4), (96, 24, 8), (128, 16, 2)]
ATTENTION_PTRS = {"out": DT, "q": DT, "k_cache": DT, "v_cache": DT, "seq_lens": "*i32",
                  "block_tables": "*i32", "query_start_loc": "*i32", "group_start_loc": "*i32",
                  "shared_blocks": "*i32", "row_shared_blocks": "*i32", "part_out": "*fp32",
                  "part_lse": "*fp32"}  # fmt: skip
FLOATS = {"qk_scale", "eps"}


def pad(n: int) -> int:
    return max(pre.MIN_DOT, triton.next_power_of_2(n))


def attention_cases(head_dim: int, heads: int, kv_heads: int) -> list[tuple]:
    """(kernel, pointer types, constexprs) as the three attention launchers choose them."""
    group = heads // kv_heads
    common = {
        "QUERY_GROUP": group, "HEAD_DIM": head_dim, "D_PAD": pad(head_dim), "BLOCK_N": pre.BLOCK_N,
        "BLOCK_SIZE": BLOCK_SIZE, "F32_DOT": False, "stride_cd": 1,
    }  # fmt: skip
    block_m = max(pre.PREFILL_BLOCK_M, triton.next_power_of_2(group))
    shared_m = max(pdec.SHARED_BLOCK_M, triton.next_power_of_2(group))
    prefill = {"TOKENS_PER_TILE": block_m // group, "BLOCK_M": block_m}
    prefix = {"ROWS_PER_TILE": shared_m // group, "SHARED_M": shared_m, "OWN_M": pad(group)}
    return [
        (pre._prefill_kernel, ATTENTION_PTRS, common | prefill),
        (dec._decode_kernel, ATTENTION_PTRS, common | {"OWN_M": pad(group)}),
        (pdec._prefix_decode_kernel, ATTENTION_PTRS, common | prefix),
    ]


def kv_cases(head_dim: int, heads: int, kv_heads: int) -> list[tuple]:
    """RoPE + KV store and the plain KV store."""
    ptrs = {"q_out": DT, "q": DT, "k": DT, "v": DT, "cos": DT, "sin": DT, "k_cache": DT, "v_cache": DT,
            "slot_mapping": "*i64"}  # fmt: skip
    p2 = triton.next_power_of_2
    rope = {
        "NUM_HEADS": heads, "NUM_KV_HEADS": kv_heads, "HALF": head_dim // 2, "QH_PAD": p2(heads),
        "KH_PAD": p2(kv_heads), "HALF_PAD": p2(head_dim // 2), "BLOCK_SIZE": BLOCK_SIZE, "stride_cd": 1,
    }  # fmt: skip
    store = {
        "NUM_KV_HEADS": kv_heads, "HEAD_DIM": head_dim, "H_PAD": p2(kv_heads), "D_PAD": p2(head_dim),
        "BLOCK_SIZE": BLOCK_SIZE, "stride_cd": 1,
    }  # fmt: skip
    return [(rope_store._rope_store_kernel, ptrs, rope), (kv_store._store_kv_kernel, ptrs, store)]


def other_cases() -> list[tuple]:
    """Norms (Llama-8B and Qwen-7B hidden sizes, Gemma's offset, a q/k norm), merge, fused MoE."""
    cases = [c for shape in ((128, 32, 8), (128, 28, 4), (80, 32, 4)) for c in kv_cases(*shape)]
    norm_ptrs = {"out": DT, "summed": DT, "x": DT, "delta": DT, "weight": DT}
    for hidden, delta, offset in ((4096, True, False), (3584, False, False), (2560, True, True), (128, 0, 0)):
        block = triton.next_power_of_2(hidden)
        consts = {"N": hidden, "BLOCK": block, "HAS_DELTA": bool(delta), "OFFSET": bool(offset)}
        cases.append(
            (rms_norm._rms_norm_kernel, norm_ptrs, consts, {"num_warps": rms_norm.norm_warps(block)})
        )
    merge_ptrs = {"out": DT, "lse_out": "*fp32", "states": "*fp32", "lses": "*fp32"}
    for head_dim in (128, 64, 80):
        consts = {"HEAD_DIM": head_dim, "D_PAD": triton.next_power_of_2(head_dim), "BLOCK_H": 16}
        cases.append((merge._merge_kernel, merge_ptrs, consts))
    moe_ptrs = {
        "out": DT,
        "a": DT,
        "b": DT,
        "slot_pair": "*i32",
        "tile_expert": "*i32",
        "pair_weight": "*fp32",
    }
    tiles = {
        "BLOCK_M": fused_moe.MOE_BLOCK_M,
        "BLOCK_N": fused_moe.MOE_BLOCK_N,
        "BLOCK_K": fused_moe.MOE_BLOCK_K,
    }
    for row_div, scale in ((8, False), (1, True)):  # gate/up (rows are tokens, top-8), down (scaled pairs)
        consts = {"ROW_DIV": row_div, "SCALE": scale, "F32_DOT": False, **tiles}
        cases.append((fused_moe._expert_matmul_kernel, moe_ptrs, consts))
    return cases


def all_cases() -> list[tuple]:
    cases = [c for shape in ATTENTION_SHAPES for c in attention_cases(*shape)] + other_cases()
    return [c if len(c) == 4 else (*c, {}) for c in cases]


def compile_case(index: int, arch: int) -> dict:
    """Compile case ``index`` of ``all_cases()``; its name, constexprs, shared bytes, registers or error."""
    kernel, ptrs, consts, options = all_cases()[index]
    name = kernel.fn.__name__
    signature, attrs = {}, {}
    for i, arg in enumerate(kernel.arg_names):
        if arg in consts:
            signature[arg] = "constexpr"
        elif arg in ptrs:
            signature[arg], attrs[(i,)] = ptrs[arg], [["tt.divisibility", 16]]
        else:
            signature[arg] = "fp32" if arg in FLOATS else "i32"
    result = {"kernel": name, "constexprs": {k: v for k, v in consts.items() if k.isupper()}, **options}
    target = GPUTarget("cuda", arch, 32)
    opts = triton.compiler.make_backend(target).parse_options(options)
    t0 = time.perf_counter()
    try:
        src = ASTSource(kernel, signature, constexprs=consts, attrs=attrs)
        compiled = triton.compile(src, target=target, options=opts.__dict__)
    except Exception as exc:  # a compile error is this case's result, not the run's end
        while exc.__cause__ is not None:  # the innermost error says what is wrong
            exc = exc.__cause__
        return result | {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[-1500:]}"}
    result["seconds"] = round(time.perf_counter() - t0, 2)
    result["shared_bytes"] = compiled.metadata.shared
    return result | cubin_resources(compiled.asm["cubin"])


def cubin_resources(cubin: bytes) -> dict:
    """Registers and spills per thread, from cuobjdump (bundled with Triton), where it runs."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.is_file():
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True).stdout
    found = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", text))
    return {"registers": int(found["REG"])} | (
        {"local_bytes": int(found["LOCAL"])} if "LOCAL" in found else {}
    )


def ptxas_missing() -> str | None:
    """Why nothing can compile here, or None."""
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if os.environ.get("TRITON_PTXAS_PATH") or bundled.is_file() or shutil.which("ptxas"):
        return None
    return f"no ptxas (looked for {bundled}, TRITON_PTXAS_PATH and PATH)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print(json.dumps({"skip": "TRITON_INTERPRET=1: kernels are interpreted, nothing compiles"}))
        return 2
    if (why := ptxas_missing()) is not None:
        print(json.dumps({"skip": why}))
        return 0
    n = len(all_cases())
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(compile_case, range(n), [args.arch] * n))
    bad = [r for r in results if "error" in r or r.get("shared_bytes", 0) > H100_SHARED_BYTES]
    for r in results:
        print(json.dumps(r))
    most = max((r.get("shared_bytes", 0) for r in results), default=0)
    regs = max((r.get("registers", 0) for r in results), default=0)
    print(
        json.dumps(
            {"summary": {"cases": n, "failed": len(bad), "max_shared_bytes": most, "max_registers": regs}}
        )
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
