"""The embedded region store: FAISS for the vectors, SQLite for the records, one directory, no server.

Layout (``$MASKINV_DATA_DIR/search``):

* ``regions.sqlite3`` (WAL): ``regions`` (one row per record, its vector as float16 unit rows; ``id`` never
  reused), ``projects`` (project -> small integer), ``removed`` (a log of removed ids, ``seq`` ascending);
* ``index-<model digest>.faiss`` + ``.json``: one FAISS index per model and how far it has read the two tables.

The SQLite file is the truth; an index is a cache of it that any process brings up to date before it answers
(rows with an id above the one it read, removals with a seq above the one it applied), so the backend's
processes, a crash or a restart never serve a stale index for longer than one catch-up.

Index kind: exact (``IndexFlatIP`` under an ``IndexIDMap2``) below :data:`TRAIN_AT` regions of a model; above,
``IndexIVFFlat`` (inner product) with ``nlist = 4 sqrt(N)`` trained on a sample, retrained when the model's
regions have grown :data:`RETRAIN_GROWTH` times. FAISS ids are ``project number << 40 | row id``, so a project
filter is an ``IDSelectorRange`` inside the search: the lists probed are the same with or without the filter and
recall does not fall with the filter's selectivity. Other filters (label, source, score) are applied to the
records of an over-fetched candidate list, widened until ``k`` pass or the project is exhausted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import faiss
import numpy as np

from backend.search.records import RegionRecord, SearchFilter, SearchHit, check_records, unit_rows

log = logging.getLogger(__name__)
#: FAISS's SWIG classes take keyword arguments its stubs do not declare
_faiss: Any = faiss

#: regions of a model below which the index is exact (a scan of at most 40 MB of vectors)
TRAIN_AT = 20_000
#: retrain the IVF index when the model's regions have grown this many times since it was trained
RETRAIN_GROWTH = 4
#: lists probed per query: at least this many, and at least nlist / PROBE_DIVISOR (benchmarks/search_stores.py)
MIN_NPROBE = 16
PROBE_DIVISOR = 64
#: write the index files after this many unsaved changes (and on close)
SAVE_EVERY = 200_000
#: rows read from SQLite per batch when building an index
READ_BATCH = 50_000
PROJECT_SHIFT = 40

_SCHEMA = """
CREATE TABLE IF NOT EXISTS projects (pid INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT UNIQUE NOT NULL);
CREATE TABLE IF NOT EXISTS regions (
    id INTEGER PRIMARY KEY AUTOINCREMENT, model TEXT NOT NULL, pid INTEGER NOT NULL, task INTEGER NOT NULL,
    annotation TEXT NOT NULL, region TEXT NOT NULL, label TEXT NOT NULL, score REAL NOT NULL, source TEXT NOT NULL,
    image_sha256 TEXT NOT NULL, box TEXT NOT NULL, dim INTEGER NOT NULL, vec BLOB NOT NULL,
    UNIQUE (model, pid, task, annotation, region));
