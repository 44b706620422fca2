"""Checks for settings values: each raises a SettingError that names the setting and says what is wrong."""

from __future__ import annotations

import math

from batchllm.errors import SettingError


def check_int(name: str, value: object, minimum: int | None = None, note: str = "") -> int:
    """``value`` if it is an integer (``True`` and ``8.0`` are not) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise SettingError(name, f"must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise SettingError(name, f"must be >= {minimum}{note}, got {value}")
    return value


def check_number(name: str, value: object) -> float:
    """``value`` if it is a finite int or float (not a bool, nan or inf)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SettingError(name, f"must be a number, got {value!r}")
    if not math.isfinite(value):
        raise SettingError(name, f"must be a finite number, got {value}")
    return value


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise SettingError(name, f"must be true or false, got {value!r}")
    return value


def check_str(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise SettingError(name, f"must be a string, got {value!r}")
    return value


def check_strings(name: str, values: tuple) -> tuple[str, ...]:
    if not isinstance(values, tuple) or not all(isinstance(v, str) for v in values):
        raise SettingError(name, f"must be strings, got {values!r}")
    return values


def parse_memory(text: str) -> float:
    """Bytes for "4GB" / "512MB"; a fraction in (0, 1] for "0.9" (of free GPU memory)."""
    t = check_str("kv-cache-memory", text).strip().upper()
    units = {"GB": 1 << 30, "GIB": 1 << 30, "MB": 1 << 20, "MIB": 1 << 20, "G": 1 << 30, "M": 1 << 20}
    for unit, scale in units.items():
        if t.endswith(unit):
            try:
                value = float(t[: -len(unit)])
            except ValueError:
                break
            if not 0 < value < math.inf:  # nan and inf fail this too
                break
            return value * scale
    else:
        try:
            value = float(t)
        except ValueError:
            value = -1.0
        if 0 < value <= 1:
            return value
    raise SettingError(
        "kv-cache-memory", f"must look like '4GB', '512MB' or a fraction like '0.9', got {text!r}"
    )


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise SettingError(name, f"must be one of {', '.join(choices)}; got {value!r}")
