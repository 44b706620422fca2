"""Command line: arguments -> JobSpec -> pipeline.run(); exit 0 all rows done, 1 some rows failed,
2 the job could not run."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from batchllm.config import EngineConfig, JobSpec, SamplingParams
from batchllm.errors import JobError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Offline batch LLM inference with global prefix sharing."
)
err = Console(stderr=True, soft_wrap=True)

Opt = typer.Option


@app.command()
def run(
    input: Annotated[Path, typer.Argument(help="Input .parquet or .jsonl file.")],
    model: Annotated[str, Opt(help="Local HF model directory or hub id.")],
    prefix: Annotated[Path | None, Opt(help="File whose UTF-8 text is put before every row's text.")] = None,
    column: Annotated[str, Opt(help="Column holding each row's text.")] = "text",
    id_column: Annotated[str | None, Opt(help="Column passed through as the output id.")] = None,
    keep_columns: Annotated[str, Opt(help="Comma-separated input columns copied to the output.")] = "",
    format: Annotated[str | None, Opt(help="parquet | jsonl (default: from the extension).")] = None,
    chat: Annotated[
        bool, Opt(help="Apply the chat template: prefix as system, text as user message.")
    ] = False,
    output: Annotated[Path | None, Opt(help="Output Parquet (default: <input stem>.out.parquet).")] = None,
    run_dir: Annotated[Path | None, Opt(help="Run directory (default: <output>.run/).")] = None,
    max_new_tokens: Annotated[int, Opt(help="Most tokens generated per row.")] = 256,
    temperature: Annotated[float, Opt(help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, Opt()] = 1.0,
    top_k: Annotated[int, Opt(help="0 = off.")] = 0,
    seed: Annotated[int, Opt(help="Seed of every row's random stream.")] = 0,
    stop: Annotated[list[str] | None, Opt(help="Stop string (repeatable); output cut before it.")] = None,
    ignore_eos: Annotated[bool, Opt(help="Do not stop at EOS (benchmarks).")] = False,
    device: Annotated[str, Opt(help="auto | cpu | cuda")] = "auto",
    dtype: Annotated[str, Opt(help="auto | float32 | bfloat16 | float16")] = "auto",
    token_budget: Annotated[int, Opt(help="New tokens per engine step.")] = 8192,
    kv_cache_memory: Annotated[
        str | None, Opt(help="KV pool size: '4GB' or a fraction of free GPU memory.")
    ] = None,
    attention_backend: Annotated[str, Opt(help="auto | torch | triton")] = "auto",
    prefix_sharing: Annotated[bool, Opt(help="Share KV of common prompt prefixes.")] = True,
    load_format: Annotated[str, Opt(help="auto | dummy (random weights from config.json)")] = "auto",
    window: Annotated[int, Opt(help="Rows planned and run together.")] = 250_000,
    report: Annotated[Path | None, Opt(help="Write the run report as JSON here.")] = None,
    quiet: Annotated[bool, Opt(help="No progress output.")] = False,
    debug: Annotated[bool, Opt(help="Show tracebacks.")] = False,
) -> None:
    """Generate one output for every input row and write them to Parquet."""
    _logging(quiet)
    with _job_errors(debug):
        if prefix is not None and not prefix.is_file():
            raise JobError(f"prefix file {prefix} does not exist")
        job = JobSpec(
            input=input,
            model=model,
            output=output or Path.cwd() / f"{input.stem}.out.parquet",
            format=format,
            column=column,
            id_column=id_column,
            keep_columns=tuple(c.strip() for c in keep_columns.split(",") if c.strip()),
            prefix=prefix.read_text(encoding="utf-8") if prefix is not None else None,
            chat=chat,
            sampling=SamplingParams(
                temperature, top_p, top_k, seed, max_new_tokens, tuple(stop or ()), ignore_eos
            ),
            engine=EngineConfig(
                device=device,
                dtype=dtype,
                token_budget=token_budget,
                kv_cache_memory=kv_cache_memory,
                attention_backend=attention_backend,
                prefix_sharing=prefix_sharing,
                load_format=load_format,
            ),
            report=report,
            progress=not quiet,
            run_dir=run_dir,
            window_rows=window,
        )
        failed = _run(job, quiet)
    if failed:
        err.print(f"{failed} row(s) failed; see the 'error' column of {job.output}")
        raise typer.Exit(1)


def _run(job: JobSpec, quiet: bool, fresh: bool = False) -> int:
    from batchllm.pipeline import Interrupted
    from batchllm.pipeline import run as run_pipeline
    from batchllm.report import collect, print_summary, write_json

    try:
        outcome = run_pipeline(job, fresh=fresh)
    except Interrupted:
        err.print(f"interrupted: finished rows are committed in {job.run_dir}; run the same command again to resume")
        raise typer.Exit(130) from None
    report = collect(job.run_dir) | {"device": outcome.device, "dtype": outcome.dtype, "steps": outcome.engine.steps}
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
    """Run the whole pipeline on a tiny random model and a generated reviews file, offline."""
    import tempfile

    from batchllm.demo_data import write_demo_job

    _logging(False)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        err.print("[bold]batchllm demo[/]: a tiny model with RANDOM weights, so its outputs are noise;")
        err.print("the point is to see the pipeline run end to end with nothing to download.\n")
        demo_job = write_demo_job(workdir, rows=rows)
        job = JobSpec(
            input=demo_job.input_path,
            model=str(demo_job.model_dir),
            output=demo_job.output_path,
            id_column="review_id",
            keep_columns=("stars",),
            prefix=demo_job.prefix_path.read_text(encoding="utf-8"),
            sampling=SamplingParams(max_new_tokens=24),
            engine=EngineConfig(device="cpu"),
        )
        with _job_errors(False):
            _run(job, False)
        import pyarrow.parquet as pq

        table = pq.read_table(job.output).slice(0, 5).to_pandas() if _has_pandas() else None
        if table is not None:
            err.print(table[["id", "output", "prompt_tokens", "cached_tokens", "finish_reason"]].to_string())
        if keep is None:
            err.print("(pass --keep DIR to keep the model, data and output)")


def _has_pandas() -> bool:
    try:
        import pandas  # noqa: F401
    except ImportError:
        return False
    return True


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
        if isinstance(exc, (JobError, ValueError)):
            err.print(f"[red]error:[/] {exc}", highlight=False)
        else:
            err.print(f"[red]error:[/] {type(exc).__name__}: {exc} (run with --debug for the traceback)")
        raise typer.Exit(2)


def _logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
