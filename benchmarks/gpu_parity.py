"""GPU correctness checks, each PASS / FAIL / SKIP with its figures, for benchmarks/gpu_check.sh.

    python benchmarks/gpu_parity.py --out parity.json          # one H100/H200, about a minute
    python benchmarks/gpu_parity.py --dry-run --out dry.json   # CPU plumbing: tiny shapes, Triton interpreter

Sections:
  attention  bf16 kernels vs torch SDPA over the same KV gathered dense, at Llama-3.1-8B (32 q / 8 kv heads)
             and Qwen2.5-7B (28 / 4) shapes, head dim 128: prefill over a cached shared prefix, per-row
             paged decode, prefix-aware decode, and the log-sum-exp merge of two halves of the KV
  fused_ops  the fused RMSNorm (+ residual add, Gemma's 1 + w) and RoPE + KV store vs their torch
             references at the same shapes
  fused_e2e  batchllm end to end, fused ops on vs off (BATCHLLM_FUSED_OPS): float32 tiny dummy model,
             greedy outputs token-identical
  cuda_graph batchllm end to end with CUDA-graph decode (engine/cuda_graphs.py, Triton backend) vs
             eager (--no-cuda-graphs), bf16, token-identical
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

if "--dry-run" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

import torch.nn.functional as F  # noqa: E402

MODELS = {"llama-3.1-8b": (32, 8), "qwen2.5-7b": (28, 4)}  # q heads, kv heads; head dim 128
HEAD_DIM, BLOCK, TOL = 128, 16, 2e-2  # bf16 keeps 8 bits: one rounding is at most 0.4% of a value
E2E_TOKENS = 8
GRAPH_FIELDS = ("cuda_graphs", "cuda_graph", "use_cuda_graphs", "enforce_eager")


@dataclasses.dataclass(frozen=True)
class Sizes:
    rows: int  # rows of one shared-prefix group
    prefix: int  # shared prefix tokens (a block multiple)
    own: int  # each row's own tokens after it
    query: int  # new tokens per row in the prefill check
    hidden: int  # norm width


FULL = Sizes(rows=64, prefix=2048, own=128, query=128, hidden=4096)
DRY = Sizes(rows=2, prefix=32, own=8, query=4, hidden=64)


def _batch(s: Sizes, kv_heads: int, query_len: int, dev: str, dtype: torch.dtype):
    """Paged caches for ``s.rows`` rows = the shared prefix + own tokens, the last ``query_len`` new."""
    from batchllm.kernels.metadata import AttentionMetadata, DecodeGroups

    prefix_blocks, own_blocks = s.prefix // BLOCK, -(-s.own // BLOCK)
    shape = (prefix_blocks + s.rows * own_blocks, BLOCK, kv_heads, HEAD_DIM)
    k_cache, v_cache = (torch.randn(shape, device=dev).to(dtype) for _ in range(2))
    own = torch.arange(s.rows * own_blocks, device=dev).view(s.rows, own_blocks) + prefix_blocks
    tables = torch.cat([torch.arange(prefix_blocks, device=dev).expand(s.rows, -1), own], 1).to(torch.int32)
    seq_len = s.prefix + s.own
    i32 = {"device": dev, "dtype": torch.int32}
    groups = DecodeGroups(torch.tensor([0, s.rows], **i32), torch.tensor([prefix_blocks], **i32), s.rows)
    meta = AttentionMetadata(
        query_start_loc=torch.arange(s.rows + 1, **i32) * query_len,
        seq_lens=torch.full((s.rows,), seq_len, **i32),
        block_tables=tables.contiguous(),
        slot_mapping=torch.zeros(s.rows * query_len, device=dev, dtype=torch.int64),
        max_query_len=query_len,
        max_seq_len=seq_len,
        query_lens_cpu=(query_len,) * s.rows,
        seq_lens_cpu=(seq_len,) * s.rows,
        decode_groups=groups if query_len == 1 else None,
    )
    return k_cache, v_cache, meta


def _dense(cache: torch.Tensor, meta, seq_len: int) -> torch.Tensor:
    """[rows, kv_heads, seq_len, head_dim]: each row's KV through its block table."""
    return cache[meta.block_tables.long()].flatten(1, 2)[:, :seq_len].transpose(1, 2)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_len: int) -> torch.Tensor:
    """q [rows * query_len, heads, D] over dense k/v, causal at the end: -> [rows * query_len, heads, D]."""
    rows, seq_len = k.shape[0], k.shape[2]
    qd = q.view(rows, query_len, q.shape[1], HEAD_DIM).transpose(1, 2)
    last = seq_len - query_len + torch.arange(query_len, device=q.device)
    mask = torch.arange(seq_len, device=q.device)[None, :] <= last[:, None]
    k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))  # GQA, any torch
    out = F.scaled_dot_product_attention(
        qd.float(), k.float(), v.float(), attn_mask=mask, scale=HEAD_DIM**-0.5
    )
    return out.transpose(1, 2).reshape(q.shape)


