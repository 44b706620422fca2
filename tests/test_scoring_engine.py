"""SCORE sequences in the engine: prefill prompt + continuation under shared prefixes, read each
continuation token's log-prob, never decode. Checked against transformers' forward log-softmax."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from hf_reference import hf_continuation_logprobs

from batchllm.config import EngineConfig, SamplingParams
from batchllm.engine.model_host import ModelHost
from batchllm.model.config import load_model_config
from batchllm.model.tokenizer import load_tokenizer
from batchllm.scheduler.seq import Seq


def _work(seed: int, vocab: int = 500) -> tuple[list[Seq], list[tuple[list[int], list[int]]]]:
    """A shared prefix; per row a row prefix (prompt less its last token) and 3 choices beneath it,
    plus rows scored on their own."""
    rng = random.Random(seed)
    system = Seq.prefix(0, [rng.randrange(vocab) for _ in range(23)])
    work, cases = [system], []
    for r in range(3):
        prompt = system.token_ids + [rng.randrange(vocab) for _ in range(4 + r)]
        row = Seq.prefix(1 + r, prompt[:-1], system, pending_rows=3)
        work.append(row)
        for length in (1, 2, 5):
            cont = [rng.randrange(vocab) for _ in range(length)]
            work.append(Seq.score(len(cases), prompt, cont, row))
            cases.append((prompt, cont))
            system.pending_rows += 1
    for length in (1, 3):
        prompt, cont = [rng.randrange(vocab) for _ in range(6)], [rng.randrange(vocab) for _ in range(length)]
        work.append(Seq.score(len(cases), prompt, cont))
        cases.append((prompt, cont))
    return work, cases


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize(
    "token_budget, kv_blocks, overlap", [(8192, 256, False), (7, 256, False), (5, 16, False), (7, 256, True)]
)
def test_scored_logprobs_match_transformers(tiny_models, family, token_budget, kv_blocks, overlap):
    """Whole prefills, chunked ones (a continuation split over steps), a pool that admits only a few
    sequences at a time, and the overlapped loop CUDA uses (a step read back after the next launch)."""
    path = tiny_models[family]
    cfg = EngineConfig(device="cpu", dtype="float32", block_size=4, token_budget=token_budget)
    host = ModelHost(path, load_model_config(path), load_tokenizer(path), cfg, SamplingParams())
    engine = host.engine(kv_blocks, 16)
    engine.overlap = overlap
    work, cases = _work(seed=1)
    done: list[Seq] = []
    stats = engine.run(work, done.append)
    engine.scheduler.check_invariants()
    assert sorted(s.index for s in done) == list(range(len(cases)))
    assert all(s.finish_reason == "scored" and s.num_output == 0 for s in done)
    for seq in done:
        prompt, cont = cases[seq.index]
        expected = hf_continuation_logprobs(path, prompt, cont)
        assert seq.scored == pytest.approx(expected, abs=1e-4)
    # each choice computes the prompt's last token and its own tokens but the last: no decode at all
    assert stats.decode_tokens == 0
    assert stats.scored_tokens == sum(len(c) for _, c in cases)
    assert engine.scheduler.pool.num_used == 0


def test_score_inputs_row_errors(tokenizer_dir):
    """Bad continuations fail their own row; a too-long one is named; the column is dropped unless kept."""
    import numpy as np
    import pyarrow as pa

    from batchllm.config import JobSpec, ScoringParams
    from batchllm.job.scoring import score_inputs
    from batchllm.job.windows import Window

    options = [["yes", "no"], [], None, ["a", ""], ["x", "x"], ["word " * 40], ["fine"]]
    n = len(options)
    prompts = [np.arange(1, 9, dtype=np.int32)] * (n - 1) + [None]
    window = Window(
        0, pa.array(range(n)), pa.table({"options": options}), prompts, [None] * (n - 1) + ["text is null"],
        np.zeros(n, dtype=bool),
    )  # fmt: skip
    job = JobSpec(input=tokenizer_dir / "in.jsonl", model="m", output=tokenizer_dir / "o.parquet",
                  scoring=ScoringParams(choices_column="options"))  # fmt: skip
    tok = load_tokenizer(tokenizer_dir)
    window, rows = score_inputs(job, tok, max_positions=32).prepare(window)
    assert window.keep is None
    assert [e is None for e in window.errors] == [True, False, False, False, False, False, False]
    assert "empty list" in window.errors[1] and "null" in window.errors[2]
    assert "non-empty" in window.errors[3] and "twice" in window.errors[4]
    assert "over the model's 32" in window.errors[5] and window.errors[6] == "text is null"
    assert rows[0].texts == ["yes", "no"] and all(len(ids) for ids in rows[0].ids)
    assert rows[1:] == [None] * (n - 1)


def test_scored_logprobs_come_back_with_the_tokens_in_one_copy(monkeypatch):
    """A scoring step's log-probs travel in the sampled tokens' read-back: one device->host copy."""
    from batchllm.engine.logprobs import gather_logprobs
    from batchllm.engine.sampled import Sampled

    tokens, scored = torch.tensor([7, 0, 49_999]), torch.randn(5).log_softmax(0)
    copies = []
    original = torch.Tensor.cpu
    monkeypatch.setattr(
        torch.Tensor, "cpu", lambda t, *a, **k: copies.append(t.shape) or original(t, *a, **k)
    )
    for sampled in (Sampled(tokens, scored=scored), Sampled(tokens[:0], scored=scored)):
        host = sampled.read_all()
        assert host.tokens == sampled.tokens.tolist() and host.logprobs is None
        assert host.scored == scored.tolist()
    with_logprobs = Sampled.of(tokens, gather_logprobs(torch.randn(3, 50_000), tokens, 3))
    host = dataclasses.replace(with_logprobs, scored=scored).read_all()
    want_tokens, want = with_logprobs.read()
    assert host.tokens == want_tokens and host.scored == scored.tolist()
    assert (
        host.logprobs.top_ids.tolist() == want.top_ids.tolist()
        and (host.logprobs.chosen == want.chosen).all()
    )
    assert len(copies) == 4  # one per read_all (and one for the plain read)
