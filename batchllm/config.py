"""Frozen, validated settings: what to sample, how the engine runs, and the whole job."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from batchllm.engine.grammar_spec import GrammarSpec
from batchllm.errors import SettingError
from batchllm.setting_checks import (
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_str,
    check_strings,
    parse_memory,
)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int = 0
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    n: int = 1  # samples per row (--n); > 1 needs temperature > 0
    logprobs: int = 0  # top alternatives reported per generated token (--logprobs); 0: none, no column

    def __post_init__(self) -> None:
        if check_number("temperature", self.temperature) < 0:
            raise SettingError("temperature", f"must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < check_number("top-p", self.top_p) <= 1:
            raise SettingError("top-p", f"must be in (0, 1], got {self.top_p}")
        check_int("top-k", self.top_k, minimum=0, note=" (0 disables it)")
        check_int("seed", self.seed)
        check_int("max-new-tokens", self.max_new_tokens, minimum=1)
        check_strings("stop", self.stop)
        if any(s == "" for s in self.stop):
            raise SettingError("stop", "strings must not be empty")
        check_bool("ignore-eos", self.ignore_eos)
        check_int("n", self.n, minimum=1)
        if self.n > 1 and self.greedy:
            raise SettingError("n", f"> 1 needs --temperature > 0 (greedy samples are equal), got {self.n}")
        if not 0 <= check_int("logprobs", self.logprobs) <= 20:
            raise SettingError("logprobs", f"must be in 0..20, got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class EngineConfig:
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    block_size: int = 16
    token_budget: int = 8192  # new tokens per step, prefill and decode together
    max_running: int = 1024  # rows decoding at once
    kv_cache_memory: str | None = None  # "4GB", "0.9" (fraction of free GPU memory), None: default
    attention_backend: str = "auto"  # auto | torch | triton
    prefix_sharing: bool = True
    deterministic: bool = False  # batch-invariant attention (torch backend): see kernels/torch_chunked.py
    load_format: str = "auto"  # auto | dummy
    cuda_graphs: bool = True  # decode steps through CUDA graphs (CUDA + Triton): engine/cuda_graphs.py
    cuda_graph_max_batch: int = 512  # rows of the largest graph bucket; bigger steps run eagerly

    def __post_init__(self) -> None:
        check_choice("device", self.device, ("auto", "cpu", "cuda"))
        check_choice("dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        check_choice("attention-backend", self.attention_backend, ("auto", "torch", "triton"))
        check_choice("load-format", self.load_format, ("auto", "dummy"))
        if check_int("block-size", self.block_size, minimum=1) & (self.block_size - 1):
            raise SettingError("block-size", f"must be a power of two, got {self.block_size}")
        check_int("token-budget", self.token_budget, minimum=1)
        check_int("max-running", self.max_running, minimum=1)
        if self.kv_cache_memory is not None:
            parse_memory(self.kv_cache_memory)
        check_bool("prefix-sharing", self.prefix_sharing)
        check_bool("cuda-graphs", self.cuda_graphs)
        check_int("cuda-graph-max-batch", self.cuda_graph_max_batch, minimum=1)


@dataclass(frozen=True)
class ScoringParams:
    """Scoring instead of generation (see ``job.scoring``): each choice's log-probability given the
    prompt (``choices`` for every row, or a list column), or one given continuation's (``score_column``)."""

    choices: tuple[str, ...] = ()
    choices_column: str | None = None
    choice_score: str = "sum"  # sum | mean (per token)
    score_column: str | None = None

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for choice in check_strings("choices", self.choices):
            if not choice:
                raise SettingError("choices", "must not hold an empty choice")
            if choice in seen:
                raise SettingError("choices", f"names {choice!r} twice; list each choice once")
            seen.add(choice)
        check_choice("choice-score", self.choice_score, ("sum", "mean"))
        for name in ("choices-column", "score-column"):
            value = getattr(self, name.replace("-", "_"))
            if value is not None and not check_str(name, value):
                raise SettingError(name, "must not be empty")
        given = [n for n, v in self._modes().items() if v]
        if len(given) > 1:
            raise SettingError(given[1], f"cannot be combined with {given[0]}; a job scores one way")

    def _modes(self) -> dict[str, bool]:
        return {
            "choices": bool(self.choices),
            "choices-column": self.choices_column is not None,
            "score-column": self.score_column is not None,
        }

    @property
    def enabled(self) -> bool:
        return any(self._modes().values())

    @property
    def flag(self) -> str | None:
        """The flag that turns scoring on (``choices``, ``choices-column``, ``score-column``)."""
        return next((name for name, given in self._modes().items() if given), None)

    @property
    def column(self) -> str | None:
        """The input column scoring reads per row, if any."""
        return self.choices_column or self.score_column


