"""``batchllm plan``: what a job will cost, from the tokenizer and config alone (no weights)."""

from __future__ import annotations

import numpy as np

from batchllm.config import JobSpec
from batchllm.io.prompts import Prompter
from batchllm.io.reader import open_input
from batchllm.job.windows import read_windows
from batchllm.model.config import ModelConfig, load_model_config, resolve_model_path
from batchllm.model.tokenizer import load_tokenizer
from batchllm.prefix_tree.plan import Plan, PlanStats, make_plan
from batchllm.prefix_tree.seqs import TokenSeqs


def plan_job(job: JobSpec) -> dict:
    """The plan figures of the whole job (its windows combined), as ``batchllm run`` would plan it."""
    source = open_input(job.input, job.format, job.column, job.id_column, job.keep_columns)
    model_path = resolve_model_path(job.model)
    mcfg = load_model_config(model_path)
    prompter = Prompter(load_tokenizer(model_path), job.prefix, job.chat)
    skip = np.zeros(source.num_rows, dtype=bool)
    windows = read_windows(
        source, prompter, job.window_rows, job.sampling.max_new_tokens, mcfg.max_position_embeddings, skip
    )
    stats, failed, flops_shared, flops_plain = [], 0, 0.0, 0.0
    share = job.engine.prefix_sharing
    for window in windows:
        prompts = [window.token_ids[i] for i in window.runnable()]
        plan = make_plan(TokenSeqs.from_lists(prompts), sharing=share, dedup=share and job.sampling.greedy)
        stats.append(plan.stats)
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
