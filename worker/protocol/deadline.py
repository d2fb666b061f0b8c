"""A job's time limit in the thread that runs it (torch-free): :func:`time_limit` around the job, :func:`check_time`
between its steps. A thread cannot be stopped from outside: a job past its limit stops at its next check, with
:class:`JobTimeout`. The embedded dispatcher applies MASKINV_JOB_TIMEOUT this way; RQ workers have their own."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Callable, Iterator


class JobTimeout(RuntimeError):
    """A job ran past its time limit and stopped at the check between two of its steps."""

    def __init__(self, message: str, time_limit_s: float):
        super().__init__(message)
        self.time_limit_s = time_limit_s


#: the clock of :func:`time_limit` (seconds; a module attribute so that tests can drive it)
clock: Callable[[], float] = time.monotonic
_limit = threading.local()


@contextlib.contextmanager
def time_limit(seconds: float | None, name: str | None = None) -> Iterator[None]:
    """Within the block, in this thread, :func:`check_time` raises :class:`JobTimeout` once ``seconds`` have passed
    (None: no limit); ``name``: the setting that sets it, for the error. A thread cannot be stopped from outside:
    the job stops at its next check."""
    previous = getattr(_limit, "value", None)
    _limit.value = None if seconds is None else (clock() + float(seconds), float(seconds), name)
    try:
        yield
    finally:
        _limit.value = previous


def check_time(step: str) -> None:
    """Raise :class:`JobTimeout` when this thread's :func:`time_limit` has passed (no-op without one); ``step``
    names what would have come next."""
    limit = getattr(_limit, "value", None)
    if limit is not None and clock() >= limit[0]:
        what = f"{limit[2]}={limit[1]:g}s" if limit[2] else f"of {limit[1]:g}s"
        raise JobTimeout(f"stopped before {step}: over its time limit {what}", limit[1])
