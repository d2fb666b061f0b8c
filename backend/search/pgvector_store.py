"""The server region store: PostgreSQL + pgvector, for deployments that outgrow one machine.

One table per vector width, ``<prefix>_d<D>`` (``vec vector(D)``, the record's columns, unique on model, project,
task, annotation, region), B-trees on (model, project), (project, task), (project, annotation) and, once a width
holds :data:`INDEX_AT` rows, an ``ivfflat`` index: cosine (pgvector clusters its lists on the sphere; the rows are
unit vectors, so the order is the inner product's), ``lists = 4 sqrt(N)``, built beside the searches by a
background thread and built anew when the rows have grown :data:`REBUILD_GROWTH` times (:func:`_ensure_index`).
A query probes ``MASKINV_SEARCH_PG_PROBES`` lists (default :data:`PROBES`); pgvector >= 0.8 also gets
``ivfflat.iterative_scan = relaxed_order``: a filter which drops most candidates of the probed lists makes the scan
probe more. Older pgvector (0.5-0.7; the version is read from ``pg_extension`` once per connection) has no
iterative scan: the probed lists are filtered as they are. With any version, when fewer than ``k`` rows pass (a
small project, a rare label) the query is answered again by an exact scan of the passing rows. Below
:data:`INDEX_AT` the scan is exact. Every query names its model: two models never mix. Connections: one per store,
by psycopg 3, in autocommit with explicit transactions (and one per background index build).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
from typing import Any, Sequence

import numpy as np
import psycopg

from backend.search.records import RegionRecord, SearchFilter, SearchHit, SearchInputError, check_records, unit_rows

#: rows of one width from which an ivfflat index is built (below: exact scans)
INDEX_AT = 50_000
#: seconds between two checks whether a width has grown enough for its index
INDEX_CHECK_S = 60.0
#: ivfflat lists per square root of the rows (as the embedded store's nlist; benchmarks/search_stores.py)
LISTS_PER_SQRT = 4
#: rebuild a width's index once its rows have grown this many times since the build (lists follow sqrt(N))
REBUILD_GROWTH = 4
#: at most this many lists: pgvector's k-means keeps (50 samples a list) x lists floats in maintenance_work_mem
#: (4000 lists ask 3.5 GB, 2000 about 0.9 GB of the 1 GB the build sets); a server allowing less gets fewer lists
MAX_LISTS = 2000
#: the index build's maintenance_work_mem
BUILD_MEMORY = "1GB"
#: lists probed per query (before an iterative scan widens it); MASKINV_SEARCH_PG_PROBES overrides
PROBES = 32
#: the first pgvector with ``ivfflat.iterative_scan``
ITERATIVE_SCAN_FROM = (0, 8, 0)
log = logging.getLogger(__name__)
_COLS = "model, project, task, annotation, region, label, score, source, image_sha256, box"


def _vec(x: np.ndarray) -> str:
    return "[" + ",".join(f"{v:.7g}" for v in x.tolist()) + "]"


def _version(text: str) -> tuple[int, ...]:
    """``"0.6.2"`` -> ``(0, 6, 2)`` (missing parts 0)."""
    parts = [int(p) for p in re.findall(r"\d+", text)[:3]]
    return tuple(parts + [0] * (3 - len(parts)))


def _probes(probes: int | None) -> int:
    """``probes``, else MASKINV_SEARCH_PG_PROBES, else :data:`PROBES`; a whole number from 1 to 10 000."""
    raw = str(probes) if probes is not None else os.environ.get("MASKINV_SEARCH_PG_PROBES", "").strip()
    if not raw:
        return PROBES
    if not raw.isdigit() or not 1 <= int(raw) <= 10_000:
        raise ValueError(f"MASKINV_SEARCH_PG_PROBES must be a whole number from 1 to 10000, got {raw!r}")
    return int(raw)


def _lists(n: int) -> int:
    return max(16, min(MAX_LISTS, int(LISTS_PER_SQRT * math.sqrt(n))))


def _index_lists(db: psycopg.Connection, table: str) -> int | None:
    """Lists of ``table``'s valid ivfflat index (None: none)."""
    row = db.execute("SELECT c.reloptions FROM pg_class c JOIN pg_index i ON i.indexrelid = c.oid "
                     "WHERE c.relname = %s AND i.indisvalid", (f"{table}_ivfc",)).fetchone()
    if row is None:
        return None
    opts = dict(str(o).split("=", 1) for o in row[0] or [])
    return int(opts.get("lists", 100))


