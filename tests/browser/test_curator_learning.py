"""What a curator sees in Label Studio 1.23 with the backend connected to a project as README.md says (*Use
predictions to prelabel tasks* left on, Label Studio's default): *Retrieve predictions* fills the Data Manager's
*Prediction score* column and sorting by it puts the least certain task first; a task opened in the labelling
page is pre-filled with the predicted regions; submitting them untouched teaches the backend nothing, editing
one region teaches it one example.

What Label Studio records per region (``origin`` in the submitted annotation's result) is written to
``screenshots/findings.json``; the sorted Data Manager is saved as ``docs/curator_sorted.png``.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import Any

import pytest
import requests

from browser_harness import REPO_ROOT, SHOTS, Project, Stack, log_in, scenes, until, with_vocabulary

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.slow]

PAGE_TIMEOUT_MS = 120_000
#: seconds to wait for the backend's answers (the CPU is slow and shared): safety nets against a hang
WAIT_S = 600
SCENE_INDICES = (3, 4, 5)
DOC_SHOT = REPO_ROOT / "docs" / "curator_sorted.png"
#: Data Manager columns hidden in the screenshot (ID, image, prediction score and model version stay)
HIDDEN = ["tasks:inner_id", "tasks:annotators", "tasks:total_predictions", "tasks:cancelled_annotations",
          "tasks:total_annotations", "tasks:completed_at", "tasks:annotations_results", "tasks:annotations_ids",
          "tasks:predictions_results", "tasks:storage_filename", "tasks:file_upload", "tasks:created_at",
          "tasks:updated_at", "tasks:updated_by", "tasks:avg_lead_time", "tasks:draft_exists"]


@dataclass
class Curated:
    project: Project
    model_url: str  # the backend's model URL (through the recording proxy, with the URL secret)
    version: str  # the model version /setup answered


def _until(what: str, probe: Any, timeout_s: float = WAIT_S) -> Any:
    return until(what, probe, timeout_s, 1.0)


@pytest.fixture(scope="module")
def curated(stack: Stack) -> Curated:
    """A rectangle project connected as README.md says (its settings left as Label Studio makes them), three
    scenes imported, and *Retrieve predictions* run on all of them (the Data Manager action)."""
    client = stack.client
    model_url = client.request("GET", f"/api/ml/{stack.projects['rectangle'].ml_backend_id}")["url"]
    xml = with_vocabulary((REPO_ROOT / "label_config" / "rectangle.xml").read_text(), stack.vocabulary)
    project = client.create_project("MaskInversion curator", xml)
    ml = client.connect_ml_backend(project["id"], model_url, interactive=True)
    tasks, _ = scenes(SCENE_INDICES)
    created = client.upload_images(project["id"], [(f"curator{k}.png", t.png) for k, t in enumerate(tasks)])
    proj = Project("curator", project["id"], ml["id"], [t["id"] for t in created], tasks)
    client.retrieve_predictions(proj.id)
    preds = _until("a prediction of every task",
                   lambda: all(client.predictions(t) for t in proj.task_ids)
                   and [client.predictions(t)[0] for t in proj.task_ids])
    version = preds[0]["model_version"]
    stack.record("curator: regions per task after Retrieve predictions",
                 [len([r for r in p["result"] if r["type"] == "rectanglelabels"]) for p in preds])
    # the backend makes its version the project's prediction source a little after the /setup
    _until("the backend's version as the project's prediction source",
           lambda: client.request("GET", f"/api/projects/{proj.id}/")["model_version"] == version)
    return Curated(proj, model_url, version)


def shot(page: Any, name: str) -> Any:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path))
    return path


def backend_json(curated: Curated, path: str) -> dict:
    resp = requests.get(f"{curated.model_url}{path}", timeout=60)
    resp.raise_for_status()
    return resp.json()


def learnt(curated: Curated, queued: int) -> dict:
    """The project's examples once the backend has handled ``queued`` webhook events in all."""
    def settled() -> bool:
        counts = backend_json(curated, "/health").get("webhooks") or {}
        return counts.get("queued", 0) >= queued and counts.get("pending", 1) == 0
    _until(f"{queued} webhook event(s) handled", settled)
    return backend_json(curated, f"/examples?project={curated.project.id}")


def webhooks_queued(curated: Curated) -> int:
    return (backend_json(curated, "/health").get("webhooks") or {}).get("queued", 0)


