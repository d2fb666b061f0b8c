"""The example store: per project, the LETs of the regions annotators labelled, grouped by annotation.

Label Studio's annotations are the source of truth; this store is a derived index that ``/train`` (and
``maskinv-rebuild-examples``) can rebuild from them at any time. Each annotation owns its examples, so:

* an updated annotation *replaces* its examples; a deleted one removes them;
* the same event twice changes nothing (same content -> same digest -> same project version);
* projects are isolated: every read and write names its project.

One example = (region id, label, model key, LET ``[D]`` float32). The *model key* names what made the LET
(model id + size, steps, lr, alpha): only examples of the model and parameters in use are scored, and a model
change needs a rebuild.

Stores:

* :class:`SqliteExampleStore` (embedded mode): one SQLite file, ``$MASKINV_DATA_DIR/examples.sqlite3``
  (default ``./maskinv-data``); WAL journal, safe for the backend's threads and processes.
* :class:`RedisExampleStore` (queue mode): per project one hash ``{prefix}:examples:{project}`` (field =
  annotation id, value = JSON with the examples, LETs base64 float32) and the set ``{prefix}:examples:projects``.
  These keys get **no TTL**; docker-compose runs Redis with AOF (``appendonly yes``) and
  ``maxmemory-policy noeviction``, so they are never evicted (a full Redis refuses writes instead).

The project *version* is a digest of its annotations' example digests: it changes exactly when the example set
changes, and goes into ``model_version`` and the prototypes' cache keys.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

import numpy as np

log = logging.getLogger(__name__)


class ExampleStoreError(RuntimeError):
    """The store cannot be read or written, or a write would exceed MASKINV_MAX_EXAMPLES."""


@dataclass(frozen=True)
class Example:
    """One labelled region's LET."""

    region_id: str
    label: str
    model_key: str
    let: np.ndarray  # [D] float32

    def to_json(self) -> dict[str, Any]:
        return {"region_id": self.region_id, "label": self.label, "model_key": self.model_key,
                "let": base64.b64encode(np.asarray(self.let, "<f4").tobytes()).decode("ascii")}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Example":
        let = np.frombuffer(base64.b64decode(data["let"]), dtype="<f4").astype(np.float32)
        return cls(str(data["region_id"]), str(data["label"]), str(data["model_key"]), let)


def examples_digest(examples: Sequence[Example]) -> str:
    """Content digest of one annotation's examples (order-independent). LETs enter rounded to float16, so a
    LET recomputed with last-bit floating-point differences (another process, another batch) digests the same."""
    h = hashlib.sha256()
    for e in sorted(examples, key=lambda e: (e.region_id, e.label, e.model_key)):
        h.update(f"{e.region_id}\n{e.label}\n{e.model_key}\n".encode())
        h.update(np.asarray(e.let, "<f2").tobytes())
    return h.hexdigest()


def project_version(digests: Iterable[tuple[str, str]]) -> str:
    """Digest of ``(annotation id, examples digest)`` pairs; ``""`` for a project without examples."""
    pairs = sorted(digests)
    if not pairs:
        return ""
    return hashlib.sha256("\n".join(f"{a}:{d}" for a, d in pairs).encode()).hexdigest()


class ExampleStore(Protocol):
    def replace_annotation(self, project: str, annotation_id: str, examples: Sequence[Example]) -> bool:
        """Set an annotation's examples (an empty list removes it); True when something changed."""

    def delete_annotation(self, project: str, annotation_id: str) -> bool: ...

    def annotation_ids(self, project: str) -> set[str]: ...

    def examples(self, project: str, model_key: str | None = None) -> list[Example]: ...

    def version(self, project: str) -> str: ...

    def clear(self, project: str) -> int: ...

    def count(self, project: str) -> int: ...


