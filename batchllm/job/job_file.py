"""Job files and command-line settings -> a JobSpec.

A TOML job file holds the same settings as the flags of ``batchllm run`` (keys are the flag names);
a flag given on the command line wins over the file. Each value must have its flag's declared type
(``chat = "false"`` is a string, not a boolean; ``8.9`` and ``true`` are not integers); ranges and
finiteness are the configs' own checks, reported against the job file when the value came from it.
"""

from __future__ import annotations

import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from types import NoneType, UnionType

import typer

from batchllm.config import EngineConfig, JobSpec, SamplingParams, ScoringParams
from batchllm.engine.grammar_spec import GrammarSpec
from batchllm.errors import JobError, SettingError
from batchllm.io.dataset import input_stem
from batchllm.io.openai_batch import is_batch_file

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PATH_KEYS = ("input", "prefix", "output", "run_dir", "report", "output_dir", "json_schema", "grammar")
LIST_KEYS = ("keep_columns", "stop", "choices")  # a string or a list of strings in a job file


@dataclass(frozen=True)
class Settings:
    """``batchllm run``'s parameters by name, and which of them came from the job file."""

    values: dict
    job_file: Path | None = None
    from_job_file: frozenset[str] = field(default_factory=frozenset)
    on_command_line: frozenset[str] = field(default_factory=frozenset)  # flags given, not defaults

    def given(self, name: str) -> bool:
        """Whether the setting was given (a flag or the job file) rather than left at its default."""
        return name in self.on_command_line or name in self.from_job_file

    def __getitem__(self, name: str) -> object:
        return self.values[name]

    def error(self, exc: SettingError) -> JobError:
        """The one-line error for a setting out of range, naming where it was given."""
        if exc.setting.replace("-", "_") in self.from_job_file:
            return JobError(f"job file {self.job_file}: {exc.setting} {exc.rule}")
        return JobError(f"--{exc.setting} {exc.rule}")