def open_prefilled(page: Any, stack: Stack, curated: Curated, k: int) -> Any:
    """Open task ``k``: the labelling page pre-fills the draft with the predicted regions; returns the region list."""
    page.goto(f"{stack.ls_url}/projects/{curated.project.id}/data?task={curated.project.task_ids[k]}")
    page.locator('img[src^="blob:"]').first.wait_for(state="visible", timeout=PAGE_TIMEOUT_MS)
    regions = page.locator(".lsf-outliner-item")
    regions.first.wait_for(state="visible", timeout=PAGE_TIMEOUT_MS)
    return regions


def submit(page: Any, stack: Stack, task_id: int) -> dict:
    page.get_by_test_id("bottombar-submit-button").or_(page.locator('[aria-label="submit"]')).first.click()
    return _until("the submitted annotation", lambda: stack.client.annotations(task_id))[-1]


def origins(annotation: dict) -> dict[str, set[str]]:
    """Region id -> the ``origin`` values of its result items, as Label Studio stored them."""
    out: dict[str, set[str]] = {}
    for item in annotation["result"]:
        out.setdefault(str(item.get("id")), set()).add(str(item.get("origin")))
    return out


# ------------------------------------------------------------------------------------------------------------
def test_retrieve_then_sort_by_prediction_score_least_certain_first(stack: Stack, page: Any,
                                                                      curated: Curated) -> None:
    client, pid = stack.client, curated.project.id
    # the Data Manager's ordering by prediction score, as a tab of the project (what the column header does)
    view = client.request("POST", "/api/dm/views/", json={"project": pid, "data": {
        "title": "least certain first", "ordering": ["tasks:predictions_score"],
        "hiddenColumns": {"explore": HIDDEN, "labeling": []}}})
    listed = client.request("GET", "/api/tasks/", params={"project": pid, "view": view["id"], "fields": "all"})
    listed = listed["tasks"] if isinstance(listed, dict) else listed
    scores = [t.get("predictions_score") for t in listed]
    stack.record("curator: prediction scores in the Data Manager's order", scores)
    assert scores and all(isinstance(s, (int, float)) for s in scores), scores
    assert scores == sorted(scores), "least certain first"

    log_in(page, stack)
    page.goto(f"{stack.ls_url}/projects/{pid}/data?tab={view['id']}")
    header = page.get_by_text("Prediction score", exact=False).first
    header.wait_for(state="visible", timeout=PAGE_TIMEOUT_MS)
    # the column shows each task's score (three decimals), least certain first
    shown = [f"{s:.3f}" for s in scores]
    page.get_by_text(shown[0], exact=True).first.wait_for(state="visible", timeout=PAGE_TIMEOUT_MS)
    text = page.locator("body").inner_text()
    at = [text.find(s) for s in shown]
    assert all(i >= 0 for i in at) and at == sorted(at), (shown, text[:2000])
    path = shot(page, "curator-sorted")
    shutil.copyfile(path, DOC_SHOT)


def test_untouched_predictions_teach_nothing_an_edited_region_teaches_one_example(stack: Stack, page: Any,
                                                                                 curated: Curated) -> None:
    log_in(page, stack)
    before = webhooks_queued(curated)

    # task 0: submitted exactly as pre-filled
    regions = open_prefilled(page, stack, curated, 0)
    n0 = regions.count()
    shot(page, "curator-prefilled")
    untouched = submit(page, stack, curated.project.task_ids[0])
    seen0 = origins(untouched)
    stack.record("curator: origin per region, submitted untouched", {k: sorted(v) for k, v in seen0.items()})
    assert len(seen0) == n0 and all(v == {"prediction"} for v in seen0.values()), seen0
    ex = learnt(curated, before + 1)
    assert ex["count"] == 0, ex

    # task 1: one region's label changed, the rest left as predicted
    regions = open_prefilled(page, stack, curated, 1)
    first = regions.first
    first.click()
    current = first.locator(".lsf-outliner-item__title").inner_text().strip()
    other = next(lab for lab in stack.vocabulary if lab != current)
    chip = page.locator(".lsf-label", has_text=other).first
    chip.scroll_into_view_if_needed()
    chip.click()
    shot(page, "curator-edited")
    edited = submit(page, stack, curated.project.task_ids[1])
    seen1 = origins(edited)
    stack.record("curator: origin per region, one label changed", {k: sorted(v) for k, v in seen1.items()})
    changed = [k for k, v in seen1.items() if "prediction-changed" in v]
    assert len(changed) == 1 and all(v == {"prediction"} for k, v in seen1.items() if k not in changed), seen1
    ex = learnt(curated, before + 2)
    assert ex["count"] == 1 and ex["labels"] == {other: 1}, ex
