"""A curator turns verified suggestions into annotations in Label Studio 1.23 (docs/trust.md).

A rectangle project whose vocabulary is a small scene world (3 colours, one shape: what the tiny scene model tells
apart surely) gets 20 annotated scenes (through the API, as an annotator's submissions: the webhook makes them
examples) and 4 scenes whose boxes came
from elsewhere (an imported prediction). *Retrieve predictions* then returns, for tasks with verified regions, a
second prediction ``<version>-verified`` holding only those; every region of the main prediction says
``calibrated`` and ``verified``. In the browser, the curator filters the Data Manager to tasks without
annotations, selects them all, runs *Create Annotations From Predictions* with the ``-verified`` version, and gets
annotations holding exactly the verified regions; the annotated tasks keep their one annotation and the main
predictions stay suggestions. Screenshots of the steps go to ``docs/trust_curator_*.png``.
"""

from __future__ import annotations

import io
import shutil
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import requests

from browser_harness import REPO_ROOT, SHOTS, Stack, log_in, until, with_vocabulary
from training.scene_world import SceneWorld

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.slow]

PAGE_TIMEOUT_MS = 120_000
WAIT_S = 900  # safety net against a hang on a slow, shared CPU
ANNOTATED, NEW = 20, 4
VERIFIED_SUFFIX = "-verified"
DOCS = REPO_ROOT / "docs"


@dataclass
class TrustProject:
    id: int
    annotated: list[int]
    new: list[int]
    model_url: str
    vocabulary: list[str]


def _until(what: str, probe: Any, timeout_s: float = WAIT_S) -> Any:
    return until(what, probe, timeout_s, 2.0)


Box = tuple[int, int, int, int]


def _scenes(count: int, start: int) -> tuple[list[tuple[bytes, list[tuple[Box, str]]]], list[str]]:
    """PNG bytes and (box, label) per object of ``count`` scenes of a 3-colour scene world, and its vocabulary."""
    world = SceneWorld(seed=0, image_size=448, min_objects=3, max_objects=3, colours=("red", "blue", "yellow"),
                       shapes=("circle",))
    out = []
    for i in range(start, start + count):
        sc = world.scene(i, split="test")
        buf = io.BytesIO()
        sc.image.save(buf, "PNG")
        objs = []
        for o in sc.objects:
            ys, xs = np.nonzero(o.mask)
            objs.append(((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1), o.label))
        out.append((buf.getvalue(), objs))
    return out, list(world.class_names)


def _rect(k: int, box: Box, label: str, size: int = 448) -> dict:
    x0, y0, x1, y1 = box
    return {"id": f"r{k}", "from_name": "label", "to_name": "image", "type": "rectanglelabels",
            "original_width": size, "original_height": size, "image_rotation": 0,
            "value": {"x": 100 * x0 / size, "y": 100 * y0 / size, "width": 100 * (x1 - x0) / size,
                      "height": 100 * (y1 - y0) / size, "rotation": 0, "rectanglelabels": [label]}}


@pytest.fixture(scope="module")
def trust(stack: Stack) -> TrustProject:
    client = stack.client
    model_url = client.request("GET", f"/api/ml/{stack.projects['rectangle'].ml_backend_id}")["url"]
    scenes, vocabulary = _scenes(ANNOTATED + NEW, 0)
    xml = with_vocabulary((REPO_ROOT / "label_config" / "rectangle.xml").read_text(), vocabulary)
    project = client.create_project("MaskInversion trust", xml)
    client.connect_ml_backend(project["id"], model_url, interactive=True)
    created = client.upload_images(project["id"], [(f"trust{k}.png", png) for k, (png, _) in enumerate(scenes)])
    ids = [t["id"] for t in created]
    for tid, (_, objs) in zip(ids[:ANNOTATED], scenes[:ANNOTATED]):  # an annotator's submissions
        client.create_annotation(tid, [_rect(k, box, label) for k, (box, label) in enumerate(objs)])
    for tid, (_, objs) in zip(ids[ANNOTATED:], scenes[ANNOTATED:]):  # boxes from elsewhere, labels to suggest
        client.request("POST", "/api/predictions/", json={
            "task": tid, "model_version": "boxes", "result": [_rect(k, box, vocabulary[0])
                                                              for k, (box, _) in enumerate(objs)]})
    def learnt() -> bool:  # every annotation's webhook handled (a region too small to embed gives none)
        health = requests.get(f"{model_url}/health", timeout=60).json().get("webhooks") or {}
        ans = requests.get(f"{model_url}/examples", params={"project": project["id"]}, timeout=60)
        return health.get("pending", 1) == 0 and ans.ok and ans.json().get("count", 0) >= 2 * ANNOTATED
    _until("the annotations' examples", learnt)
    return TrustProject(project["id"], ids[:ANNOTATED], ids[ANNOTATED:], model_url, vocabulary)


