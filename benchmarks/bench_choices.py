"""Choice scoring on shared prefixes vs a 1-token generation of the same prompts, side by side.

    python benchmarks/bench_choices.py                      # 1,000 rows x 3 choices
    python benchmarks/bench_choices.py --rows 200 --repeats 1 --json choices.json
    python benchmarks/bench_choices.py --choices " great, terrible, okay"   # one token each here

Workload: a ~200-token shared instruction > 20 groups with a ~30-token group text > rows with a
~15-token row text (1,000 rows by default, shuffled); choices " positive", " negative", " neutral"
(2, 2 and 6 tokens under the benchmark's small trained tokenizer; a production tokenizer has one token
each: ``--choices`` picks others); a ~5M-parameter Llama-shaped random model (hidden 256, 4 layers),
float32, CPU, one process.

Figures (issue 13's goals):
  prefill ratio = prefill_tokens_computed / (unique prompt tokens + every row's choices' own tokens)
                  (goal <= 1.1)
  wall ratio    = scoring wall / 1-token generation wall (goal <= 1.3)
  compute ratio = the two runs' prefill_tokens_computed (on a CPU wall time follows it)
  general ratio = with ``--general-path``: scoring wall with the short-chunk cascade
                  (kernels/short_chunks.py) / scoring wall without it (every choice sequence through
                  the general path, as before), in the same process
Wall time is ``job.run`` from the Parquet input to the written output, model load excluded; best of
``--repeats`` runs taken round-robin, after one warm-up of each. Label figures taken on a shared
machine "under load".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import platform
import random
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

import batchllm.engine.model_runner as model_runner
from batchllm.config import EngineConfig, JobSpec, SamplingParams, ScoringParams
from batchllm.job.run import run
from batchllm.testing.tiny import make_tiny_model
from batchllm.testing.tiny_tokenizer import default_corpus, train_tokenizer

CHOICES = (" positive", " negative", " neutral")
GROUPS, PREFIX_TOKENS, GROUP_TOKENS, ROW_TOKENS = 20, 200, 30, 15
MODEL_SHAPE = dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=1024)


def _grow(rng: random.Random, tok, start: str, target: int, words: list[str]) -> str:
    text = start
    while len(tok(text, add_special_tokens=False)["input_ids"]) < target:
        text += " " + rng.choice(words)
    return text


def make_inputs(workdir: Path, rows: int, seed: int = 0) -> tuple[Path, Path, str]:
    """The model directory, the input Parquet and the shared instruction."""
    train_tokenizer(workdir / "tokenizer", vocab_size=4096)
    model = make_tiny_model(workdir / "model", "llama", tokenizer_dir=workdir / "tokenizer", **MODEL_SHAPE)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    rng = random.Random(seed)
    words = " ".join(default_corpus(500, seed=seed + 1)).split()
    prefix = _grow(rng, tok, "Classify the sentiment of the review.", PREFIX_TOKENS, words) + "\n"
    groups = [_grow(rng, tok, f"Product {g}:", GROUP_TOKENS, words) for g in range(GROUPS)]
    texts = [
        _grow(rng, tok, f"{groups[r % GROUPS]}\nReview {r}:", GROUP_TOKENS + ROW_TOKENS, words)
        + "\nSentiment:"
        for r in range(rows)
    ]
    rng.shuffle(texts)
    pq.write_table(pa.table({"text": texts}), workdir / "in.parquet")
    return model, workdir / "in.parquet", prefix


def run_once(
    workdir: Path, model: Path, inp: Path, prefix: str, name: str, choices: tuple[str, ...] | None
) -> dict:
    job = JobSpec(
        input=inp,
        model=str(model),
        output=workdir / f"{name}.parquet",
        prefix=prefix,
        sampling=SamplingParams(max_new_tokens=1, ignore_eos=choices is None),
        engine=EngineConfig(device="cpu", dtype="float32"),
        scoring=ScoringParams(choices=choices) if choices else ScoringParams(),
        progress=False,
    )
    outcome = run(job, fresh=True)
    plan = outcome.plan
    return {
        "seconds": outcome.wall_seconds - outcome.phases.get("load", 0.0),
        "prefill_tokens_computed": outcome.engine.prefill_tokens,
        "unique_prompt_tokens": plan.unique_prompt_tokens,
        "scored_tokens": outcome.engine.scored_tokens,
        "steps": outcome.engine.steps,
    }


@contextlib.contextmanager
def general_path_only(on: bool):
    """With ``on``: no step runs its short chunks as one-token rows (the baseline before them)."""
    if not on:
        yield
        return
    original = model_runner.with_short_chunks
    model_runner.with_short_chunks = lambda *args, **kwargs: None
    try:
        yield
    finally:
        model_runner.with_short_chunks = original


def choice_tokens(model: Path, choices: tuple[str, ...]) -> int:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    return sum(len(tok(c, add_special_tokens=False)["input_ids"]) for c in choices)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--choices", default=",".join(CHOICES), help="comma-separated, spaces kept")
    parser.add_argument("--general-path", action="store_true", help="also score without short-chunk cascade")
    args = parser.parse_args()
    choices = tuple(args.choices.split(","))
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model, inp, prefix = make_inputs(workdir, args.rows)
        best: dict[str, dict] = {}
        variants = [("generate_1", None), ("choices", choices)]
        variants += [("choices_general_path", choices)] if args.general_path else []
        for attempt in range(args.repeats + 1):  # the first round warms up
            for name, scored in variants:
                with general_path_only(name == "choices_general_path"):
                    result = run_once(workdir, model, inp, prefix, name, scored)
                if attempt and (name not in best or result["seconds"] < best[name]["seconds"]):
                    best[name] = result
        own = choice_tokens(model, choices) * args.rows
    score, gen = best["choices"], best["generate_1"]
    figures = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "rows": args.rows,
        "choices": list(choices),
        "choices_own_tokens": own,
        "scoring": score,
        "generate_1_token": gen,
        "prefill_ratio": score["prefill_tokens_computed"] / (score["unique_prompt_tokens"] + own),
        "wall_ratio": score["seconds"] / gen["seconds"],
        "compute_ratio": score["prefill_tokens_computed"] / gen["prefill_tokens_computed"],
    }
    if args.general_path:
        figures["choices_general_path"] = best["choices_general_path"]
        figures["general_ratio"] = score["seconds"] / best["choices_general_path"]["seconds"]
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    logging.getLogger(__name__).info("done in %.1f s", time.perf_counter() - t0)
