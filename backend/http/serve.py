"""``maskinv-backend`` / ``python -m backend``: serve the backend with gunicorn (threaded workers).

Settings come from the environment (docs/configuration.md); ``--host/--port/--workers/--threads`` override
MASKINV_HOST/MASKINV_PORT/MASKINV_WEB_WORKERS/MASKINV_WEB_THREADS.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Sequence

from gunicorn.glogging import Logger

from backend.settings import Settings, SettingsError

#: what stands for MASKINV_URL_SECRET in the access log
REDACTED = "***"


def redacting_logger(secret: str | None) -> type[Logger]:
    """gunicorn's logger class with ``secret`` (the URL prefix that authenticates Label Studio) replaced by
    :data:`REDACTED` in every access-log field (request line, path, query, referer)."""

    class RedactingLogger(Logger):
        def atoms(self, resp: Any, req: Any, environ: dict, request_time: Any) -> dict[str, Any]:
            atoms = super().atoms(resp, req, environ, request_time)
            if not secret:
                return atoms
            return {k: v.replace(secret, REDACTED) if isinstance(v, str) else v for k, v in atoms.items()}

    return RedactingLogger


def gunicorn_options(settings: Settings) -> dict[str, Any]:
    """gunicorn settings for ``settings`` (the worker timeout exceeds the longest request we allow)."""
    longest = max(settings.timeout_s, settings.batch_timeout_s) + settings.fetch_timeout_s
    return {
        "bind": f"{settings.host}:{settings.port}",
        "workers": settings.web_workers,
        "threads": settings.web_threads,
        "worker_class": "gthread",
        "timeout": int(longest + 60),
        "graceful_timeout": 30,
        "keepalive": 5,
        "accesslog": "-",
        "logger_class": redacting_logger(settings.url_secret),
        "errorlog": "-",
        "loglevel": settings.log_level.lower(),
        "preload_app": False,  # every worker builds its own app: Redis connections, threads, caches
        "proc_name": "maskinv-backend",
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="maskinv-backend", description=__doc__.splitlines()[0])
    p.add_argument("--host", help="bind address [env MASKINV_HOST, default 0.0.0.0]")
    p.add_argument("--port", type=int, help="port [env MASKINV_PORT, default 9090]")
    p.add_argument("--workers", type=int, help="gunicorn worker processes [env MASKINV_WEB_WORKERS]")
    p.add_argument("--threads", type=int, help="threads per worker [env MASKINV_WEB_THREADS, default 4]")
    args = p.parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"maskinv-backend: {exc}", file=sys.stderr)
        return 2
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port), ("web_workers", args.workers),
                                   ("web_threads", args.threads)) if v is not None}
    settings = dataclasses.replace(settings, **overrides)

    from gunicorn.app.base import BaseApplication

    class _Server(BaseApplication):
        def load_config(self) -> None:
            for key, value in gunicorn_options(settings).items():
                self.cfg.set(key, value)

        def load(self):
            from backend.http.app import create_app

            return create_app(settings)

    _Server().run()
    return 0