def check_attention(s: Sizes, dev: str, dtype: torch.dtype) -> dict:
    from batchllm.kernels.decode_attention import paged_decode_attention
    from batchllm.kernels.prefill_attention import prefill_attention
    from batchllm.kernels.prefix_decode_attention import prefix_decode_attention

    errors = {}
    for model, (heads, kv_heads) in MODELS.items():
        k_cache, v_cache, meta = _batch(s, kv_heads, s.query, dev, dtype)
        k, v = _dense(k_cache, meta, meta.max_seq_len), _dense(v_cache, meta, meta.max_seq_len)
        q = torch.randn(s.rows * s.query, heads, HEAD_DIM, device=dev).to(dtype)
        ours = prefill_attention(q, k_cache, v_cache, meta, HEAD_DIM**-0.5)
        errors[f"{model}/prefill"] = _err(ours, _sdpa(q, k, v, s.query))
        k_cache, v_cache, meta = _batch(s, kv_heads, 1, dev, dtype)
        q = torch.randn(s.rows, heads, HEAD_DIM, device=dev).to(dtype)
        ref = _sdpa(q, _dense(k_cache, meta, meta.max_seq_len), _dense(v_cache, meta, meta.max_seq_len), 1)
        errors[f"{model}/decode"] = _err(
            paged_decode_attention(q, k_cache, v_cache, meta, HEAD_DIM**-0.5), ref
        )
        prefix = prefix_decode_attention(q, k_cache, v_cache, meta, HEAD_DIM**-0.5)
        errors[f"{model}/prefix_decode"] = _err(prefix, ref)
        errors[f"{model}/merge"] = _merge_error(q, k_cache, v_cache, meta, ref)
    return _verdict(errors)


def _merge_error(q, k_cache, v_cache, meta, ref: torch.Tensor) -> float:
    """The merge kernel over two halves of each row's KV (float32 reference states) vs the whole."""
    from batchllm.kernels.merge import merge_state_stack
    from batchllm.kernels.reference import attention_state_ref

    seq_len, half = meta.max_seq_len, meta.max_seq_len // 2
    k, v = _dense(k_cache, meta, seq_len), _dense(v_cache, meta, seq_len)  # [rows, kv, S, D]
    states = [[], []]
    for row in range(q.shape[0]):
        kr, vr = k[row].transpose(0, 1), v[row].transpose(0, 1)  # [S, kv, D]
        for part, span in enumerate((slice(0, half), slice(half, seq_len))):
            states[part].append(attention_state_ref(q[row : row + 1], kr[span], vr[span], HEAD_DIM**-0.5))
    outs = torch.stack([torch.cat([o for o, _ in part]) for part in states])
    lses = torch.stack([torch.cat([lse for _, lse in part]) for part in states])
    return _err(merge_state_stack(outs.to(q.dtype), lses).out, ref)


