"""The backend's search page in Chromium: a curator searches a project by text and sees the matching regions
as crops with their similarity, label and a link to the task in Label Studio.

The project is the test's own (the shipped rectangle config with the scene world's vocabulary, three scenes);
its annotations reach the region index through Label Studio's webhook, the page is served by the backend under
its URL secret (through the recording proxy, as Label Studio reaches it)."""

from __future__ import annotations

import time

import pytest
import requests

from browser_harness import REPO_ROOT, SHOTS, Stack, scenes, with_vocabulary

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.slow]

WAIT_S = 600


def _model_url(stack: Stack) -> str:
    any_project = next(iter(stack.projects.values()))
    return str(stack.client.request("GET", f"/api/ml/{any_project.ml_backend_id}")["url"]).rstrip("/")


def test_search_page_shows_crops_of_the_regions_found(stack: Stack, page) -> None:
    client = stack.client
    tasks, vocabulary = scenes((6, 7, 8))
    xml = with_vocabulary((REPO_ROOT / "label_config" / "rectangle.xml").read_text(), vocabulary)
    pid = client.create_project("MaskInversion search page", xml)["id"]
    model_url = _model_url(stack)
    client.connect_ml_backend(pid, model_url)
    created = client.upload_images(pid, [(f"search{k}.png", t.png) for k, t in enumerate(tasks)])
    for t, scene in zip(created, tasks):
        w, h = scene.size
        result = []
        for k, label in enumerate(scene.labels):
            x0, y0, x1, y1 = scene.box(k)
            result.append({"id": f"r{k}", "from_name": "label", "to_name": "image", "type": "rectanglelabels",
                           "original_width": w, "original_height": h, "image_rotation": 0, "origin": "manual",
                           "value": {"x": 100 * x0 / w, "y": 100 * y0 / h, "width": 100 * (x1 - x0) / w,
                                     "height": 100 * (y1 - y0) / h, "rotation": 0, "rectanglelabels": [label]}})
        client.create_annotation(t["id"], result)
    n_regions = sum(len(s.labels) for s in tasks)
    query = tasks[0].labels[0]
    deadline = time.monotonic() + WAIT_S
    while True:  # the webhook events are handled after Label Studio's 1 s wait
        resp = requests.post(f"{model_url}/search", json={"projects": [pid], "text": query, "k": 50}, timeout=120)
        if resp.status_code == 200 and len(resp.json()["hits"]) == n_regions or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert resp.status_code == 200 and len(resp.json()["hits"]) == n_regions, resp.text[:500]

    page.goto(f"{model_url}/search")
    page.fill("input[name=projects]", str(pid))
    page.fill("input[name=text]", query)
    page.fill("input[name=k]", "6")
    page.click("button[type=submit]")
    page.wait_for_selector("figure.hit", timeout=WAIT_S * 1000)
    hits = page.locator("figure.hit")
    assert hits.count() == 6
    assert "hit(s)" in page.inner_text("#status")
    assert query in page.inner_text("#grid")  # a region labelled as searched is among the hits
    link = hits.nth(0).locator("a").get_attribute("href")
    assert link and link.startswith(f"{stack.ls_url}/projects/{pid}/data?task=")
    page.wait_for_function("() => [...document.querySelectorAll('figure.hit img')].every("
                           "i => i.complete && i.naturalWidth > 0)", timeout=WAIT_S * 1000)
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "search_page.png"), full_page=True)
