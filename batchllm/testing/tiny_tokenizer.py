"""A byte-level BPE tokenizer trained on a small built-in corpus, for tests, benchmarks and the demo."""

from __future__ import annotations

import random
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
BOS_TOKEN = "<|bos|>"

# Files that make up a saved tokenizer (transformers 5 writes the chat template to its own file).
_TOKENIZER_FILE_PREFIXES = ("tokenizer", "special_tokens", "chat_template", "added_tokens", "vocab", "merges")

_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Word lists for the built-in corpus: review-like sentences, plus invented brand names so that BPE
# keeps finding new merges even for vocabularies of several thousand tokens.
_OPENERS = ("I", "We", "My wife", "My son", "Our team", "The kids", "My friend", "Everyone")
_VERBS = ("bought", "ordered", "tried", "returned", "used", "received", "tested", "loved", "hated")
_ITEMS = (
    "blender", "headphones", "backpack", "kettle", "phone case", "lamp", "keyboard", "jacket",
    "coffee maker", "vacuum", "tent", "charger", "monitor", "water bottle", "chair", "book",
)  # fmt: skip
_QUALITIES = (
    "great", "terrible", "okay", "excellent", "disappointing", "sturdy", "flimsy", "beautiful",
    "noisy", "quiet", "comfortable", "cheap", "expensive", "reliable", "broken", "amazing",
)  # fmt: skip
_DETAILS = (
    "the battery lasts all day", "it broke after a week", "shipping was fast", "the price was fair",
    "customer service never answered", "the color faded quickly", "it works exactly as described",
    "the instructions were confusing", "it feels well made", "it arrived damaged",
    "I would buy it again", "I want a refund", "five stars from me", "one star, avoid it",
)  # fmt: skip
_SYLLABLES = (
    "ka", "lo", "mi", "zen", "tor", "vex", "ra", "ple", "qui", "dor", "bel", "nix", "sa", "tru",
    "gon", "fi", "mar", "lux", "ae", "on", "ix", "ul", "pra", "sto", "wen", "dy", "cor", "ber",
)  # fmt: skip


def default_corpus(num_sentences: int = 6000, seed: int = 0) -> list[str]:
    """Deterministic review-like sentences (with invented brand names and numbers)."""
    rng = random.Random(seed)
    return [_corpus_sentence(rng) for _ in range(num_sentences)]


def _corpus_sentence(rng: random.Random) -> str:
    brand = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))).capitalize()
    return (
        f"{rng.choice(_OPENERS)} {rng.choice(_VERBS)} the {brand} {rng.choice(_ITEMS)} "
        f"for ${rng.randint(5, 400)}. It is {rng.choice(_QUALITIES)} and {rng.choice(_DETAILS)}. "
        f"Rating: {rng.randint(1, 5)}/5."
    )


def train_tokenizer(
    out_dir: Path,
    corpus: Iterable[str] | None = None,
    vocab_size: int = 512,
    add_bos: bool = False,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer, save it to `out_dir` (Hugging Face layout) and return it.

    Special tokens: `<|endoftext|>` (eos and pad), `<|im_start|>`, `<|im_end|>` and, when `add_bos`,
    `<|bos|>`, which encoding then puts in front of every text (as Llama's tokenizer does). The
    vocabulary can come out smaller than `vocab_size` when the corpus runs out of merges.
    """
    special = [EOS_TOKEN, IM_START, IM_END] + ([BOS_TOKEN] if add_bos else [])
    if vocab_size < 256 + len(special):
        raise ValueError(f"vocab_size must be at least {256 + len(special)} (all bytes + specials)")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_texts(corpus), trainer=trainer)
    backend.post_processor = _post_processor(backend, add_bos)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        bos_token=BOS_TOKEN if add_bos else None,
        additional_special_tokens=[IM_START, IM_END],
    )
    tokenizer.chat_template = ("{{ bos_token }}" if add_bos else "") + _CHAT_TEMPLATE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    _check_tokenizer(out_dir, add_bos)
    return tokenizer


def _texts(corpus: Iterable[str] | None) -> Iterator[str]:
    yield from default_corpus() if corpus is None else corpus
    # The prompts used by the demo and tests use these words; make sure they get merges too.
    yield "Classify the sentiment of this review as positive or negative.\nReview: "
    yield "system user assistant\n"


def _post_processor(backend: Tokenizer, add_bos: bool) -> processors.PostProcessor:
    if not add_bos:
        return processors.ByteLevel(trim_offsets=False)
    bos_id = backend.token_to_id(BOS_TOKEN)
    return processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A:0",
        pair=f"{BOS_TOKEN} $A:0 {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )


def _check_tokenizer(out_dir: Path, add_bos: bool) -> None:
    """Reload from disk and check the things batchllm relies on; raise RuntimeError if one fails."""
    loaded = AutoTokenizer.from_pretrained(out_dir)
    if not loaded.is_fast:
        raise RuntimeError(f"tokenizer in {out_dir} did not load back as a fast tokenizer")
    text = "I bought the blender. It is great!"
    ids = loaded(text)["input_ids"]
    if (ids[0] == loaded.bos_token_id) != add_bos:
        raise RuntimeError(f"tokenizer in {out_dir}: bos placement wrong (add_bos={add_bos})")
    if loaded.decode(ids, skip_special_tokens=True) != text:
        raise RuntimeError(f"tokenizer in {out_dir} does not round-trip text")
    chat = loaded.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    if not chat.endswith(f"{IM_START}assistant\n"):
        raise RuntimeError(f"tokenizer in {out_dir}: chat template gave {chat!r}")


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    if not (src / "tokenizer.json").is_file():
        raise ValueError(f"{src} holds no tokenizer.json; train one with train_tokenizer() first")
    for path in src.iterdir():
        if path.is_file() and path.name.startswith(_TOKENIZER_FILE_PREFIXES):
            shutil.copy2(path, dst / path.name)
