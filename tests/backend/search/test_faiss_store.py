"""The embedded store: survives restarts, stays exact-equivalent past the IVF switch, processes catch up."""

from __future__ import annotations

import numpy as np

from backend.search.faiss_store import FaissSqliteStore
from backend.search.records import RegionRecord, SearchFilter


def _clustered(n: int, dim: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(20, dim))
    return (centres[rng.integers(0, 20, n)] + 0.5 * rng.normal(size=(n, dim))).astype(np.float32)


def _recs(n: int, project=lambda i: f"p{i % 2}") -> list[RegionRecord]:
    return [RegionRecord(model="m", project=project(i), task=i, region=f"r{i}") for i in range(n)]


def test_the_index_survives_a_restart_and_changes_made_meanwhile(tmp_path) -> None:
    x = _clustered(300)
    a = FaissSqliteStore(tmp_path)
    a.upsert(_recs(200), x[:200])
    flt = SearchFilter(model="m", projects=("p0", "p1"))
    before = [h.record.region for h in a.search(x[0], flt, 10)]
    a.close()
    assert list(tmp_path.glob("index-*.faiss"))
    b = FaissSqliteStore(tmp_path)
    assert [h.record.region for h in b.search(x[0], flt, 10)] == before
    # a second process writes; this one catches up before it answers
    c = FaissSqliteStore(tmp_path)
    c.upsert(_recs(300)[200:], x[200:])
    c.delete_tasks("p0", [0])
    hits = [h.record.region for h in b.search(x[250], flt, 5)]
    assert hits[0] == "r250" and "r0" not in [h.record.region for h in b.search(x[0], flt, 300)]
    b.close()
    c.close()


def test_ivf_index_past_the_threshold_keeps_filters_and_recall(tmp_path) -> None:
    x = _clustered(3000)
    s = FaissSqliteStore(tmp_path, train_at=1000)
    s.upsert(_recs(3000, project=lambda i: f"p{i % 3}"), x)
    flt = SearchFilter(model="m", projects=("p1",))
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    recall = []
    for qi in range(0, 60, 3):
        q = xn[qi] + 0.05
        hits = s.search(q, flt, 10)
        assert all(h.record.project == "p1" for h in hits) and len(hits) == 10
        order = [i for i in np.argsort(-(xn @ q)) if i % 3 == 1][:10]
        recall.append(len({f"r{i}" for i in order} & {h.record.region for h in hits}) / 10)
    assert s._indexes["m"].trained_n == 3000
    assert np.mean(recall) >= 0.95
    s.close()
