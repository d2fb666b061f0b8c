"""What an annotator sees on Label Studio 1.23's labelling page with the MaskInversion backend connected.

Each test logs in through the login form, opens a task, turns on *Auto-Annotation* (with *Auto-Accept
Suggestions* off), picks a label, draws a region with the mouse on one object of the scene and waits for
what Label Studio shows: the suggestion with its accept/reject controls, then (after accepting) the backend's
label in the region list and its caption in the region's caption field. Screenshots go to
``tests/browser/screenshots/``; the payloads Label Studio sent and the timings to ``screenshots/findings.json``.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from browser_harness import SHOTS, Project, Stack

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.slow]

#: the CPU is slow and shared: generous waits for UI states, never sleep-and-assert
PAGE_TIMEOUT_MS = 120_000
SUGGESTION_TIMEOUT_MS = 180_000


# ------------------------------------------------------------------------------------------------------------
# steps an annotator takes
# ------------------------------------------------------------------------------------------------------------
def log_in(page: Any, stack: Stack) -> None:
    """Fill the login form and click *Log in*."""
    page.goto(f"{stack.ls_url}/user/login/")
    page.locator("#email").fill(stack.username)
    page.locator("#password").fill(stack.password)
    page.locator("button.login-button").click()
    page.wait_for_url(lambda url: "/user/login" not in url, timeout=PAGE_TIMEOUT_MS)


def open_task(page: Any, stack: Stack, project: Project, k: int) -> Any:
    """Open task ``k`` of ``project`` on the labelling page; returns the rendered image element."""
    page.goto(f"{stack.ls_url}/projects/{project.id}/data?task={project.task_ids[k]}")
    image = page.locator('img[src^="blob:"]').first  # the labelling page's image (the list shows thumbnails)
    image.wait_for(state="visible", timeout=PAGE_TIMEOUT_MS)
    return image


def turn_on_auto_annotation(page: Any) -> None:
    """Click the *Auto-Annotation* toggle; *Auto-Accept Suggestions* (shown then) must stay off."""
    page.get_by_text("Auto-Annotation", exact=True).click()
    auto_accept = page.get_by_test_id("bottombar-auto-accept-toggle")
    auto_accept.wait_for(state="attached", timeout=PAGE_TIMEOUT_MS)
    assert not auto_accept.is_checked(), "Auto-Accept Suggestions must be off for this flow"


def pick_label(page: Any, label: str) -> None:
    chip = page.locator(".lsf-label", has_text=label).first
    chip.scroll_into_view_if_needed()
    chip.click()


def choose_auto_detect(page: Any) -> None:
    """The toolbar's *Auto-Detect* button (shown with Auto-Annotation on) selects the smart tool."""
    page.locator(".lsf-tool", has_text="Auto-Detect").first.click()


def page_point(image: Any, size: tuple[int, int], x: float, y: float) -> tuple[float, float]:
    """Page coordinates of image pixel (x, y); ``size`` = (width, height) of the image in pixels."""
    image.scroll_into_view_if_needed()
    box = image.bounding_box()
    return box["x"] + x * box["width"] / size[0], box["y"] + y * box["height"] / size[1]


def drag(page: Any, start: tuple[float, float], end: tuple[float, float]) -> None:
    """Mouse down at ``start``, move in steps, mouse up at ``end`` (how a person draws a box)."""
    page.mouse.move(*start)
    page.mouse.down()
    page.mouse.move(*end, steps=12)
    page.mouse.up()


def shot(page: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"))


def region_result(answer: dict, tag: str) -> tuple[str, str | None, float]:
    """(label, caption, score) of the first region in Label Studio's interactive-annotating answer."""
    result = answer["data"]["result"]
    labelled = next(r for r in result if r["type"] == tag)
    caption = next((r["value"]["text"][0] for r in result if r["type"] == "textarea"), None)
    return labelled["value"][tag][0], caption, float(labelled.get("score", 0.0))


# ------------------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------------------
def test_rectangle_suggestion_is_shown_accepted_and_captioned(stack: Stack, page: Any) -> None:
    project = stack.projects["rectangle"]
    k, obj = 2, 1  # scene 5: the blue circle
    scene = project.scenes[k]
    log_in(page, stack)
    image = open_task(page, stack, project, k)
    turn_on_auto_annotation(page)
    pick_label(page, scene.labels[obj])
    choose_auto_detect(page)
    x0, y0, x1, y1 = scene.box(obj)
    margin = 4
    sent_before = len(stack.proxy.predicts)
    with page.expect_response(lambda r: "/interactive-annotating" in r.url, timeout=SUGGESTION_TIMEOUT_MS) as resp:
        drag(page, page_point(image, scene.size, x0 - margin, y0 - margin),
             page_point(image, scene.size, x1 + margin, y1 + margin))
    request_body = resp.value.request.post_data_json
    answer = resp.value.json()
    accept = page.get_by_test_id("bottombar-accept-suggestions-button")
    accept.wait_for(state="visible", timeout=SUGGESTION_TIMEOUT_MS)
    stack.record("rectangle: seconds from a clean start to the first suggestion in the browser",
                 round(time.monotonic() - stack.started_at, 1))
    shot(page, "rectangle-suggestion")
    assert page.get_by_test_id("bottombar-reject-suggestions-button").is_visible()
    assert "data" in answer, f"Label Studio answered no suggestion: {answer}"
    label, caption, score = region_result(answer, "rectanglelabels")
    stack.record("rectangle: the labelling page sent (interactive-annotating)", request_body)
    stack.record("rectangle: Label Studio sent to /predict", _without_config(stack.proxy.predicts[sent_before:]))
    stack.record("rectangle: suggestion", {"label": label, "caption": caption, "score": score,
                                           "truth": scene.labels[obj]})

    accept.click()
    accept.wait_for(state="hidden", timeout=PAGE_TIMEOUT_MS)
    region = page.locator(".lsf-outliner-item").first
    region.wait_for(state="visible", timeout=PAGE_TIMEOUT_MS)
    assert page.locator(".lsf-outliner-item").count() == 1, "one region: the accepted suggestion"
    assert region.locator(".lsf-outliner-item__title").inner_text().strip() == label
    region.click()  # select it: the per-region caption field shows up
    assert caption, f"the backend sent no caption: {answer}"
    page.get_by_text(caption, exact=True).first.wait_for(state="visible", timeout=PAGE_TIMEOUT_MS)
    shot(page, "rectangle-accepted")


def _without_config(payloads: list[dict]) -> list[dict]:
    """``/predict`` payloads with the label config and task data shortened for the findings file."""
    out = []
    for p in payloads:
        tasks = [{"id": t.get("id"), "data": t.get("data"), "keys": sorted(t)} for t in p.get("tasks", [])]
        out.append({**p, "label_config": f"<{len(p.get('label_config') or '')} characters>", "tasks": tasks})
    return out
