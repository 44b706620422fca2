"""GGUF plumbing without a downloaded model: header parsing, name mapping, q/k un-permuting, refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from batchllm.errors import JobError
from batchllm.model.config import load_model_config, resolve_model_path
from batchllm.model.gguf import _unpermute, hf_tensor_name
from batchllm.model.gguf_file import find_gguf, read_header


def write_gguf(path: Path, arch: str = "llama", dtype: type = np.float32) -> Path:
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_token_list([f"t{i}" for i in range(32)])
    writer.add_eos_token_id(3)
    writer.add_tensor("token_embd.weight", np.arange(32 * 8, dtype=dtype).reshape(32, 8))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_header_and_config_from_metadata(tmp_path):
    path = write_gguf(tmp_path / "m.gguf")
    header = read_header(path)
    assert header.architecture == "llama" and header.metadata["tokenizer.ggml.tokens"] == 32
    (embed,) = header.tensors
    assert embed.name == "token_embd.weight" and embed.shape == (32, 8)
    config = load_model_config(resolve_model_path(str(tmp_path)))  # a directory holding one .gguf
    assert (config.vocab_size, config.hidden_size, config.head_dim, config.num_kv_heads) == (32, 8, 4, 1)
    assert (
        config.tie_word_embeddings
        and config.eos_token_ids == (3,)
        and config.architecture == "LlamaForCausalLM"
    )


def test_refusals_are_one_line_job_errors(tmp_path):
    with pytest.raises(JobError, match="unsupported GGUF architecture 'gpt2'"):
        load_model_config(write_gguf(tmp_path / "gpt2.gguf", arch="gpt2"))
    write_gguf(tmp_path / "other.gguf")
    with pytest.raises(JobError, match="several .gguf files"):
        find_gguf(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    assert find_gguf(tmp_path) is None  # a Hugging Face directory wins
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(JobError, match="cannot read GGUF file"):
        read_header(tmp_path / "bad.gguf")


def test_names_map_to_hf():
    assert hf_tensor_name("blk.3.attn_q.weight") == "model.layers.3.self_attn.q_proj.weight"
    assert hf_tensor_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert hf_tensor_name("output.weight") == "lm_head.weight"
    assert hf_tensor_name("rope_freqs.weight") is None


def test_unpermute_inverts_llama_cpp_permute():
    heads, head_dim, hidden = 3, 8, 5
    weight = torch.randn(heads * head_dim, hidden)
    # llama.cpp's convert_hf_to_gguf.py permute: rows [heads, 2, half] -> [heads, half, 2]
    permuted = weight.reshape(heads, 2, head_dim // 2, hidden).swapaxes(1, 2).reshape(weight.shape)
    assert torch.equal(_unpermute(permuted, heads), weight)
