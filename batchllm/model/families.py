"""Per-family parts of a model config beyond the Llama shape: experts, Gemma's extras, sliding windows.

Each reader takes the transformers config object and returns a frozen summary, or raises a one-line
JobError for a feature batchllm does not implement: a config is never run with a feature ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from batchllm.errors import JobError

MOE_ARCHITECTURES = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")
GEMMA_ARCHITECTURES = ("Gemma3ForCausalLM",)
SUPPORTED_ACTIVATIONS = ("silu", "swish", "gelu_pytorch_tanh")
# These read `layer_types`; Mistral, Mixtral and Qwen3-MoE apply `sliding_window` to every layer.
_LAYER_TYPED = ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen2MoeForCausalLM", "Gemma3ForCausalLM")
_LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class MoEConfig:
    """A sparse MLP: each token goes through its ``top_k`` of ``num_experts`` SwiGLU experts."""

    num_experts: int
    top_k: int
    intermediate_size: int  # of one expert
    norm_topk_prob: bool  # renormalise the top-k probabilities to sum to 1
    sparse_layers: tuple[int, ...]  # layers with the sparse MLP; the others have a dense one
    shared_expert_size: int = 0  # Qwen2-MoE: a sigmoid-gated dense expert every token also takes

    def __post_init__(self) -> None:
        if not 0 < self.top_k <= self.num_experts:
            raise ValueError(f"num_experts_per_tok must be in 1..{self.num_experts}, got {self.top_k}")
        if self.intermediate_size <= 0:
            raise ValueError(f"expert intermediate size must be positive, got {self.intermediate_size}")


@dataclass(frozen=True)
class GemmaConfig:
    """Gemma 3: (1 + weight) norms, post-norms, scaled embeddings, local rope on window layers."""

    query_pre_attn_scalar: float
    local_rope_theta: float
    final_logit_softcapping: float | None

    def __post_init__(self) -> None:
        if self.query_pre_attn_scalar <= 0:
            raise ValueError(f"query_pre_attn_scalar must be positive, got {self.query_pre_attn_scalar}")


def read_moe(hf: Any, architecture: str) -> MoEConfig | None:
    if architecture not in MOE_ARCHITECTURES:
        return None
    if architecture == "MixtralForCausalLM":
        return MoEConfig(
            num_experts=hf.num_local_experts,
            top_k=hf.num_experts_per_tok,
            intermediate_size=hf.intermediate_size,
            norm_topk_prob=True,  # Mixtral always renormalises its top-k
            sparse_layers=tuple(range(hf.num_hidden_layers)),
        )
    step = hf.decoder_sparse_step
    dense = set(hf.mlp_only_layers or ())
    sparse = [i for i in range(hf.num_hidden_layers) if i not in dense and (i + 1) % step == 0]
    return MoEConfig(
        num_experts=hf.num_experts,
        top_k=hf.num_experts_per_tok,
        intermediate_size=hf.moe_intermediate_size,
        norm_topk_prob=bool(hf.norm_topk_prob),
        sparse_layers=tuple(sparse) if hf.num_experts > 0 else (),
        shared_expert_size=getattr(hf, "shared_expert_intermediate_size", 0) or 0,
    )


def read_gemma(hf: Any, architecture: str) -> GemmaConfig | None:
    if architecture not in GEMMA_ARCHITECTURES:
        return None
    if getattr(hf, "use_bidirectional_attention", False):
        raise JobError(f"{architecture} with use_bidirectional_attention=true is not supported")
    local = dict(hf.rope_parameters.get("sliding_attention") or {})
    if local.get("rope_type", "default") != "default":
        raise JobError(f"{architecture}: rope scaling on sliding-window layers is not supported")
    return GemmaConfig(
        query_pre_attn_scalar=float(hf.query_pre_attn_scalar),
        local_rope_theta=float(local.get("rope_theta", 10000.0)),
        final_logit_softcapping=getattr(hf, "final_logit_softcapping", None),
    )


def global_rope_parameters(hf: Any, architecture: str) -> dict[str, Any]:
    """The rope dict of the full-attention layers (Gemma 3 keeps one per layer type)."""
    params = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
    if architecture in GEMMA_ARCHITECTURES:
        return dict(params.get("full_attention") or {})
    return params


def read_layer_windows(hf: Any, architecture: str) -> tuple[int | None, ...]:
    """Each layer's sliding window (None: full attention), as transformers' attention applies it."""
    n = hf.num_hidden_layers
    window = getattr(hf, "sliding_window", None) or None  # Qwen2-MoE writes 0 for "none"
    if architecture not in _LAYER_TYPED:
        return (window,) * n
    types = list(getattr(hf, "layer_types", None) or ["full_attention"] * n)
    unknown = sorted(set(types) - set(_LAYER_TYPES))
    if unknown:
        raise JobError(f"{architecture}: layer type {unknown[0]!r} is not supported")
    return tuple(window if t == "sliding_attention" else None for t in types)


def check_features(hf: Any, architecture: str) -> None:
    """Raise JobError for any config feature batchllm does not implement."""
    act = getattr(hf, "hidden_activation", None) or getattr(hf, "hidden_act", "silu")
    if act not in SUPPORTED_ACTIVATIONS:
        raise JobError(
            f"unsupported activation {act!r} in {architecture}; batchllm supports "
            + ", ".join(SUPPORTED_ACTIVATIONS)
        )
    if getattr(hf, "mlp_bias", False):
        raise JobError(f"{architecture} with mlp_bias=true is not supported")
    if getattr(hf, "attn_logit_softcapping", None):
        raise JobError(f"{architecture} with attention logit soft-capping is not supported")


def hidden_activation(hf: Any) -> str:
    act = getattr(hf, "hidden_activation", None) or getattr(hf, "hidden_act", "silu")
    return "silu" if act == "swish" else str(act)
