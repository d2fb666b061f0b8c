"""Typed environment parsers shared by ``backend.settings`` and ``worker.settings``; errors name the variable."""

from __future__ import annotations

import math
from typing import Mapping, Sequence


class SettingError(ValueError):
    """An environment variable has a value that cannot be used; the message names the variable."""


def env_str(env: Mapping[str, str], name: str, default: str) -> str:
    """``env[name]`` stripped, or ``default`` when unset or blank."""
    value = env.get(name)
    return default if value is None or value.strip() == "" else value.strip()


def _range_error(name: str, value: float, lo: float | None, hi: float | None) -> str | None:
    if lo is not None and hi is not None and not lo <= value <= hi:
        return f"{name} must be in [{lo}, {hi}], got {value}"
    if lo is not None and not value >= lo:
        return f"{name} must be >= {lo}, got {value}"
    if hi is not None and not value <= hi:
        return f"{name} must be <= {hi}, got {value}"
    return None


def env_int(env: Mapping[str, str], name: str, default: int, lo: int | None = None, hi: int | None = None, *,
            error: type[Exception] = SettingError, prefix: str = "") -> int:
    """``int(env[name])``, or ``default`` when unset or blank; ``error("<prefix><name> must be ...")`` otherwise."""
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise error(f"{prefix}{name} must be an integer, got {raw!r}") from None
    problem = _range_error(name, value, lo, hi)
    if problem:
        raise error(prefix + problem)
    return value


def env_float(env: Mapping[str, str], name: str, default: float, lo: float | None = None, hi: float | None = None,
              *, error: type[Exception] = SettingError, prefix: str = "") -> float:
    """``float(env[name])`` (finite), or ``default`` when unset or blank."""
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise error(f"{prefix}{name} must be a number, got {raw!r}") from None
    if not math.isfinite(value):
        raise error(f"{prefix}{name} must be a finite number, got {raw!r}")
    problem = _range_error(name, value, lo, hi)
    if problem:
        raise error(prefix + problem)
    return value


def env_bool(env: Mapping[str, str], name: str, default: bool, *, error: type[Exception] = SettingError) -> bool:
    """1/0, true/false, yes/no, on/off (any case), or ``default`` when unset or blank."""
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise error(f"{name} must be a boolean (1/0, true/false), got {raw!r}")


def env_choice(env: Mapping[str, str], name: str, default: str, choices: Sequence[str], *,
               error: type[Exception] = SettingError) -> str:
    """``env[name]`` lower-cased, one of ``choices``, or ``default`` when unset or blank."""
    value = env_str(env, name, default).lower()
    if value not in choices:
        raise error(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value
