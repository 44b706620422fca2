"""What batchllm needs to know about a model: a frozen summary of its HF config, and where it lives."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchllm.errors import JobError
from batchllm.model import families
from batchllm.model.families import GemmaConfig, MoEConfig
from batchllm.model.gguf_file import find_gguf, is_gguf
from batchllm.model.raw_config import raw_config

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "MixtralForCausalLM",
    "Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM",
    "Gemma3ForCausalLM",
)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_ARCH_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}
_QK_NORM = ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Gemma3ForCausalLM")
_DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]

# Sorted (key, value) pairs of the HF rope dict, rope_theta left out: hashable, so ModelConfig is too.
RopeScaling = tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None  # None: plain rope ("default")
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # bias on q/k/v
    qk_norm: bool  # Qwen3: per-head RMSNorm on q and k before rope
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    o_proj_bias: bool = False  # Llama/Qwen3 attention_bias also covers o_proj; Qwen2's bias does not
    initializer_range: float = 0.02
    hidden_act: str = "silu"  # or "gelu_pytorch_tanh" (Gemma)
    layer_windows: tuple[int | None, ...] = ()  # per layer: sliding window, None = full; () = all full
    moe: MoEConfig | None = None
    gemma: GemmaConfig | None = None

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise JobError(_unsupported(self.architecture))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise JobError(
                f"unsupported rope scaling type {self.rope_type!r}; batchllm supports: "
                + ", ".join(SUPPORTED_ROPE_TYPES)
            )
        if self.layer_windows and len(self.layer_windows) != self.num_layers:
            raise ValueError(
                f"layer_windows has {len(self.layer_windows)} entries for {self.num_layers} layers"
            )
        if any(w is not None and w < 1 for w in self.layer_windows):
            raise JobError(f"sliding window must be >= 1 token, got {self.layer_windows}")

    def window(self, layer: int) -> int | None:
        """Layer ``layer``'s sliding window: a token attends to itself and the window - 1 before it."""
        return self.layer_windows[layer] if self.layer_windows else None

    def is_sparse(self, layer: int) -> bool:
        return self.moe is not None and layer in self.moe.sparse_layers

    @property
    def rope_type(self) -> str:
        return str(self.rope_params.get("rope_type", "default"))

    @property
    def rope_params(self) -> dict[str, Any]:
        return dict(self.rope_scaling or ())

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def num_params(self) -> int:
        """Approximate parameter count (norms included, biases left out), every expert counted."""
        return self._params(active=False)

    @property
    def active_params(self) -> int:
        """Parameters one token runs through: for a sparse model only its top-k experts count."""
        return self._params(active=True)

    def _params(self, active: bool) -> int:
        attn = self.hidden_size * (2 * self.q_size + 2 * self.kv_size)
        dense_mlp = 3 * self.hidden_size * self.intermediate_size
        norms = (4 if self.gemma else 2) * self.hidden_size + (2 * self.head_dim if self.qk_norm else 0)
        mlps = sum(
            _sparse_mlp_params(self.moe, self.hidden_size, active)
            if self.moe and self.is_sparse(i)
            else dense_mlp
            for i in range(self.num_layers)
        )
        embed = self.vocab_size * self.hidden_size
        lm_head = 0 if self.tie_word_embeddings else embed
        return embed + lm_head + self.num_layers * (attn + norms) + mlps + self.hidden_size


def _sparse_mlp_params(moe: MoEConfig, hidden: int, active: bool) -> int:
    experts = moe.top_k if active else moe.num_experts
    shared = 3 * moe.shared_expert_size + 1 if moe.shared_expert_size else 0
    return hidden * (3 * experts * moe.intermediate_size + moe.num_experts + shared)


