"""Regions the product labels go into the region index as it labels them (embedded mode, tiny model): interactive
suggestions as ``suggested``, proposals as ``proposed``, project runs too; the prediction never carries the
embedding, and each region's ``meta.labelled_similarity`` appears once a human region is indexed."""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np
import pytest

from worker.protocol import sha256_hex

from backend.search.api import current_model
from backend.search.records import SearchFilter
from backend.trust.score import prediction_score
from backend_support import config, png_bytes, predict, rect, task

PROJECT = {"id": 1, "label_config": config("rectangle")}


@pytest.fixture(autouse=True, scope="module")
def proposal_env(tiny_runtime):
    """Worker proposal settings for a random model: every MaskCut proposal kept, at most 2 per image."""
    from worker.jobs import runtime as jobs

    mp = pytest.MonkeyPatch()
    for k, v in {"MASKINV_PROPOSAL_MIN_SCORE": "0", "MASKINV_PROPOSAL_SOURCES": "maskcut",
                 "MASKINV_MAX_PROPOSALS": "2", "MASKINV_PROPOSAL_PRECISION": "0"}.items():
        mp.setenv(k, v)
    mp.setattr(jobs, "_runtime", None)
    yield
    mp.undo()


@pytest.fixture
def client(make_client, tmp_path):
    return make_client(MASKINV_DATA_DIR=str(tmp_path / "data"), MASKINV_WEBHOOK_QUEUE="0",
                       MASKINV_BATCH_TIMEOUT="600", MASKINV_TIMEOUT="600")


def service_of(client) -> Any:
    return client.application.config["MASKINV_SERVICE"]


def indexed(client, *sources: str) -> list:
    """The project's indexed regions of the current model (of ``sources``), once the background writes are done."""
    service = service_of(client)
    assert service.search_index.flush(60)
    flt = SearchFilter(model=current_model(service), projects=("1",), sources=sources)
    return service.search_index.store.fetch(flt, 100)[0]


def suggest(client, tid: int, seed: int, *regions: dict) -> dict:
    resp = predict(client, "rectangle", [task(tid, seed)], context={"result": list(regions)})
    assert resp.status_code == 200, resp.get_json()
    assert "embedding" not in json.dumps(resp.get_json())  # the vector never goes to Label Studio
    (pred,) = resp.get_json()["results"]
    return pred


def annotate(client, ann_id: int, tid: int, seed: int, *regions: dict) -> None:
    body = {"action": "ANNOTATION_CREATED", "project": PROJECT, "task": task(tid, seed),
            "annotation": {"id": ann_id, "task": tid, "project": 1, "result": list(regions), "was_cancelled": False}}
    resp = client.post("/webhook", json=body)
    assert resp.status_code == 200 and resp.get_json()["status"] == "stored", resp.get_json()


def test_an_interactive_suggestion_is_indexed_and_its_answer_has_no_embedding(client):
    pred = suggest(client, 5, 5, rect("r1"))
    (item,) = [r for r in pred["result"] if r["type"] == "rectanglelabels"]
    assert "labelled_similarity" not in item["meta"]  # no human region yet
    (rec,) = indexed(client)
    assert (rec.project, rec.task, rec.region, rec.annotation, rec.source) == ("1", 5, "r1", "", "suggested")
    assert rec.label == item["value"]["rectanglelabels"][0] and rec.score == pytest.approx(item["score"])
    assert rec.image_sha256 == sha256_hex(png_bytes(80, 60, 5))
    assert rec.box == pytest.approx((10.0, 10.0, 40.0, 50.0))


def test_labelled_similarity_once_a_human_region_is_indexed_also_from_the_result_cache(client):
    annotate(client, 51, 5, 5, rect("a", labels=("car",)), rect("b", x=55, w=20, labels=("dog",)))
    assert len(indexed(client, "human")) == 2
    first = suggest(client, 5, 5, rect("r1"), rect("r2", x=55, w=20))
    again = suggest(client, 5, 5, rect("r1"), rect("r2", x=55, w=20))
    assert again["maskinv"]["jobs"][0]["result_cache"] == {"hits": 2, "misses": 0}
    for pred in (first, again):
        sims = {r["id"]: r["meta"]["labelled_similarity"] for r in pred["result"] if r["type"] == "rectanglelabels"}
        # the same regions as the annotated ones: their nearest human region is themselves
        assert set(sims) == {"r1", "r2"} and all(0.98 <= s <= 1.0001 for s in sims.values()), sims
        assert pred["score"] == pytest.approx(prediction_score(pred["result"]))  # the task score saw them
    other = suggest(client, 6, 9, rect("x", x=0, y=0, w=100, h=100))  # another image, the whole of it
    (item,) = [r for r in other["result"] if r["type"] == "rectanglelabels"]
    assert -1.0 <= item["meta"]["labelled_similarity"] <= 1.0001  # a random model finds most regions alike
    assert {(r.task, r.region) for r in indexed(client, "suggested")} == {(5, "r1"), (5, "r2"), (6, "x")}