class SqliteExampleStore:
    """Examples in one SQLite file (embedded mode)."""

    def __init__(self, path: str | Path, max_examples: int = 20000):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_examples = int(max_examples)
        self._local = threading.local()
        with self._conn() as db:
            db.executescript("""
                PRAGMA journal_mode=WAL;
                CREATE TABLE IF NOT EXISTS annotations (
                    project TEXT NOT NULL, annotation_id TEXT NOT NULL, digest TEXT NOT NULL, n INTEGER NOT NULL,
                    PRIMARY KEY (project, annotation_id));
                CREATE TABLE IF NOT EXISTS examples (
                    project TEXT NOT NULL, annotation_id TEXT NOT NULL, region_id TEXT NOT NULL,
                    label TEXT NOT NULL, model_key TEXT NOT NULL, let BLOB NOT NULL);
                CREATE INDEX IF NOT EXISTS examples_by_annotation ON examples (project, annotation_id);
            """)

    def _conn(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.execute("PRAGMA busy_timeout=30000")
            self._local.db = db
        return db

    def replace_annotation(self, project: str, annotation_id: str, examples: Sequence[Example]) -> bool:
        digest = examples_digest(examples)
        db = self._conn()
        try:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT digest, n FROM annotations WHERE project=? AND annotation_id=?",
                             (project, annotation_id)).fetchone()
            if (row is None and not examples) or (row is not None and examples and row[0] == digest):
                db.execute("COMMIT")
                return False
            total = db.execute("SELECT COALESCE(SUM(n), 0) FROM annotations WHERE project=?", (project,)).fetchone()[0]
            if examples and total - (row[1] if row else 0) + len(examples) > self.max_examples:
                db.execute("ROLLBACK")
                raise ExampleStoreError(f"project {project} would have more than MASKINV_MAX_EXAMPLES="
                                        f"{self.max_examples} examples")
            db.execute("DELETE FROM examples WHERE project=? AND annotation_id=?", (project, annotation_id))
            db.execute("DELETE FROM annotations WHERE project=? AND annotation_id=?", (project, annotation_id))
            if examples:
                db.execute("INSERT INTO annotations VALUES (?, ?, ?, ?)",
                           (project, annotation_id, digest, len(examples)))
                db.executemany("INSERT INTO examples VALUES (?, ?, ?, ?, ?, ?)",
                               [(project, annotation_id, e.region_id, e.label, e.model_key,
                                 np.asarray(e.let, "<f4").tobytes()) for e in examples])
            db.execute("COMMIT")
            return True
        except sqlite3.Error as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise ExampleStoreError(f"example store {self.path}: {exc}") from None

    def delete_annotation(self, project: str, annotation_id: str) -> bool:
        return self.replace_annotation(project, annotation_id, [])

    def annotation_ids(self, project: str) -> set[str]:
        return {r[0] for r in self._conn().execute("SELECT annotation_id FROM annotations WHERE project=?", (project,))}

    def examples(self, project: str, model_key: str | None = None) -> list[Example]:
        q = "SELECT region_id, label, model_key, let FROM examples WHERE project=?"
        args: tuple = (project,)
        if model_key is not None:
            q, args = q + " AND model_key=?", (project, model_key)
        return [Example(r[0], r[1], r[2], np.frombuffer(r[3], "<f4").astype(np.float32))
                for r in self._conn().execute(q + " ORDER BY annotation_id, rowid", args)]

    def version(self, project: str) -> str:
        return project_version(self._conn().execute("SELECT annotation_id, digest FROM annotations WHERE project=?",
                                                    (project,)).fetchall())

    def count(self, project: str) -> int:
        return int(self._conn().execute("SELECT COALESCE(SUM(n), 0) FROM annotations WHERE project=?",
                                        (project,)).fetchone()[0])

    def clear(self, project: str) -> int:
        n = self.count(project)
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        db.execute("DELETE FROM examples WHERE project=?", (project,))
        db.execute("DELETE FROM annotations WHERE project=?", (project,))
        db.execute("COMMIT")
        return n


class RedisExampleStore:
    """Examples in Redis hashes without TTL (queue mode)."""

    def __init__(self, connection: Any, prefix: str = "maskinv", max_examples: int = 20000):
        self.connection = connection
        self.prefix = prefix
        self.max_examples = int(max_examples)

    def _key(self, project: str) -> str:
        return f"{self.prefix}:examples:{project}"

    @property
    def _projects(self) -> str:
        return f"{self.prefix}:examples:projects"

    def _records(self, project: str) -> dict[str, dict]:
        out = {}
        for field_, raw in self.connection.hgetall(self._key(project)).items():
            try:
                out[field_.decode() if isinstance(field_, bytes) else field_] = json.loads(raw)
            except (TypeError, ValueError):
                log.warning("example store: unreadable record %r in project %s", field_, project)
        return out

    def replace_annotation(self, project: str, annotation_id: str, examples: Sequence[Example]) -> bool:
        from redis.exceptions import RedisError, WatchError

        key = self._key(project)
        digest = examples_digest(examples)
        try:
            with self.connection.pipeline() as pipe:
                while True:
                    try:
                        pipe.watch(key)
                        raw = pipe.hget(key, annotation_id)
                        old = json.loads(raw) if raw else None
                        if (old is None and not examples) or (old is not None and examples and old["digest"] == digest):
                            pipe.unwatch()
                            return False
                        if examples:
                            total = sum(len(json.loads(v)["examples"]) for v in pipe.hvals(key))
                            if total - (len(old["examples"]) if old else 0) + len(examples) > self.max_examples:
                                pipe.unwatch()
                                raise ExampleStoreError(f"project {project} would have more than "
                                                        f"MASKINV_MAX_EXAMPLES={self.max_examples} examples")
                        pipe.multi()
                        if examples:
                            pipe.hset(key, annotation_id, json.dumps(
                                {"digest": digest, "examples": [e.to_json() for e in examples]}))
                            pipe.sadd(self._projects, project)
                        else:
                            pipe.hdel(key, annotation_id)
                        pipe.execute()
                        return True
                    except WatchError:
                        continue
        except RedisError as exc:
            raise ExampleStoreError(f"example store (Redis): {exc}") from None

    def delete_annotation(self, project: str, annotation_id: str) -> bool:
        return self.replace_annotation(project, annotation_id, [])

    def annotation_ids(self, project: str) -> set[str]:
        return {f.decode() if isinstance(f, bytes) else f for f in self.connection.hkeys(self._key(project))}

    def examples(self, project: str, model_key: str | None = None) -> list[Example]:
        out = []
        for ann in sorted(self._records(project).items()):
            for e in ann[1].get("examples") or []:
                ex = Example.from_json(e)
                if model_key is None or ex.model_key == model_key:
                    out.append(ex)
        return out

    def version(self, project: str) -> str:
        return project_version((a, r.get("digest", "")) for a, r in self._records(project).items())

    def count(self, project: str) -> int:
        return sum(len(r.get("examples") or []) for r in self._records(project).values())

    def clear(self, project: str) -> int:
        n = self.count(project)
        self.connection.delete(self._key(project))
        self.connection.srem(self._projects, project)
        return n


def make_example_store(settings: Any, connection: Any = None) -> ExampleStore:
    """SQLite under ``settings.data_dir`` (embedded) or Redis (queue mode)."""
    if settings.embedded:
        return SqliteExampleStore(Path(os.path.expanduser(settings.data_dir)) / "examples.sqlite3",
                                  settings.max_examples)
    if connection is None:
        from redis import Redis

        connection = Redis.from_url(settings.redis_url)
    return RedisExampleStore(connection, settings.redis_prefix, settings.max_examples)
