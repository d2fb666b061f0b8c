"""End-to-end: a real Label Studio 1.23 project with the polygon config and images nobody annotated →
Data Manager "Retrieve Predictions" → polygon regions proposed by the backend, with labels and captions;
the annotations of annotated tasks stay untouched.

The model is the tiny random-init test model: the test checks the plumbing (types, vocabulary, geometry in
percent, captions, the proposed mark, what Label Studio stores), not the accuracy.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest

from ls_harness import BACKEND_ENV
from ls_harness import BackendServer, started, LabelStudioClient
from test_label_studio import drawn_region, new_project, scene_png, shipped_config

pytestmark = pytest.mark.e2e

#: a random model's label probabilities are near uniform: keep every proposal, at most 3, MaskCut only (fast)
PROPOSAL_ENV = {"MASKINV_PROPOSAL_MIN_SCORE": "0", "MASKINV_MAX_PROPOSALS": "3", "MASKINV_PROPOSAL_SOURCES": "maskcut"}


@pytest.fixture(scope="module")
def proposing_backend(ls_server, ls_token, tmp_path_factory):
    env = dict(BACKEND_ENV, LABEL_STUDIO_URL=ls_server.url, LABEL_STUDIO_API_KEY=ls_token, **PROPOSAL_ENV)
    server = BackendServer(tmp_path_factory.mktemp("backend-proposals") / "backend.log", env=env)
    started(server)
    yield server
    server.stop()


def test_retrieve_predictions_proposes_polygons_for_unannotated_images(ls: LabelStudioClient, proposing_backend):
    cfg = shipped_config("polygon")
    project, _ = new_project(ls, cfg, proposing_backend.url)
    tasks = ls.upload_images(project["id"], [(f"raw{k}.png", scene_png(seed=40 + k)) for k in range(3)])
    raw, annotated = tasks[:2], tasks[2]
    region = drawn_region(cfg, 160, 120, (10.0, 10.0, 40.0, 50.0))
    region["value"][cfg.tag] = [cfg.labels[0]]
    ls.create_annotation(annotated["id"], [region])
    before = copy.deepcopy(ls.annotations(annotated["id"]))

    ans = ls.retrieve_predictions(project["id"])
    assert ans.get("processed_items") == 3, ans

    for task in raw:
        preds = ls.predictions(task["id"])
        assert len(preds) == 1, f"task {task['id']}: expected one prediction, got {preds}"
        result = preds[0]["result"]
        polygons = [r for r in result if r["type"] == "polygonlabels"]
        captions = {r["id"]: r for r in result if r["type"] == "textarea"}
        assert 1 <= len(polygons) <= 3, result
        for r in polygons:
            assert r["from_name"] == cfg.control and r["to_name"] == cfg.image
            (label,) = r["value"]["polygonlabels"]
            assert label in cfg.labels
            pts = r["value"]["points"]
            assert len(pts) >= 3 and all(0.0 <= c <= 100.0 for p in pts for c in p)
            assert r["meta"]["text"][0].startswith("proposed by MaskInversion (maskcut)")
            assert r["meta"].get("proposed") is True
            assert (r["original_width"], r["original_height"]) == (160, 120)
            if cfg.caption:
                assert captions[r["id"]]["value"]["text"][0].strip()
        assert ls.annotations(task["id"]) == [], "proposals are predictions, never annotations"

    # the annotated task is labelled (its own region), not proposed for, and its annotation is untouched
    (pred,) = ls.predictions(annotated["id"])
    assert {r["id"] for r in pred["result"]} == {region["id"]}
    assert not any(r.get("meta", {}).get("proposed") for r in pred["result"])
    assert ls.annotations(annotated["id"]) == before


@pytest.mark.parametrize("where", ["view", "control"])
def test_label_config_switch_is_kept_by_label_studio_and_turns_proposals_off(ls: LabelStudioClient,
                                                                             proposing_backend, where):
    """``maskinvProposals="false"`` on the root <View> or on the region control: Label Studio validates and keeps
    it in the saved config (and in what it sends the backend), and Retrieve Predictions proposes nothing."""
    cfg = shipped_config("polygon")
    tag = "<View>" if where == "view" else "<PolygonLabels "
    xml = cfg.xml.replace(tag, tag[:-1] + ' maskinvProposals="false"' + tag[-1], 1)
    assert xml != cfg.xml
    ans = ls.request("POST", "/api/projects/validate/", json={"label_config": xml}, expect=(200, 204))
    assert ans is None or "errors" not in ans, ans
    project, _ = new_project(ls, dataclasses.replace(cfg, xml=xml), proposing_backend.url)
    saved = ls.request("GET", f"/api/projects/{project['id']}")["label_config"]
    assert 'maskinvProposals="false"' in saved, saved
    tasks = ls.upload_images(project["id"], [("raw.png", scene_png(seed=50))])
    ans = ls.retrieve_predictions(project["id"])
    assert ans.get("processed_items") == 1, ans
    assert ls.predictions(tasks[0]["id"]) == []  # the backend answered [] (nothing to label): nothing stored