def load_model_config(path: Path) -> ModelConfig:
    """Read ``path/config.json`` (and ``generation_config.json`` if present) into a ModelConfig."""
    if is_gguf(path):
        from batchllm.model.gguf import load_gguf_config

        return load_gguf_config(path)
    architecture, hf = _hf_config(path)
    families.check_features(hf, architecture)
    theta, scaling = _rope(families.global_rope_parameters(hf, architecture), getattr(hf, "rope_theta", None))
    is_qwen2 = architecture in ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM")
    qwen2_bias = bool(getattr(hf, "qkv_bias", True))  # Qwen2-MoE names it; Qwen2 always has it
    bias = qwen2_bias if is_qwen2 else bool(getattr(hf, "attention_bias", False))
    return ModelConfig(
        architecture=architecture,
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads,
        num_kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
        rms_norm_eps=float(hf.rms_norm_eps),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=hf.max_position_embeddings,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        attention_bias=bias,
        qk_norm=architecture in _QK_NORM,
        eos_token_ids=_eos_token_ids(path, hf),
        bos_token_id=getattr(hf, "bos_token_id", None),
        o_proj_bias=bias and not is_qwen2,
        initializer_range=float(getattr(hf, "initializer_range", None) or 0.02),
        hidden_act=families.hidden_activation(hf),
        layer_windows=families.read_layer_windows(hf, architecture),
        moe=families.read_moe(hf, architecture),
        gemma=families.read_gemma(hf, architecture),
    )


def _hf_config(path: Path) -> tuple[str, Any]:
    """(architecture, transformers config) of a model directory; JobError when it is not one we run."""
    raw = _read_json(path / "config.json", required=True)
    architecture = _architecture(raw)
    plain = raw_config(raw, architecture)  # the common dense families, without importing transformers
    if plain is not None:
        return architecture, plain
    try:
        from transformers import AutoConfig

        return architecture, AutoConfig.from_pretrained(str(path))
    except Exception as e:  # transformers raises many types for a bad config
        raise JobError(f"cannot read model config in {path}: {_one_line(e)}") from e


def resolve_model_path(name_or_path: str) -> Path:
    """A local model directory as is (a .gguf file, or a directory holding only one, as that file);
    anything else is a hub id, downloaded (or found in the HF cache)."""
    local = Path(name_or_path).expanduser()
    gguf = find_gguf(local)
    if gguf is not None:
        return gguf
    if local.is_dir():
        return local
    if name_or_path.startswith(("/", "./", "../", "~")):
        raise JobError(f"model directory {name_or_path} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=name_or_path, allow_patterns=_DOWNLOAD_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated, bad id: all mean "no model"
        raise JobError(
            f"model {name_or_path!r} is not available locally and could not be downloaded: {_one_line(e)}"
        ) from e


def _architecture(raw: dict[str, Any]) -> str:
    names = raw.get("architectures") or []
    if not names and raw.get("model_type") in _ARCH_BY_MODEL_TYPE:
        return _ARCH_BY_MODEL_TYPE[raw["model_type"]]
    if len(names) != 1 or names[0] not in SUPPORTED_ARCHITECTURES:
        raise JobError(_unsupported(", ".join(names) or f"of model_type {raw.get('model_type')!r}"))
    return names[0]


def _rope(params: dict[str, Any], old_theta: float | None) -> tuple[float, RopeScaling | None]:
    """(rope_theta, frozen scaling) from transformers-5 ``rope_parameters`` or old ``rope_scaling``."""
    theta = params.pop("rope_theta", None) or old_theta or 10000.0
    if "type" in params:  # very old configs name it "type"
        params.setdefault("rope_type", params.pop("type"))
    if params.get("rope_type", "default") == "default":
        return float(theta), None
    return float(theta), tuple(sorted((k, _freeze(v)) for k, v in params.items()))


def _freeze(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _eos_token_ids(path: Path, hf: Any) -> tuple[int, ...]:
    gen = _read_json(path / "generation_config.json", required=False)
    eos = gen.get("eos_token_id") if "eos_token_id" in gen else getattr(hf, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(int(e) for e in eos) if isinstance(eos, list | tuple) else (int(eos),)


def _read_json(file: Path, required: bool) -> dict[str, Any]:
    if not file.is_file():
        if required:
            raise JobError(f"no {file.name} in {file.parent}: not a Hugging Face model directory")
        return {}
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise JobError(f"cannot read {file}: {_one_line(e)}") from e


def _unsupported(name: str) -> str:
    return f"unsupported architecture {name}; batchllm supports: {', '.join(SUPPORTED_ARCHITECTURES)}"


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"
