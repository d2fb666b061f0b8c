"""Run records shared by the processes of one machine in embedded mode: SQLite under MASKINV_DATA_DIR.

``maskinv-annotate`` without REDIS_URL runs in its own process; it writes its records (and heartbeats) to
``$MASKINV_DATA_DIR/runs.sqlite3``, where the embedded backend's ``GET /runs`` reads them, as queue mode shares
them through Redis. Claims, written marks and resume records stay in each process's memory (an embedded backend
and a ``maskinv-annotate`` run different models in different processes: they never share a job).

Tables::

    runs(id TEXT PRIMARY KEY, doc TEXT, updated REAL)   the RunStatus JSON (at most MASKINV_MAX_RUN_RECORDS,
                                                        oldest finished dropped first; RECORD_TTL_S)
    alive(id TEXT PRIMARY KEY, until REAL)              heartbeat: epoch seconds the run counts as alive until
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path

from backend.runs.store import ALIVE_TTL_S, MAX_RUNS, MemoryRunStore, RunStatus, records_to_drop

log = logging.getLogger(__name__)

#: the file under MASKINV_DATA_DIR
FILE_NAME = "runs.sqlite3"


class SqliteRunStore(MemoryRunStore):
    """Embedded mode: records and liveness in SQLite (module docstring), the rest as :class:`MemoryRunStore`."""

    def __init__(self, path: str | Path, max_records: int = MAX_RUNS) -> None:
        super().__init__(max_records)
        self.path = Path(path)
        self._db_lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    def _conn(self) -> sqlite3.Connection:
        with self._db_lock:
            if self._db is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
                db.execute("PRAGMA busy_timeout=30000")
                db.execute("CREATE TABLE IF NOT EXISTS runs (id TEXT PRIMARY KEY, doc TEXT NOT NULL, updated REAL)")
                db.execute("CREATE TABLE IF NOT EXISTS alive (id TEXT PRIMARY KEY, until REAL NOT NULL)")
                self._db = db
            return self._db

    def _exec(self, sql: str, args: tuple = ()) -> list[tuple]:
        db = self._conn()
        with self._db_lock:
            return db.execute(sql, args).fetchall()

    def save(self, status: RunStatus) -> None:
        super().save(status)
        self._exec("INSERT OR REPLACE INTO runs (id, doc, updated) VALUES (?, ?, ?)",
                   (status.id, json.dumps(status.to_dict()), status.last_change()))
        self._trim_file()

    def _trim_file(self) -> None:
        records = self._load_file()
        for run_id in records_to_drop(records, self.max_records):
            self._exec("DELETE FROM runs WHERE id = ?", (run_id,))
            self._exec("DELETE FROM alive WHERE id = ?", (run_id,))

    def _load_file(self) -> list[RunStatus]:
        out = []
        for (doc,) in self._exec("SELECT doc FROM runs"):
            try:
                out.append(RunStatus.from_dict(json.loads(doc)))
            except (ValueError, TypeError) as exc:
                log.warning("a run record in %s is unreadable (%s); skipped", self.path, exc)
        return out

    def load_all(self) -> list[RunStatus]:
        """Every process's records (this process's newest in memory win)."""
        mine = {s.id: s for s in super().load_all()}
        theirs = [s for s in self._load_file() if s.id not in mine]
        return list(mine.values()) + theirs

    def beat(self, run_id: str) -> None:
        super().beat(run_id)
        self._exec("INSERT OR REPLACE INTO alive (id, until) VALUES (?, ?)", (run_id, time.time() + ALIVE_TTL_S))

    def alive(self, run_id: str) -> bool:
        if super().alive(run_id):
            return True
        rows = self._exec("SELECT until FROM alive WHERE id = ?", (run_id,))
        return bool(rows) and float(rows[0][0]) > time.time()

    def end(self, run_id: str) -> None:
        super().end(run_id)
        self._exec("DELETE FROM alive WHERE id = ?", (run_id,))


def embedded_run_store(data_dir: str, max_records: int) -> SqliteRunStore:
    """The embedded mode's run store: ``$MASKINV_DATA_DIR/runs.sqlite3``."""
    return SqliteRunStore(Path(os.path.expanduser(data_dir)) / FILE_NAME, max_records)
