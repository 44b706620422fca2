"""``batchllm plan``: what a job will cost, from the tokenizer and config alone (no weights).

With ``workers > 1`` it also cuts each window into work units and runs the Ray driver's assignment
(``job.assignment.simulate``, equally fast workers): prefill tokens computed and prefix copies per worker.
"""

from __future__ import annotations

import numpy as np

from batchllm.config import JobSpec
from batchllm.job.assignment import simulate
from batchllm.job.inputs import JobInputs
from batchllm.job.scoring import scoring_figures
from batchllm.job.units import split_plan
from batchllm.job.window_plan import plan_window
from batchllm.model.config import ModelConfig
from batchllm.prefix_tree.plan import Plan, PlanStats


def plan_job(job: JobSpec) -> dict:
    """The plan figures of the whole job (its windows combined), as ``batchllm run`` would plan it."""
    inputs = JobInputs.open(job)
    job = inputs.job or job  # an OpenAI batch file's requests widen it
    mcfg, windows = inputs.mcfg, inputs.windows(job, np.zeros(inputs.source.num_rows, dtype=bool))
    stats, failed, flops_shared, flops_plain = [], 0, 0.0, 0.0
    per_worker: dict[str, dict[str, int]] = {}
    scoring: dict[str, int] = {}
    for window, conts in windows:
        planned = plan_window(job, window, conts)
        plan = planned.plan
        stats.append(plan.stats)
        if conts is not None:
            for key, value in scoring_figures(plan, planned.planned.continuations).items():
                scoring[key] = scoring.get(key, 0) + value
        if (job.workers or 1) > 1:
            _add_workers(per_worker, simulate(split_plan(plan, planned.planned, job.workers), job.workers))
        failed += window.num_failed
        flops_shared += _planned_flops(plan, mcfg)
        flops_plain += _segment_flops(mcfg, 0, plan.seqs.lengths)
    total = PlanStats.combine(stats).to_dict()
    return {
        **total,
        "rows": total["rows"] // job.sampling.n + failed,
        "rows_ok": total["rows"] // job.sampling.n,
        "sequences": total["rows"],  # rows_ok x --n: the sample sequences the plan runs
        "rows_failed": failed,
        "prefill_flops_with_sharing": flops_shared,
        "prefill_flops_without_sharing": flops_plain,
        "model": job.model,
        **scoring,
        **_workers_figures(per_worker),
    }


def _add_workers(total: dict[str, dict[str, int]], window: dict[str, dict[str, int]]) -> None:
    for name, figures in window.items():
        mine = total.setdefault(name, dict.fromkeys(figures, 0))
        for key, value in figures.items():
            mine[key] += value


def _workers_figures(per_worker: dict[str, dict[str, int]]) -> dict:
    """The per-worker estimate and its sums; nothing for one worker."""
    if not per_worker:
        return {}
    return {
        "workers": len(per_worker),
        "prefill_tokens_with_workers": sum(w["prefill_tokens"] for w in per_worker.values()),
        "prefix_copy_tokens": sum(w["prefix_copy_tokens"] for w in per_worker.values()),
        "per_worker": per_worker,
    }


def _segment_flops(cfg: ModelConfig, start: np.ndarray | int, end: np.ndarray) -> float:
    """Forward FLOPs of prefilling positions [start, end) of sequences (summed): the matmuls over the
    weights (2 per parameter per token) plus attention scores and values over the context."""
    start, end = np.asarray(start, np.float64), np.asarray(end, np.float64)
    dense = 2.0 * cfg.num_params * (end - start)
    attention = 2.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * (end * end - start * start)
    return float(np.sum(dense + attention))


def _planned_flops(plan: Plan, cfg: ModelConfig) -> float:
    """The chosen prefixes' own tokens once each, then every representative row's own tokens."""
    length, parent = plan.node_length, plan.node_parent
    nodes = _segment_flops(cfg, length[parent[1:]], length[1:])
    rows = plan.row_order
    return nodes + _segment_flops(cfg, length[plan.row_node[rows]], plan.seqs.lengths[rows])
