"""Building blocks of the decoder: RMSNorm, rotary embedding, attention, SwiGLU MLP.

Parameters are allocated empty (no init pass) on the target device; the loader fills them.
q/k/v live in one fused weight and gate/up in another, so each is a single matmul.
Numerics follow transformers' Llama/Qwen code op for op, so float32 results match it closely.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from batchllm.kernels import rms_norm as norm_kernels
from batchllm.kernels.backend import AttentionBackend, KVCache
from batchllm.kernels.metadata import AttentionMetadata
from batchllm.kernels.rope_store import rope_store_kv
from batchllm.model.config import ModelConfig

FUSED_OPS_ENV = "BATCHLLM_FUSED_OPS"


def fused_ops_default(device: torch.device) -> bool:
    """Whether layers start on the Triton fused small ops (RMSNorm + residual add, RoPE + KV store).

    ``BATCHLLM_FUSED_OPS=0``: never; ``=1``: on every device (on CPU only under TRITON_INTERPRET=1, for
    tests); unset: on CUDA only, so the CPU path stays plain torch."""
    setting = os.environ.get(FUSED_OPS_ENV, "")
    if setting in ("0", "1"):
        return setting == "1"
    return torch.device(device).type == "cuda"


def use_fused_ops(model: nn.Module, on: bool) -> None:
    """Switch every layer of ``model`` that has fused ops to them (on) or to the torch path (off)."""
    for module in model.modules():
        if isinstance(module, RMSNorm | Attention):
            module.fused = on


def empty_param(*shape: int, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm: normalise in float32, cast back, then scale by the weight."""
    input_dtype = x.dtype
    x = x.to(torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    return weight * x.to(input_dtype)


class RMSNorm(nn.Module):
    offset = False  # scale by (1 + weight): Gemma

    def __init__(self, size: int, eps: float, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.weight = empty_param(size, dtype=dtype, device=device)
        self.eps = eps
        self.fused = fused_ops_default(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return norm_kernels.rms_norm(x, self.weight, self.eps, self.offset)
        return self.torch_norm(x)

    def torch_norm(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(norm(x + delta), x + delta)``: the residual add and the norm after it, fused if on."""
        if self.fused:
            return norm_kernels.add_rms_norm(x, delta, self.weight, self.eps, self.offset)
        summed = x + delta
        return self.torch_norm(summed), summed


class OffsetRMSNorm(RMSNorm):
    """Gemma's RMSNorm: scales by (1 + weight), in float32, and casts back only at the end."""

    offset = True

    def torch_norm(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.float())).type_as(x)


def make_norm(config: ModelConfig, size: int, dtype: torch.dtype, device: torch.device) -> RMSNorm:
    norm_class = OffsetRMSNorm if config.gemma is not None else RMSNorm
    return norm_class(size, config.rms_norm_eps, dtype, device)


def rope_inv_freq(config: ModelConfig, local: bool = False) -> torch.Tensor:
    """[head_dim // 2] float32 inverse frequencies, computed as transformers does (on CPU).

    ``local``: Gemma's sliding-window layers, plain rope at their own theta."""
    dim = config.head_dim
    theta = config.gemma.local_rope_theta if local and config.gemma else config.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if local:
        return inv_freq
    params = config.rope_params
    if config.rope_type == "linear":
        return inv_freq / params["factor"]
    if config.rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, params)
    return inv_freq


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict) -> torch.Tensor:
    factor = params["factor"]
    low_freq_factor = params["low_freq_factor"]
    high_freq_factor = params["high_freq_factor"]
    old_context_len = params["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are divided by factor, short ones kept, the band between interpolated.
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_freq_llama)


def rope_cos_sin(
    positions: torch.Tensor,  # [T] int64
    inv_freq: torch.Tensor,  # [head_dim // 2] float32
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:  # each [T, 1, head_dim], broadcast over heads
    freqs = positions[:, None].float() * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; neox-style rotation of the two halves."""
    return (x * cos) + (rotate_half(x) * sin)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device, layer: int = 0) -> None:
        super().__init__()
        self.config = config
        self.window = config.window(layer)
        c = config
        self.qkv_weight = empty_param(c.q_size + 2 * c.kv_size, c.hidden_size, dtype=dtype, device=device)
        self.qkv_bias = (
            empty_param(c.q_size + 2 * c.kv_size, dtype=dtype, device=device) if c.attention_bias else None
        )
        self.o_weight = empty_param(c.hidden_size, c.q_size, dtype=dtype, device=device)
        self.o_bias = empty_param(c.hidden_size, dtype=dtype, device=device) if c.o_proj_bias else None
        self.q_norm = make_norm(c, c.head_dim, dtype, device) if c.qk_norm else None
        self.k_norm = make_norm(c, c.head_dim, dtype, device) if c.qk_norm else None
        self.scale = (c.gemma.query_pre_attn_scalar if c.gemma else c.head_dim) ** -0.5
        self.fused = fused_ops_default(device)

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        cos_sin: tuple[torch.Tensor, torch.Tensor],  # each [T, 1, head_dim]
        kv_cache: KVCache,
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:  # [T, hidden]
        c = self.config
        num_tokens = x.shape[0]
        qkv = F.linear(x, self.qkv_weight, self.qkv_bias)
        q, k, v = qkv.split([c.q_size, c.kv_size, c.kv_size], dim=-1)
        q = q.view(num_tokens, c.num_heads, c.head_dim)
        k = k.view(num_tokens, c.num_kv_heads, c.head_dim)
        v = v.view(num_tokens, c.num_kv_heads, c.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        out = self._rope_attend(q, k, v, cos_sin, kv_cache, meta, backend)
        return F.linear(out.reshape(num_tokens, c.q_size), self.o_weight, self.o_bias)

    def _rope_attend(
        self,
        q: torch.Tensor,  # [T, heads, head_dim]
        k: torch.Tensor,  # [T, kv_heads, head_dim]
        v: torch.Tensor,  # [T, kv_heads, head_dim]
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        kv_cache: KVCache,
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:  # [T, heads, head_dim]
        """Rotate q and k, store k and v, attend. Fused, when on and the backend can attend over
        K/V already stored (``attend``): one kernel rotates and stores, k never lands on its own."""
        cos, sin = cos_sin
        attend = getattr(backend, "attend", None)
        if self.fused and attend is not None:
            q = rope_store_kv(q, k, v, cos, sin, *kv_cache, meta.slot_mapping)
            return attend(q, kv_cache, meta, self.scale, window=self.window)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return backend.forward(q, k, v, kv_cache, meta, self.scale, window=self.window)


def activation(name: str, gate: torch.Tensor) -> torch.Tensor:
    """The gate's activation: silu (SwiGLU) or tanh-approximated gelu (Gemma's GeGLU)."""
    return F.gelu(gate, approximate="tanh") if name == "gelu_pytorch_tanh" else F.silu(gate)


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)), gate and up fused into one weight."""

    def __init__(
        self, config: ModelConfig, dtype: torch.dtype, device: torch.device, inter: int | None = None
    ) -> None:
        super().__init__()
        inter, hidden = inter or config.intermediate_size, config.hidden_size
        self.act = config.hidden_act
        self.gate_up_weight = empty_param(2 * inter, hidden, dtype=dtype, device=device)
        self.down_weight = empty_param(hidden, inter, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden] -> [T, hidden]
        gate, up = F.linear(x, self.gate_up_weight).chunk(2, dim=-1)
        return F.linear(activation(self.act, gate) * up, self.down_weight)