def merge_job_file(ctx: typer.Context, job: Path | None) -> Settings:
    """The command's parameters, with a job file's values where no flag was given."""
    params = dict(ctx.params)
    flags = frozenset(n for n in params if getattr(ctx.get_parameter_source(n), "name", None) != "DEFAULT")
    if job is None:
        return Settings(params, on_command_line=flags)
    try:
        settings = tomllib.loads(job.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise JobError(f"cannot read the job file {job}: {exc}") from exc
    declared = typing.get_type_hints(ctx.command.callback)
    taken = set()
    for key, value in settings.items():
        name = key.replace("-", "_")
        if name not in params or name in ("job", "debug"):
            raise JobError(f"job file {job}: unknown setting {key!r}")
        expected = _type_problem(name, value, declared[name])
        if expected is not None:
            raise JobError(f"job file {job}: {key} must be {expected}, got {value!r}")
        if getattr(ctx.get_parameter_source(name), "name", None) != "DEFAULT":
            continue  # the command line wins
        params[name] = _flag_value(name, value, job)
        taken.add(name)
    return Settings(params, job, frozenset(taken), flags)


def _type_problem(name: str, value: object, declared: object) -> str | None:
    """What ``value`` should have been for a flag declared as ``declared``; None when it fits."""
    if name in LIST_KEYS:
        items = value if isinstance(value, list) else [value]
        ok = all(isinstance(v, str) for v in items)
        return None if ok else "a string or a list of strings"
    if isinstance(declared, UnionType):  # X | None: TOML has no null, so X
        (declared,) = [t for t in typing.get_args(declared) if t is not NoneType]
    if declared is bool:
        return None if isinstance(value, bool) else "true or false"
    if isinstance(value, bool):  # bool is an int subclass; it is never a number here
        return {int: "an integer", float: "a number"}.get(declared, "a string")
    if declared is int:
        return None if isinstance(value, int) else "an integer"
    if declared is float:
        return None if isinstance(value, (int, float)) else "a number"
    return None if isinstance(value, str) else "a string"  # str and Path flags


def _flag_value(name: str, value: object, job: Path) -> object:
    """A type-checked job-file value as the flag would have given it."""
    if name in PATH_KEYS:
        return job.parent / value  # relative to the job file
    if name == "keep_columns" and isinstance(value, list):
        return ",".join(value)
    if name == "stop" and isinstance(value, str):
        return [value]
    return value


def read_prefix(path: Path | str) -> str:
    """The prefix file's text, or a JobError naming the file and what is wrong with it."""
    path = Path(path)
    if path.is_dir():
        raise JobError(f"prefix file {path} is a directory; give a UTF-8 text file")
    if not path.exists():
        raise JobError(f"prefix file {path} does not exist")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise JobError(
            f"prefix file {path} is not UTF-8 text ({e.reason} at byte {e.start}); is it a binary file?"
        ) from e
    except OSError as e:
        raise JobError(f"cannot read the prefix file {path}: {e.strerror or e}") from e


def read_text_file(path: Path, what: str) -> str:
    """A UTF-8 text file's contents, or a JobError naming the ``what`` file and what is wrong."""
    if not path.is_file():
        problem = "is a directory; give a UTF-8 text file" if path.is_dir() else "does not exist"
        raise JobError(f"{what} file {path} {problem}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise JobError(f"{what} file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    except OSError as e:
        raise JobError(f"cannot read the {what} file {path}: {e.strerror or e}") from e


def job_spec(p: Settings) -> JobSpec:
    """The JobSpec of ``batchllm run``'s settings; a setting out of range is a JobError naming it."""
    if p["input"] is None or p["model"] is None:
        raise JobError("give INPUT and --model (on the command line or in a --job file)")
    try:
        return _job_spec(p)
    except SettingError as e:
        raise p.error(e) from e


def _job_spec(p: Settings) -> JobSpec:
    inp, prefix = Path(p["input"]), p["prefix"]
    return JobSpec(
        input=inp,
        model=str(p["model"]),
        output=_output(p, inp),
        format=p["format"],
        column=p["column"],
        id_column=p["id_column"],
        keep_columns=tuple(c.strip() for c in p["keep_columns"].split(",") if c.strip()),
        prefix=read_prefix(prefix) if prefix is not None else None,
        chat=p["chat"],
        sampling=_sampling(p),
        engine=_engine(p),
        scoring=_scoring(p),
        report=Path(p["report"]) if p["report"] else None,
        progress=not p["quiet"],
        run_dir=Path(p["run_dir"]) if p["run_dir"] else None,
        window_rows=p["window"],
        checkpoint_rows=p["checkpoint_rows"],
        checkpoint_seconds=p["checkpoint_seconds"],
        workers=p["workers"],
        ray_address=p["ray_address"],
        output_dir=Path(p["output_dir"]) if p.values.get("output_dir") else None,
        messages_column=p.values.get("messages_column"),
        params_column=p.values.get("params_column"),
        explode_samples=p["explode_samples"],
        grammar=_grammar(p),
        schema_column=p["schema_column"],
        schema_in_prompt=p["schema_in_prompt"],
        max_new_tokens_given=p.given("max_new_tokens"),
    )


def _output(p: Settings, inp: Path) -> Path:
    """--output, or with --output-dir that directory (each input file's output goes inside it)."""
    output_dir = p.values.get("output_dir")
    if output_dir and p["output"]:
        raise JobError("give --output or --output-dir, not both")
    if output_dir:
        return Path(output_dir)
    if p["output"]:
        return Path(p["output"])
    batch = p["format"] == "openai" or (p["format"] is None and inp.suffix == ".jsonl" and is_batch_file(inp))
    return Path.cwd() / f"{input_stem(inp)}.out.{'jsonl' if batch else 'parquet'}"


def _grammar(p: Settings) -> GrammarSpec | None:
    """The job's output constraint from --json-schema FILE, --regex PATTERN or --grammar FILE."""
    given = [k for k in ("json_schema", "regex", "grammar") if p[k] is not None]
    if len(given) > 1:
        flags = " and ".join("--" + k.replace("_", "-") for k in given)
        raise JobError(f"{flags} cannot be combined; give one output constraint")
    if not given:
        return None
    kind = given[0]
    if kind == "regex":
        return GrammarSpec("regex", p["regex"])
    what = "JSON schema" if kind == "json_schema" else "grammar"
    return GrammarSpec(kind, read_text_file(Path(p[kind]), what))


def _sampling(p: Settings) -> SamplingParams:
    return SamplingParams(
        temperature=p["temperature"],
        top_p=p["top_p"],
        top_k=p["top_k"],
        seed=p["seed"],
        max_new_tokens=p["max_new_tokens"],
        stop=tuple(p["stop"] or ()),
        ignore_eos=p["ignore_eos"],
        n=p["n"],
        logprobs=p["logprobs"],
    )


def _scoring(p: Settings) -> ScoringParams:
    """``--choices`` is comma-separated on the command line, a list (or that string) in a job file;
    each choice is taken exactly, spaces included."""
    choices = p["choices"]
    if isinstance(choices, str):
        choices = choices.split(",")
    return ScoringParams(
        choices=tuple(choices or ()),
        choices_column=p["choices_column"],
        choice_score=p["choice_score"],
        score_column=p["score_column"],
    )


def _engine(p: Settings) -> EngineConfig:
    return EngineConfig(
        device=p["device"],
        dtype=p["dtype"],
        token_budget=p["token_budget"],
        kv_cache_memory=p["kv_cache_memory"],
        attention_backend=p["attention_backend"],
        prefix_sharing=p["prefix_sharing"],
        deterministic=p["deterministic"],
        cuda_graphs=p["cuda_graphs"],
        load_format=p["load_format"],
    )
