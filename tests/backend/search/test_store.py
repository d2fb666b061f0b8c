"""The region-store interface, the same checks on every store: the embedded FAISS + SQLite store, and
PostgreSQL + pgvector on a real server (``pg_url`` in conftest.py: MASKINV_TEST_PG_URL, or a private one)."""

from __future__ import annotations

import uuid
from typing import Iterator

import numpy as np
import pytest

from backend.search.faiss_store import FaissSqliteStore
from backend.search.records import RegionRecord, SearchFilter
from backend.search.store import RegionStore, open_store

DIM = 16


@pytest.fixture(params=["faiss_sqlite", "pgvector"])
def store(request: pytest.FixtureRequest, tmp_path) -> Iterator[RegionStore]:
    if request.param == "faiss_sqlite":
        s: RegionStore = FaissSqliteStore(tmp_path / "search")
    else:
        from backend.search.pgvector_store import PgvectorStore

        s = PgvectorStore(request.getfixturevalue("pg_url"), table_prefix=f"test_regions_{uuid.uuid4().hex[:8]}")
    yield s
    if request.param == "pgvector":
        s.drop_all()  # type: ignore[attr-defined]
    s.close()


def _data(n: int = 60, seed: int = 0) -> tuple[list[RegionRecord], np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, DIM)).astype(np.float32)
    recs = [RegionRecord(model="m1", project=f"p{i % 3}", task=i // 6, region=f"r{i}", label=("cat", "dog")[i % 2],
                         score=i / n, source=("human", "suggested", "proposed")[i % 3 if i % 5 else 0],
                         annotation=f"a{i // 6}" if i % 3 == 0 else "", image_sha256=f"img{i // 6}",
                         box=(1.0, 2.0, 3.0, 4.0)) for i in range(n)]
    return recs, x


def _exact(recs: list[RegionRecord], x: np.ndarray, q: np.ndarray, flt: SearchFilter, k: int) -> list[str]:
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    order = np.argsort(-(xn @ (q / np.linalg.norm(q))))
    return [recs[i].region for i in order if flt.accepts(recs[i])][:k]


def test_search_returns_the_exact_top_k_within_the_filter(store: RegionStore) -> None:
    recs, x = _data()
    assert store.upsert(recs, x) == len(recs)
    for q_i, flt in [(0, SearchFilter(model="m1", projects=("p0",))),
                     (1, SearchFilter(model="m1", projects=("p0", "p2"))),
                     (2, SearchFilter(model="m1", projects=("p0", "p1", "p2"), labels=("dog",))),
                     (3, SearchFilter(model="m1", projects=("p1",), sources=("human",))),
                     (4, SearchFilter(model="m1", projects=("p2",), min_score=0.2, max_score=0.7))]:
        hits = store.search(x[q_i] + 0.1, flt, 5)
        assert [h.record.region for h in hits] == _exact(recs, x, x[q_i] + 0.1, flt, 5)
        assert all(flt.accepts(h.record) for h in hits)
        sims = [h.similarity for h in hits]
        assert sims == sorted(sims, reverse=True) and all(-1.0001 <= s <= 1.0001 for s in sims)


def test_records_come_back_as_written(store: RegionStore) -> None:
    recs, x = _data()
    store.upsert(recs, x)
    hit = store.search(x[3], SearchFilter(model="m1", projects=("p0",)), 1)[0]
    assert hit.record == recs[3]
    assert hit.similarity == pytest.approx(1.0, abs=1e-2)


def test_models_never_mix(store: RegionStore) -> None:
    recs, x = _data()
    store.upsert(recs, x)
    other = [RegionRecord(model="m2", project=r.project, task=r.task, region=r.region) for r in recs]
    store.upsert(other, -x)
    hits = store.search(x[0], SearchFilter(model="m2", projects=("p0",)), 50)
    assert hits and all(h.record.model == "m2" for h in hits)
    assert hits[-1].record.region == "r0"  # m2 holds -x: the region is the farthest there
    assert store.count(model="m1") == len(recs) and store.count(model="m2") == len(recs)
    assert store.search(x[0], SearchFilter(model="m3", projects=("p0",)), 5) == []


