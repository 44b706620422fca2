"""Command line: arguments -> JobSpec -> job.run.run(); exit 0 all rows done, 1 some rows failed,
2 the job could not run."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from batchllm.config import EngineConfig, JobSpec, SamplingParams, ScoringParams
from batchllm.errors import JobError, SettingError
from batchllm.job.job_file import job_spec, merge_job_file, read_prefix

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Offline batch LLM inference with global prefix sharing."
)
err = Console(stderr=True, soft_wrap=True)

Opt = typer.Option


@app.command()
def run(
    ctx: typer.Context,
    input: Annotated[Path | None, typer.Argument(help="Input .parquet or .jsonl file.")] = None,
    job: Annotated[Path | None, Opt(help="TOML job file with these settings; flags override it.")] = None,
    model: Annotated[str | None, Opt(help="Local HF model directory or hub id.")] = None,
    prefix: Annotated[Path | None, Opt(help="File whose UTF-8 text is put before every row's text.")] = None,
    column: Annotated[str, Opt(help="Column holding each row's text.")] = "text",
    id_column: Annotated[str | None, Opt(help="Column passed through as the output id.")] = None,
    keep_columns: Annotated[str, Opt(help="Comma-separated input columns copied to the output.")] = "",
    format: Annotated[str | None, Opt(help="parquet | jsonl | openai (default: from the extension).")] = None,
    params_column: Annotated[
        str | None, Opt(help="Column of per-row settings: max_tokens, temperature, top_p, top_k, seed, stop.")
    ] = None,
    messages_column: Annotated[
        str | None,
        Opt(help="Column of conversations (list of {role, content}), rendered with the chat template."),
    ] = None,
    chat: Annotated[
        bool, Opt(help="Apply the chat template: prefix as system, text as user message.")
    ] = False,
    output: Annotated[Path | None, Opt(help="Output Parquet (default: <input stem>.out.parquet).")] = None,
    output_dir: Annotated[
        Path | None, Opt(help="One output per input file, at its path below the dataset (not with --output).")
    ] = None,
    run_dir: Annotated[Path | None, Opt(help="Run directory (default: <output>.run/).")] = None,
    fresh: Annotated[bool, Opt(help="Discard an earlier run in the run directory.")] = False,
    max_new_tokens: Annotated[int, Opt(help="Most tokens generated per row.")] = 256,
    temperature: Annotated[float, Opt(help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, Opt()] = 1.0,
    top_k: Annotated[int, Opt(help="0 = off.")] = 0,
    seed: Annotated[int, Opt(help="Seed of every row's random stream.")] = 0,
    stop: Annotated[list[str] | None, Opt(help="Stop string (repeatable); output cut before it.")] = None,
    ignore_eos: Annotated[bool, Opt(help="Do not stop at EOS (benchmarks).")] = False,
    n: Annotated[int, Opt("--n", help="Samples per row (needs --temperature > 0).")] = 1,
    logprobs: Annotated[
        int, Opt(help="Per generated token: its logprob and the top K alternatives (0..20; 0: off).")
    ] = 0,
    explode_samples: Annotated[
        bool, Opt(help="One output row per sample (sample_index column) instead of list columns.")
    ] = False,
    json_schema: Annotated[
        Path | None, Opt(help="JSON Schema file: every output is JSON valid under it.")
    ] = None,
    regex: Annotated[str | None, Opt(help="Every output matches this regular expression in full.")] = None,
    grammar: Annotated[Path | None, Opt(help="Lark or GBNF grammar file every output follows.")] = None,
    schema_column: Annotated[
        str | None, Opt(help="Column holding each row's own JSON Schema (text).")
    ] = None,
    schema_in_prompt: Annotated[
        bool, Opt(help="With --chat: put the JSON Schema into the system message.")
    ] = False,
    choices: Annotated[
        str | None, Opt(help="Score these comma-separated choices instead of generating (exact text).")
    ] = None,
    choices_column: Annotated[str | None, Opt(help="Score each row's list of choices in this column.")] = (
        None
    ),
    choice_score: Annotated[str, Opt(help="sum | mean (per token) of a choice's log-probs.")] = "sum",
    score_column: Annotated[
        str | None, Opt(help="Score this column's text as the prompt's continuation.")
    ] = None,
    device: Annotated[str, Opt(help="auto | cpu | cuda")] = "auto",
    dtype: Annotated[str, Opt(help="auto | float32 | bfloat16 | float16")] = "auto",
    token_budget: Annotated[int, Opt(help="New tokens per engine step.")] = 8192,
    kv_cache_memory: Annotated[
        str | None, Opt(help="KV pool: '4GB' or a fraction of free GPU memory.")
    ] = None,
    attention_backend: Annotated[str, Opt(help="auto | torch | triton")] = "auto",
    prefix_sharing: Annotated[bool, Opt(help="Share KV of common prompt prefixes.")] = True,
    deterministic: Annotated[bool, Opt(help="Batch-invariant: no output depends on its batch.")] = False,
    cuda_graphs: Annotated[bool, Opt(help="Decode steps through CUDA graphs (GPU, Triton backend).")] = True,
    load_format: Annotated[str, Opt(help="auto | dummy (random weights from config.json)")] = "auto",
    window: Annotated[
        int, Opt(help="Rows planned and run together (one prefix tree each); 0: sized to memory.")
    ] = 0,
    checkpoint_rows: Annotated[int, Opt(help="Commit finished rows at least every N rows...")] = 10_000,
    checkpoint_seconds: Annotated[float, Opt(help="...and at least every S seconds.")] = 60.0,
    report: Annotated[Path | None, Opt(help="Write the run report as JSON here.")] = None,
    workers: Annotated[
        int | None, Opt(help="Engine workers on Ray (one per GPU); 1: in this process.", min=1)
    ] = None,
    ray_address: Annotated[
        str | None, Opt(help="Join this Ray cluster and use its GPUs (--workers caps the count).")
    ] = None,
    quiet: Annotated[bool, Opt(help="No progress output.")] = False,
    debug: Annotated[bool, Opt(help="Show tracebacks.")] = False,
) -> None:
    """Generate one output for every input row and write them to Parquet (resumes an interrupted run)."""
    _logging(quiet)
    with _job_errors(debug):
        p = merge_job_file(ctx, job)
        spec = job_spec(p)
        failed = _run(spec, p["quiet"], fresh=p["fresh"])
    if failed:
        err.print(f"{failed} row(s) failed; see the 'error' column of {spec.output}")
        raise typer.Exit(1)


@app.command()
def plan(
    input: Annotated[Path, typer.Argument(help="Input .parquet or .jsonl file.")],
    model: Annotated[str, Opt(help="Model directory or hub id (only its tokenizer and config are read).")],
    prefix: Annotated[Path | None, Opt(help="File put before every row's text.")] = None,
    column: Annotated[str, Opt()] = "text",
    messages_column: Annotated[str | None, Opt(help="As for run.")] = None,
    format: Annotated[str | None, Opt()] = None,
    chat: Annotated[bool, Opt()] = False,
    max_new_tokens: Annotated[int, Opt(help="As for run: rows too long for it are errors.")] = 256,
    n: Annotated[int, Opt("--n", help="As for run: every row planned as N sample sequences.", min=1)] = 1,
    choices: Annotated[str | None, Opt(help="As for run: count the choice sequences.")] = None,
    choices_column: Annotated[str | None, Opt(help="As for run.")] = None,
    score_column: Annotated[str | None, Opt(help="As for run.")] = None,
    prefix_sharing: Annotated[bool, Opt()] = True,
    window: Annotated[int, Opt(help="As for run.")] = 0,
    workers: Annotated[
        int, Opt(help="Also estimate prefill and prefix copies per worker for a run on N workers.", min=1)
    ] = 1,
    json_out: Annotated[bool, Opt("--json", help="Print one JSON object.")] = False,
    debug: Annotated[bool, Opt()] = False,
) -> None:
    """What a job will cost: tokens, unique tokens, planned prefill, groups, FLOPs — without weights."""
    from batchllm.job.estimate import plan_job

    _logging(True)
    with _job_errors(debug):
        spec = JobSpec(
            input=input,
            model=model,
            output=Path("unused.parquet"),
            format=format,
            column=column,
            messages_column=messages_column,
            prefix=read_prefix(prefix) if prefix is not None else None,
            chat=chat,
            sampling=SamplingParams(max_new_tokens=max_new_tokens, n=n, temperature=1.0 if n > 1 else 0.0),
            engine=EngineConfig(prefix_sharing=prefix_sharing),
            scoring=ScoringParams(
                tuple(choices.split(",")) if choices else (), choices_column, "sum", score_column
            ),
            window_rows=window,
            workers=workers,
        )
        figures = plan_job(spec)
    if json_out:
        typer.echo(json.dumps(figures))
        return
    _print_plan(figures, title=f"batchllm plan: {input}")


def _figure(value: object) -> str:
    number = f"{value:,.3g}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else None
    return number or str(value)


def _print_plan(figures: dict, title: str) -> None:
    table = Table(title=title, show_header=False)
    for name, w in figures.pop("per_worker", {}).items():
        figures[f"worker {name}"] = (
            f"{w['units']} units  {w['prefill_tokens']:,} prefill ({w['prefix_copy_tokens']:,} prefix copies)"
        )
    for key, value in figures.items():
        table.add_row(key, _figure(value))
    Console().print(table)


@app.command("report")
def report_cmd(
    run_dir: Annotated[Path, typer.Argument(help="The run directory (<output>.run/).")],
    json_out: Annotated[bool, Opt("--json", help="Print one JSON object.")] = False,
    plot: Annotated[Path | None, Opt(help="Draw throughput and KV use over time to this PNG.")] = None,
    debug: Annotated[bool, Opt()] = False,
) -> None:
    """The throughput report of a run: finished, still running, or interrupted."""
    from batchllm.job.report import collect, print_summary
    from batchllm.job.report import plot as draw

    with _job_errors(debug):
        figures = collect(run_dir)
        if plot is not None:
            draw(run_dir, plot)
    if json_out:
        typer.echo(json.dumps(figures))
    else:
        print_summary(figures, Console(), title=f"batchllm report: {run_dir}")


def _run(job: JobSpec, quiet: bool, fresh: bool = False) -> int:
    from batchllm.errors import Interrupted
    from batchllm.job.interrupt import StopRequest
    from batchllm.job.report import collect, print_summary, write_json
    from batchllm.job.run import run as run_pipeline

    stop = StopRequest().install()
    try:
        outcome = run_pipeline(job, fresh=fresh, stop=stop)
    except Interrupted:
        err.print(
            f"interrupted: finished rows are committed in {job.run_dir}; run the same command again to resume"
        )
        raise typer.Exit(130) from None
    finally:
        stop.restore()
    report = collect(job.run_dir) | {
        "device": outcome.device,
        "dtype": outcome.dtype,
        "steps": outcome.engine.steps,
    }
    if job.report is not None:
        write_json(report, job.report)
    if not quiet:
        print_summary(report, err)
        err.print(f"wrote {job.output}")
    return report["rows_failed"]


@app.command()
def demo(
    rows: Annotated[int, Opt(help="Rows in the demo dataset.")] = 48,
    keep: Annotated[Path | None, Opt(help="Keep the demo files in this directory.")] = None,
) -> None:
    """Run the whole pipeline on a generated reviews file, offline: with SmolLM2-135M when it has been
    fetched (see README), else with a tiny random model."""
    import tempfile

    from batchllm.testing.demo import choose_demo_job, preview

    _logging(False)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        demo_job, banner = choose_demo_job(workdir, rows=rows)
        err.print(f"[bold]batchllm demo[/]: {banner}\n")
        spec = demo_job.spec()
        with _job_errors(False):
            _run(spec, False)
        err.print(preview(spec.output))
        if keep is None:
            err.print("(pass --keep DIR to keep the model, data and output)")


class _job_errors:
    """Turns a job-level failure into one line on stderr and exit code 2."""

    def __init__(self, debug: bool) -> None:
        self.debug = debug

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None or isinstance(exc, (typer.Exit, KeyboardInterrupt)):
            return False
        if self.debug:
            return False
        if isinstance(exc, SettingError):
            err.print(f"[red]error:[/] --{escape(str(exc))}", highlight=False)
        elif isinstance(exc, (JobError, ValueError)):
            err.print(f"[red]error:[/] {escape(str(exc))}", highlight=False)
        else:
            what = f"{type(exc).__name__}: {escape(str(exc))}"
            err.print(f"[red]error:[/] {what} (run with --debug for the traceback)")
        raise typer.Exit(2)


def _logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
