"""How a window's rows become a plan, for ``run`` and ``plan`` alike: each row's random stream and
own settings, its ``--n`` samples as rows sharing its prompt, and one prefix tree over them all."""

from __future__ import annotations

from dataclasses import dataclass

from batchllm.config import JobSpec
from batchllm.job.samples import expand_samples
from batchllm.job.units import PlannedRows
from batchllm.job.windows import Window, row_keys
from batchllm.prefix_tree.plan import Plan, make_plan
from batchllm.prefix_tree.seqs import TokenSeqs


@dataclass(frozen=True)
class WindowPlan:
    plan: Plan
    planned: PlannedRows  # the plan's rows (samples expanded), what the unit cut needs besides the plan


def plan_window(job: JobSpec, window: Window) -> WindowPlan:
    runnable = window.runnable()
    prompts = [window.token_ids[i] for i in runnable]
    keys = row_keys(job.sampling.seed, window.ids, runnable, window.params)
    params = None if window.params is None else [window.params[i] for i in runnable.tolist()]
    n = job.sampling.n
    block, prompts, keys = expand_samples(window.block(runnable), prompts, keys, n, job.sampling.seed)
    if params is not None and n > 1:
        params = [p for p in params for _ in range(n)]
    share = job.engine.prefix_sharing
    # Duplicates are merged only when nothing but the prompt decides a row's output.
    dedup = share and job.sampling.greedy and window.params is None and job.schema_column is None
    plan = make_plan(TokenSeqs.from_lists(prompts), sharing=share, dedup=dedup)
    return WindowPlan(plan, PlannedRows(block, prompts, keys, job.sampling.max_new_tokens, params))
