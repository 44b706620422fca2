"""``batchllm plan``: what a job will cost, from the tokenizer and config alone (no weights).

With ``workers > 1`` it also cuts each window into work units and runs the Ray driver's assignment
(``job.assignment.simulate``, equally fast workers): prefill tokens computed and prefix copies per worker.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from batchllm.config import JobSpec
from batchllm.io.prompts import Prompter
from batchllm.io.reader import open_input
from batchllm.job.assignment import simulate
from batchllm.job.scoring import Continuations, input_keep_columns, score_inputs, scoring_figures
from batchllm.job.units import PlannedRows, split_plan
from batchllm.job.windows import Window, read_windows, row_keys
from batchllm.model.config import ModelConfig, load_model_config, resolve_model_path
from batchllm.model.tokenizer import load_tokenizer
from batchllm.prefix_tree.plan import Plan, PlanStats, make_plan
from batchllm.prefix_tree.seqs import TokenSeqs


def plan_job(job: JobSpec) -> dict:
    """The plan figures of the whole job (its windows combined), as ``batchllm run`` would plan it."""
    mcfg, windows = _windows(job)
    stats, failed, flops_shared, flops_plain = [], 0, 0.0, 0.0
    share = job.engine.prefix_sharing
    per_worker: dict[str, dict[str, int]] = {}
    scoring: dict[str, int] = {}
    for window, conts in windows:
        prompts = [window.token_ids[i] for i in window.runnable()]
        dedup = share and job.sampling.greedy and job.scoring.column is None
        plan = make_plan(TokenSeqs.from_lists(prompts), sharing=share, dedup=dedup)
        stats.append(plan.stats)
        if conts is not None:
            for key, value in scoring_figures(plan, conts).items():
                scoring[key] = scoring.get(key, 0) + value
        if (job.workers or 1) > 1:
            _add_workers(per_worker, _worker_estimate(job, window, plan, conts))
        failed += window.num_failed
        flops_shared += _planned_flops(plan, mcfg)
        flops_plain += sum(_segment_flops(mcfg, 0, len(p)) for p in prompts)
    total = PlanStats.combine(stats).to_dict()
    return {
        **total,
        "rows": total["rows"] + failed,
        "rows_ok": total["rows"],
        "rows_failed": failed,
        "prefill_flops_with_sharing": flops_shared,
        "prefill_flops_without_sharing": flops_plain,
        "model": job.model,
        **scoring,
        **_workers_figures(per_worker),
    }


def _windows(job: JobSpec) -> tuple[ModelConfig, Iterator[tuple[Window, list[Continuations] | None]]]:
    """The model's config, and the job's windows as ``batchllm run`` reads them, each with its runnable
    rows' continuations in a scoring job."""
    source = open_input(job.input, job.format, job.column, job.id_column, input_keep_columns(job))
    model_path = resolve_model_path(job.model)
    mcfg = load_model_config(model_path)
    tokenizer = load_tokenizer(model_path)
    prompter = Prompter(tokenizer, job.prefix, job.chat)
    scorer = score_inputs(job, tokenizer, mcfg.max_position_embeddings)
    skip = np.zeros(source.num_rows, dtype=bool)
    max_new = job.sampling.max_new_tokens if scorer is None else 0
    windows = read_windows(source, prompter, job.window_rows, max_new, mcfg.max_position_embeddings, skip)

    def prepared() -> Iterator[tuple[Window, list[Continuations] | None]]:
        for window in windows:
            if scorer is None:
                yield window, None
                continue
            window, conts = scorer.prepare(window)
            yield window, [conts[i] for i in window.runnable().tolist()]

    return mcfg, prepared()


def _worker_estimate(
    job: JobSpec, window: Window, plan: Plan, conts: list[Continuations] | None = None
) -> dict[str, dict[str, int]]:
    """The window cut into units as ``batchllm run --workers N`` cuts it, and assigned as its driver would."""
    runnable = window.runnable()
    prompts = [window.token_ids[i] for i in runnable]
    keys = row_keys(job.sampling.seed, window.ids, runnable)
    planned = PlannedRows(window.block(runnable), prompts, keys, job.sampling.max_new_tokens, conts)
    return simulate(split_plan(plan, planned, job.workers), job.workers)


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


def _segment_flops(cfg: ModelConfig, start: int, end: int) -> float:
    """Forward FLOPs of prefilling positions [start, end) of one sequence: the matmuls over the
    weights (2 per parameter per token) plus attention scores and values over the context."""
    dense = 2.0 * cfg.num_params * (end - start)
    attention = 2.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * (end * end - start * start)
    return dense + attention


def _planned_flops(plan: Plan, cfg: ModelConfig) -> float:
    lengths = plan.seqs.lengths
    nodes = sum(
        _segment_flops(cfg, int(plan.node_length[p]), int(plan.node_length[i]))
        for i, p in enumerate(plan.node_parent.tolist())
        if p >= 0
    )
    rows = sum(
        _segment_flops(cfg, int(plan.node_length[plan.row_node[r]]), int(lengths[r]))
        for r in plan.row_order.tolist()
    )
    return nodes + rows