def _ensure_index(db: psycopg.Connection, table: str) -> bool:
    """Build ``table``'s ivfflat index (cosine, ``lists = 4 sqrt(N)``) once it holds :data:`INDEX_AT` rows, and
    build it anew once its rows have grown :data:`REBUILD_GROWTH` times since: ``CREATE INDEX CONCURRENTLY``
    beside the old one (searches and writes go on), then swapped in. One process builds at a time (an advisory
    lock); the others go on with the index they have. Whether the table has an index after."""
    lists = _index_lists(db, table)
    n = int(db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])  # type: ignore[index]
    if n < INDEX_AT or (lists is not None and _lists(n) < math.sqrt(REBUILD_GROWTH) * lists):
        return lists is not None
    if not db.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (table,)).fetchone()[0]:  # type: ignore[index]
        return lists is not None
    try:
        db.execute(f"SET maintenance_work_mem = '{BUILD_MEMORY}'")
        want = _lists(n)
        while True:
            db.execute(f"DROP INDEX IF EXISTS {table}_ivfc_next")  # a build cut short
            try:
                # cosine, not inner product: pgvector clusters cosine lists on the sphere (normalised centres); on
                # unit rows the order is the same
                db.execute(f"CREATE INDEX CONCURRENTLY {table}_ivfc_next ON {table} USING ivfflat "
                           f"(vec vector_cosine_ops) WITH (lists = {want})")
                break
            except psycopg.errors.ProgramLimitExceeded:  # "memory required is ... MB, maintenance_work_mem is ..."
                if want <= 16:
                    raise
                log.warning("ivfflat index of %s: %d lists do not fit maintenance_work_mem, trying %d", table, want,
                            want // 2)
                want //= 2
        with db.transaction():
            db.execute(f"DROP INDEX IF EXISTS {table}_ivfc")
            db.execute(f"DROP INDEX IF EXISTS {table}_ivf")  # the inner-product index of an earlier version
            db.execute(f"ALTER INDEX {table}_ivfc_next RENAME TO {table}_ivfc")
        db.execute(f"ANALYZE {table}")
    finally:
        db.execute("SELECT pg_advisory_unlock(hashtext(%s))", (table,))
    return True


class PgvectorStore:
    """:class:`backend.search.store.RegionStore` on PostgreSQL + pgvector (see the module docstring)."""

    def __init__(self, url: str, table_prefix: str = "maskinv_regions", probes: int | None = None):
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,40}", table_prefix):
            raise ValueError(f"table prefix must be a lower-case SQL name, got {table_prefix!r}")
        self.prefix = table_prefix
        #: ivfflat lists probed per query (MASKINV_SEARCH_PG_PROBES, else PROBES)
        self.probes = _probes(probes)
        self._lock = threading.RLock()
        self._url = url
        self._db = psycopg.connect(url, autocommit=True)
        self._db.execute("CREATE EXTENSION IF NOT EXISTS vector")
        row = self._db.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
        #: the server's pgvector version, e.g. (0, 6, 2)
        self.version = _version(str(row[0]) if row else "0")
        #: whether the server widens a filtered ivfflat scan by itself (pgvector >= 0.8)
        self.iterative_scan = self.version >= ITERATIVE_SCAN_FROM
        self._dims: set[int] = set()
        self._indexed: set[int] = set()  # widths known to have their ivfflat index
        self._builders: dict[int, threading.Thread] = {}  # width -> its last background index build
        self._checked: dict[int, float] = {}  # width -> when its row count was last checked (monotonic)
        for (name,) in self._db.execute("SELECT tablename FROM pg_tables WHERE tablename LIKE %s",
                                        (f"{self.prefix}_d%",)).fetchall():
            m = re.fullmatch(re.escape(self.prefix) + r"_d(\d+)", name)
            if m:
                self._dims.add(int(m.group(1)))

    def _table(self, dim: int) -> str:
        name = f"{self.prefix}_d{int(dim)}"
        if dim not in self._dims:
            self._db.execute(
                f"CREATE TABLE IF NOT EXISTS {name} (id bigserial PRIMARY KEY, model text NOT NULL, "
                "project text NOT NULL, task bigint NOT NULL, annotation text NOT NULL, region text NOT NULL, "
                "label text NOT NULL, score real NOT NULL, source text NOT NULL, image_sha256 text NOT NULL, "
                f"box jsonb NOT NULL, vec vector({int(dim)}) NOT NULL, "
                "UNIQUE (model, project, task, annotation, region))")
            # vectors stay in the row (a 512-d row is over TOAST's 2 kB threshold; out-of-line reads cost a scan)
            self._db.execute(f"ALTER TABLE {name} ALTER COLUMN vec SET STORAGE PLAIN")
            self._db.execute(f"CREATE INDEX IF NOT EXISTS {name}_mp ON {name} (model, project)")
            self._db.execute(f"CREATE INDEX IF NOT EXISTS {name}_pt ON {name} (project, task)")
            self._db.execute(f"CREATE INDEX IF NOT EXISTS {name}_pa ON {name} (project, annotation)")
            self._dims.add(dim)
        return name

    def upsert(self, records: Sequence[RegionRecord], vectors: np.ndarray) -> int:
        if not records:
            return 0
        x = check_records(records, vectors)
        table = self._table(int(x.shape[1]))
        rows = [(r.model, r.project, r.task, r.annotation, r.region, r.label, float(r.score), r.source,
                 r.image_sha256, json.dumps(list(r.box)), _vec(v)) for r, v in zip(records, x)]
        with self._lock, self._db.transaction(), self._db.cursor() as cur:
            cur.executemany(
                f"INSERT INTO {table} ({_COLS}, vec) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s::vector) "
                "ON CONFLICT (model, project, task, annotation, region) DO UPDATE SET label = EXCLUDED.label, "
                "score = EXCLUDED.score, source = EXCLUDED.source, image_sha256 = EXCLUDED.image_sha256, "
                "box = EXCLUDED.box, vec = EXCLUDED.vec", rows)
        return len(records)

    def _delete(self, project: str, column: str, values: list[Any]) -> int:
        if not values:
            return 0
        n = 0
        with self._lock, self._db.transaction():
            for dim in sorted(self._dims):
                cur = self._db.execute(f"DELETE FROM {self.prefix}_d{dim} WHERE project = %s AND {column} = ANY(%s)",
                                       (project, values))
                n += cur.rowcount
        return n

    def delete_tasks(self, project: str, tasks: Sequence[int]) -> int:
        return self._delete(project, "task", [int(t) for t in tasks])

    def delete_annotations(self, project: str, annotations: Sequence[str]) -> int:
        return self._delete(project, "annotation", [str(a) for a in annotations if str(a)])

    def build_index(self, model: str, dim: int) -> bool:
        """Build the width's ivfflat index now if it is due (:func:`_ensure_index`); whether one exists after."""
        table = self._table(dim)
        with self._lock:
            if _ensure_index(self._db, table):
                self._indexed.add(dim)
            return dim in self._indexed

    def index_lists(self, dim: int) -> int | None:
        """Lists of the width's ivfflat index (None: no index yet, its scans are exact)."""
        with self._lock:
            return _index_lists(self._db, f"{self.prefix}_d{int(dim)}")

    def wait_for_index(self, timeout: float | None = None) -> None:
        """Wait until the index builds running in the background have ended (tests, benchmarks)."""
        for thread in list(self._builders.values()):
            thread.join(timeout)

    def _check_index(self, dim: int) -> None:
        """At most every :data:`INDEX_CHECK_S`: note whether the width has its index (another process may have
        built it) and let a background thread build or rebuild it when due, so no search waits for a build."""
        if time.monotonic() - self._checked.get(dim, -1e9) <= INDEX_CHECK_S:
            return
        self._checked[dim] = time.monotonic()
        table = f"{self.prefix}_d{dim}"
        if _index_lists(self._db, table) is not None:
            self._indexed.add(dim)
        running = self._builders.get(dim)
        if running is not None and running.is_alive():
            return

        def build() -> None:
            try:
                with psycopg.connect(self._url, autocommit=True) as db:
                    if _ensure_index(db, table):
                        self._indexed.add(dim)
            except psycopg.Error as exc:
                log.warning("ivfflat index of %s not built: %s", table, exc)

        self._builders[dim] = threading.Thread(target=build, name=f"pgvector-index-{table}", daemon=True)
        self._builders[dim].start()

    def _where(self, flt: SearchFilter) -> tuple[str, list[Any]]:
        sql, args = "model = %s AND project = ANY(%s)", list[Any]([flt.model, list(flt.projects)])
        if flt.labels:
            sql, args = sql + " AND label = ANY(%s)", args + [list(flt.labels)]
        if flt.sources:
            sql, args = sql + " AND source = ANY(%s)", args + [list(flt.sources)]
        if flt.min_score is not None:
            sql, args = sql + " AND score >= %s", args + [flt.min_score]
        if flt.max_score is not None:
            sql, args = sql + " AND score <= %s", args + [flt.max_score]
        return sql, args

    def _dim_of(self, model: str) -> int | None:
        for dim in sorted(self._dims):
            if self._db.execute(f"SELECT 1 FROM {self.prefix}_d{dim} WHERE model = %s LIMIT 1", (model,)).fetchone():
                return dim
        return None

    @staticmethod
    def _record(row: Sequence[Any]) -> RegionRecord:
        box = row[9] if isinstance(row[9], list) else json.loads(row[9])
        return RegionRecord(model=row[0], project=row[1], task=int(row[2]), annotation=row[3], region=row[4],
                            label=row[5], score=float(row[6]), source=row[7], image_sha256=row[8],
                            box=tuple(float(b) for b in box))  # type: ignore[arg-type]

    def search(self, query: np.ndarray, flt: SearchFilter, k: int) -> list[SearchHit]:
        with self._lock:
            dim = self._dim_of(flt.model)
            if dim is None:
                return []
            q = unit_rows(query, dim)[0]
            self._check_index(dim)
            where, args = self._where(flt)
            table, qv = f"{self.prefix}_d{dim}", _vec(q)
            with self._db.transaction():
                self._db.execute(f"SET LOCAL ivfflat.probes = {self.probes}")
                if self.iterative_scan:
                    self._db.execute("SET LOCAL ivfflat.iterative_scan = relaxed_order")
                rows = self._db.execute(
                    f"SELECT {_COLS}, 1 - (vec <=> %s::vector) AS sim FROM {table} WHERE {where} "
                    "ORDER BY vec <=> %s::vector LIMIT %s", [qv] + args + [qv, k]).fetchall()
            if len(rows) < k and dim in self._indexed:
                # the probed lists held fewer than k passing rows: score every passing row (OFFSET 0 keeps the
                # ORDER BY off the ivfflat index, so the filter's B-tree or a scan answers, exactly)
                rows = self._db.execute(
                    f"SELECT {_COLS}, sim FROM (SELECT {_COLS}, 1 - (vec <=> %s::vector) AS sim FROM {table} "
                    f"WHERE {where} OFFSET 0) AS passing ORDER BY sim DESC LIMIT %s", [qv] + args + [k]).fetchall()
        hits = [SearchHit(self._record(r), float(r[10])) for r in rows]
        return sorted(hits, key=lambda h: -h.similarity)

    def fetch(self, flt: SearchFilter, limit: int, tasks: Sequence[int] | None = None
              ) -> tuple[list[RegionRecord], np.ndarray]:
        with self._lock:
            dim = self._dim_of(flt.model)
            if dim is None:
                return [], np.zeros((0, 0), np.float32)
            where, args = self._where(flt)
            if tasks is not None:
                where, args = where + " AND task = ANY(%s)", args + [[int(t) for t in tasks]]
            rows = self._db.execute(f"SELECT {_COLS}, vec::text FROM {self.prefix}_d{dim} WHERE {where} "
                                    "ORDER BY id LIMIT %s", args + [limit]).fetchall()
        if not rows:
            return [], np.zeros((0, dim), np.float32)
        vecs = np.array([json.loads(r[10]) for r in rows], dtype=np.float32)
        return [self._record(r) for r in rows], vecs

    def count(self, model: str | None = None, project: str | None = None) -> int:
        n = 0
        with self._lock:
            for dim in sorted(self._dims):
                sql, args = f"SELECT COUNT(*) FROM {self.prefix}_d{dim} WHERE TRUE", list[str]()
                if model is not None:
                    sql, args = sql + " AND model = %s", args + [model]
                if project is not None:
                    sql, args = sql + " AND project = %s", args + [project]
                n += int(self._db.execute(sql, args).fetchone()[0])  # type: ignore[index]
        return n

    def stats(self, dim: int) -> dict[str, float]:
        """Bytes of the width's table and indexes, and the resident set of this connection's server process."""
        with self._lock:
            size = self._db.execute("SELECT pg_total_relation_size(%s)", (f"{self.prefix}_d{dim}",)).fetchone()
            pid = self._db.execute("SELECT pg_backend_pid()").fetchone()
        rss = 0.0
        try:
            with open(f"/proc/{int(pid[0])}/status") as f:  # type: ignore[index]
                rss = next(float(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS"))
        except (OSError, StopIteration):
            pass
        return {"bytes": float(size[0]), "backend_rss_mb": round(rss, 1)}  # type: ignore[index]

    def drop_all(self) -> None:
        """Drop every table of this prefix (benchmarks and tests)."""
        with self._lock:
            for dim in sorted(self._dims):
                self._db.execute(f"DROP TABLE IF EXISTS {self.prefix}_d{dim}")
            self._dims.clear()
            self._indexed.clear()
            self._checked.clear()

    def close(self) -> None:
        with self._lock:
            self._db.close()


__all__ = ["PgvectorStore", "SearchInputError"]
