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
  annotation id, value = JSON with the examples, LETs base64 float32), its index (digest and count per
  annotation) and version keys, and the set ``{prefix}:examples:projects``. These keys get **no TTL**;
  docker-compose runs Redis with AOF (``appendonly yes``) and
  ``maxmemory-policy volatile-lru``, which evicts only keys with a TTL, so they are never evicted (a Redis full of
  them refuses writes instead).

The project *version* is a digest of its annotations' example digests: it changes exactly when the example set
changes, and goes into ``model_version`` and the prototypes' cache keys.

Budgets: ``MASKINV_MAX_EXAMPLES`` examples per project and ``MASKINV_MAX_PROJECTS`` projects per store; a write
beyond either is refused (:class:`ExampleBudgetError` for projects) and changes nothing: stored projects are
never evicted (their examples cost annotators' work to rebuild), a project whose examples are all deleted frees
its place.
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


class ExampleBudgetError(ExampleStoreError):
    """A write refused because the store keeps MASKINV_MAX_PROJECTS projects already; nothing was changed."""


def projects_refusal(project: str, max_projects: int) -> ExampleBudgetError:
    """The error for a new project beyond ``max_projects`` (new projects are refused, stored ones never evicted)."""
    return ExampleBudgetError(f"project {project} would be example store project number {max_projects + 1}, more "
                              f"than MASKINV_MAX_PROJECTS={max_projects}; delete another project's examples or "
                              "raise the limit")


@dataclass(frozen=True)
class Example:
    """One labelled region's embedding (the LET mixed with its masked crop) and, when the embedding mixed one in,
    the masked crop itself (what the examples are learned on beside the embedding, ``worker.protocol.features``)."""

    region_id: str
    label: str
    model_key: str
    let: np.ndarray  # [D] float32
    crop: np.ndarray | None = None  # [D] float32

    def to_json(self) -> dict[str, Any]:
        doc = {"region_id": self.region_id, "label": self.label, "model_key": self.model_key,
               "let": _b64(self.let)}
        if self.crop is not None:
            doc["crop"] = _b64(self.crop)
        return doc

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Example":
        crop = _vector(data["crop"]) if data.get("crop") else None
        return cls(str(data["region_id"]), str(data["label"]), str(data["model_key"]), _vector(data["let"]), crop)


def _b64(vector: np.ndarray) -> str:
    return base64.b64encode(np.asarray(vector, "<f4").tobytes()).decode("ascii")


def _vector(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4").astype(np.float32)


def examples_digest(examples: Sequence[Example]) -> str:
    """Content digest of one annotation's examples (order-independent). LETs enter rounded to float16, so a
    LET recomputed with last-bit floating-point differences (another process, another batch) digests the same."""
    h = hashlib.sha256()
    for e in sorted(examples, key=lambda e: (e.region_id, e.label, e.model_key)):
        h.update(f"{e.region_id}\n{e.label}\n{e.model_key}\n".encode())
        h.update(np.asarray(e.let, "<f2").tobytes())
        if e.crop is not None:
            h.update(b"crop" + np.asarray(e.crop, "<f2").tobytes())
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

    def snapshot(self, project: str, model_key: str | None = None) -> tuple[str, list[Example]]:
        """The project's version and its examples (of ``model_key``), read together."""

    def version(self, project: str) -> str: ...

    def clear(self, project: str) -> int: ...

    def count(self, project: str) -> int: ...


class SqliteExampleStore:
    """Examples in one SQLite file (embedded mode)."""

    def __init__(self, path: str | Path, max_examples: int = 20000, max_projects: int = 1000):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_examples = int(max_examples)
        self.max_projects = int(max_projects)
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
            # the masked crop beside the embedding (files made before crops were kept have no such column)
            if "crop" not in {row[1] for row in db.execute("PRAGMA table_info(examples)")}:
                db.execute("ALTER TABLE examples ADD COLUMN crop BLOB")

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
            if examples and row is None and total == 0 and self._projects(db) >= self.max_projects:
                db.execute("ROLLBACK")
                raise projects_refusal(project, self.max_projects)
            db.execute("DELETE FROM examples WHERE project=? AND annotation_id=?", (project, annotation_id))
            db.execute("DELETE FROM annotations WHERE project=? AND annotation_id=?", (project, annotation_id))
            if examples:
                db.execute("INSERT INTO annotations VALUES (?, ?, ?, ?)",
                           (project, annotation_id, digest, len(examples)))
                db.executemany("INSERT INTO examples (project, annotation_id, region_id, label, model_key, let, crop) "
                               "VALUES (?, ?, ?, ?, ?, ?, ?)",
                               [(project, annotation_id, e.region_id, e.label, e.model_key,
                                 np.asarray(e.let, "<f4").tobytes(),
                                 None if e.crop is None else np.asarray(e.crop, "<f4").tobytes()) for e in examples])
            db.execute("COMMIT")
            return True
        except sqlite3.Error as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise ExampleStoreError(f"example store {self.path}: {exc}") from None

    @staticmethod
    def _projects(db: sqlite3.Connection) -> int:
        return int(db.execute("SELECT COUNT(DISTINCT project) FROM annotations").fetchone()[0])

    def delete_annotation(self, project: str, annotation_id: str) -> bool:
        return self.replace_annotation(project, annotation_id, [])

    def annotation_ids(self, project: str) -> set[str]:
        return {r[0] for r in self._conn().execute("SELECT annotation_id FROM annotations WHERE project=?", (project,))}

    def examples(self, project: str, model_key: str | None = None) -> list[Example]:
        q = "SELECT region_id, label, model_key, let, crop FROM examples WHERE project=?"
        args: tuple = (project,)
        if model_key is not None:
            q, args = q + " AND model_key=?", (project, model_key)
        return [Example(r[0], r[1], r[2], np.frombuffer(r[3], "<f4").astype(np.float32),
                        None if r[4] is None else np.frombuffer(r[4], "<f4").astype(np.float32))
                for r in self._conn().execute(q + " ORDER BY annotation_id, rowid", args)]

    def snapshot(self, project: str, model_key: str | None = None) -> tuple[str, list[Example]]:
        db = self._conn()
        db.execute("BEGIN")  # one read transaction: the version names exactly these examples
        try:
            return self.version(project), self.examples(project, model_key)
        finally:
            db.execute("COMMIT")

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
    """Examples in Redis without TTL (queue mode).

    Per project: the hash ``{prefix}:examples:{project}`` (annotation id -> JSON with its examples, LETs base64),
    its index ``...:{project}:index`` (annotation id -> ``"<digest> <count>"``, a few bytes each) and the project
    version ``...:{project}:version``; all three change in one transaction. Reading the version or the count
    reads no LET: a /predict whose prototypes are cached costs one GET. An index missing beside an existing hash
    (a store written before it existed) is built from the hash on first use.
    """

    def __init__(self, connection: Any, prefix: str = "maskinv", max_examples: int = 20000,
                 max_projects: int = 1000):
        self.connection = connection
        self.prefix = prefix
        self.max_examples = int(max_examples)
        self.max_projects = int(max_projects)

    def _key(self, project: str) -> str:
        return f"{self.prefix}:examples:{project}"

    def _index_key(self, project: str) -> str:
        return f"{self.prefix}:examples:{project}:index"

    def _version_key(self, project: str) -> str:
        return f"{self.prefix}:examples:{project}:version"

    @property
    def _projects(self) -> str:
        return f"{self.prefix}:examples:projects"

    def _records(self, project: str, conn: Any = None) -> dict[str, dict]:
        return _decode_records(project, (conn or self.connection).hgetall(self._key(project)))

    def _index(self, conn: Any, project: str) -> dict[str, tuple[str, int]]:
        """annotation id -> (examples digest, example count); built from the records if the index is missing."""
        raw = conn.hgetall(self._index_key(project))
        if raw or not conn.exists(self._key(project)):
            return {_text(a): (_text(v).split(" ")[0], int(_text(v).split(" ")[1])) for a, v in raw.items()}
        return {a: (r.get("digest", ""), len(r.get("examples") or [])) for a, r in self._records(project, conn).items()}

    def _write_index(self, pipe: Any, project: str, index: dict[str, tuple[str, int]]) -> None:
        """Queue (inside MULTI) the index and version of ``project`` as ``index`` says, and its projects entry."""
        pipe.delete(self._index_key(project))
        if index:
            pipe.hset(self._index_key(project), mapping={a: f"{d} {n}" for a, (d, n) in index.items()})
            pipe.set(self._version_key(project), project_version((a, d) for a, (d, _) in index.items()))
            pipe.sadd(self._projects, project)
        else:
            pipe.delete(self._version_key(project))
            pipe.srem(self._projects, project)

    def _check_budget(self, pipe: Any, project: str, index: dict, old: tuple | None, n_new: int) -> None:
        total = sum(n for _, n in index.values()) - (old[1] if old else 0) + n_new
        if total > self.max_examples:
            raise ExampleStoreError(f"project {project} would have more than MASKINV_MAX_EXAMPLES={self.max_examples}"
                                    " examples")
        if not index and pipe.scard(self._projects) >= self.max_projects:
            self._prune_projects(pipe)
            if pipe.scard(self._projects) >= self.max_projects:
                raise projects_refusal(project, self.max_projects)

    def _prune_projects(self, conn: Any) -> None:
        """Drop projects without examples from the projects set (left there by stores written before the index)."""
        for member in conn.smembers(self._projects):
            if not conn.exists(self._key(_text(member))):
                self.connection.srem(self._projects, member)

    def replace_annotation(self, project: str, annotation_id: str, examples: Sequence[Example]) -> bool:
        from redis.exceptions import RedisError, WatchError

        digest = examples_digest(examples)
        try:
            with self.connection.pipeline() as pipe:
                while True:
                    try:
                        pipe.watch(self._key(project), self._index_key(project), self._projects)
                        index = self._index(pipe, project)
                        old = index.get(annotation_id)
                        if (old is None and not examples) or (old is not None and examples and old[0] == digest):
                            pipe.unwatch()
                            return False
                        if examples:
                            self._check_budget(pipe, project, index, old, len(examples))
                            index[annotation_id] = (digest, len(examples))
                        else:
                            index.pop(annotation_id, None)
                        pipe.multi()
                        if examples:
                            pipe.hset(self._key(project), annotation_id, json.dumps(
                                {"digest": digest, "examples": [e.to_json() for e in examples]}))
                        else:
                            pipe.hdel(self._key(project), annotation_id)
                        self._write_index(pipe, project, index)
                        pipe.execute()
                        return True
                    except WatchError:
                        continue
        except RedisError as exc:
            raise ExampleStoreError(f"example store (Redis): {exc}") from None

    def delete_annotation(self, project: str, annotation_id: str) -> bool:
        return self.replace_annotation(project, annotation_id, [])

    def annotation_ids(self, project: str) -> set[str]:
        return {_text(f) for f in self.connection.hkeys(self._key(project))}

    def examples(self, project: str, model_key: str | None = None) -> list[Example]:
        return _examples_of(self._records(project), model_key)

    def snapshot(self, project: str, model_key: str | None = None) -> tuple[str, list[Example]]:
        with self.connection.pipeline(transaction=True) as pipe:
            pipe.get(self._version_key(project))
            pipe.hgetall(self._key(project))
            version, raw = pipe.execute()
        records = _decode_records(project, raw)
        if version is None and records:  # no index yet: version from the records themselves
            version = project_version((a, r.get("digest", "")) for a, r in records.items())
        return _text(version) if version else "", _examples_of(records, model_key)

    def version(self, project: str) -> str:
        """One GET (the index's version); a store without index is indexed first."""
        version = self.connection.get(self._version_key(project))
        if version is not None:
            return _text(version)
        if not self.connection.exists(self._key(project)):
            return ""
        return self._build_index(project)

    def _build_index(self, project: str) -> str:
        """Write the index and version of a project stored without them; returns the version."""
        from redis.exceptions import WatchError

        with self.connection.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(self._key(project), self._index_key(project))
                    index = self._index(pipe, project)
                    pipe.multi()
                    self._write_index(pipe, project, index)
                    pipe.execute()
                    return project_version((a, d) for a, (d, _) in index.items())
                except WatchError:
                    continue

    def count(self, project: str) -> int:
        self.version(project)  # makes sure the index exists
        return sum(n for _, n in self._index(self.connection, project).values())

    def clear(self, project: str) -> int:
        n = self.count(project)
        self.connection.delete(self._key(project), self._index_key(project), self._version_key(project))
        self.connection.srem(self._projects, project)
        return n


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _decode_records(project: str, raw: dict) -> dict[str, dict]:
    out = {}
    for field_, value in raw.items():
        try:
            out[_text(field_)] = json.loads(value)
        except (TypeError, ValueError):
            log.warning("example store: unreadable record %r in project %s", field_, project)
    return out


def _examples_of(records: dict[str, dict], model_key: str | None) -> list[Example]:
    out = []
    for _, record in sorted(records.items()):
        for e in record.get("examples") or []:
            ex = Example.from_json(e)
            if model_key is None or ex.model_key == model_key:
                out.append(ex)
    return out


def make_example_store(settings: Any, connection: Any = None) -> ExampleStore:
    """SQLite under ``settings.data_dir`` (embedded) or Redis (queue mode)."""
    if settings.embedded:
        return SqliteExampleStore(Path(os.path.expanduser(settings.data_dir)) / "examples.sqlite3",
                                  settings.max_examples, settings.max_projects)
    if connection is None:
        from redis import Redis

        connection = Redis.from_url(settings.redis_url)
    return RedisExampleStore(connection, settings.redis_prefix, settings.max_examples, settings.max_projects)