def _by_version(preds: list[dict]) -> dict[str, dict]:
    return {p["model_version"]: p for p in preds}


def shot(page: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path))
    shutil.copyfile(path, DOCS / f"{name}.png")


def test_verified_suggestions_become_annotations_the_rest_stay_suggestions(stack: Stack, page: Any,
                                                                          trust: TrustProject) -> None:
    client = stack.client
    client.retrieve_predictions(trust.id)

    def retrieved() -> dict[int, dict[str, dict]] | None:
        out = {t: _by_version(client.predictions(t)) for t in trust.new}
        return out if all(any(v.startswith("maskinversion") for v in p) for p in out.values()) else None
    preds = _until("the backend's predictions of the new tasks", retrieved)
    main_version = next(v for v in preds[trust.new[0]] if v.startswith("maskinversion")
                        and not v.endswith(VERIFIED_SUFFIX))
    verified_version = main_version + VERIFIED_SUFFIX
    verified: dict[int, set[str]] = {}
    for tid, by in preds.items():
        main = by[main_version]
        regions = [r for r in main["result"] if r["type"] == "rectanglelabels"]
        assert regions and all(isinstance(r["meta"].get("verified"), bool) for r in regions), main
        assert all(0.0 <= r["meta"]["calibrated"] <= 1.0 for r in regions), main
        marked = {r["id"] for r in regions if r["meta"]["verified"]}
        if verified_version in by:
            kept = {r["id"] for r in by[verified_version]["result"] if r["type"] == "rectanglelabels"}
            assert kept == marked and kept, (kept, marked)
            verified[tid] = kept
        else:
            assert not marked
    stack.record("trust: verified regions per new task", {t: sorted(v) for t, v in verified.items()})
    stack.record("trust: calibrated per region", {t: [(r["value"]["rectanglelabels"][0], r["meta"]["calibrated"],
                                                       r["meta"]["verified"]) for r in by[main_version]["result"]
                                                      if r["type"] == "rectanglelabels"] for t, by in preds.items()})
    assert verified, "no suggestion verified: the project's examples should verify some"

    # the curator's view: tasks without annotations (so no annotated task gets a second annotation)
    view = client.request("POST", "/api/dm/views/", json={"project": trust.id, "data": {
        "title": "not annotated", "filters": {"conjunction": "and", "items": [
            {"filter": "filter:tasks:total_annotations", "operator": "equal", "type": "Number", "value": 0}]}}})
    log_in(page, stack)
    page.goto(f"{stack.ls_url}/projects/{trust.id}/data?tab={view['id']}")
    page.get_by_label("Select all rows").first.wait_for(state="visible", timeout=PAGE_TIMEOUT_MS)
    page.locator(".lsf-table-row, .lsf-table__row-wrapper").first.wait_for(state="visible", timeout=PAGE_TIMEOUT_MS)
    shot(page, "trust_curator_1_filtered")
    page.get_by_label("Select all rows").first.click()
    page.get_by_label("Tasks Actions").first.click()
    item = page.get_by_text("Create Annotations From Predictions", exact=True).first
    item.wait_for(state="visible", timeout=PAGE_TIMEOUT_MS)
    shot(page, "trust_curator_2_actions")
    item.click()
    # the dialog's "Choose predictions" list (Label Studio's own select, the current version preselected)
    trigger = page.locator('[class*="form-select__list"]').first
    trigger.wait_for(state="visible", timeout=PAGE_TIMEOUT_MS)
    trigger.click()
    page.get_by_role("option", name=verified_version).or_(page.get_by_text(verified_version, exact=True)).last.click()
    shot(page, "trust_curator_3_choose_verified")
    page.get_by_test_id("dialog-ok-button").first.click()

    def annotated_new() -> bool:
        return all(len(client.annotations(t)) == 1 for t in verified)
    _until("annotations from the verified predictions", annotated_new, 300)
    every = client.request("POST", "/api/dm/views/", json={"project": trust.id, "data": {"title": "all tasks"}})
    page.goto(f"{stack.ls_url}/projects/{trust.id}/data?tab={every['id']}")  # the filtered view is empty now
    page.locator(".lsf-table-row, .lsf-table__row-wrapper").first.wait_for(state="visible", timeout=PAGE_TIMEOUT_MS)
    shot(page, "trust_curator_4_done")

    for tid, kept in verified.items():
        (ann,) = client.annotations(tid)
        assert {r["id"] for r in ann["result"] if r["type"] == "rectanglelabels"} == kept
        assert main_version in _by_version(client.predictions(tid))  # the other suggestions stay suggestions
    for tid in set(trust.new) - set(verified):
        assert client.annotations(tid) == []
    for tid in trust.annotated:  # never a second annotation, never replaced
        assert len(client.annotations(tid)) == 1