CREATE INDEX IF NOT EXISTS regions_task ON regions (pid, task);
CREATE INDEX IF NOT EXISTS regions_annotation ON regions (pid, annotation);
CREATE INDEX IF NOT EXISTS regions_model ON regions (model, id);
CREATE INDEX IF NOT EXISTS regions_source ON regions (model, pid, source, id);
CREATE TABLE IF NOT EXISTS removed (seq INTEGER PRIMARY KEY AUTOINCREMENT, model TEXT NOT NULL, fid INTEGER NOT NULL);
"""
_COLS = "id, model, pid, task, annotation, region, label, score, source, image_sha256, box"


def _row_filter(flt: SearchFilter) -> tuple[str, list[Any]]:
    """The SQL conditions (`` AND ...``) and arguments of ``flt``'s source, label and score filters, so a fetch
    reads only the rows that pass (a project's few human regions among a million suggestions)."""
    sql, args = "", list[Any]()
    if flt.sources:
        sql, args = sql + f" AND source IN ({','.join('?' * len(flt.sources))})", args + list(flt.sources)
    if flt.labels:
        sql, args = sql + f" AND label IN ({','.join('?' * len(flt.labels))})", args + list(flt.labels)
    if flt.min_score is not None:
        sql, args = sql + " AND score >= ?", args + [flt.min_score]
    if flt.max_score is not None:
        sql, args = sql + " AND score <= ?", args + [flt.max_score]
    return sql, args


def _fid(pid: int, rid: int) -> int:
    return (pid << PROJECT_SHIFT) | rid


@dataclass
class _ModelIndex:
    """One model's FAISS index and how far it has read the tables."""

    index: Any
    dim: int
    last_id: int = 0
    last_seq: int = 0
    trained_n: int = 0  # regions when the IVF index was trained (0: exact index)
    unsaved: int = 0


class FaissSqliteStore:
    """:class:`backend.search.store.RegionStore` in one directory (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike[str], train_at: int = TRAIN_AT):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.train_at = train_at
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.dir / "regions.sqlite3", check_same_thread=False, timeout=30,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._indexes: dict[str, _ModelIndex] = {}
        self._pids: dict[str, int] = {}
        #: lists probed per IVF query (None: max(MIN_NPROBE, nlist / PROBE_DIVISOR))
        self.nprobe: int | None = None

    # ------------------------------------------------------------------------------------------- writes
    def _pid(self, project: str, create: bool) -> int | None:
        pid = self._pids.get(project)
        if pid is None:
            row = self._db.execute("SELECT pid FROM projects WHERE name = ?", (project,)).fetchone()
            if row is None and create:
                self._db.execute("INSERT OR IGNORE INTO projects (name) VALUES (?)", (project,))
                row = self._db.execute("SELECT pid FROM projects WHERE name = ?", (project,)).fetchone()
            if row is None:
                return None
            pid = self._pids[project] = int(row[0])
        return pid

    def upsert(self, records: Sequence[RegionRecord], vectors: np.ndarray) -> int:
        if not records:
            return 0
        x = check_records(records, vectors)
        blobs = x.astype("<f2")
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for rec, row in zip(records, blobs):
                    pid = self._pid(rec.project, create=True)
                    old = self._db.execute(
                        "SELECT id FROM regions WHERE model=? AND pid=? AND task=? AND annotation=? AND region=?",
                        (rec.model, pid, rec.task, rec.annotation, rec.region)).fetchone()
                    if old is not None:
                        self._remove_rows(rec.model, [(int(old[0]), int(pid or 0))])
                    self._db.execute(
                        "INSERT INTO regions (model, pid, task, annotation, region, label, score, source, "
                        "image_sha256, box, dim, vec) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (rec.model, pid, rec.task, rec.annotation, rec.region, rec.label, float(rec.score),
                         rec.source, rec.image_sha256, json.dumps(list(rec.box)), int(x.shape[1]), row.tobytes()))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return len(records)

    def _remove_rows(self, model: str, rows: Sequence[tuple[int, int]]) -> None:
        self._db.executemany("DELETE FROM regions WHERE id = ?", [(rid,) for rid, _ in rows])
        self._db.executemany("INSERT INTO removed (model, fid) VALUES (?, ?)",
                             [(model, _fid(pid, rid)) for rid, pid in rows])

    def _delete_where(self, project: str, column: str, values: Sequence[Any]) -> int:
        with self._lock:
            pid = self._pid(project, create=False)
            if pid is None or not values:
                return 0
            self._db.execute("BEGIN IMMEDIATE")
            try:
                n = 0
                for value in values:
                    rows = self._db.execute(f"SELECT id, model FROM regions WHERE pid = ? AND {column} = ?",
                                            (pid, value)).fetchall()
                    for rid, model in rows:
                        self._remove_rows(model, [(int(rid), pid)])
                    n += len(rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return n

    def delete_tasks(self, project: str, tasks: Sequence[int]) -> int:
        return self._delete_where(project, "task", [int(t) for t in tasks])

    def delete_annotations(self, project: str, annotations: Sequence[str]) -> int:
        return self._delete_where(project, "annotation", [str(a) for a in annotations if str(a)])

    # ------------------------------------------------------------------------------------------- index
    def _paths(self, model: str) -> tuple[Path, Path]:
        digest = hashlib.sha256(model.encode("utf-8")).hexdigest()[:16]
        return self.dir / f"index-{digest}.faiss", self.dir / f"index-{digest}.json"

    def _rows(self, model: str, after: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(fids [B], vectors [B, D]) of the model's rows with an id above ``after``, in id order."""
        last = after
        while True:
            rows = self._db.execute("SELECT id, pid, vec, dim FROM regions WHERE model = ? AND id > ? ORDER BY id "
                                    "LIMIT ?", (model, last, READ_BATCH)).fetchall()
            if not rows:
                return
            last = int(rows[-1][0])
            fids = np.array([_fid(int(pid), int(rid)) for rid, pid, _, _ in rows], dtype=np.int64)
            vecs = np.frombuffer(b"".join(r[2] for r in rows), dtype="<f2").reshape(len(rows), int(rows[0][3]))
            yield fids, vecs.astype(np.float32)

    def _empty(self, dim: int) -> Any:
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))

    def _build(self, model: str) -> _ModelIndex | None:
        """A fresh index of every row of ``model`` (None: no rows)."""
        row = self._db.execute("SELECT COUNT(*), MAX(id), MAX(dim) FROM regions WHERE model = ?", (model,)).fetchone()
        n, dim = int(row[0]), int(row[2] or 0)
        if n == 0:
            return None
        seq = int(self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM removed").fetchone()[0])
        faiss.omp_set_num_threads(os.cpu_count() or 1)  # training and adding use every core; queries one
        if n < self.train_at:
            mi = _ModelIndex(self._empty(dim), dim)
        else:
            nlist = int(4 * math.sqrt(n))
            sample_ids = np.random.default_rng(0).choice(n, size=min(n, 64 * nlist), replace=False)
            keep = np.zeros(n, bool)
            keep[sample_ids] = True
            parts, at = [], 0
            for _, vecs in self._rows(model, 0):
                parts.append(vecs[keep[at:at + len(vecs)]])
                at += len(vecs)
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(np.concatenate(parts))
            mi = _ModelIndex(index, dim, trained_n=n)
        for fids, vecs in self._rows(model, 0):
            mi.index.add_with_ids(vecs, fids)
            mi.last_id = int(fids[-1] & ((1 << PROJECT_SHIFT) - 1))
        mi.last_seq = seq
        mi.unsaved = n
        faiss.omp_set_num_threads(1)
        log.info("search index of %s built: %d regions (%s)", model, n, "IVF" if mi.trained_n else "exact")
        return mi

    def _load(self, model: str) -> _ModelIndex | None:
        path, meta = self._paths(model)
        if not (path.exists() and meta.exists()):
            return None
        try:
            state = json.loads(meta.read_text())
            index = faiss.read_index(str(path))
        except (OSError, ValueError, RuntimeError) as exc:
            log.warning("search index %s unreadable (%s): rebuilding it", path, exc)
            return None
        return _ModelIndex(index, int(state["dim"]), int(state["last_id"]), int(state["last_seq"]),
                           int(state["trained_n"]))

    def _current(self, model: str) -> _ModelIndex | None:
        """The model's index, brought up to date with the tables (built or retrained when due)."""
        mi = self._indexes.get(model) or self._load(model)
        if mi is None:
            mi = self._build(model)
            if mi is None:
                return None
        added = 0
        for fids, vecs in self._rows(model, mi.last_id):
            mi.index.add_with_ids(vecs, fids)
            mi.last_id = int(fids[-1] & ((1 << PROJECT_SHIFT) - 1))
            added += len(fids)
        gone = self._db.execute("SELECT seq, fid FROM removed WHERE model = ? AND seq > ? ORDER BY seq",
                                (model, mi.last_seq)).fetchall()
        if gone:
            mi.index.remove_ids(np.array([g[1] for g in gone], dtype=np.int64))
        mi.last_seq = max([mi.last_seq] + [int(g[0]) for g in gone])
        mi.unsaved += added + len(gone)
        n = int(mi.index.ntotal)
        if (mi.trained_n == 0 and n >= self.train_at) or (mi.trained_n and n >= RETRAIN_GROWTH * mi.trained_n):
            mi = self._build(model) or mi
        self._indexes[model] = mi
        if mi.unsaved >= SAVE_EVERY:
            self._save(model, mi)
        return mi

    def _save(self, model: str, mi: _ModelIndex) -> None:
        path, meta = self._paths(model)
        faiss.write_index(mi.index, str(path) + ".tmp")
        os.replace(str(path) + ".tmp", path)
        meta.write_text(json.dumps({"dim": mi.dim, "last_id": mi.last_id, "last_seq": mi.last_seq,
                                    "trained_n": mi.trained_n, "model": model}))
        mi.unsaved = 0

    def flush(self) -> None:
        """Write every index with unsaved changes."""
        with self._lock:
            for model, mi in self._indexes.items():
                if mi.unsaved:
                    self._save(model, mi)

    # ------------------------------------------------------------------------------------------- reads
    def _records(self, fids: Sequence[int]) -> dict[int, RegionRecord]:
        ids = [int(f) & ((1 << PROJECT_SHIFT) - 1) for f in fids]
        out: dict[int, RegionRecord] = {}
        names = {pid: name for name, pid in self._pids.items()}
        for start in range(0, len(ids), 900):
            chunk = ids[start:start + 900]
            q = f"SELECT {_COLS} FROM regions WHERE id IN ({','.join('?' * len(chunk))})"
            for row in self._db.execute(q, chunk).fetchall():
                out[int(row[0])] = self._record(row, names)
        return out

    def _record(self, row: Sequence[Any], names: dict[int, str]) -> RegionRecord:
        pid = int(row[2])
        if pid not in names:
            names[pid] = self._db.execute("SELECT name FROM projects WHERE pid = ?", (pid,)).fetchone()[0]
        return RegionRecord(model=row[1], project=names[pid], task=int(row[3]), annotation=row[4], region=row[5],
                            label=row[6], score=float(row[7]), source=row[8], image_sha256=row[9],
                            box=tuple(json.loads(row[10])))

    def _params(self, mi: _ModelIndex, pid: int) -> Any:
        sel = faiss.IDSelectorRange(pid << PROJECT_SHIFT, (pid + 1) << PROJECT_SHIFT)
        if mi.trained_n:
            nprobe = self.nprobe or max(MIN_NPROBE, int(mi.index.nlist) // PROBE_DIVISOR)
            return _faiss.SearchParametersIVF(sel=sel, nprobe=min(nprobe, int(mi.index.nlist))), sel
        return _faiss.SearchParameters(sel=sel), sel

    def search(self, query: np.ndarray, flt: SearchFilter, k: int) -> list[SearchHit]:
        with self._lock:
            mi = self._current(flt.model)
            if mi is None:
                return []
            q = unit_rows(query, mi.dim)
            faiss.omp_set_num_threads(1)  # one query: threads only wait on each other (more so on a busy host)
            hits: list[SearchHit] = []
            for project in dict.fromkeys(flt.projects):
                pid = self._pid(project, create=False)
                if pid is None:
                    continue
                params, _sel = self._params(mi, pid)
                want = k if not flt.restricts_rows else 4 * k
                while True:
                    sims, fids = mi.index.search(q, want, params=params)
                    found = [(float(s), int(f)) for s, f in zip(sims[0], fids[0]) if f >= 0]
                    recs = self._records([f for _, f in found])
                    passed = [SearchHit(recs[f & ((1 << PROJECT_SHIFT) - 1)], s) for s, f in found
                              if (f & ((1 << PROJECT_SHIFT) - 1)) in recs
                              and flt.accepts(recs[f & ((1 << PROJECT_SHIFT) - 1)])]
                    if len(passed) >= k or len(found) < want or want >= mi.index.ntotal:
                        break
                    want *= 4
                hits.extend(passed[:k])
            hits.sort(key=lambda h: -h.similarity)
            return hits[:k]

    def fetch(self, flt: SearchFilter, limit: int, tasks: Sequence[int] | None = None
              ) -> tuple[list[RegionRecord], np.ndarray]:
        with self._lock:
            names: dict[int, str] = {}
            recs: list[RegionRecord] = []
            blobs: list[bytes] = []
            dim = 0
            for project in dict.fromkeys(flt.projects):
                pid = self._pid(project, create=False)
                if pid is None:
                    continue
                only, args = _row_filter(flt)
                if tasks is not None:
                    only += f" AND task IN ({','.join(str(int(t)) for t in tasks) or 'NULL'})"
                cur = self._db.execute(f"SELECT {_COLS}, vec, dim FROM regions WHERE model = ? AND pid = ?{only} "
                                       "ORDER BY id", (flt.model, pid, *args))
                for row in cur:
                    rec = self._record(row, names)
                    if flt.accepts(rec):
                        recs.append(rec)
                        blobs.append(row[11])
                        dim = int(row[12])
                        if len(recs) >= limit:
                            break
                if len(recs) >= limit:
                    break
            if not recs:
                return [], np.zeros((0, 0), np.float32)
            vecs = np.frombuffer(b"".join(blobs), dtype="<f2").reshape(len(recs), dim).astype(np.float32)
            return recs, vecs

    def count(self, model: str | None = None, project: str | None = None) -> int:
        q, args = "SELECT COUNT(*) FROM regions r JOIN projects p ON p.pid = r.pid WHERE 1=1", list[str]()
        if model is not None:
            q, args = q + " AND r.model = ?", args + [model]
        if project is not None:
            q, args = q + " AND p.name = ?", args + [project]
        with self._lock:
            return int(self._db.execute(q, args).fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self.flush()
            self._db.close()
