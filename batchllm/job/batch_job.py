"""An OpenAI batch file's job as run: its settings widened to what its requests ask.

The job's ``max_new_tokens``, ``n`` and ``logprobs`` size the KV cache, the work units and the output
columns before any row is read, so a request asking more than the flags (``max_tokens: 4000``, ``n: 4``,
``top_logprobs: 5``) raises them to the largest request (``--max-new-tokens``, when given, is a cap on
every request's ``max_tokens`` instead); each row still runs with its own values
(``io.openai_batch`` fills a request's missing temperature and ``max_tokens`` from the flags). The
engine computes the largest ``top_logprobs`` for every row and each output line keeps its own
(``io.openai_output``). Requests with a ``response_format`` make the job constrained.
"""

from __future__ import annotations

from dataclasses import replace

from batchllm.config import JobSpec
from batchllm.errors import JobError
from batchllm.io.openai_batch import OpenAIBatchSource
from batchllm.io.source import InputSource


def batch_job(job: JobSpec, source: InputSource, max_positions: int) -> tuple[JobSpec, InputSource]:
    """(the job as run, the source with the job's own settings as its requests' defaults). No request
    raises the job's max tokens past the model's positions (such a request is that row's error)."""
    if not isinstance(source, OpenAIBatchSource):
        return job, source
    if job.explode_samples:
        raise JobError(
            "--explode-samples does not apply to an OpenAI batch file (a request's samples are its choices)"
        )
    if job.schema_column is not None:
        raise JobError(
            "--schema-column does not apply to an OpenAI batch file (give requests a response_format)"
        )
    own, needs = job.sampling, source.needs
    n = max(own.n, needs.n)
    # Every request carries its own temperature; a greedy job may only run n > 1 rows that sample.
    temperature = own.temperature if n == 1 or not own.greedy else 1.0
    capped = job.max_new_tokens_given  # a --max-new-tokens given caps every request instead
    sampling = replace(
        own,
        max_new_tokens=own.max_new_tokens
        if capped
        else max(own.max_new_tokens, min(needs.max_tokens, max_positions)),
        n=n,
        logprobs=max(own.logprobs, needs.logprobs),
        temperature=temperature,
    )
    run = replace(job, sampling=sampling, request_schemas=needs.schemas)
    return run, replace(source, defaults=own, caps_max_tokens=capped)
