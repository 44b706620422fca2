"""What a job reads before anything runs, opened the same way by ``run`` and ``plan``: its input, the
model's config and tokenizer, and how rows become prompts and windows (chat rendering, schemas in the
prompt, per-row schemas, scoring continuations)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from batchllm.config import JobSpec
from batchllm.io.batch_prompts import batch_prompter
from batchllm.io.prompts import Prompter
from batchllm.io.source import InputSource
from batchllm.job.batch_job import batch_job
from batchllm.job.grammars import JobGrammars, is_constrained, system_prefix
from batchllm.job.scoring import Continuations, ScoreInputs, score_inputs
from batchllm.job.windows import Window, open_job_input, read_windows
from batchllm.model.config import ModelConfig, load_model_config, resolve_model_path
from batchllm.model.tokenizer import load_tokenizer


@dataclass(frozen=True)
class JobInputs:
    source: InputSource
    model_path: Path
    mcfg: ModelConfig
    tokenizer: Any
    prompter: Prompter
    grammars: JobGrammars | None  # structured output: the job's grammar and per-row schemas
    scorer: ScoreInputs | None  # a scoring job: what each row scores
    job: JobSpec | None = None  # the job as run (an OpenAI batch file's widened: ``job.batch_job``)

    @classmethod
    def open(cls, job: JobSpec) -> JobInputs:
        source = open_job_input(job)
        model_path = resolve_model_path(job.model)
        mcfg = load_model_config(model_path)
        job, source = batch_job(job, source, mcfg.max_position_embeddings)
        tokenizer = load_tokenizer(model_path)
        prompter = batch_prompter(source, tokenizer, system_prefix(job), job.chat)
        grammars = JobGrammars(job, tokenizer, mcfg) if is_constrained(job) else None
        scorer = score_inputs(job, tokenizer, mcfg.max_position_embeddings)
        return cls(source, model_path, mcfg, tokenizer, prompter, grammars, scorer, job)

    def windows(
        self, job: JobSpec, skip: np.ndarray
    ) -> Iterator[tuple[Window, list[Continuations | None] | None]]:
        """The job's windows, tokenized (rows in ``skip`` are not), with row errors for bad schemas or
        scoring inputs; in a scoring job, each row's continuations too."""
        max_new = 0 if self.scorer is not None else job.sampling.max_new_tokens  # scoring: per row
        systems = self.grammars.row_systems() if self.grammars else None
        max_pos = self.mcfg.max_position_embeddings
        for window in read_windows(
            self.source, self.prompter, job.window_rows, max_new, max_pos, skip, job.sampling, systems
        ):
            window = self.grammars.with_schemas(window) if self.grammars else window
            yield self.scorer.prepare(window) if self.scorer is not None else (window, None)
