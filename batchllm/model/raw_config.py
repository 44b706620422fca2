"""config.json read without transformers, for the dense families whose defaults are written out here.

``AutoConfig`` costs seconds of imports at start-up, and for Llama, Mistral, Qwen2 and Qwen3 it only
fills defaults and derives two fields. ``raw_config`` does the same from the file (the defaults of
transformers 5's config classes; Qwen's sliding window and layer types as its ``__post_init__``
derives them) and gives the attributes ``model.config`` and ``model.families`` read. It declines
(None: use AutoConfig) for any other architecture and for files it cannot vouch for: a required size
missing, no ``rope_theta`` or ``rope_parameters``, layer types on a Mistral. ``tests/test_startup.py``
checks that the resulting ModelConfig equals the AutoConfig one on every tiny family.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

_COMMON = dict(hidden_act="silu", initializer_range=0.02, rms_norm_eps=1e-6, tie_word_embeddings=False)
_QWEN = dict(
    _COMMON, max_position_embeddings=32768, num_key_value_heads=32, bos_token_id=None, eos_token_id=None,
    use_sliding_window=False, sliding_window=4096, max_window_layers=28, layer_types=None,
)  # fmt: skip
DEFAULTS: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": dict(
        _COMMON,
        max_position_embeddings=2048,
        num_key_value_heads=None,
        head_dim=None,
        bos_token_id=1,
        eos_token_id=2,
        attention_bias=False,
        mlp_bias=False,
    ),  # fmt: skip
    "MistralForCausalLM": dict(
        _COMMON,
        max_position_embeddings=4096 * 32,
        num_key_value_heads=8,
        head_dim=None,
        bos_token_id=1,
        eos_token_id=2,
        sliding_window=4096,
    ),  # fmt: skip
    "Qwen2ForCausalLM": _QWEN,
    "Qwen3ForCausalLM": dict(_QWEN, head_dim=128, attention_bias=False),
}
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def raw_config(raw: dict[str, Any], architecture: str) -> SimpleNamespace | None:
    """The config's attributes as transformers would give them, or None when only AutoConfig will do."""
    defaults = DEFAULTS.get(architecture)
    if defaults is None or any(raw.get(k) is None for k in REQUIRED):
        return None
    if raw.get("rope_theta") is None and not raw.get("rope_parameters"):
        return None
    if architecture == "MistralForCausalLM" and "layer_types" in raw:
        return None
    c = SimpleNamespace(**{**defaults, **raw})
    if c.num_key_value_heads is None:
        c.num_key_value_heads = c.num_attention_heads
    if getattr(c, "head_dim", 0) is None:
        c.head_dim = c.hidden_size // c.num_attention_heads
    if "use_sliding_window" in defaults:  # Qwen: the window only when switched on, from a layer on
        c.sliding_window = c.sliding_window if c.use_sliding_window else None
        if c.layer_types is None:
            c.layer_types = [
                "sliding_attention"
                if c.sliding_window is not None and i >= c.max_window_layers
                else "full_attention"
                for i in range(c.num_hidden_layers)
            ]
    return c
