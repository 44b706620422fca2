"""Our decoder + loader + torch attention against transformers' own models, on tiny random checkpoints."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from batchllm.errors import JobError
from batchllm.kernels import kv_gather
from batchllm.kernels.metadata import AttentionMetadata
from batchllm.kernels.torch_backend import TorchAttention, decode_attention, store_kv, varlen_attention
from batchllm.model.config import load_model_config, resolve_model_path
from batchllm.model.decoder import CausalLM, allocate_kv_caches, kv_bytes_per_block
from batchllm.model.loader import load_model

BLOCK_SIZE = 4
NUM_BLOCKS = 40
TINY = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.1,  # larger than default, so attention is peaked and mistakes show
)
LLAMA3_ROPE = dict(
    rope_type="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=64,  # small, so all three frequency bands occur at head_dim 16
)
VARIANTS = {
    "llama_untied": (LlamaConfig, dict(tie_word_embeddings=False), None),
    "llama3_rope_bias": (
        LlamaConfig,
        dict(
            tie_word_embeddings=True, attention_bias=True, rope_parameters=LLAMA3_ROPE | {"rope_theta": 5e5}
        ),
        None,
    ),
    "mistral_sharded": (MistralConfig, dict(tie_word_embeddings=False, sliding_window=None), "40KB"),
    "qwen2_tied_bias": (Qwen2Config, dict(tie_word_embeddings=True), None),
    "qwen3_qk_norm": (Qwen3Config, dict(tie_word_embeddings=False, head_dim=32), None),
}


def _save_tiny(tmp: Path, name: str) -> tuple[Path, torch.nn.Module]:
    config_cls, extra, shard = VARIANTS[name]
    config = config_cls(**TINY, **extra)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # HF inits norms to 1 and biases to 0; randomise them so they are tested
        for pname, p in hf.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif pname.endswith("bias"):
                p.normal_(0, 0.1)
    path = tmp / name
    hf.save_pretrained(path, safe_serialization=True, **({"max_shard_size": shard} if shard else {}))
    return path, hf


@pytest.fixture(scope="module", params=list(VARIANTS))
def tiny(request, tmp_path_factory) -> tuple[Path, torch.nn.Module, CausalLM]:
    path, hf = _save_tiny(tmp_path_factory.mktemp("models"), request.param)
    config = load_model_config(path)
    return path, hf, load_model(path, config, torch.float32, torch.device("cpu"))


@dataclass
class Seq:
    tokens: list[int]
    blocks: list[int]
    cached: int = 0


class PagedRun:
    """Drives our model step by step through a paged KV cache, with shuffled block ids."""

    def __init__(self, model: CausalLM, seed: int = 0) -> None:
        self.model = model
        self.caches = allocate_kv_caches(
            model.config, NUM_BLOCKS, BLOCK_SIZE, torch.float32, torch.device("cpu")
        )
        self.free = torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(seed)).tolist()

    def add(self, tokens: list[int], max_len: int) -> Seq:
        n = math.ceil(max_len / BLOCK_SIZE)
        blocks, self.free = self.free[:n], self.free[n:]
        return Seq(list(tokens), blocks)

    def step(self, seqs: list[Seq], query_lens: list[int]) -> torch.Tensor:  # [T, vocab] logits
        meta, ids, positions = make_meta(seqs, query_lens)
        with torch.no_grad():
            hidden = self.model(ids, positions, self.caches, meta, TorchAttention())
        for s, n in zip(seqs, query_lens, strict=True):
            s.cached += n
        return self.model.compute_logits(hidden)


def make_meta(seqs: list[Seq], query_lens: list[int]) -> tuple[AttentionMetadata, torch.Tensor, torch.Tensor]:
    ids, positions, slots = [], [], []
    for s, n in zip(seqs, query_lens, strict=True):
        for p in range(s.cached, s.cached + n):
            ids.append(s.tokens[p])
            positions.append(p)
            slots.append(s.blocks[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE)
    seq_lens = [s.cached + n for s, n in zip(seqs, query_lens, strict=True)]
    width = max(len(s.blocks) for s in seqs)
    tables = [s.blocks + [0] * (width - len(s.blocks)) for s in seqs]
    meta = AttentionMetadata(
        query_start_loc=torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor(tables, dtype=torch.int32),
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_lens_cpu=tuple(query_lens),
        seq_lens_cpu=tuple(seq_lens),
    )
    return meta, torch.tensor(ids), torch.tensor(positions)


def hf_logits(hf: torch.nn.Module, tokens: list[int]) -> torch.Tensor:  # [len, vocab]
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].float()


def _random_tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, TINY["vocab_size"], (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_prefill_then_paged_decode_match_transformers(tiny):
    _, hf, model = tiny
    run = PagedRun(model)
    prompts = [_random_tokens(n, seed) for n, seed in ((5, 1), (9, 2), (3, 3))]
    extra = [_random_tokens(4, seed) for seed in (4, 5, 6)]
    seqs = [run.add(p + e, len(p) + len(e)) for p, e in zip(prompts, extra, strict=True)]
    prefill = run.step(seqs, [len(p) for p in prompts]).split([len(p) for p in prompts])
    decoded = [run.step(seqs, [1, 1, 1]) for _ in range(4)]
    for i, s in enumerate(seqs):
        want = hf_logits(hf, s.tokens)
        torch.testing.assert_close(prefill[i], want[: len(prompts[i])], atol=1e-4, rtol=1e-4)
        got = torch.stack([step[i] for step in decoded])
        torch.testing.assert_close(got, want[len(prompts[i]) :], atol=1e-4, rtol=1e-4)


def test_chunked_prefill_in_mixed_batch_matches_one_shot(tiny):
    _, hf, model = tiny
    run = PagedRun(model, seed=1)
    long, short = _random_tokens(11, 7), _random_tokens(6, 8)
    a, b = run.add(long, 11), run.add(short, 6)
    first = run.step([a, b], [6, 5])  # a: first chunk; b: all but its last token
    second = run.step([a, b], [5, 1])  # a: rest, at context 6 (mid-block); b: one decode token, mixed in
    got_a = torch.cat([first[:6], second[:5]])
    one_shot = PagedRun(model, seed=2)
    want_a = one_shot.step([one_shot.add(long, 11)], [11])
    torch.testing.assert_close(got_a, want_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_a, hf_logits(hf, long), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(second[5], hf_logits(hf, short)[-1], atol=1e-4, rtol=1e-4)


def test_greedy_tokens_equal_transformers_generate(tiny):
    _, hf, model = tiny
    prompt = _random_tokens(7, 9)
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        want = hf.generate(
            torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None
        )[0, len(prompt) :].tolist()
    run = PagedRun(model)
    seq = run.add(prompt, len(prompt) + 8)
    logits = run.step([seq], [len(prompt)])[-1:]
    for _ in range(8):
        seq.tokens.append(int(logits[-1].argmax()))
        logits = run.step([seq], [1])
    assert seq.tokens[len(prompt) :] == want


def test_config_fields(tiny):
    path, hf, model = tiny
    config = model.config
    assert config.architecture == hf.config.architectures[0]
    assert config.head_dim == (getattr(hf.config, "head_dim", None) or 16)
    assert config.num_params == sum(p.numel() for n, p in hf.named_parameters() if not n.endswith("bias"))
    assert hash(config) == hash(load_model_config(path))


def test_llama3_rope_and_eos_from_generation_config(tmp_path):
    path, _ = _save_tiny(tmp_path, "llama3_rope_bias")
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9], "bos_token_id": 1}))
    config = load_model_config(path)
    assert config.rope_type == "llama3" and config.rope_theta == 5e5
    assert config.rope_params["original_max_position_embeddings"] == 64
    assert config.eos_token_ids == (7, 9)
    assert config.attention_bias and config.o_proj_bias and config.tie_word_embeddings


def test_old_style_rope_scaling_keys(tmp_path):
    raw = dict(TINY, architectures=["LlamaForCausalLM"], model_type="llama", rope_theta=123.0, eos_token_id=2)
    raw["rope_scaling"] = dict(LLAMA3_ROPE)
    tmp_path.joinpath("config.json").write_text(json.dumps(raw))
    config = load_model_config(tmp_path)
    assert config.rope_theta == 123.0 and config.rope_type == "llama3"
    assert config.eos_token_ids == (2,)


def test_unsupported_architecture_names_supported_ones(tmp_path):
    GPT2Config(n_layer=1, n_embd=32, n_head=2, architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path)
    with pytest.raises(JobError, match="unsupported architecture GPT2LMHeadModel.*LlamaForCausalLM.*Qwen3"):
        load_model_config(tmp_path)


def test_unsupported_rope_type(tmp_path):
    rope = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4, "original_max_position_embeddings": 64}
    LlamaConfig(**TINY, rope_parameters=rope, architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path)
    with pytest.raises(JobError, match="yarn.*llama3"):
        load_model_config(tmp_path)


def test_missing_config_and_weights(tmp_path):
    with pytest.raises(JobError, match="no config.json"):
        load_model_config(tmp_path)
    path, _ = _save_tiny(tmp_path, "llama_untied")
    config = load_model_config(path)
    weights = load_file(path / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, path / "model.safetensors")
    with pytest.raises(JobError, match="missing weights: model.layers.1.mlp.up_proj.weight"):
        load_model(path, config, torch.float32, torch.device("cpu"))
    (path / "model.safetensors").unlink()
    with pytest.raises(JobError, match="no .safetensors weights"):
        load_model(path, config, torch.float32, torch.device("cpu"))


def test_resolve_model_path(tmp_path, monkeypatch):
    assert resolve_model_path(str(tmp_path)) == tmp_path
    with pytest.raises(JobError, match="does not exist"):
        resolve_model_path(str(tmp_path / "nope"))

    def offline(**kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr("huggingface_hub.snapshot_download", offline)
    with pytest.raises(JobError, match="not available locally and could not be downloaded.*unreachable"):
        resolve_model_path("org/model")


def test_dummy_load_gives_finite_logits(tmp_path):
    path, _ = _save_tiny(tmp_path, "qwen3_qk_norm")
    (path / "model.safetensors").unlink()  # dummy must not read weights
    config = load_model_config(path)
    model = load_model(path, config, torch.bfloat16, torch.device("cpu"), dummy=True)
    caches = allocate_kv_caches(config, 8, BLOCK_SIZE, torch.bfloat16, torch.device("cpu"))
    run = PagedRun(model)
    run.caches = caches
    seqs = [Seq(_random_tokens(6, 1), [3, 5]), Seq(_random_tokens(3, 2), [0])]
    logits = run.step(seqs, [6, 3])
    assert logits.shape == (9, config.vocab_size) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert kv_bytes_per_block(config, 16, torch.bfloat16) == 2 * 2 * 16 * 2 * 32 * 2


def test_batched_decode_path_equals_general_path(monkeypatch):
    """70 decode rows of varied lengths: the padded fast path, in row chunks, equals per-sequence SDPA."""
    gen = torch.Generator().manual_seed(0)
    num_seqs, kv_heads, heads, head_dim = 70, 2, 6, 8
    k_cache = torch.randn(400, BLOCK_SIZE, kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(400, BLOCK_SIZE, kv_heads, head_dim, generator=gen)
    lens = torch.randint(1, 20, (num_seqs,), generator=gen).tolist()
    blocks = torch.randperm(400, generator=gen).tolist()
    seqs = [Seq([0] * n, blocks[5 * i : 5 * i + 5], cached=n - 1) for i, n in enumerate(lens)]
    meta, _, _ = make_meta(seqs, [1] * num_seqs)
    q = torch.randn(num_seqs, heads, head_dim, generator=gen)
    k, v = torch.randn(2, num_seqs, kv_heads, head_dim, generator=gen)
    store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    want = varlen_attention(q, k_cache, v_cache, meta, 0.3)
    monkeypatch.setattr(kv_gather, "GATHER_ELEMENTS", 3000)  # forces several row chunks
    torch.testing.assert_close(decode_attention(q, k_cache, v_cache, meta, 0.3), want)
    assert k_cache.view(-1, kv_heads, head_dim)[meta.slot_mapping].equal(k)
