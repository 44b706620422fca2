"""A ``--params-column`` value -> that row's sampling settings: the job's, with any of ``max_tokens``,
``temperature``, ``top_p``, ``top_k``, ``seed`` and ``stop`` overridden (a Parquet struct or a JSONL
object; null fields and a null value keep the job's). A value of the wrong shape is that row's error.

``max_tokens`` may lower the job's ``--max-new-tokens`` but not raise it: the job's value sizes the
KV cache and the work units before any row is read."""

from __future__ import annotations

import math
from dataclasses import replace

from batchllm.config import SamplingParams
from batchllm.errors import SettingError

KEYS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop")


def row_params(
    value: object, job: SamplingParams, cap_max_tokens: bool = False, extra_keys: tuple[str, ...] = ()
) -> tuple[SamplingParams | None, str | None]:
    """(the row's settings, None) — None settings: the job's own — or (None, why the value is wrong).
    ``cap_max_tokens``: a ``max_tokens`` above the job's is lowered to it instead of refused.
    ``extra_keys``: keys allowed besides ``KEYS`` (``n`` for OpenAI batch requests)."""
    if value is None:
        return None, None
    if not isinstance(value, dict):
        return None, f"params is not an object ({type(value).__name__})"
    if (
        cap_max_tokens
        and isinstance(value.get("max_tokens"), int)
        and value["max_tokens"] > job.max_new_tokens
    ):
        value = {**value, "max_tokens": job.max_new_tokens}
    unknown = [k for k in value if k not in KEYS and k not in extra_keys]
    if unknown:
        return None, f"params has an unknown key {unknown[0]!r} (known: {', '.join(KEYS)})"
    given = {k: v for k, v in value.items() if v is not None}
    if not given:
        return None, None
    for key, v in given.items():
        error = _problem(key, v, job)
        if error is not None:
            return None, f"params {key} {error}, got {v!r}"
    stop = given.pop("stop", None)
    overrides = {("max_new_tokens" if k == "max_tokens" else k): v for k, v in given.items()}
    for key in ("max_new_tokens", "top_k", "seed", "n"):
        if key in overrides:
            overrides[key] = int(overrides[key])  # 5.0 from a column that also holds 2.5
    if stop is not None:
        overrides["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
    try:
        return replace(job, **overrides), None
    except SettingError as e:
        return None, f"params {e.setting} {e.rule}"


def _problem(key: str, value: object, job: SamplingParams) -> str | None:
    """What ``value`` should have been for ``key``; None when it fits."""
    if key == "stop":
        items = [value] if isinstance(value, str) else value
        ok = isinstance(items, list) and all(isinstance(s, str) and s for s in items)
        return None if ok else "must be a non-empty string or a list of them"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "must be a number"
    integral = isinstance(value, int) or float(value).is_integer()
    if key in ("max_tokens", "top_k", "seed", "n") and not integral:
        return "must be an integer"
    if not math.isfinite(value):
        return "must be finite"
    if key == "max_tokens" and not 1 <= value <= job.max_new_tokens:
        return f"must be in [1, {job.max_new_tokens}] (the job's --max-new-tokens)"
    if key == "temperature" and value < 0:
        return "must be >= 0"
    if key == "top_p" and not 0 < value <= 1:
        return "must be in (0, 1]"
    if key == "n" and not 1 <= value <= job.n:
        return f"must be in [1, {job.n}] (the job's --n)"
    if key == "top_k" and value < 0:
        return "must be >= 0"
    return None