def test_proposals_are_indexed_as_proposed(client):
    resp = predict(client, "rectangle", [task(7, 7)])
    assert resp.status_code == 200 and "embedding" not in json.dumps(resp.get_json())
    (pred,) = resp.get_json()["results"]
    proposed = {r["id"]: r for r in pred["result"] if r["type"] == "rectanglelabels"}
    assert proposed and all(r["meta"]["proposed"] for r in proposed.values())
    recs = indexed(client, "proposed")
    assert {r.region for r in recs} == set(proposed) and {r.task for r in recs} == {7}
    for rec in recs:
        item = proposed[rec.region]
        assert rec.label == item["value"]["rectanglelabels"][0] and rec.score == pytest.approx(item["score"])
        assert rec.box == pytest.approx(tuple(item["value"][k] for k in ("x", "y", "width", "height")), abs=1e-6)


def test_index_trouble_never_fails_a_prediction(client, monkeypatch):
    annotate(client, 81, 8, 8, rect("a"))
    store = service_of(client).search_index.store

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")
    monkeypatch.setattr(store, "upsert", broken)
    monkeypatch.setattr(store, "fetch", broken)
    service_of(client).search_index._humans.clear()
    pred = suggest(client, 8, 8, rect("r9"))
    (item,) = [r for r in pred["result"] if r["type"] == "rectanglelabels"]
    assert "labelled_similarity" not in item["meta"]
    assert service_of(client).search_index.flush(60)


def test_without_a_store_nothing_is_asked_for(make_client, tmp_path, monkeypatch):
    client = make_client(MASKINV_DATA_DIR=str(tmp_path / "off"), MASKINV_SEARCH_STORE="off")
    from backend.dispatch import base

    asked: list[bool] = []
    build = base.LabelRegionsJob.build

    def spy(*args, **kwargs):
        asked.append(kwargs.get("embedding", False))
        return build(*args, **kwargs)
    monkeypatch.setattr(base.LabelRegionsJob, "build", spy)
    pred = suggest(client, 5, 5, rect("r1"))
    assert pred["result"] and asked == [False]


class FakeAPI:
    """Label Studio's API in memory: the predictions a run writes."""

    url = "http://ls.test"

    def __init__(self):
        self.results: dict[Any, list] = {}
        self.lock = threading.Lock()

    def prediction_versions(self, task_id):
        return []

    def create_prediction(self, task_id, result, score, model_version):
        with self.lock:
            self.results[task_id] = result
        return len(self.results)


def test_a_project_run_indexes_what_it_labels_and_proposes(client):
    from backend.runs.project_run import ProjectRun
    from backend.runs.store import MemoryRunStore

    service = service_of(client)
    drawn = task(11, 11, project=1, annotations=[{"id": 110, "result": [rect("d1")], "was_cancelled": False}])
    blank = task(12, 12, project=1, annotations=[], predictions=[])
    api = FakeAPI()
    run = ProjectRun(service, service.config(config("rectangle")), api, MemoryRunStore(), model_version="v-test",
                     project=1, timeout_s=600)
    summary = run.run(iter([drawn, blank]), total=2)
    assert summary.failed == 0 and set(api.results) == {11, 12}, summary.to_dict()
    assert {(r.task, r.region) for r in indexed(client, "suggested")} == {(11, "d1")}
    proposed = {r["id"] for r in api.results[12] if r.get("meta", {}).get("proposed")}
    assert proposed and {(r.task, r.region) for r in indexed(client, "proposed")} == {(12, p) for p in proposed}
    assert np.isfinite([r.score for r in indexed(client)]).all()
