"""Batch mode proposes regions for tasks nobody drew on (embedded mode, tiny random model)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from backend.labelstudio.label_config import parse_label_config
from backend.predict.propose import split_override, target_control, wanted
from backend.labelstudio.regions import collect_regions, region_mask
from backend.service import PredictError
from backend.trust.score import prediction_score
from backend_support import H, W, brush, config, predict, task

@pytest.fixture(autouse=True, scope="module")
def proposal_env():
    """Worker proposal settings for a random model on 2 busy cores: every proposal kept (its scores are near
    uniform), MaskCut only, at most 3 per image."""
    from worker.jobs import runtime as jobs

    mp = pytest.MonkeyPatch()
    for k, v in {"MASKINV_PROPOSAL_MIN_SCORE": "0", "MASKINV_PROPOSAL_SOURCES": "maskcut",
                 "MASKINV_MAX_PROPOSALS": "3", "MASKINV_PROPOSAL_PRECISION": "0"}.items():
        mp.setenv(k, v)
    mp.setattr(jobs, "_runtime", None)  # the worker reads its settings once, when its runtime is built
    yield
    mp.undo()


SLOW_OK = {"MASKINV_BATCH_TIMEOUT": "600"}  # the first job of a module loads the runtime (tens of s on busy cores)


@pytest.fixture
def client(make_client):
    return make_client(**SLOW_OK)


TYPES = {"polygon": "polygonlabels", "rectangle": "rectanglelabels", "brush": "brushlabels"}


@pytest.mark.parametrize("name", ["polygon", "rectangle", "brush"])
def test_task_without_regions_gets_proposals_in_the_config_type(client, name):
    tasks = [task(1, 1)]
    sent = copy.deepcopy(tasks)
    resp = predict(client, name, tasks)
    assert resp.status_code == 200, resp.get_json()
    (pred,) = resp.get_json()["results"]
    assert pred and "result" in pred, pred
    cfg = parse_label_config(config(name))
    assert cfg.validate_prediction(pred) == []
    regions = [r for r in pred["result"] if r["type"] == TYPES[name]]
    captions = {r["id"]: r for r in pred["result"] if r["type"] == "textarea"}
    assert 1 <= len(regions) <= 3  # MASKINV_MAX_PROPOSALS
    for r in regions:
        assert r["meta"]["proposed"] is True and r["meta"]["source"] == "maskcut"
        assert 0.0 <= r["meta"]["objectness"] <= 1.0  # the worker's class-agnostic objectness
        assert r["meta"]["text"][0].startswith("proposed by MaskInversion")
        (label,) = r["value"][TYPES[name]]
        assert label in cfg.control("label").labels and 0 < r["score"] <= 1
        assert (r["original_width"], r["original_height"]) == (W, H)
        assert captions[r["id"]]["value"]["text"][0].strip()
    # the geometry reads back as a non-empty mask with the backend's own parser
    parsed, problems = collect_regions(regions, cfg)
    assert not problems and all(region_mask(p, (W, H)).any() for p in parsed)
    assert pred["maskinv"]["source"] == "proposals" and pred["score"] == pytest.approx(prediction_score(regions))
    assert tasks == sent


def test_tasks_with_regions_or_annotations_get_no_proposals_and_off_switches(client, make_client):
    m = np.zeros((H, W), bool)
    m[5:30, 10:40] = True
    drawn = task(1, 1, annotations=[{"id": 1, "result": [brush("b1", m)]}])
    empty_submitted = task(2, 2, annotations=[{"id": 2, "result": []}])
    res = predict(client, "brush", [drawn, empty_submitted, task(3, 3)]).get_json()["results"]
    assert {r["id"] for r in res[0]["result"]} == {"b1"}  # labelled, not proposed
    assert res[1] == []  # an annotator submitted "nothing here": left alone
    assert res[2]["maskinv"]["source"] == "proposals"
    assert predict(client, "brush", [task(3, 3)], maskinv={"proposals": False}).get_json()["results"] == [[]]
    off = make_client(MASKINV_PROPOSALS="off", **SLOW_OK)
    assert predict(off, "brush", [task(3, 3)]).get_json()["results"] == [[]]
    on = predict(off, "brush", [task(3, 3)], maskinv={"proposals": {"max_proposals": 2, "min_score": 0.0}})
    (pred,) = on.get_json()["results"]
    assert 1 <= len([r for r in pred["result"] if r["type"] == "brushlabels"]) <= 2


def test_interactive_requests_never_propose(client):
    from backend_support import rect

    resp = predict(client, "rectangle", [task(7)], context={"result": [rect("a1")]})
    (pred,) = resp.get_json()["results"]
    assert {r["id"] for r in pred["result"]} == {"a1"}


def test_bad_proposal_overrides_are_400(client):
    resp = predict(client, "brush", [task(1)], maskinv={"proposals": "yes"})
    assert resp.status_code == 400 and "proposals" in resp.get_json()["error"]
    resp = predict(client, "brush", [task(1)], maskinv={"proposals": {"foo": 1}})
    assert resp.status_code == 400 and "foo" in resp.get_json()["error"]
    resp = predict(client, "brush", [task(1)], maskinv={"proposals": {"sources": ["dino"]}})
    (ans,) = resp.get_json()["results"]
    assert "proposals.sources" in ans["error"]


def test_override_helpers():
    assert split_override(None) == (None, None)
    assert split_override({"steps": 3, "proposals": False}) == ({"steps": 3}, False)
    assert split_override({"proposals": True}) == (None, True)
    with pytest.raises(PredictError):
        split_override({"proposals": 1})
    assert wanted("auto", None) and not wanted("off", None) and wanted("off", {}) and not wanted("auto", False)
    cfg = parse_label_config(config("polygon"))
    assert target_control(cfg).kind == "polygon"


def test_proposal_score_is_the_workers_ranking_score():
    from backend.labelstudio.predictions import proposal_score
    from worker.protocol import RegionResult

    def res(meta):
        return RegionResult.from_dict({"id": "p", "labels": [{"label": "car", "score": 0.6}], "meta": meta})
    assert proposal_score(res({"score": 0.15, "objectness": 0.25})) == pytest.approx(0.15)
    assert proposal_score(res({})) == pytest.approx(0.6)
    assert proposal_score(res({"score": True})) == pytest.approx(0.6)


def test_proposed_regions_carry_the_objectness_in_their_meta():
    from backend.predict.propose import objectness_of, with_objectness
    from worker.protocol import RegionResult

    def res(meta):
        return RegionResult.from_dict({"id": "p", "labels": [{"label": "car", "score": 0.6}], "meta": meta})
    assert objectness_of(res({"objectness": 0.25})) == pytest.approx(0.25)
    assert objectness_of(res({"objectness": 1.5})) is None and objectness_of(res({"objectness": True})) is None
    assert objectness_of(res({})) is None
    items = [{"id": "a", "meta": {"proposed": True}}, {"id": "a", "type": "textarea"}]
    out = with_objectness(items, 0.123456)
    assert out[0]["meta"] == {"proposed": True, "objectness": 0.1235} and "meta" not in out[1]
    assert with_objectness([{"meta": {}}], None) == [{"meta": {}}]


def test_proposals_of_a_project_with_examples_use_them(make_client, tmp_path):
    """Proposals are labelled like drawn regions of their project: with its examples' prototypes (one view,
    MASKINV_EXAMPLE_VIEWS applies to drawn regions), the regions' meta say how many examples back their label,
    and the prediction carries the project's model version (what /setup answers, the same with examples) and
    its example set in the regions' ``meta.examples_state``."""
    from backend_support import rect

    c = make_client(MASKINV_DATA_DIR=str(tmp_path / "d"), MASKINV_WEBHOOK_QUEUE="0", **SLOW_OK)
    before = predict(c, "rectangle", [task(1, 1)]).get_json()["results"][0]
    assert "-ex" not in before["model_version"]
    assert all("examples_state" not in r.get("meta", {}) for r in before["result"])
    assert all("examples" not in r["meta"] for r in before["result"] if r["type"] == "rectanglelabels")
    labels = parse_label_config(config("rectangle")).control("label").labels
    project = {"id": 1, "label_config": config("rectangle")}
    for i, lab in enumerate(labels):
        ann = {"id": 50 + i, "task": 50 + i, "project": 1, "was_cancelled": False,
               "result": [rect("a", x=30, y=20, w=40, h=50, labels=(lab,))]}
        ans = c.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": project, "annotation": ann,
                                       "task": task(50 + i, 20 + i)})
        assert ans.get_json()["status"] == "stored", ans.get_json()
    sent = []
    service = c.application.config["MASKINV_SERVICE"]
    run_jobs = service.dispatcher.run_jobs
    service.dispatcher.run_jobs = lambda fn, reqs, t: sent.extend(p for _, p in reqs) or run_jobs(fn, reqs, t)
    after = predict(c, "rectangle", [task(1, 1)]).get_json()["results"][0]
    assert after["model_version"] == before["model_version"]
    assert all(r["meta"]["examples_state"].startswith("ex") for r in after["result"])
    setup = c.post("/setup", json={"project": "1.1700000000", "schema": config("rectangle")}).get_json()
    assert setup["model_version"] == after["model_version"]
    (payload,) = sent
    assert payload["prototypes"]["counts"] == [1] * len(labels) and "views" not in payload["params"]
    regions = [r for r in after["result"] if r["type"] == "rectanglelabels"]
    assert regions and all(r["meta"]["examples"] == 1 and r["meta"]["proposed"] for r in regions)
