"""What batchllm needs to know about a model: a frozen summary of its HF config, and where it lives."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchllm.errors import JobError
from batchllm.model.gguf_file import find_gguf, is_gguf

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_ARCH_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
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
    checkpoint_dtype: str | None = None  # e.g. "bfloat16", as the checkpoint declares it

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
        """Approximate parameter count (norms included, biases left out), for FLOP estimates."""
        attn = self.hidden_size * (2 * self.q_size + 2 * self.kv_size)
        mlp = 3 * self.hidden_size * self.intermediate_size
        norms = 2 * self.hidden_size + (2 * self.head_dim if self.qk_norm else 0)
        per_layer = attn + mlp + norms
        embed = self.vocab_size * self.hidden_size
        lm_head = 0 if self.tie_word_embeddings else embed
        return embed + lm_head + self.num_layers * per_layer + self.hidden_size


def load_model_config(path: Path) -> ModelConfig:
    """Read ``path/config.json`` (and ``generation_config.json`` if present) into a ModelConfig."""
    if is_gguf(path):
        from batchllm.model.gguf import load_gguf_config

        return load_gguf_config(path)
    raw = _read_json(path / "config.json", required=True)
    architecture = _architecture(raw)
    try:
        from transformers import AutoConfig

        hf = AutoConfig.from_pretrained(str(path))
    except Exception as e:  # transformers raises many types for a bad config
        raise JobError(f"cannot read model config in {path}: {_one_line(e)}") from e
    _check_supported_features(hf, architecture)
    theta, scaling = _rope(hf)
    is_qwen2 = architecture == "Qwen2ForCausalLM"
    bias = True if is_qwen2 else bool(getattr(hf, "attention_bias", False))
    dtype = getattr(hf, "dtype", None) or getattr(hf, "torch_dtype", None)
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
        qk_norm=architecture == "Qwen3ForCausalLM",
        eos_token_ids=_eos_token_ids(path, hf),
        bos_token_id=getattr(hf, "bos_token_id", None),
        o_proj_bias=bias and not is_qwen2,
        initializer_range=float(getattr(hf, "initializer_range", None) or 0.02),
        checkpoint_dtype=None if dtype is None else str(dtype).removeprefix("torch."),
    )


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


def _check_supported_features(hf: Any, architecture: str) -> None:
    act = getattr(hf, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise JobError(f"unsupported activation {act!r} in {architecture}; batchllm supports silu only")
    if getattr(hf, "mlp_bias", False):
        raise JobError(f"{architecture} with mlp_bias=true is not supported")
    window = getattr(hf, "sliding_window", None)
    if window is not None and (
        architecture == "MistralForCausalLM" or getattr(hf, "use_sliding_window", False)
    ):
        # Full attention equals sliding-window attention until a sequence outgrows the window.
        logger.warning("sliding_window=%s is ignored: sequences longer than it will differ from HF", window)


def _rope(hf: Any) -> tuple[float, RopeScaling | None]:
    """(rope_theta, frozen scaling) from transformers-5 ``rope_parameters`` or old ``rope_scaling``."""
    params = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
    theta = params.pop("rope_theta", None) or getattr(hf, "rope_theta", None) or 10000.0
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
