"""Integer settings from environment variables, with one error format for every worker setting."""

from __future__ import annotations

import os
from typing import Mapping


def env_int(name: str, default: int, *, minimum: int | None = None, env: Mapping[str, str] | None = None,
            error: type[Exception] = ValueError, prefix: str = "") -> int:
    """``int(env[name])``, or ``default`` when unset or blank.

    Raises ``error`` with ``"<prefix><name> must be an integer, got '...'"`` for a non-integer and
    ``"<prefix><name> must be >= <minimum>, got ..."`` below ``minimum``."""
    raw = (os.environ if env is None else env).get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise error(f"{prefix}{name} must be an integer, got {raw!r}") from None
    if minimum is not None and value < minimum:
        raise error(f"{prefix}{name} must be >= {minimum}, got {value}")
    return value