def test_upsert_replaces_a_region_with_the_same_key(store: RegionStore) -> None:
    recs, x = _data()
    store.upsert(recs, x)
    moved = RegionRecord(model="m1", project="p0", task=0, region="r0", annotation="a0", label="bird", source="human")
    store.upsert([moved], x[5:6])
    assert store.count(model="m1") == len(recs)
    hit = store.search(x[5], SearchFilter(model="m1", projects=("p0",), labels=("bird",)), 3)
    assert [h.record.region for h in hit] == ["r0"]


def test_deleting_tasks_and_annotations_removes_their_regions(store: RegionStore) -> None:
    recs, x = _data()
    store.upsert(recs, x)
    in_task_1 = [r for r in recs if r.project == "p0" and r.task == 1]
    assert store.delete_tasks("p0", [1]) == len(in_task_1)
    flt = SearchFilter(model="m1", projects=("p0",))
    assert all(h.record.task != 1 for h in store.search(x[6], flt, 50))
    in_a0 = [r for r in recs if r.project == "p0" and r.annotation == "a0"]
    assert store.delete_annotations("p0", ["a0"]) == len(in_a0)
    assert all(h.record.annotation != "a0" for h in store.search(x[0], flt, 50))
    assert store.count() == len(recs) - len(in_task_1) - len(in_a0)
    assert store.delete_tasks("nope", [1]) == 0


def test_fetch_returns_the_filtered_regions_and_their_vectors(store: RegionStore) -> None:
    recs, x = _data()
    store.upsert(recs, x)
    flt = SearchFilter(model="m1", projects=("p1",), labels=("cat",))
    got, vecs = store.fetch(flt, 100)
    want = [r for r in recs if flt.accepts(r)]
    assert sorted(r.region for r in got) == sorted(r.region for r in want)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    by_region = {r.region: i for i, r in enumerate(recs)}
    for rec, v in zip(got, vecs):
        np.testing.assert_allclose(v, xn[by_region[rec.region]], atol=2e-3)
    assert len(store.fetch(flt, 2)[0]) == 2


def test_open_store_picks_the_store_by_url(tmp_path) -> None:
    s = open_store("embedded", str(tmp_path))
    assert isinstance(s, FaissSqliteStore) and (tmp_path / "search" / "regions.sqlite3").exists()
    s.close()
    with pytest.raises(ValueError, match="MASKINV_SEARCH_STORE"):
        open_store("mysql://x", str(tmp_path))


# ------------------------------------------------------------------------ PostgreSQL + pgvector specifics
@pytest.fixture
def pg_store(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[RegionStore]:
    """A pgvector store that builds its ivfflat index from 100 rows (instead of 50 000)."""
    from backend.search import pgvector_store

    monkeypatch.setattr(pgvector_store, "INDEX_AT", 100)
    s = pgvector_store.PgvectorStore(pg_url, table_prefix=f"test_regions_{uuid.uuid4().hex[:8]}")
    yield s
    s.drop_all()
    s.close()


def _clustered(n: int, rare_every: int = 0) -> tuple[list[RegionRecord], np.ndarray]:
    """``n`` regions in 40 tight clusters; every ``rare_every``-th labelled ``rare`` (the others ``common``)."""
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(40, DIM))
    x = (centres[rng.integers(0, 40, n)] + 0.1 * rng.normal(size=(n, DIM))).astype(np.float32)
    recs = [RegionRecord(model="m1", project="p", task=i, region=f"r{i}",
                         label="rare" if rare_every and i % rare_every == 0 else "common") for i in range(n)]
    return recs, x


def test_pgvector_reads_the_extension_version_and_searches_its_index_on_it(pg_store) -> None:
    assert pg_store.version >= (0, 5, 0)
    assert pg_store.iterative_scan == (pg_store.version >= (0, 8, 0))
    recs, x = _clustered(800)
    pg_store.upsert(recs, x)
    assert pg_store.build_index("m1", DIM)  # lists = 4 sqrt(800)
    flt = SearchFilter(model="m1", projects=("p",))
    pg_store.probes = 10_000  # every list: the index scan is exact
    for q_i in (0, 7, 99):
        assert [h.record.region for h in pg_store.search(x[q_i], flt, 10)] == _exact(recs, x, x[q_i], flt, 10)