def check_fused_ops(s: Sizes, dev: str, dtype: torch.dtype) -> dict:
    from batchllm.kernels.reference import add_rms_norm_ref, rms_norm_ref, rope_store_kv_ref
    from batchllm.kernels.rms_norm import add_rms_norm, rms_norm
    from batchllm.kernels.rope_store import rope_store_kv

    errors = {}
    x, d = (torch.randn(s.rows * s.query, s.hidden, device=dev).to(dtype) for _ in range(2))
    w = torch.randn(s.hidden, device=dev).to(dtype)
    for offset in (False, True):
        name = "offset" if offset else "plain"
        errors[f"rms_norm/{name}"] = _err(rms_norm(x, w, 1e-6, offset), rms_norm_ref(x, w, 1e-6, offset))
        normed, summed = add_rms_norm(x, d, w, 1e-6, offset)
        ref_normed, ref_summed = add_rms_norm_ref(x, d, w, 1e-6, offset)
        errors[f"add_rms_norm/{name}"] = max(_err(normed, ref_normed), _err(summed, ref_summed))
    for model, (heads, kv_heads) in MODELS.items():
        k_cache, v_cache, meta = _batch(s, kv_heads, s.query, dev, dtype)
        tokens = s.rows * s.query
        meta_slots = torch.randperm(k_cache.shape[0] * BLOCK, device=dev)[:tokens]
        q, k, v = (
            torch.randn(tokens, n, HEAD_DIM, device=dev).to(dtype) for n in (heads, kv_heads, kv_heads)
        )
        angles = torch.rand(tokens, HEAD_DIM // 2, device=dev) * 100
        cos, sin = (torch.cat([f(angles)] * 2, -1).to(dtype) for f in (torch.cos, torch.sin))
        k_ref, v_ref = k_cache.clone(), v_cache.clone()
        q_ref = rope_store_kv_ref(q, k, v, cos, sin, k_ref, v_ref, meta_slots)
        q_rot = rope_store_kv(q, k, v, cos, sin, k_cache, v_cache, meta_slots)
        errors[f"{model}/rope_store_kv"] = max(_err(q_rot, q_ref), _err(k_cache, k_ref), _err(v_cache, v_ref))
    return _verdict(errors)


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest difference, absolute where |b| <= 1 and relative above (bf16 rounds relatively)."""
    a, b = a.float(), b.float()
    return ((a - b).abs() / b.abs().clamp(min=1.0)).max().item() if a.numel() else 0.0


def _verdict(errors: dict[str, float]) -> dict:
    worst = max(errors.values())
    return {"status": "pass" if worst <= TOL else "fail", "max_abs_error": errors, "tolerance": TOL}


# ---- end to end ----


def _run_job(model_dir: Path, workdir: Path, dtype: str, texts: list[str], **engine) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from batchllm.config import EngineConfig, JobSpec, SamplingParams
    from batchllm.job.run import run

    workdir.mkdir(parents=True)
    pq.write_table(pa.table({"text": texts}), workdir / "in.parquet")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = EngineConfig(device=device, dtype=dtype, load_format="dummy", **engine)
    sampling = SamplingParams(max_new_tokens=E2E_TOKENS, ignore_eos=True)
    out = workdir / "out.parquet"
    src = workdir / "in.parquet"
    job = JobSpec(input=src, model=str(model_dir), output=out, sampling=sampling, engine=cfg, progress=False)
    torch.manual_seed(0)  # dummy weights: the same model in every run
    run(job, fresh=True)
    return pq.read_table(workdir / "out.parquet").column("output").to_pylist()


def _tiny_model(root: Path, rows: int) -> tuple[Path, list[str]]:
    """bench_gpu's dry-run model shape (dummy weights) with its word tokenizer, and shared-prefix texts."""
    sys.path.insert(0, str(Path(__file__).parent))
    import bench_gpu

    config = bench_gpu.model_config("llama-3.1-8b", dry=True)
    model_dir = bench_gpu.make_model_dir(root / "model", config)
    spec = bench_gpu.WorkloadSpec(
        groups=2, per_group=max(1, rows // 2), shared=40, distinct=6, output=E2E_TOKENS
    )
    prompts, order = bench_gpu.make_prompts(spec, config["vocab_size"], seed=0)
    return model_dir, bench_gpu.texts_of(
        prompts, order, spec.rows, bench_gpu.token_words(config["vocab_size"])
    )


def _same_outputs(a: list[str], b: list[str]) -> dict:
    same = sum(x == y for x, y in zip(a, b, strict=True))
    return {"status": "pass" if same == len(a) else "fail", "rows": len(a), "rows_identical": same}


def check_fused_e2e(root: Path, rows: int) -> dict:
    model_dir, texts = _tiny_model(root, rows)
    outputs = {}
    backend = "triton" if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1" else "auto"
    for setting in ("0", "1"):
        os.environ["BATCHLLM_FUSED_OPS"] = setting
        try:
            outputs[setting] = _run_job(
                model_dir, root / f"fused{setting}", "float32", texts, attention_backend=backend
            )
        finally:
            os.environ.pop("BATCHLLM_FUSED_OPS")
    return _same_outputs(outputs["0"], outputs["1"])


def check_cuda_graph(root: Path, rows: int) -> dict:
    from batchllm.config import EngineConfig

    field = next((f.name for f in dataclasses.fields(EngineConfig) if f.name in GRAPH_FIELDS), None)
    if field is None:
        return {"status": "skip", "reason": f"EngineConfig has none of {GRAPH_FIELDS} yet"}
    if not torch.cuda.is_available():
        return {"status": "skip", "reason": "needs CUDA", "switch": field}
    model_dir, texts = _tiny_model(root, rows)
    eager_value = field == "enforce_eager"
    triton = {"attention_backend": "triton"}  # graphs run with the Triton backend only
    eager = _run_job(model_dir, root / "eager", "bfloat16", texts, **{field: eager_value}, **triton)
    graphs = _run_job(model_dir, root / "graphs", "bfloat16", texts, **{field: not eager_value}, **triton)
    return _same_outputs(eager, graphs) | {"switch": field}


SECTIONS: dict[str, Callable[[Sizes, str, torch.dtype, Path], dict]] = {
    "attention": lambda s, dev, dt, root: check_attention(s, dev, dt),
    "fused_ops": lambda s, dev, dt, root: check_fused_ops(s, dev, dt),
    "fused_e2e": lambda s, dev, dt, root: check_fused_e2e(root, s.rows),
    "cuda_graph": lambda s, dev, dt, root: check_cuda_graph(root, s.rows),
}


def run_sections(names: list[str], sizes: Sizes, dev: str) -> dict:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            torch.manual_seed(0)
            t0 = time.perf_counter()
            try:
                results[name] = SECTIONS[name](sizes, dev, torch.bfloat16, Path(tmp) / name)
            except Exception as exc:  # one section failing must not lose the others
                tail = traceback.format_exc().splitlines()[-6:]
                results[name] = {
                    "status": "fail",
                    "error": f"{type(exc).__name__}: {exc}"[:500],
                    "trace": tail,
                }
            results[name]["seconds"] = round(time.perf_counter() - t0, 2)
            print(f"{results[name]['status'].upper():4s}  {name}  ({results[name]['seconds']} s)", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="JSON path")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreter")
    args = p.parse_args(argv)
    names = [n for n in args.sections.split(",") if n]
    if not names or any(n not in SECTIONS for n in names):
        p.error(f"--sections must be a comma-separated subset of {', '.join(SECTIONS)}")
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_parity needs CUDA (or --dry-run for a CPU plumbing check)")
        return 0
    dev = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    results = run_sections(names, DRY if args.dry_run else FULL, dev)
    gpu = torch.cuda.get_device_name() if dev == "cuda" else "cpu (dry run)"
    report = {"gpu": gpu, "dry_run": args.dry_run, "torch": torch.__version__, "sections": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if any(r["status"] == "fail" for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
