"""``env_int(name, default, ...)``: the keyword form of :func:`worker.protocol.env_int` (same parser, same messages).

Kept for callers that read one integer by name; the worker's settings are read in ``worker.settings``.
"""

from __future__ import annotations

from typing import Mapping

from . import protocol


def env_int(name: str, default: int, *, minimum: int | None = None, env: Mapping[str, str] | None = None,
            error: type[Exception] = ValueError, prefix: str = "") -> int:
    """``int(env[name])`` (default: the process environment), or ``default`` when unset or blank.

    Raises ``error`` with ``"<prefix><name> must be an integer, got '...'"`` for a non-integer and
    ``"<prefix><name> must be >= <minimum>, got ..."`` below ``minimum``."""
    return protocol.env_int(protocol.process_env() if env is None else env, name, default, minimum,
                            error=error, prefix=prefix)
