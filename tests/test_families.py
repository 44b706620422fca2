"""Mixture-of-experts and Gemma 3 families, and sliding-window attention, against transformers.

Parity is token-identical greedy output of `batchllm run` against transformers' own generate() on
tiny random float32 models (prompts several times longer than the windows), plus the window and
fused-MoE kernels against their torch references (Triton in its interpreter on CPU).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_kernels import BF16, F32, assert_close, make_batch
from test_run import expected, got, run_job
from transformers import Gemma3TextConfig, Qwen2Config

from batchllm.errors import JobError
from batchllm.kernels.decode_attention import paged_decode_attention
from batchllm.kernels.fused_moe import fused_moe
from batchllm.kernels.prefill_attention import prefill_attention
from batchllm.kernels.reference import fused_moe_ref, paged_attention_ref
from batchllm.kernels.torch_backend import TorchAttention
from batchllm.kernels.triton_backend import TritonAttention
from batchllm.model.config import load_model_config
from batchllm.model.moe import grouped_experts_torch, route
from batchllm.testing.tiny import make_tiny_model

WINDOW = 8
# name -> (family, make_tiny_model arguments). Windows are far shorter than the prompts (~70 tokens).
SPECS: dict[str, tuple[str, dict]] = {
    "qwen3_moe": ("qwen3_moe", {"seed": 10, "head_dim": 32}),
    "qwen2_moe": ("qwen2_moe", {"seed": 11, "tie_word_embeddings": True}),
    "mixtral": ("mixtral", {"seed": 12, "num_kv_heads": 1}),
    "gemma3": (
        "gemma3",
        {
            "seed": 13,
            "num_layers": 3,
            "tie_word_embeddings": True,
            "config_overrides": {
                "sliding_window": WINDOW,
                "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
                "final_logit_softcapping": 5.0,
            },
        },
    ),
    "mistral_window": ("mistral", {"seed": 14, "config_overrides": {"sliding_window": WINDOW}}),
    "qwen2_window": (
        "qwen2",
        {
            "seed": 15,
            "config_overrides": {
                "use_sliding_window": True,
                "sliding_window": WINDOW,
                "max_window_layers": 1,
            },
        },
    ),
}


@pytest.fixture(scope="module")
def family_models(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("family_models")
    return {
        name: make_tiny_model(root / name, family, tokenizer_dir=tokenizer_dir, **kwargs)
        for name, (family, kwargs) in SPECS.items()
    }


@pytest.mark.parametrize("name", list(SPECS))
def test_greedy_matches_transformers(tmp_path, family_models, make_rows, name):
    texts = make_rows(num_groups=2, rows_per_group=3, duplicates=1, seed=21)
    rows, report = run_job(tmp_path, family_models[name], texts, "--max-new-tokens", "8")
    assert got(rows) == expected(family_models[name], texts, max_new=8)
    assert report["cached_tokens"] > 0  # shared prefixes were reused, windows or not


@pytest.mark.parametrize("name", ["gemma3", "mistral_window"])
def test_triton_backend_with_windows_matches_transformers(tmp_path, family_models, make_rows, name):
    texts = make_rows(num_groups=2, rows_per_group=2, seed=22, instruction_words=20)
    flags = ("--attention-backend", "triton", "--max-new-tokens", "4")
    rows, _ = run_job(tmp_path, family_models[name], texts, *flags)
    assert got(rows) == expected(family_models[name], texts, max_new=4)


def test_config_reads_family_features(family_models):
    gemma = load_model_config(family_models["gemma3"])
    assert (
        gemma.layer_windows == (WINDOW, None, WINDOW)
        and gemma.qk_norm
        and gemma.hidden_act == "gelu_pytorch_tanh"
    )
    assert gemma.gemma is not None and gemma.gemma.query_pre_attn_scalar == 24
    assert gemma.gemma.local_rope_theta != gemma.rope_theta
    assert load_model_config(family_models["qwen2_window"]).layer_windows == (None, WINDOW)
    assert load_model_config(family_models["mistral_window"]).layer_windows == (WINDOW, WINDOW)
    qwen2_moe = load_model_config(family_models["qwen2_moe"])
    assert qwen2_moe.moe is not None and qwen2_moe.moe.shared_expert_size == 128
    assert qwen2_moe.attention_bias and not qwen2_moe.o_proj_bias
    mixtral = load_model_config(family_models["mixtral"])
    assert mixtral.moe is not None and mixtral.moe.norm_topk_prob and mixtral.moe.num_experts == 4
    assert mixtral.active_params < mixtral.num_params


@pytest.mark.parametrize("name", ["qwen3_moe", "qwen2_moe", "mixtral", "gemma3"])
def test_num_params_counts_every_weight(family_models, name):
    from hf_reference import load_hf_model

    hf = load_hf_model(family_models[name])
    want = sum(p.numel() for n, p in hf.named_parameters() if not n.endswith("bias"))
    assert load_model_config(family_models[name]).num_params == want


def _edit_config(model_dir: Path, tmp_path: Path, **changes) -> Path:
    raw = json.loads((model_dir / "config.json").read_text()) | changes
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return tmp_path


@pytest.mark.parametrize(
    ("name", "changes", "message"),
    [
        ("gemma3", {"attn_logit_softcapping": 50.0}, "soft-capping is not supported"),
        ("gemma3", {"use_bidirectional_attention": True}, "bidirectional"),
        ("mixtral", {"hidden_act": "relu"}, "unsupported activation 'relu'"),
        ("qwen2_window", {"layer_types": ["full_attention", "chunked_attention"]}, "chunked_attention"),
    ],
)
def test_unsupported_features_are_refused(family_models, tmp_path, name, changes, message):
    with pytest.raises(JobError, match=message):
        load_model_config(_edit_config(family_models[name], tmp_path, **changes))


def test_window_in_config_objects_is_applied_not_ignored(tmp_path):
    Qwen2Config(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=64,
        use_sliding_window=True, sliding_window=4, max_window_layers=0,
    ).save_pretrained(tmp_path / "q")  # fmt: skip
    assert load_model_config(tmp_path / "q").layer_windows == (4, 4)
    Gemma3TextConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=6, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, intermediate_size=64, sliding_window=5,
    ).save_pretrained(tmp_path / "g")  # fmt: skip
    assert load_model_config(tmp_path / "g").layer_windows == (5,) * 5 + (None,)


WINDOW_CASES = [
    pytest.param(dict(query_lens=[1, 5, 19], own_lens=[13, 5, 30], heads=(4, 4)), 4, id="f32-w4"),
    pytest.param(
        dict(
            query_lens=[3, 1, 17],
            own_lens=[7, 20, 17],
            paths=[(0,), (0,), (1,)],
            level_blocks=2,
            heads=(8, 2),
            block_size=16,
            dtype=BF16,
        ),
        11,
        id="bf16-w11-shared",
    ),  # fmt: skip
    pytest.param(dict(query_lens=[2, 9, 1], own_lens=[11, 9, 3], heads=(8, 1)), 1, id="f32-w1"),
]


@pytest.mark.parametrize(("case", "window"), WINDOW_CASES)
def test_windowed_prefill_matches_reference(case: dict, window: int) -> None:
    batch = make_batch(**case)
    k_cache, v_cache = batch.stored()
    want = paged_attention_ref(batch.q, (k_cache, v_cache), batch.meta, batch.scale, window)
    full = paged_attention_ref(batch.q, (k_cache, v_cache), batch.meta, batch.scale)
    assert not torch.allclose(want.float(), full.float(), atol=1e-3)  # the window matters here
    out = prefill_attention(batch.q, k_cache, v_cache, batch.meta, batch.scale, window)
    assert_close(out, want, case.get("dtype", F32))
    cache = (batch.k_cache.clone(), batch.v_cache.clone())
    torch_out = TorchAttention().forward(batch.q, batch.k, batch.v, cache, batch.meta, batch.scale, window)
    assert_close(torch_out, want, case.get("dtype", F32))


@pytest.mark.parametrize("window", [1, 6, 13])
@pytest.mark.parametrize("grouped", [False, True])
def test_windowed_decode_matches_reference(window: int, grouped: bool) -> None:
    case = dict(own_lens=[1, 5, 9, 3, 12], paths=[(0,)] * 3 + [(1,)] * 2, level_blocks=2)
    batch = make_batch(query_lens=[1] * 5, group_level=1 if grouped else 0, **case)
    k_cache, v_cache = batch.stored()
    want = paged_attention_ref(batch.q, (k_cache, v_cache), batch.meta, batch.scale, window)
    assert_close(
        paged_decode_attention(batch.q, k_cache, v_cache, batch.meta, batch.scale, window), want, F32
    )
    for backend in (TorchAttention(), TritonAttention()):
        cache = (batch.k_cache.clone(), batch.v_cache.clone())
        out = backend.forward(batch.q, batch.k, batch.v, cache, batch.meta, batch.scale, window)
        assert_close(out, want, F32)


def _moe_inputs(tokens: int, experts: int, top_k: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden, inter = 40, 24  # not multiples of the kernel's tiles
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, generator=gen) / inter**0.5).to(dtype)
    logits = torch.randn(tokens, experts, generator=gen).to(dtype)
    weights, chosen = route(logits, top_k, renormalize=True, mixtral=False)
    return x, w13, w2, weights, chosen


@pytest.mark.parametrize(
    ("tokens", "experts", "top_k", "dtype", "act"),
    [
        (1, 4, 2, F32, "silu"),
        (37, 8, 3, F32, "gelu_pytorch_tanh"),
        (20, 6, 2, BF16, "silu"),
        (5, 16, 4, F32, "silu"),
    ],
)
def test_fused_moe_matches_reference(tokens, experts, top_k, dtype, act) -> None:
    x, w13, w2, weights, chosen = _moe_inputs(tokens, experts, top_k, dtype)
    want = fused_moe_ref(x, w13, w2, weights, chosen, act)
    tol = {F32: 1e-4, BF16: 5e-2}[dtype]
    for got_ in (
        fused_moe(x, w13, w2, weights, chosen, act),
        grouped_experts_torch(x, w13, w2, weights, chosen, act),
    ):
        assert got_.dtype == dtype
        torch.testing.assert_close(got_.float(), want, atol=tol, rtol=tol)


def test_routing_follows_transformers() -> None:
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.5], [3.0, 0.0, 0.0, 2.9]])
    weights, chosen = route(logits, 2, renormalize=False, mixtral=False)
    probs = logits.softmax(-1)
    assert chosen.tolist() == [[1, 3], [0, 3]]  # each row in expert order
    torch.testing.assert_close(weights, probs.gather(1, chosen))
    weights, _ = route(logits, 2, renormalize=True, mixtral=True)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2))
    # Mixtral's "top-k of the logits, then softmax" is the same thing.
    torch.testing.assert_close(weights, logits.gather(1, chosen).softmax(-1))


def test_ignoring_the_window_would_not_match(tmp_path, family_models, make_rows, monkeypatch):
    """The parity test above can fail: with full attention, rows longer than the window differ."""
    monkeypatch.setattr("batchllm.model.families.read_layer_windows", lambda hf, arch: ())
    texts = make_rows(num_groups=2, rows_per_group=3, duplicates=1, seed=21)
    rows, _ = run_job(tmp_path, family_models["mistral_window"], texts, "--max-new-tokens", "8")
    assert got(rows) != expected(family_models["mistral_window"], texts, max_new=8)
