"""Fill a CausalLM from HF safetensors checkpoints (single file or sharded), or with random weights.

The model is built with empty parameters on the target device, then every checkpoint tensor is
copied straight into its slot (fused q/k/v and gate/up weights take slices, each expert of a sparse
MLP its index of the stacked expert weights), cast to the run dtype.
The HF model itself is never instantiated.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from batchllm.errors import JobError
from batchllm.model.config import ModelConfig
from batchllm.model.decoder import CausalLM
from batchllm.model.gguf_file import is_gguf

logger = logging.getLogger(__name__)

_DUMMY_SEED = 0


@dataclass(frozen=True)
class Target:
    """Where one HF tensor goes: a parameter of ours, and the row range of it (fused weights)."""

    param: str
    start: int | None = None  # None: the whole parameter
    stop: int | None = None
    expert: int | None = None  # stacked expert weights: the expert's slice, before start:stop


def load_model(
    path: Path, config: ModelConfig, dtype: torch.dtype, device: torch.device, dummy: bool = False
) -> CausalLM:
    model = CausalLM(config, dtype, device).eval()
    if dummy:
        _fill_random(model, config)
    elif is_gguf(path):
        from batchllm.model.gguf import fill_from_gguf

        fill_from_gguf(model, config, path)
    else:
        _fill_from_checkpoint(model, config, path)
    return model


def weight_targets(config: ModelConfig) -> dict[str, Target]:
    """HF weight name -> where it lands in our CausalLM."""
    targets = {
        "model.embed_tokens.weight": Target("embed_tokens"),
        "model.norm.weight": Target("norm.weight"),
    }
    if not config.tie_word_embeddings:
        targets["lm_head.weight"] = Target("lm_head")
    for i in range(config.num_layers):
        targets |= _layer_targets(config, i)
    return targets


def _layer_targets(config: ModelConfig, i: int) -> dict[str, Target]:
    hf, ours = f"model.layers.{i}", f"layers.{i}"
    q, kv = config.q_size, config.kv_size
    qkv_rows = {"q_proj": (0, q), "k_proj": (q, q + kv), "v_proj": (q + kv, q + 2 * kv)}
    targets = {
        f"{hf}.input_layernorm.weight": Target(f"{ours}.input_norm.weight"),
        f"{hf}.post_attention_layernorm.weight": Target(f"{ours}.post_attn_norm.weight"),
        f"{hf}.self_attn.o_proj.weight": Target(f"{ours}.attn.o_weight"),
    }
    if config.is_sparse(i):
        targets |= _sparse_mlp_targets(config, i)
    else:
        targets |= _mlp_targets(f"{hf}.mlp", f"{ours}.mlp", config.intermediate_size)
    if config.gemma:
        targets[f"{hf}.pre_feedforward_layernorm.weight"] = Target(f"{ours}.pre_ff_norm.weight")
        targets[f"{hf}.post_feedforward_layernorm.weight"] = Target(f"{ours}.post_ff_norm.weight")
    for name, (start, stop) in qkv_rows.items():
        targets[f"{hf}.self_attn.{name}.weight"] = Target(f"{ours}.attn.qkv_weight", start, stop)
        if config.attention_bias:
            targets[f"{hf}.self_attn.{name}.bias"] = Target(f"{ours}.attn.qkv_bias", start, stop)
    if config.o_proj_bias:
        targets[f"{hf}.self_attn.o_proj.bias"] = Target(f"{ours}.attn.o_bias")
    if config.qk_norm:
        targets[f"{hf}.self_attn.q_norm.weight"] = Target(f"{ours}.attn.q_norm.weight")
        targets[f"{hf}.self_attn.k_norm.weight"] = Target(f"{ours}.attn.k_norm.weight")
    return targets


def _mlp_targets(hf: str, ours: str, inter: int) -> dict[str, Target]:
    """A gated MLP: HF module ``hf`` (gate/up/down projections) into our MLP ``ours``."""
    return {
        f"{hf}.gate_proj.weight": Target(f"{ours}.gate_up_weight", 0, inter),
        f"{hf}.up_proj.weight": Target(f"{ours}.gate_up_weight", inter, 2 * inter),
        f"{hf}.down_proj.weight": Target(f"{ours}.down_weight"),
    }


def _sparse_mlp_targets(config: ModelConfig, i: int) -> dict[str, Target]:
    """Router and experts (one checkpoint tensor per expert and projection), and Qwen2-MoE's shared expert."""
    moe = config.moe
    if moe is None:
        return {}
    mixtral = config.architecture == "MixtralForCausalLM"
    hf = f"model.layers.{i}.{'block_sparse_moe' if mixtral else 'mlp'}"
    ours, inter = f"layers.{i}.mlp", moe.intermediate_size
    gate, up, down = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    targets = {f"{hf}.gate.weight": Target(f"{ours}.router_weight")}
    for e in range(moe.num_experts):
        targets[f"{hf}.experts.{e}.{gate}.weight"] = Target(f"{ours}.w13", 0, inter, expert=e)
        targets[f"{hf}.experts.{e}.{up}.weight"] = Target(f"{ours}.w13", inter, 2 * inter, expert=e)
        targets[f"{hf}.experts.{e}.{down}.weight"] = Target(f"{ours}.w2", expert=e)
    if moe.shared_expert_size:
        targets |= _mlp_targets(f"{hf}.shared_expert", f"{ours}.shared", moe.shared_expert_size)
        targets[f"{hf}.shared_expert_gate.weight"] = Target(f"{ours}.shared_gate_weight")
    return targets


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: from the shard index, the single file, or a glob."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise JobError(f"cannot read shard index {index}: {e}") from e
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise JobError(f"checkpoint shards listed in {index.name} are missing: {', '.join(missing)}")
        return files
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise JobError(f"no .safetensors weights in {path} (batchllm loads safetensors checkpoints only)")
    return files


def _fill_from_checkpoint(model: CausalLM, config: ModelConfig, path: Path) -> None:
    params = dict(model.named_parameters())
    targets = weight_targets(config)
    loaded: set[str] = set()
    for file in checkpoint_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                target = targets.get(name)
                if target is None:
                    logger.debug("ignoring checkpoint tensor %s", name)
                    continue
                _copy_into(params[target.param], target, f.get_tensor(name), name)
                loaded.add(name)
    missing = sorted(set(targets) - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise JobError(f"checkpoint in {path} is missing weights: {shown}")


@torch.no_grad()
def _copy_into(param: torch.Tensor, target: Target, tensor: torch.Tensor, name: str) -> None:
    dest = param if target.expert is None else param[target.expert]
    dest = dest if target.start is None else dest[target.start : target.stop]
    if dest.shape != tensor.shape:
        raise JobError(
            f"checkpoint weight {name} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)} "
            "from config.json"
        )
    dest.copy_(tensor)  # casts to the run dtype and moves to the model's device in one go


@torch.no_grad()
def _fill_random(model: CausalLM, config: ModelConfig) -> None:
    """Normal(0, initializer_range) weights, unit norms, zeros for biases; seeded, made on device."""
    generator = torch.Generator(device=model.embed_tokens.device).manual_seed(_DUMMY_SEED)
    unit_norm = 0.0 if config.gemma else 1.0  # Gemma's norms scale by (1 + weight)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(unit_norm)
        elif name.endswith("bias"):
            param.zero_()
        else:
            param.normal_(0.0, config.initializer_range, generator=generator)
