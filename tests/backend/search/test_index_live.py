"""The region index's live side (embedded store): background writes, the similarity to the nearest human region
and the project's human regions it keeps, and the records of predicted regions."""

from __future__ import annotations

import numpy as np
import pytest

from backend.search.index import RegionIndex, predicted_record
from backend.search.records import RegionRecord, SearchFilter

D = 8


def unit(*values: float) -> np.ndarray:
    v = np.zeros(D, np.float32)
    v[:len(values)] = values
    return v / np.linalg.norm(v)


def human(region: str, vec: np.ndarray, model: str = "m") -> tuple[RegionRecord, np.ndarray]:
    return RegionRecord(model=model, project="1", task=1, region=region, annotation="a1", source="human"), vec


@pytest.fixture
def index(tmp_path):
    idx = RegionIndex("embedded", str(tmp_path))
    yield idx
    idx.close()


def test_background_writes_land_after_flush_and_hold_one_model_a_write(index):
    recs = [RegionRecord(model=m, project="1", task=2, region=f"r{m}", source="suggested") for m in ("m", "n")]
    index.index_later(recs, np.stack([unit(1), unit(0, 1)]))
    assert index.flush(30)
    for m in ("m", "n"):
        (rec,), _ = index.store.fetch(SearchFilter(model=m, projects=("1",)), 10)
        assert rec.region == f"r{m}"


def test_a_failed_background_write_is_logged_and_the_writer_goes_on(index, monkeypatch, caplog):
    calls = []

    def flaky(records, vectors):
        calls.append(len(records))
        if len(calls) == 1:
            raise RuntimeError("disk full")
        return len(records)
    monkeypatch.setattr(index.store, "upsert", flaky)
    rec = RegionRecord(model="m", project="1", task=2, region="r", source="suggested")
    index.index_later([rec], unit(1)[None])
    index.index_later([rec], unit(1)[None])
    assert index.flush(30) and calls == [1, 1] and "disk full" in caplog.text


def test_labelled_similarity_is_the_cosine_of_the_nearest_human_region(index):
    (r1, v1), (r2, v2) = human("a", unit(1)), human("b", unit(0, 1))
    index.index_records([r1, r2], np.stack([v1, v2]))
    index.index_records([RegionRecord(model="m", project="1", task=3, region="s", source="suggested")],
                        unit(1, 1)[None])  # not a human region: never the nearest
    sims = index.labelled_similarity("1", "m", np.stack([unit(1, 0.1), unit(1, 1), unit(0, 0, 1)]))
    assert sims == pytest.approx([float(unit(1, 0.1) @ v1), float(unit(1, 1) @ v1), 0.0], abs=1e-3)
    assert index.labelled_similarity("1", "other-model", unit(1)[None]) == [None]
    assert index.labelled_similarity("2", "m", unit(1)[None]) == [None]  # another project


def test_human_regions_written_elsewhere_are_seen_once_the_cached_ones_expire(tmp_path, monkeypatch):
    from backend.search import index as module

    monkeypatch.setattr(module, "HUMANS_TTL_S", 3600.0)
    writer = RegionIndex("embedded", str(tmp_path))
    reader = RegionIndex("embedded", str(tmp_path))  # another process's index over the same store
    assert reader.labelled_similarity("1", "m", unit(1)[None]) == [None]
    rec, vec = human("a", unit(1))
    writer.index_records([rec], vec[None])
    assert reader.labelled_similarity("1", "m", unit(1)[None]) == [None]  # its cached "none" still holds
    reader._humans.discard(lambda key: True)  # what the end of HUMANS_TTL_S does
    assert reader.labelled_similarity("1", "m", unit(1)[None]) == [pytest.approx(1.0, abs=1e-3)]
    writer.close()
    reader.close()


def test_this_process_sees_its_own_annotations_and_deletions_at_once(index):
    assert index.labelled_similarity("1", "m", unit(1)[None]) == [None]
    rec, vec = human("a", unit(1))
    index.index_later([rec], vec[None])
    assert index.flush(30)
    assert index.labelled_similarity("1", "m", unit(1)[None]) == [pytest.approx(1.0, abs=1e-3)]
    index.remove_annotations("1", ["a1"])
    assert index.labelled_similarity("1", "m", unit(1)[None]) == [None]


def test_a_store_failure_gives_no_similarity(index, monkeypatch):
    def broken(*args):
        raise RuntimeError("gone")
    monkeypatch.setattr(index.store, "fetch", broken)
    assert index.labelled_similarity("1", "m", np.stack([unit(1), unit(0, 1)])) == [None, None]


def test_predicted_record_takes_source_and_box_from_the_item():
    item = {"value": {"x": 10, "y": 20, "width": 30, "height": 40}, "meta": {"proposed": True}}
    rec = predicted_record("m", "1", 7, "prop0_abc", item, "car", 0.4, "sha")
    assert (rec.source, rec.box, rec.label, rec.score, rec.image_sha256, rec.annotation) == (
        "proposed", (10.0, 20.0, 30.0, 40.0), "car", 0.4, "sha", "")
    assert predicted_record("m", "1", 7, "r1", {"value": {"points": [[1, 2], [5, 8]]}}, "car", 0.9).source == \
        "suggested"
