"""The fused small ops (RMSNorm + residual add, RoPE + KV store) against their torch references, and
the decoder with them switched on against transformers; on CPU through Triton's interpreter."""

from __future__ import annotations

import pytest
import torch
from test_families import SPECS
from test_kernels import BF16, DEVICE, F16, F32, assert_close, make_batch
from test_run import expected, got, run_job

from batchllm.kernels.reference import add_rms_norm_ref, rms_norm_ref, rope_store_kv_ref
from batchllm.kernels.rms_norm import add_rms_norm, rms_norm
from batchllm.kernels.rope_store import rope_store_kv
from batchllm.model.layers import FUSED_OPS_ENV, OffsetRMSNorm, RMSNorm, fused_ops_default, use_fused_ops
from batchllm.testing.tiny import make_tiny_model

NORM_CASES = [
    pytest.param((5, 64), F32, False, id="f32-plain"),
    pytest.param((3, 4, 80), BF16, False, id="bf16-plain-3d-npow2"),
    pytest.param((7, 96), F16, True, id="f16-offset-npow2"),
    pytest.param((4, 128), BF16, True, id="bf16-offset"),
    pytest.param((0, 64), F32, False, id="no-rows"),
]


def _randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)


@pytest.mark.parametrize(("shape", "dtype", "offset"), NORM_CASES)
def test_rms_norm_matches_reference(shape, dtype, offset):
    x, w = _randn(*shape, dtype=dtype, seed=0), _randn(shape[-1], dtype=dtype, seed=1)
    assert_close(rms_norm(x, w, 1e-6, offset), rms_norm_ref(x, w, 1e-6, offset), dtype)


@pytest.mark.parametrize(("shape", "dtype", "offset"), NORM_CASES)
def test_add_rms_norm_matches_reference_and_rounds_the_sum_as_torch(shape, dtype, offset):
    x, d = _randn(*shape, dtype=dtype, seed=2), _randn(*shape, dtype=dtype, seed=3)
    w = _randn(shape[-1], dtype=dtype, seed=4)
    normed, summed = add_rms_norm(x, d, w, 1e-5, offset)
    ref_normed, ref_summed = add_rms_norm_ref(x, d, w, 1e-5, offset)
    if dtype == BF16 and DEVICE == "cpu":  # the interpreter casts to bfloat16 by truncating, not rounding
        assert_close(summed, ref_summed, dtype)
    else:
        assert torch.equal(summed, ref_summed)  # the residual stream is bit-identical
    assert_close(normed, ref_normed, dtype)


def test_norm_refuses_mismatched_inputs():
    x = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(x, torch.zeros(4), 1e-6)
    with pytest.raises(ValueError, match="one dtype"):
        rms_norm(x, torch.zeros(8, dtype=BF16), 1e-6)
    with pytest.raises(ValueError, match="must match"):
        add_rms_norm(x, torch.zeros(2, 4), torch.zeros(8), 1e-6)


ROPE_CASES = [
    pytest.param(dict(query_lens=[1, 5, 19], own_lens=[13, 5, 30], heads=(4, 4)), id="f32-gqa1-d64"),
    pytest.param(
        dict(query_lens=[3, 1], own_lens=[9, 4], heads=(6, 2), head_dim=80, dtype=BF16), id="bf16-gqa3-d80"
    ),
    pytest.param(
        dict(query_lens=[4], own_lens=[6], heads=(8, 1), head_dim=96, dtype=F16, block_size=4),
        id="f16-mqa-d96",
    ),
    pytest.param(
        dict(query_lens=[2, 2], own_lens=[2, 7], heads=(8, 2), head_dim=128, dtype=BF16), id="bf16-d128"
    ),
]


@pytest.mark.parametrize("case", ROPE_CASES)
def test_rope_store_kv_matches_reference(case):
    b = make_batch(**case)
    tokens, head_dim = b.q.shape[0], b.q.shape[2]
    angles = _randn(tokens, head_dim // 2, dtype=F32, seed=5) * 3
    cos = torch.cat([angles.cos()] * 2, -1).to(b.q.dtype)
    sin = torch.cat([angles.sin()] * 2, -1).to(b.q.dtype)
    k_ref, v_ref = b.k_cache.clone(), b.v_cache.clone()
    q_ref = rope_store_kv_ref(b.q, b.k, b.v, cos, sin, k_ref, v_ref, b.meta.slot_mapping)
    k_cache, v_cache = b.k_cache.clone(), b.v_cache.clone()
    q_rot = rope_store_kv(b.q, b.k, b.v, cos[:, None], sin[:, None], k_cache, v_cache, b.meta.slot_mapping)
    assert_close(q_rot, q_ref, b.q.dtype)
    assert_close(k_cache, k_ref, b.q.dtype)  # rotated k in its slots, every other slot untouched
    assert torch.equal(v_cache, v_ref)


def test_switch_defaults_to_cuda_only(monkeypatch):
    monkeypatch.delenv(FUSED_OPS_ENV, raising=False)
    assert not fused_ops_default(torch.device("cpu"))
    assert fused_ops_default(torch.device("cuda"))
    monkeypatch.setenv(FUSED_OPS_ENV, "0")
    assert not fused_ops_default(torch.device("cuda"))
    monkeypatch.setenv(FUSED_OPS_ENV, "1")
    assert fused_ops_default(torch.device("cpu"))


@pytest.mark.parametrize("norm_class", [RMSNorm, OffsetRMSNorm])
def test_norm_module_fused_equals_torch_path(norm_class):
    norm = norm_class(48, 1e-6, F32, torch.device(DEVICE))
    norm.weight.copy_(_randn(48, dtype=F32, seed=6))
    x, d = _randn(5, 48, dtype=F32, seed=7), _randn(5, 48, dtype=F32, seed=8)
    use_fused_ops(norm, False)
    plain, plain_add = norm(x), norm.add_forward(x, d)
    use_fused_ops(norm, True)
    assert_close(norm(x), plain, F32)
    fused_normed, fused_sum = norm.add_forward(x, d)
    assert_close(fused_normed, plain_add[0], F32)
    assert torch.equal(fused_sum, plain_add[1])


@pytest.fixture(scope="module")
def gemma_model(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir):
    family, kwargs = SPECS["gemma3"]
    return make_tiny_model(
        tmp_path_factory.mktemp("gemma_fused"), family, tokenizer_dir=tokenizer_dir, **kwargs
    )


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_fused_decoder_matches_transformers(
    tmp_path, tiny_models, gemma_model, make_rows, monkeypatch, family
):
    """Triton backend with the fused ops on (the CUDA default) in the whole engine: qwen3 has q/k norms
    and MQA, gemma3 (1 + w) norms, sandwich norms and sliding windows."""
    monkeypatch.setenv(FUSED_OPS_ENV, "1")
    model = gemma_model if family == "gemma3" else tiny_models[family]
    texts = make_rows(num_groups=2, rows_per_group=2, seed=9, instruction_words=16)
    rows, report = run_job(tmp_path, model, texts, "--attention-backend", "triton", "--max-new-tokens", "5")
    assert got(rows) == expected(model, texts, max_new=5)
    assert report["cached_tokens"] > 0
