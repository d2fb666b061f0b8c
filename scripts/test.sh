#!/usr/bin/env bash
# Set up everything the test suite needs (idempotent) and run it.
#   bash scripts/test.sh            # all tests, end-to-end against a real Label Studio included
#   bash scripts/test.sh -m "not e2e" -x   # extra arguments go to pytest
# `ruff check .` and `mypy` run before pytest and fail the run on any finding.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch first, pinned to the builds that lie on this project's machines' disk (no multi-GB download).
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  .venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
fi
.venv/bin/pip install -q -e '.[all]'

# The browser tests (tests/browser, docs/browser.md) drive Debian's Chromium through Playwright (the `test` extra
# above); no browser is downloaded. apt only when /usr/bin/chromium is missing.
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -q && $SUDO apt-get install -y -q chromium
fi

# The region-search store tests run against PostgreSQL + pgvector (docs/search.md): the server at MASKINV_TEST_PG_URL
# (default 127.0.0.1:5432) when it offers pgvector, else a private PostgreSQL 16 + pgvector 0.6 that the `pgserver`
# package (test extra above) starts in a temporary directory for the run (tests/backend/search/conftest.py); in CI
# (CI set) a run with neither fails instead of skipping. apt is tried only for a local server without pgvector
# (Debian trixie and the PostgreSQL apt repository ship postgresql-15-pgvector; bookworm does not: pgserver's is used).
if command -v pg_config >/dev/null 2>&1 && [ ! -f "$(pg_config --sharedir)/extension/vector.control" ] \
    && command -v apt-get >/dev/null 2>&1; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get install -y -q postgresql-15-pgvector || echo "postgresql-15-pgvector not available from apt"
fi

# Label Studio lives in its own virtual environment (its pins clash with label-studio-ml's).
if [ -f scripts/label_studio_env.sh ]; then
  bash scripts/label_studio_env.sh
fi

# The queue tests talk to a real Redis (127.0.0.1:6379 unless REDIS_URL says otherwise).
if command -v redis-cli >/dev/null 2>&1 && ! redis-cli -u "${REDIS_URL:-redis://127.0.0.1:6379/0}" ping >/dev/null 2>&1; then
  echo "Redis is not answering at ${REDIS_URL:-redis://127.0.0.1:6379/0}; starting a local one" >&2
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no || true
fi

# Lint first (rules in pyproject.toml's [tool.ruff]); any finding fails the run.
.venv/bin/python -m ruff check .
# Type check the contract, the backend and the job entry points ([tool.mypy] in pyproject.toml); any error fails.
.venv/bin/python -m mypy

exec .venv/bin/python -m pytest -ra "$@"
