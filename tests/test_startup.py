"""Start-up without transformers: config.json read directly (model/raw_config.py) and tokenizer.json run
by the tokenizers library (model/fast_tokenizer.py) give exactly what AutoConfig and AutoTokenizer give."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from batchllm.model import config as config_module
from batchllm.model.config import load_model_config
from batchllm.model.fast_tokenizer import FastTokenizer
from batchllm.model.tokenizer import load_tokenizer

TEXTS = [
    "I bought the blender. It is great!",
    "  leading spaces, tabs\tand\nnewlines  ",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|> after the end",
    "ünïcödé — 日本語 🙂",
    "Rated 123 of 4567, at 10:30.",
    "",
]


def _auto_config(path: Path, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(config_module, "raw_config", lambda raw, arch: None)
        return load_model_config(path)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_raw_config_equals_autoconfig(tiny_models, family, monkeypatch):
    assert (
        config_module.raw_config(json.loads((tiny_models[family] / "config.json").read_text()), "x") is None
    )
    assert load_model_config(tiny_models[family]) == _auto_config(tiny_models[family], monkeypatch)


DROPPED = (
    *("head_dim", "max_position_embeddings", "tie_word_embeddings", "rms_norm_eps", "bos_token_id"),
    *("eos_token_id", "sliding_window", "hidden_act", "attention_bias", "initializer_range"),
)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_raw_config_fills_transformers_defaults(tiny_models, family, tmp_path, monkeypatch):
    """Every optional field left out (transformers' class defaults), and Qwen's window switched on."""
    raw = json.loads((tiny_models[family] / "config.json").read_text())
    dropped = (*DROPPED, "num_key_value_heads") if family == "llama" else DROPPED  # others: 8 or 32
    raw = {k: v for k, v in raw.items() if k not in dropped}
    if family.startswith("qwen"):
        raw.update(use_sliding_window=True, sliding_window=8, max_window_layers=1)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert config_module.raw_config(raw, raw["architectures"][0]) is not None
    assert load_model_config(tmp_path) == _auto_config(tmp_path, monkeypatch)


@pytest.fixture(params=["plain", "bos"])
def model_dir(request, tiny_models, tiny_model_bos) -> Path:
    return tiny_models["llama"] if request.param == "plain" else tiny_model_bos


def test_fast_tokenizer_gives_autotokenizer_ids(model_dir):
    ours, theirs = load_tokenizer(model_dir), AutoTokenizer.from_pretrained(model_dir)
    assert isinstance(ours, FastTokenizer)
    for special in (True, False):
        assert (
            ours(TEXTS, add_special_tokens=special)["input_ids"]
            == theirs(TEXTS, add_special_tokens=special)["input_ids"]
        )
        for text in TEXTS:
            ids = ours(text, add_special_tokens=special)["input_ids"]
            assert ids == theirs(text, add_special_tokens=special)["input_ids"]
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(
                    ids, skip_special_tokens=skip
                )
    assert (len(ours), ours.eos_token_id, ours.bos_token_id) == (
        len(theirs),
        theirs.eos_token_id,
        theirs.bos_token_id,
    )
    assert ours.convert_tokens_to_ids("<|im_end|>") == theirs.convert_tokens_to_ids("<|im_end|>")
    assert ours.chat_template == theirs.chat_template
    assert (
        pickle.loads(pickle.dumps(ours))(TEXTS)["input_ids"] == theirs(TEXTS)["input_ids"]
    )  # to Ray workers
    chat = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": TEXTS[0]}]]
    kwargs = dict(add_generation_prompt=True, tokenize=False)
    assert ours.apply_chat_template(chat, **kwargs) == theirs.apply_chat_template(chat, **kwargs)


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
def test_other_families_give_autotokenizer_ids(tiny_models, family):
    """Mistral runs on FastTokenizer; Qwen's transformers class splits digits apart: it keeps transformers."""
    ours, theirs = load_tokenizer(tiny_models[family]), AutoTokenizer.from_pretrained(tiny_models[family])
    assert isinstance(ours, FastTokenizer) == (family == "mistral")
    assert ours(TEXTS)["input_ids"] == theirs(TEXTS)["input_ids"]


def test_unusual_tokenizer_files_keep_transformers(tiny_models, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copy(tiny_models["llama"] / name, tmp_path / name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}))
    assert not isinstance(load_tokenizer(tmp_path), FastTokenizer)


def test_a_run_loads_config_and_tokenizer_without_transformers(tiny_models):
    code = (
        "import sys; import batchllm.cli, batchllm.job.run;"
        "from batchllm.model.config import load_model_config;"
        "from batchllm.model.tokenizer import load_tokenizer;"
        f"p = __import__('pathlib').Path({str(tiny_models['llama'])!r}); load_model_config(p);"
        "t = load_tokenizer(p); t.decode(t('hello world')['input_ids']);"
        "from batchllm.io.prompts import Prompter;"
        "Prompter(t, 'Do this.\\nNow:', False).encode(['first row', 'second\\nrow']);"
        "assert 'transformers' not in sys.modules, 'transformers was imported'"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
