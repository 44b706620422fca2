"""Job files and command-line settings -> a JobSpec.

A TOML job file holds the same settings as the flags of ``batchllm run`` (keys are the flag names);
a flag given on the command line wins over the file.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from batchllm.config import EngineConfig, JobSpec, SamplingParams
from batchllm.errors import JobError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PATH_KEYS = ("input", "prefix", "output", "run_dir", "report")


def merge_job_file(ctx: typer.Context, job: Path | None) -> dict:
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


def job_spec(p: dict) -> JobSpec:
    """The JobSpec of ``batchllm run``'s settings (flag names as keys)."""
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
        sampling=_sampling(p),
        engine=_engine(p),
        report=Path(p["report"]) if p["report"] else None,
        progress=not p["quiet"],
        run_dir=Path(p["run_dir"]) if p["run_dir"] else None,
        window_rows=p["window"],
        checkpoint_rows=p["checkpoint_rows"],
        checkpoint_seconds=p["checkpoint_seconds"],
        workers=p["workers"],
        ray_address=p["ray_address"],
    )


def _sampling(p: dict) -> SamplingParams:
    return SamplingParams(
        temperature=p["temperature"],
        top_p=p["top_p"],
        top_k=p["top_k"],
        seed=p["seed"],
        max_new_tokens=p["max_new_tokens"],
        stop=tuple(p["stop"] or ()),
        ignore_eos=p["ignore_eos"],
    )


def _engine(p: dict) -> EngineConfig:
    return EngineConfig(
        device=p["device"],
        dtype=p["dtype"],
        token_budget=p["token_budget"],
        kv_cache_memory=p["kv_cache_memory"],
        attention_backend=p["attention_backend"],
        prefix_sharing=p["prefix_sharing"],
        deterministic=p["deterministic"],
        load_format=p["load_format"],
    )
