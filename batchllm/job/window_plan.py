"""How a window's rows become a plan, for ``run`` and ``plan`` alike: each row's random stream and
own settings, its ``--n`` samples as rows sharing its prompt, and one prefix tree over them all."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from batchllm.config import JobSpec
from batchllm.job.samples import expand_samples
from batchllm.job.scoring import Continuations
from batchllm.job.units import PlannedRows
from batchllm.job.windows import Window, row_keys
from batchllm.prefix_tree.plan import Plan, make_plan
from batchllm.prefix_tree.seqs import TokenSeqs


@dataclass(frozen=True)
class WindowPlan:
    plan: Plan
    planned: PlannedRows  # the plan's rows (samples expanded), what the unit cut needs besides the plan


def plan_window(job: JobSpec, window: Window, continuations: list[Continuations] | None = None) -> WindowPlan:
    """``continuations``: what each of the window's rows scores, in a scoring job."""
    runnable = window.runnable()
    prompts = [window.token_ids[i] for i in runnable]
    keys = row_keys(job.sampling.seed, window.ids, runnable, window.params)
    params = None if window.params is None else [window.params[i] for i in runnable.tolist()]
    n = job.sampling.n
    counts = n if params is None or n == 1 else [n if p is None else p.n for p in params]
    spans = window.spans(runnable)  # the window's buffer, uncopied
    block, prompts, keys = expand_samples(window.block(runnable), prompts, keys, counts, job.sampling.seed)
    if spans is not None and len(prompts) != len(spans):  # samples: each prompt's span repeated
        spans = spans.take(np.repeat(np.arange(len(spans)), counts))
    if params is not None and n > 1:
        params = [p for p, c in zip(params, counts) for _ in range(c)]
    share = job.engine.prefix_sharing
    # Duplicates are merged only when nothing but the prompt decides a row's output.
    own = window.params is not None or job.schema_column is not None or job.scoring.column is not None
    seqs = spans if spans is not None else TokenSeqs.from_lists(prompts)
    plan = make_plan(seqs, sharing=share, dedup=share and job.sampling.greedy and not own)
    conts = None if continuations is None else [continuations[i] for i in runnable.tolist()]
    planned = PlannedRows(block, prompts, keys, job.sampling.max_new_tokens, params, conts)
    return WindowPlan(plan, planned)
