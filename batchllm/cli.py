"""Command line: arguments -> JobSpec -> pipeline.run(); exit 0 all rows done, 1 some rows failed,
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

from batchllm.config import EngineConfig, JobSpec, SamplingParams
from batchllm.errors import JobError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Offline batch LLM inference with global prefix sharing."
)
err = Console(stderr=True, soft_wrap=True)

Opt = typer.Option


PATH_KEYS = ("input", "prefix", "output", "run_dir", "report")


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
    format: Annotated[str | None, Opt(help="parquet | jsonl (default: from the extension).")] = None,
    chat: Annotated[
        bool, Opt(help="Apply the chat template: prefix as system, text as user message.")
    ] = False,
    output: Annotated[Path | None, Opt(help="Output Parquet (default: <input stem>.out.parquet).")] = None,
    run_dir: Annotated[Path | None, Opt(help="Run directory (default: <output>.run/).")] = None,
    fresh: Annotated[bool, Opt(help="Discard an earlier run in the run directory.")] = False,
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
        str | None, Opt(help="KV pool: '4GB' or a fraction of free GPU memory.")
    ] = None,
    attention_backend: Annotated[str, Opt(help="auto | torch | triton")] = "auto",
    prefix_sharing: Annotated[bool, Opt(help="Share KV of common prompt prefixes.")] = True,
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
        p = _merge_job_file(ctx, job)
        spec = _job_spec(p)
        failed = _run(spec, p["quiet"], fresh=p["fresh"])
    if failed:
        err.print(f"{failed} row(s) failed; see the 'error' column of {spec.output}")
        raise typer.Exit(1)


def _merge_job_file(ctx: typer.Context, job: Path | None) -> dict:
    """The command's parameters, with a job file's values where no flag was given."""
    params = dict(ctx.params)
    if job is None:
        return params
    try:
        settings = tomllib.loads(job.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise JobError(f"cannot read the job file {job}: {exc}") from exc
    for key, value in settings.items():
        name = key.replace("-", "_")
        if name not in params or name in ("job", "debug"):
            raise JobError(f"job file {job}: unknown setting {key!r}")
        if getattr(ctx.get_parameter_source(name), "name", None) != "DEFAULT":
            continue  # the command line wins
        if name in PATH_KEYS:
            value = job.parent / value  # relative to the job file
        elif name == "keep_columns" and isinstance(value, list):
            value = ",".join(value)
        elif name == "stop" and isinstance(value, str):
            value = [value]
        params[name] = value
    return params


def _job_spec(p: dict) -> JobSpec:
    if p["input"] is None or p["model"] is None:
        raise JobError("give INPUT and --model (on the command line or in a --job file)")
    inp, prefix = Path(p["input"]), p["prefix"]
    if prefix is not None and not Path(prefix).is_file():
        raise JobError(f"prefix file {prefix} does not exist")
    return JobSpec(
        input=inp,
        model=str(p["model"]),
        output=Path(p["output"]) if p["output"] else Path.cwd() / f"{inp.stem}.out.parquet",
        format=p["format"],
        column=p["column"],
        id_column=p["id_column"],
        keep_columns=tuple(c.strip() for c in p["keep_columns"].split(",") if c.strip()),
        prefix=Path(prefix).read_text(encoding="utf-8") if prefix is not None else None,
        chat=p["chat"],
        sampling=SamplingParams(
            p["temperature"],
            p["top_p"],
            p["top_k"],
            p["seed"],
            p["max_new_tokens"],
            tuple(p["stop"] or ()),
            p["ignore_eos"],
        ),  # fmt: skip
        engine=EngineConfig(
            device=p["device"],
            dtype=p["dtype"],
            token_budget=p["token_budget"],
            kv_cache_memory=p["kv_cache_memory"],
            attention_backend=p["attention_backend"],
            prefix_sharing=p["prefix_sharing"],
            load_format=p["load_format"],
        ),
        report=Path(p["report"]) if p["report"] else None,
        progress=not p["quiet"],
        run_dir=Path(p["run_dir"]) if p["run_dir"] else None,
        window_rows=p["window"],
        checkpoint_rows=p["checkpoint_rows"],
        checkpoint_seconds=p["checkpoint_seconds"],
        workers=p["workers"],
        ray_address=p["ray_address"],
    )


@app.command()
def plan(
    input: Annotated[Path, typer.Argument(help="Input .parquet or .jsonl file.")],
    model: Annotated[str, Opt(help="Model directory or hub id (only its tokenizer and config are read).")],
    prefix: Annotated[Path | None, Opt(help="File put before every row's text.")] = None,
    column: Annotated[str, Opt()] = "text",
    format: Annotated[str | None, Opt()] = None,
    chat: Annotated[bool, Opt()] = False,
    max_new_tokens: Annotated[int, Opt(help="As for run: rows too long for it are errors.")] = 256,
    prefix_sharing: Annotated[bool, Opt()] = True,
    window: Annotated[int, Opt(help="As for run.")] = 0,
    json_out: Annotated[bool, Opt("--json", help="Print one JSON object.")] = False,
    debug: Annotated[bool, Opt()] = False,
) -> None:
    """What a job will cost: tokens, unique tokens, planned prefill, groups, FLOPs — without weights."""
    from batchllm.analyze import plan_job

    _logging(True)
    with _job_errors(debug):
        if prefix is not None and not prefix.is_file():
            raise JobError(f"prefix file {prefix} does not exist")
        spec = JobSpec(
            input=input,
            model=model,
            output=Path("unused.parquet"),
            format=format,
            column=column,
            prefix=prefix.read_text(encoding="utf-8") if prefix is not None else None,
            chat=chat,
            sampling=SamplingParams(max_new_tokens=max_new_tokens),
            engine=EngineConfig(prefix_sharing=prefix_sharing),
            window_rows=window,
        )
        figures = plan_job(spec)
    if json_out:
        typer.echo(json.dumps(figures))
        return
    table = Table(title=f"batchllm plan: {input}", show_header=False)
    for key, value in figures.items():
        table.add_row(
            key,
            f"{value:,.3g}"
            if isinstance(value, float)
            else f"{value:,}"
            if isinstance(value, int)
            else str(value),
        )
    Console().print(table)


@app.command("report")
def report_cmd(
    run_dir: Annotated[Path, typer.Argument(help="The run directory (<output>.run/).")],
    json_out: Annotated[bool, Opt("--json", help="Print one JSON object.")] = False,
    plot: Annotated[Path | None, Opt(help="Draw throughput and KV use over time to this PNG.")] = None,
    debug: Annotated[bool, Opt()] = False,
) -> None:
    """The throughput report of a run: finished, still running, or interrupted."""
    from batchllm.report import collect, print_summary
    from batchllm.report import plot as draw

    with _job_errors(debug):
        figures = collect(run_dir)
        if plot is not None:
            draw(run_dir, plot)
    if json_out:
        typer.echo(json.dumps(figures))
    else:
        print_summary(figures, Console(), title=f"batchllm report: {run_dir}")


def _run(job: JobSpec, quiet: bool, fresh: bool = False) -> int:
    from batchllm.interrupt import Interrupted, StopRequest
    from batchllm.pipeline import run as run_pipeline
    from batchllm.report import collect, print_summary, write_json

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

    from batchllm.demo_data import choose_demo_job

    _logging(False)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        demo_job, banner = choose_demo_job(workdir, rows=rows)
        err.print(f"[bold]batchllm demo[/]: {banner}\n")
        job = JobSpec(
            input=demo_job.input_path,
            model=str(demo_job.model_dir),
            output=demo_job.output_path,
            id_column="review_id",
            keep_columns=("stars",),
            prefix=demo_job.prefix_path.read_text(encoding="utf-8"),
            chat=demo_job.chat,
            sampling=SamplingParams(max_new_tokens=demo_job.max_new_tokens),
            engine=EngineConfig(device="cpu"),
        )
        with _job_errors(False):
            _run(job, False)
        _preview(job.output)
        if keep is None:
            err.print("(pass --keep DIR to keep the model, data and output)")


def _preview(output: Path, rows: int = 5) -> None:
    import pyarrow.parquet as pq

    table = Table(title=f"first rows of {output.name}")
    columns = ["id", "output", "prompt_tokens", "cached_tokens", "finish_reason"]
    for name in columns:
        table.add_column(name, no_wrap=True)
    for row in pq.read_table(output, columns=columns).slice(0, rows).to_pylist():
        table.add_row(*(escape(repr(row[c])[:40] if c == "output" else str(row[c])) for c in columns))
    err.print(table)


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