@dataclass(frozen=True)
class JobSpec:
    input: Path
    model: str
    output: Path
    format: str | None = None  # parquet | jsonl | openai; None: from the extension (and first line)
    column: str = "text"
    id_column: str | None = None
    keep_columns: tuple[str, ...] = ()
    prefix: str | None = None  # the prefix text itself, already read from --prefix FILE
    chat: bool = False
    sampling: SamplingParams = field(default_factory=SamplingParams)
    engine: EngineConfig = field(default_factory=EngineConfig)
    scoring: ScoringParams = field(default_factory=ScoringParams)
    report: Path | None = None
    progress: bool = True
    run_dir: Path | None = None  # None: <output>.run/ next to the output
    window_rows: int = 0  # rows planned and run together (one prefix tree each); 0: sized to memory
    checkpoint_rows: int = 10_000  # commit finished rows at least this often...
    checkpoint_seconds: float = 60.0  # ...and at least this often
    workers: int | None = None  # engine workers; None: 1, or every GPU of the Ray cluster at ray_address
    ray_address: str | None = None  # join this Ray cluster ("auto", "ray://host:10001"); None: local
    params_column: str | None = None  # a column of per-row sampling settings (io.row_params)
    messages_column: str | None = None  # a column of conversations, rendered with the chat template
    output_dir: Path | None = None  # one output file per input file here (``output`` is then this directory)
    explode_samples: bool = False  # one output row per sample (with sample_index) instead of list columns
    grammar: GrammarSpec | None = None  # every row's output must match it (--json-schema/--regex/--grammar)
    schema_column: str | None = None  # column of per-row JSON Schema texts
    schema_in_prompt: bool = False  # with chat: the JSON Schema text goes into the system message
    request_schemas: bool = False  # rows bring their own JSON Schema (OpenAI response_format)
    max_new_tokens_given: bool = False  # --max-new-tokens was set: it caps OpenAI requests' max_tokens

    def __post_init__(self) -> None:
        self._check_grammar()
        if self.workers is not None:
            check_int("workers", self.workers, minimum=1)
        if self.ray_address is not None and not check_str("ray-address", self.ray_address).strip():
            raise SettingError("ray-address", "must not be empty")
        if self.format is not None:
            check_choice("format", self.format, ("parquet", "jsonl", "openai"))
        self._check_columns()
        self._check_scoring()
        check_bool("chat", self.chat)
        check_bool("progress", self.progress)
        check_bool("explode-samples", self.explode_samples)
        check_int("checkpoint-rows", self.checkpoint_rows, minimum=1)
        if check_number("checkpoint-seconds", self.checkpoint_seconds) <= 0:
            raise SettingError("checkpoint-seconds", f"must be > 0, got {self.checkpoint_seconds}")
        check_int("window", self.window_rows, minimum=0, note=" rows (0 sizes it to memory)")
        if self.window_rows == 0:
            object.__setattr__(self, "window_rows", default_window_rows())
        if self.run_dir is None:
            object.__setattr__(self, "run_dir", self.output.with_name(self.output.name + ".run"))

    def _check_grammar(self) -> None:
        if self.grammar is not None and not isinstance(self.grammar, GrammarSpec):
            raise SettingError("json-schema", f"must be a GrammarSpec, got {self.grammar!r}")
        if self.schema_column is not None:
            if not check_str("schema-column", self.schema_column):
                raise SettingError("schema-column", "must not be empty")
            if self.grammar is not None:
                raise SettingError("schema-column", f"cannot be combined with --{self.grammar.flag}")
        if check_bool("schema-in-prompt", self.schema_in_prompt):
            if not self.chat:
                raise SettingError("schema-in-prompt", "needs --chat (the schema goes in the system message)")
            if self.schema_column is None and (self.grammar is None or self.grammar.kind != "json_schema"):
                raise SettingError("schema-in-prompt", "needs --json-schema or --schema-column")

    def _check_columns(self) -> None:
        check_str("column", self.column)
        if self.id_column is not None:
            check_str("id-column", self.id_column)
        if self.messages_column is not None:
            check_str("messages-column", self.messages_column)
        if self.params_column is not None:
            check_str("params-column", self.params_column)
        seen: set[str] = set()
        for name in check_strings("keep-columns", self.keep_columns):
            if name in seen:
                raise SettingError("keep-columns", f"names {name!r} twice; list each column once")
            seen.add(name)

    def _check_scoring(self) -> None:
        """Scoring replaces generation for the whole job: flags that only shape generated text are refused."""
        if not self.scoring.enabled:
            return
        s, flag = self.sampling, self.scoring.flag
        changed = {"temperature": s.temperature != 0, "top-p": s.top_p != 1, "top-k": s.top_k != 0}
        changed.update({"stop": bool(s.stop), "ignore-eos": s.ignore_eos})
        for name, differs in changed.items():
            if differs:
                raise SettingError(name, f"shapes generated text, and --{flag} scores instead of generating")
        column = self.scoring.column
        if column is not None and column in (self.column, self.id_column):
            raise SettingError(flag, f"column {column!r} is also the text or id column")


BYTES_PER_WINDOW_ROW = 16 << 10  # text, token ids and plan of one ~1k-token row, with headroom


def default_window_rows() -> int:
    """Rows per window when none is given: a quarter of the memory available now, at 16 KiB a row,
    between 10,000 and 1,000,000 rows."""
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not POSIX
        available = 4 << 30
    return max(10_000, min(1_000_000, available // 4 // BYTES_PER_WINDOW_ROW))