def test_pgvector_answers_a_rare_filter_in_full_when_the_probed_lists_miss_it(pg_store) -> None:
    recs, x = _clustered(3000, rare_every=50)
    pg_store.upsert(recs, x)
    assert pg_store.build_index("m1", DIM)
    # one list of 219 probed: the planner scans the ivfflat index, and few if any of its rows are rare
    pg_store.probes = 1
    flt = SearchFilter(model="m1", projects=("p",), labels=("rare",))
    for q_i in (0, 1, 2):
        hits = pg_store.search(x[q_i], flt, 10)
        assert [h.record.region for h in hits] == _exact(recs, x, x[q_i], flt, 10)


def test_pgvector_builds_its_index_in_the_background_and_anew_as_the_rows_grow(
        pg_store, monkeypatch: pytest.MonkeyPatch) -> None:
    from backend.search import pgvector_store

    recs, x = _clustered(3000)
    flt = SearchFilter(model="m1", projects=("p",))
    pg_store.probes = 10_000  # every list: exact with or without the index, whenever the build ends
    pg_store.upsert(recs[:200], x[:200])
    assert pg_store.index_lists(DIM) is None
    assert [h.record.region for h in pg_store.search(x[0], flt, 5)] == _exact(recs[:200], x[:200], x[0], flt, 5)
    pg_store.wait_for_index(60)  # the search started the build beside it
    assert pg_store.index_lists(DIM) == 56  # 4 sqrt(200)
    pg_store.upsert(recs[200:700], x[200:700])
    assert pg_store.build_index("m1", DIM) and pg_store.index_lists(DIM) == 56  # 3.5 times the rows: kept
    pg_store.upsert(recs[700:], x[700:])
    monkeypatch.setattr(pgvector_store, "INDEX_CHECK_S", 0.0)
    pg_store.search(x[0], flt, 5)
    pg_store.wait_for_index(60)
    assert pg_store.index_lists(DIM) == 219  # 15 times the rows: built anew, 4 sqrt(3000)
    assert [h.record.region for h in pg_store.search(x[1], flt, 10)] == _exact(recs, x, x[1], flt, 10)


def test_pgvector_builds_fewer_lists_when_the_server_allows_less_memory(
        pg_store, monkeypatch: pytest.MonkeyPatch) -> None:
    from backend.search import pgvector_store

    monkeypatch.setattr(pgvector_store, "BUILD_MEMORY", "1MB")  # 219 lists of 3000 rows need about 2.6 MB
    recs, x = _clustered(3000)
    pg_store.upsert(recs, x)
    assert pg_store.build_index("m1", DIM)
    assert 0 < pg_store.index_lists(DIM) < 219  # halved until the k-means fits
    pg_store.probes = 10_000
    flt = SearchFilter(model="m1", projects=("p",))
    assert [h.record.region for h in pg_store.search(x[5], flt, 10)] == _exact(recs, x, x[5], flt, 10)


def test_pgvector_probes_come_from_the_environment(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from backend.search.pgvector_store import PROBES, PgvectorStore

    monkeypatch.setenv("MASKINV_SEARCH_PG_PROBES", "64")
    s = PgvectorStore(pg_url, table_prefix=f"test_regions_{uuid.uuid4().hex[:8]}")
    assert s.probes == 64
    s.close()
    monkeypatch.setenv("MASKINV_SEARCH_PG_PROBES", "")
    s = PgvectorStore(pg_url, table_prefix=f"test_regions_{uuid.uuid4().hex[:8]}", probes=None)
    assert s.probes == PROBES
    s.close()
    for bad in ("0", "many", "-3"):
        monkeypatch.setenv("MASKINV_SEARCH_PG_PROBES", bad)
        with pytest.raises(ValueError, match="MASKINV_SEARCH_PG_PROBES"):
            PgvectorStore(pg_url)
