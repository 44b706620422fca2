"""Grammar engines for structured output (issue #14): xgrammar vs llguidance at a 150k vocabulary.

Both engines get the same synthetic byte-level BPE tokenizer (`grammar_vocab.py`: 151,643 tokens + 3
specials, logits vocabulary 152,064 as Qwen2's) and the same 6-field JSON schema (string, integer,
number, boolean, enum, array of strings; all required, compact separators, no free whitespace).
Each of `--rows` rows walks its own valid JSON document, tokenized by the HF tokenizer; every step:

  mask     fill the int32 bitmask of all live rows in one batched call (the engine's own threads)
  advance  each live row's matcher accepts its next token (checked allowed by the mask first)
  forced   each live row asks for its jump-forward tokens (what the grammar forces next)

and at the end every row must allow EOS and accept it. Reported: milliseconds per row per step for
each phase (total time / live row-steps), tokenizer set-up and schema compile times, the cost of a
new per-row matcher, and applying a [rows, 152064] mask to float32 logits on the CPU (xgrammar's
kernel; batchllm.engine.constraints.apply_mask for llguidance, whose own helper is torch.compile'd).

    python benchmarks/bench_grammar.py                     # 64 rows, 1 engine thread, 3 repeats
    python benchmarks/bench_grammar.py --rows 16 --threads 2 --json /tmp/grammar.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1])]  # grammar_vocab; this checkout
from grammar_vocab import QWEN2_LOGITS_VOCAB, build_tokenizer  # noqa: E402

from batchllm.engine.constraints import apply_mask  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "score": {"type": "number"},
        "active": {"type": "boolean"},
        "tier": {"enum": ["bronze", "silver", "gold"]},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "score", "active", "tier", "tags"],
    "additionalProperties": False,
}


def documents(rows: int, seed: int = 0) -> list[str]:
    """One valid compact JSON document per row, with varied values (and some non-ASCII text)."""
    rng = random.Random(seed)
    words = ["alpha", "Ada Lovelace", "quick brown fox", "naïve café", "数据", "x", "", 'tab\tand "quote"']
    return [
        json.dumps(
            {
                "name": rng.choice(words) + " " + str(rng.randint(0, 99)),
                "age": rng.randint(-5, 120),
                "score": round(rng.uniform(-100, 100), rng.randint(0, 4)),
                "active": rng.random() < 0.5,
                "tier": rng.choice(["bronze", "silver", "gold"]),
                "tags": [rng.choice(words) for _ in range(rng.randint(0, 3))],
            },
            separators=(",", ":"),
            ensure_ascii=False,
        )
        for _ in range(rows)
    ]


class Xgr:
    """xgrammar: GrammarCompiler -> CompiledGrammar (shared) -> GrammarMatcher per row."""

    name = "xgrammar"

    def __init__(self, tokenizer, vocab: int, threads: int) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
        self.compiler = xgr.GrammarCompiler(info, max_threads=threads, cache_enabled=False)
        self.batch = xgr.BatchGrammarMatcher(max_threads=threads)

    def compile(self, schema: str):
        return self.compiler.compile_json_schema(schema, any_whitespace=False, separators=(",", ":"))

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matchers: list, bitmask: torch.Tensor) -> None:
        self.batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def accept(self, matchers: list, tokens: list[int]) -> list[bool]:
        return self.xgr.BatchGrammarMatcher.batch_accept_token(matchers, tokens)

    def forced(self, matcher) -> list[int]:
        return matcher.find_jump_forward_tokens()

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        self.xgr.apply_token_bitmask_inplace(logits, bitmask)


class Llg:
    """llguidance: grammar text -> LLMatcher (parses it); later rows deep_copy a template matcher."""

    name = "llguidance"

    def __init__(self, tokenizer, vocab: int, threads: int) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg, self.llt = llguidance, llguidance.torch
        self.tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
        self.executor = llguidance.LLExecutor(num_threads=threads)

    def compile(self, schema: str):
        options = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema, defaults=options)
        template = self.llg.LLMatcher(self.tok, grammar)
        if template.is_error():
            raise ValueError(template.get_error())
        return template

    def matcher(self, compiled):
        return compiled.deep_copy()

    def fill(self, matchers: list, bitmask: torch.Tensor) -> None:
        self.llt.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask)

    def accept(self, matchers: list, tokens: list[int]) -> list[bool]:
        return [m.consume_token(t) for m, t in zip(matchers, tokens)]

    def forced(self, matcher) -> list[int]:
        return matcher.compute_ff_tokens()

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        apply_mask(logits, bitmask)  # batchllm's; llguidance's own is torch.compile'd (a C compiler on CPU)


def allowed(bitmask: torch.Tensor, row: int, token: int) -> bool:
    return bool((int(bitmask[row, token // 32]) >> (token % 32)) & 1)


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def walk(engine, compiled, targets: list[list[int]], eos: int, vocab: int) -> dict:
    """One pass: every row generates its document under the mask. Seconds per phase and counts."""
    matchers = [engine.matcher(compiled) for _ in targets]
    bitmask = torch.full((len(targets), (vocab + 31) // 32), -1, dtype=torch.int32)
    seconds = {"mask": 0.0, "advance": 0.0, "forced": 0.0}
    row_steps = forced_steps = 0
    for step in range(max(len(t) for t in targets) + 1):
        live = [i for i, t in enumerate(targets) if step <= len(t)]  # the last step of a row: EOS
        rows = [matchers[i] for i in live]
        tokens = [targets[i][step] if step < len(targets[i]) else eos for i in live]
        sub = bitmask[: len(live)]
        seconds["mask"] += timed(lambda rows=rows, sub=sub: engine.fill(rows, sub))[0]
        if not all(allowed(sub, k, token) for k, token in enumerate(tokens)):
            raise RuntimeError(f"{engine.name}: step {step}: a row's next token is masked out")
        mid_text = [matchers[i] for i in live if step < len(targets[i])]
        dt, forced = timed(lambda mid_text=mid_text: [engine.forced(m) for m in mid_text])
        seconds["forced"] += dt
        forced_steps += sum(1 for f in forced if f)
        dt, ok = timed(lambda rows=rows, tokens=tokens: engine.accept(rows, tokens))
        seconds["advance"] += dt
        if not all(ok):
            raise RuntimeError(f"{engine.name}: step {step}: a matcher rejected its token")
        row_steps += len(live)
    return {"seconds": seconds, "row_steps": row_steps, "steps_with_forced_tokens": forced_steps}


def cold_row(engine, i: int, target: list[int], eos: int, vocab: int) -> float:
    """Seconds to compile a schema never seen before and walk one row through it (--schema-column)."""
    schema = json.loads(json.dumps(SCHEMA))
    schema["properties"]["tier"]["enum"].append(f"tier{i}")  # a new grammar: nothing cached
    start = time.perf_counter()
    walk(engine, engine.compile(json.dumps(schema)), [target], eos, vocab)
    return time.perf_counter() - start


def per_step(walked: dict) -> dict[str, float]:
    return {phase: 1e3 * s / walked["row_steps"] for phase, s in walked["seconds"].items()}


def bench_engine(cls, tokenizer, targets: list[list[int]], args: argparse.Namespace) -> dict:
    vocab, schema = QWEN2_LOGITS_VOCAB, json.dumps(SCHEMA)
    setup_s, engine = timed(lambda: cls(tokenizer, vocab, args.threads))
    compile_s = [timed(lambda: engine.compile(schema))[0] for _ in range(args.repeats)]
    cold_s = [cold_row(engine, i, targets[0], tokenizer.eos_token_id, vocab) for i in range(args.repeats)]
    compiled = engine.compile(schema)
    matcher_s, _ = timed(lambda: [engine.matcher(compiled) for _ in range(1000)])
    passes = [walk(engine, compiled, targets, tokenizer.eos_token_id, vocab) for _ in range(args.repeats)]
    best = min(passes, key=lambda p: p["seconds"]["mask"])
    logits = torch.randn(len(targets), vocab)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (len(targets), (vocab + 31) // 32), dtype=torch.int32)
    engine.apply(logits, bitmask)  # warm-up
    apply_s = min(timed(lambda: engine.apply(logits, bitmask))[0] for _ in range(5))
    return {
        "tokenizer_setup_s": setup_s,
        "compile_ms_median": 1e3 * statistics.median(compile_s),
        "compile_ms_first": 1e3 * compile_s[0],
        "new_schema_one_row_ms": 1e3 * statistics.median(cold_s),
        "new_row_matcher_us": 1e3 * matcher_s,  # 1000 matchers -> microseconds each
        "ms_per_row_step": per_step(best),
        "ms_per_row_step_first_pass": per_step(passes[0]),
        "row_steps": best["row_steps"],
        "row_steps_with_forced_tokens": best["steps_with_forced_tokens"],
        "apply_mask_cpu_ms": 1e3 * apply_s,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="engine threads for batched mask/accept calls")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--engines", default="xgrammar,llguidance")
    p.add_argument("--glued", action="store_true", help="worst-case vocabulary (see grammar_vocab.py)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    build_s, tokenizer = timed(lambda: build_tokenizer(glued=args.glued))
    targets = [tokenizer.encode(d) for d in documents(args.rows)]
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        "shared CPU host (noisy)",
        "vocab": {
            "tokenizer": len(tokenizer),
            "logits": QWEN2_LOGITS_VOCAB,
            "glued": args.glued,
            "build_s": build_s,
        },
        "rows": args.rows,
        "mean_doc_tokens": statistics.mean(len(t) for t in targets),
        "engines": {},
    }
    for cls in (Xgr, Llg):
        if cls.name in args.engines.split(","):
            report["engines"][cls.name] = bench_engine(cls, tokenizer, targets, args)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
