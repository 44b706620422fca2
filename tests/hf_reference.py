"""Ground truth for correctness tests: greedy decoding with transformers' own `generate()` in float32.

batchllm's greedy output must match `hf_greedy` token for token.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedModel


@functools.lru_cache(maxsize=8)
def load_hf_model(model_dir: Path) -> PreTrainedModel:
    """The float32 transformers model in `model_dir`, loaded once per directory and process."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval()


def hf_greedy(
    model_dir: Path,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_token_ids: list[int] | None = None,
) -> list[list[int]]:
    """Greedy continuations of `prompts` (token ids), each generated alone (batch of one, no padding).

    Returns one list per prompt holding only the generated ids, without the prompt. A row that
    stopped on an EOS id ends with that EOS id (so it has at most `max_new_tokens` ids); a row
    that did not has exactly `max_new_tokens` ids.

    `eos_token_ids`: None uses the model's generation_config.json (for the tiny models
    `<|endoftext|>` and `<|im_end|>`); `[]` never stops early (like ignore_eos: EOS can still be
    generated, it just does not end the row).
    """
    model = load_hf_model(Path(model_dir))
    config = _generation_config(model, max_new_tokens, eos_token_ids)
    return [_generate_one(model, prompt, config) for prompt in prompts]


def _generation_config(
    model: PreTrainedModel, max_new_tokens: int, eos_token_ids: list[int] | None
) -> GenerationConfig:
    config = copy.deepcopy(model.generation_config)
    config.do_sample = False
    config.max_new_tokens = max_new_tokens
    if eos_token_ids is not None:
        # An empty list, not None: generate() would fill None in from the model's generation config.
        config.eos_token_id = list(eos_token_ids)
    return config


@torch.no_grad()
def _generate_one(model: PreTrainedModel, prompt: list[int], config: GenerationConfig) -> list[int]:
    if not prompt:
        raise ValueError("hf_greedy needs non-empty prompts")
    input_ids = torch.tensor([prompt], dtype=torch.long)  # [1, prompt_len]
    output = model.generate(
        input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config
    )  # [1, prompt_len + generated]
    return output[0, len(prompt) :].tolist()


@torch.no_grad()
def hf_continuation_logprobs(model_dir: Path, prompt: list[int], continuation: list[int]) -> list[float]:
    """Transformers' float32 forward log-softmax of each ``continuation`` token after ``prompt`` and
    the continuation tokens before it (what ``--choices`` and ``--score-column`` report)."""
    model = load_hf_model(Path(model_dir))
    ids = torch.tensor([list(prompt) + list(continuation)])  # [1, prompt + continuation]
    logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    positions = range(len(prompt) - 1, len(prompt) + len(continuation) - 1)
    return [logp[p, t].item() for p, t in zip(positions, continuation)]
