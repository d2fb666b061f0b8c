"""What an annotator sees on Label Studio 1.23's labelling page with the MaskInversion backend connected.

Each test logs in through the login form, opens a task, turns on *Auto-Annotation* (with *Auto-Accept
Suggestions* off), picks one of the toolbar's *Auto-Detect* tools, marks one object of the scene with the mouse
and waits for what Label Studio shows: the suggestion with its accept/reject controls, then (after accepting) the
backend's label in the region list and its caption in the region's caption field. One test per flow:

* rectangle project: a box drawn with the smart rectangle is labelled as drawn;
* polygon project: a box, or a click, drawn with the smart rectangle / keypoint (``smartOnly`` in
  ``label_config/polygon.xml``) comes back as a polygon of the object; submitting stores that polygon;
* brush project: a box drawn with the smart rectangle comes back as the object painted with the brush.

Screenshots go to ``tests/browser/screenshots/``; the payloads Label Studio sent and the timings to
``screenshots/findings.json``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw

from browser_harness import REPO_ROOT, SHOTS, Project, Stack, log_in

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.slow]

#: the CPU is slow and shared: generous waits for UI states, never sleep-and-assert
PAGE_TIMEOUT_MS = 120_000
SUGGESTION_TIMEOUT_MS = 180_000


# ------------------------------------------------------------------------------------------------------------
# steps an annotator takes
# ------------------------------------------------------------------------------------------------------------


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


def choose_smart_tool(page: Any, tool: str) -> None:
    """Hover *Auto-Detect* (several smart tools: it unfolds them) and click one: ``rectangle-tool``,
    ``rectangle-3-point-tool`` or ``key-point-tool`` (their ``aria-label``)."""
    page.locator(".lsf-tool.lsf-tool_smart:not([aria-label])").first.hover()
    page.locator(f'.lsf-tool_smart[aria-label="{tool}"]').first.click()
    page.locator(f'.lsf-tool_smart.lsf-tool_active[aria-label="{tool}"]').first.wait_for(state="attached")


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


def mark_object(page: Any, image: Any, scene: Any, obj: int, how: str) -> tuple[dict, dict]:
    """Drag a box around object ``obj`` (``how="box"``) or click its centre (``"click"``) and wait for Label
    Studio's interactive-annotating call; returns (what the page sent, what it got back)."""
    with page.expect_response(lambda r: "/interactive-annotating" in r.url, timeout=SUGGESTION_TIMEOUT_MS) as resp:
        if how == "box":
            x0, y0, x1, y1 = scene.box(obj)
            drag(page, page_point(image, scene.size, x0 - 4, y0 - 4), page_point(image, scene.size, x1 + 4, y1 + 4))
        else:
            ys, xs = scene.masks[obj].nonzero()
            inside = np.argmin((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2)  # the object's pixel nearest its centroid
            page.mouse.click(*page_point(image, scene.size, float(xs[inside]) + 0.5, float(ys[inside]) + 0.5))
    return resp.value.request.post_data_json, resp.value.json()


def accept_and_check(page: Any, answer: dict, tag: str, name: str) -> tuple[str, str]:
    """Accept the suggestion shown and check what the annotator sees: one region, titled with the backend's label,
    whose caption field shows the backend's caption; returns (label, caption)."""
    accept = page.get_by_test_id("bottombar-accept-suggestions-button")
    accept.wait_for(state="visible", timeout=SUGGESTION_TIMEOUT_MS)
    assert page.get_by_test_id("bottombar-reject-suggestions-button").is_visible()
    shot(page, f"{name}-suggestion")
    assert "data" in answer, f"Label Studio answered no suggestion: {answer}"
    label, caption, _ = region_result(answer, tag)
    accept.click()
    accept.wait_for(state="hidden", timeout=PAGE_TIMEOUT_MS)
    region = page.locator(".lsf-outliner-item").first
    region.wait_for(state="visible", timeout=PAGE_TIMEOUT_MS)
    assert page.locator(".lsf-outliner-item").count() == 1, "one region: the accepted suggestion (the mark is gone)"
    assert region.locator(".lsf-outliner-item__title").inner_text().strip() == label
    region.click()
    assert caption, f"the backend sent no caption: {answer}"
    page.get_by_text(caption, exact=True).first.wait_for(state="visible", timeout=PAGE_TIMEOUT_MS)
    shot(page, f"{name}-accepted")
    return label, caption


def outline_iou(suggested: dict, truth: np.ndarray) -> float | None:
    """IoU of a suggested polygon with the object's mask ``[H, W]`` (None for other region types): a finding, not
    asserted here (how well a box or click is outlined is the worker's, measured in benchmarks/box_to_mask.py)."""
    points = suggested["value"].get("points")
    if not points:
        return None
    h, w = truth.shape
    canvas = Image.new("1", (w, h), 0)
    ImageDraw.Draw(canvas).polygon([(x * w / 100, y * h / 100) for x, y in points], fill=1)
    outline = np.asarray(canvas, dtype=bool)
    return round(float((outline & truth).sum() / max(1, (outline | truth).sum())), 3)


def submit(page: Any, stack: Stack, task_id: int) -> dict:
    """Click *Submit*; returns the annotation Label Studio stored."""
    page.get_by_test_id("bottombar-submit-button").or_(page.locator('[aria-label="submit"]')).first.click()
    deadline = time.monotonic() + PAGE_TIMEOUT_MS / 1000
    while time.monotonic() < deadline:
        annotations = stack.client.annotations(task_id)
        if annotations:
            return annotations[-1]
        time.sleep(0.5)
    raise AssertionError(f"task {task_id}: no annotation stored after Submit")


def marked_object_flow(stack: Stack, page: Any, project: Project, k: int, obj: int, tool: str, how: str,
                       tag: str) -> None:
    """Mark object ``obj`` of task ``k`` with a smart tool; the suggestion is a ``tag`` region of the object with
    the backend's label and caption; accepting and submitting stores exactly that region and caption."""
    name = f"{project.name}-{how}"
    scene = project.scenes[k]
    log_in(page, stack)
    image = open_task(page, stack, project, k)
    turn_on_auto_annotation(page)
    choose_smart_tool(page, tool)
    sent_before = len(stack.proxy.predicts)
    request_body, answer = mark_object(page, image, scene, obj, how)
    stack.record(f"{name}: the labelling page sent (interactive-annotating)", request_body)
    stack.record(f"{name}: Label Studio sent to /predict", _without_config(stack.proxy.predicts[sent_before:]))
    marks = request_body["context"]["result"]
    assert [m["type"] for m in marks] == (["rectangle"] if how == "box" else ["keypoint"])
    label, caption = accept_and_check(page, answer, tag, name)
    suggested = next(r for r in answer["data"]["result"] if r["type"] == tag)
    assert suggested["id"] == marks[0]["id"] and suggested["from_name"] == "label"
    stack.record(f"{name}: suggestion", {"label": label, "caption": caption, "truth": scene.labels[obj],
                                        "refined_by": suggested["meta"].get("refined_by"),
                                        "outline IoU with the object": outline_iou(suggested, scene.masks[obj])})
    stored = submit(page, stack, project.task_ids[k])
    regions = [r for r in stored["result"] if r["type"] == tag]
    captions = [r for r in stored["result"] if r["type"] == "textarea"]
    assert [r["value"][tag] for r in regions] == [[label]], stored["result"]
    assert [c["value"]["text"] for c in captions] == [[caption]], stored["result"]
    assert not [r for r in stored["result"] if r["type"] in ("rectangle", "keypoint")], "the mark is not stored"
    if tag == "polygonlabels":
        assert regions[0]["value"]["points"] == suggested["value"]["points"]


#: the shipped label configs and the tests that drive them (every one has a flow)
FLOWS = {"rectangle": "test_rectangle_suggestion_is_shown_accepted_and_captioned",
         "polygon": "test_polygon_project_box_becomes_a_labelled_captioned_polygon",
         "brush": "test_brush_project_box_comes_back_painted_labelled_and_captioned"}


def test_every_shipped_label_config_has_a_browser_flow() -> None:
    shipped = sorted(p.stem for p in (REPO_ROOT / "label_config").glob("*.xml"))
    assert shipped == sorted(FLOWS) and all(callable(globals().get(name)) for name in FLOWS.values())


def test_polygon_project_box_becomes_a_labelled_captioned_polygon(stack: Stack, page: Any) -> None:
    marked_object_flow(stack, page, stack.projects["polygon"], 0, 0, "rectangle-tool", "box", "polygonlabels")


def test_polygon_project_click_becomes_a_labelled_captioned_polygon(stack: Stack, page: Any) -> None:
    marked_object_flow(stack, page, stack.projects["polygon"], 1, 1, "key-point-tool", "click", "polygonlabels")


def test_brush_project_box_comes_back_painted_labelled_and_captioned(stack: Stack, page: Any) -> None:
    marked_object_flow(stack, page, stack.projects["brush"], 0, 1, "rectangle-tool", "box", "brushlabels")


def _without_config(payloads: list[dict]) -> list[dict]:
    """``/predict`` payloads with the label config and task data shortened for the findings file."""
    out = []
    for p in payloads:
        tasks = [{"id": t.get("id"), "data": t.get("data"), "keys": sorted(t)} for t in p.get("tasks", [])]
        out.append({**p, "label_config": f"<{len(p.get('label_config') or '')} characters>", "tasks": tasks})
    return out
