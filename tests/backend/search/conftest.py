"""The PostgreSQL + pgvector server the search tests run against (``pg_url``, one per test run).

MASKINV_TEST_PG_URL (default ``postgresql://postgres@127.0.0.1:5432/postgres``) when that server offers the
``vector`` extension; otherwise a private PostgreSQL 16 with pgvector 0.6 from the ``pgserver`` package (the
``test`` extra), started in a temporary directory and stopped and removed after the run. With neither the pgvector
tests skip, except in CI (``CI`` set), where they fail and say why.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from typing import Iterator

import pytest

DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def _has_pgvector(url: str) -> str | None:
    """None when the server at ``url`` answers and offers pgvector; else why not."""
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=3) as conn:
            if conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'").fetchone() is None:
                return f"the PostgreSQL server at {url} has no pgvector extension"
    except psycopg.OperationalError as exc:
        return f"no PostgreSQL server at {url} ({str(exc).strip()})"
    return None


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(f"pgvector tests cannot run in CI: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A ``postgresql://`` URL of a server with pgvector (see the module docstring)."""
    url = os.environ.get("MASKINV_TEST_PG_URL", DEFAULT_PG_URL)
    why_not = _has_pgvector(url)
    if why_not is None:
        yield url
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR unset
            import pgserver
    except ImportError:
        _unavailable(f"{why_not}, and the pgserver package (the test extra) is not installed")
        return
    data = tempfile.mkdtemp(prefix="maskinv-pg-")  # under /tmp: the server's own user must reach it
    try:
        server = pgserver.get_server(data, cleanup_mode="delete")
        local = server.get_uri()
    except Exception as exc:  # noqa: BLE001 - any failure to start is reported the same way
        shutil.rmtree(data, ignore_errors=True)
        _unavailable(f"{why_not}, and pgserver could not start a server in {data}: {exc}")
        return
    try:
        if (reason := _has_pgvector(local)) is not None:
            _unavailable(f"{why_not}, and pgserver's server: {reason}")
        yield local
    finally:
        server.cleanup()
        shutil.rmtree(data, ignore_errors=True)
