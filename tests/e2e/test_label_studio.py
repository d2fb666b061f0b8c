"""End-to-end: a real Label Studio 1.23 + the MaskInversion ML backend, through Label Studio's own API.

* interactive: the annotator draws a region (saved as a draft); the labelling UI asks Label Studio for an
  interactive prediction (``POST /api/ml/{id}/interactive-annotating``), Label Studio calls the backend's
  /predict, the backend downloads the uploaded image from Label Studio and answers the region labelled and
  captioned; the annotator accepts the suggestion, which Label Studio stores in the annotation;
* batch: annotated tasks get predictions through the Data Manager's "Retrieve Predictions" action; the
  annotations stay as they were.

The model is the tiny random-init test model, so the labels themselves are arbitrary: the tests check the
plumbing (ids, geometry, types, vocabulary, scores, captions, what Label Studio stores), not the accuracy.
"""

from __future__ import annotations

import copy
import io
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image, ImageDraw

from backend.trust.score import prediction_score
from ls_harness import REPO_ROOT, LabelStudioClient

pytestmark = pytest.mark.e2e

CONFIG_DIR = REPO_ROOT / "label_config"
SHIPPED = sorted(p.stem for p in CONFIG_DIR.glob("*.xml"))
REGION_TAGS = {"rectanglelabels": "rectangle", "polygonlabels": "polygon", "brushlabels": "brush"}


# ------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShippedConfig:
    """What the tests need to know about a shipped label config (read from its XML)."""

    name: str
    xml: str
    image: str  # <Image name>
    control: str  # region control name
    tag: str  # region control tag, lower case (rectanglelabels, ...)
    labels: tuple[str, ...]
    caption: str | None  # per-region <TextArea name>

    @property
    def kind(self) -> str:
        return REGION_TAGS[self.tag]


def shipped_config(name: str) -> ShippedConfig:
    xml = (CONFIG_DIR / f"{name}.xml").read_text()
    root = ET.fromstring(xml)
    image = next(e.get("name") for e in root.iter() if e.tag == "Image")
    control = next(e for e in root.iter() if e.tag.lower() in REGION_TAGS)
    caption = next((e.get("name") for e in root.iter()
                    if e.tag == "TextArea" and e.get("perRegion", "").lower() == "true"), None)
    labels = tuple(lab.get("value") for lab in control.iter("Label"))
    return ShippedConfig(name, xml, image, control.get("name"), control.tag.lower(), labels, caption)


def scene_png(width: int = 160, height: int = 120, seed: int = 0) -> bytes:
    """A small synthetic scene: textured background, a red box and a blue disc. ``[height, width, 3]`` PNG."""
    rng = np.random.default_rng(seed)
    base = np.full((height, width, 3), (90, 140, 90), dtype=np.int16)
    base += rng.integers(-20, 21, (height, width, 3), dtype=np.int16)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    draw.rectangle([int(0.1 * width), int(0.2 * height), int(0.45 * width), int(0.7 * height)], fill=(210, 30, 30))
    draw.ellipse([int(0.55 * width), int(0.3 * height), int(0.9 * width), int(0.85 * height)], fill=(30, 60, 200))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def drawn_region(cfg: ShippedConfig, width: int, height: int, box: tuple[float, float, float, float],
                 region_id: str | None = None) -> dict:
    """A region as the labelling UI serialises it right after drawing (no label picked yet).

    ``box`` = (x, y, w, h) in percent of the image; polygons are that box's corners, brushes its filled mask.
    """
    x, y, w, h = box
    if cfg.kind == "rectangle":
        value = {"x": x, "y": y, "width": w, "height": h, "rotation": 0}
    elif cfg.kind == "polygon":
        value = {"points": [[x, y], [x + w, y], [x + w, y + h], [x, y + h]], "closed": True}
    else:
        from label_studio_sdk.converter.brush import mask2rle

        mask = np.zeros((height, width), dtype=np.uint8)
        mask[int(y * height / 100):int((y + h) * height / 100), int(x * width / 100):int((x + w) * width / 100)] = 255
        value = {"format": "rle", "rle": [int(v) for v in mask2rle(mask)]}
    value[cfg.tag] = []
    return {"id": region_id or uuid.uuid4().hex[:10], "from_name": cfg.control, "to_name": cfg.image,
            "type": cfg.tag, "original_width": width, "original_height": height, "image_rotation": 0,
            "origin": "manual", "value": value}


def geometry(value: dict) -> dict:
    return {k: v for k, v in value.items() if k not in ("rectanglelabels", "polygonlabels", "brushlabels", "text")}


def check_labelled(cfg: ShippedConfig, drawn: list[dict], result: list[dict]) -> dict[str, tuple[str, str | None]]:
    """Assert ``result`` labels every drawn region (same id, type, geometry; label from the vocabulary; caption).

    Returns ``{region id: (label, caption)}``.
    """
    out = {}
    for region in drawn:
        items = [r for r in result if r.get("id") == region["id"]]
        labelled = [r for r in items if r.get("type") == cfg.tag]
        assert len(labelled) == 1, f"region {region['id']}: expected one {cfg.tag} item, got {items}"
        item = labelled[0]
        assert item["from_name"] == cfg.control and item["to_name"] == cfg.image
        assert geometry(item["value"]) == geometry(region["value"]), "the region's geometry must come back unchanged"
        assert item["original_width"] == region["original_width"]
        assert item["original_height"] == region["original_height"]
        labels = item["value"][cfg.tag]
        assert len(labels) == 1 and labels[0] in cfg.labels, f"label {labels} is not in the vocabulary {cfg.labels}"
        assert 0.0 < item["score"] <= 1.0
        assert any("MaskInversion top-" in t for t in item.get("meta", {}).get("text", [])), item.get("meta")
        caption = None
        if cfg.caption:
            texts = [r for r in items if r.get("type") == "textarea"]
            assert len(texts) == 1, f"region {region['id']}: expected one caption item, got {items}"
            assert texts[0]["from_name"] == cfg.caption and texts[0]["to_name"] == cfg.image
            caption = texts[0]["value"]["text"][0]
            assert isinstance(caption, str) and caption.strip()
            assert labels[0] in caption, f"the caption {caption!r} should describe the predicted {labels[0]!r}"
        out[region["id"]] = (labels[0], caption)
    return out


def new_project(ls: LabelStudioClient, cfg: ShippedConfig, backend_url: str) -> tuple[dict, dict]:
    project = ls.create_project(f"e2e {cfg.name} {uuid.uuid4().hex[:6]}", cfg.xml)
    ml = ls.connect_ml_backend(project["id"], backend_url)
    return project, ml


# ------------------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------------------
def test_shipped_configs_are_accepted_by_label_studio(ls: LabelStudioClient):
    assert SHIPPED, f"no label configs in {CONFIG_DIR}"
    for name in SHIPPED:
        cfg = shipped_config(name)
        ans = ls.request("POST", "/api/projects/validate/", json={"label_config": cfg.xml}, expect=(200, 204))
        assert ans is None or "errors" not in ans, ans


def backend_for(request, mode: str):
    """The running backend of ``mode`` ("embedded" or "queue")."""
    return request.getfixturevalue("ml_backend" if mode == "embedded" else "ml_backend_queue")


@pytest.mark.parametrize("config_name, mode", [(name, "embedded") for name in SHIPPED] + [
    pytest.param("rectangle" if "rectangle" in SHIPPED else SHIPPED[0], "queue", marks=pytest.mark.redis)])
def test_interactive_prediction_labels_and_captions_the_drawn_region(ls: LabelStudioClient, request,
                                                                     config_name: str, mode: str):
    cfg = shipped_config(config_name)
    project, ml = new_project(ls, cfg, backend_for(request, mode).url)
    assert ml["is_interactive"] is True
    assert ml["state"] == "CO", f"Label Studio did not connect the backend: {ml}"

    png = scene_png(seed=1)
    (task,) = ls.upload_images(project["id"], [("scene.png", png)])
    assert task["data"]["image"].startswith("/data/upload/"), task["data"]

    # the annotator draws a region around the red box; the UI keeps it in a draft
    region = drawn_region(cfg, 160, 120, (10.0, 20.0, 35.0, 50.0))
    draft = ls.create_draft(task["id"], [region])
    assert draft["result"] == [region]

    # ... and asks for the interactive suggestion, exactly as the labelling UI does
    answer = ls.interactive_annotating(ml["id"], task["id"], draft["result"])
    assert [d["result"] for d in ls.drafts(task["id"])] == [[region]], "the backend must not touch the draft"
    assert "errors" not in answer, answer
    data = answer["data"]
    assert data["model_version"].startswith("maskinversion"), data
    labelled = check_labelled(cfg, [region], data["result"])
    assert 0.0 < data["score"] <= 1.0

    # asking again gives the same answer (served from the backend's result cache)
    again = ls.interactive_annotating(ml["id"], task["id"], draft["result"])
    assert check_labelled(cfg, [region], again["data"]["result"]) == labelled

    # the annotator accepts the suggestion and submits: Label Studio stores label and caption
    suggestion = [{k: v for k, v in r.items() if k not in ("score", "meta")} for r in data["result"]]
    ann = ls.create_annotation(task["id"], suggestion)
    stored = ls.annotations(task["id"])
    assert [a["id"] for a in stored] == [ann["id"]]
    assert check_labelled_stored(cfg, region, stored[0]["result"]) == labelled[region["id"]]


def check_labelled_stored(cfg: ShippedConfig, region: dict, result: list[dict]) -> tuple[str, str | None]:
    """Label and caption of ``region`` in a stored annotation result."""
    item = next(r for r in result if r["id"] == region["id"] and r["type"] == cfg.tag)
    assert geometry(item["value"]) == geometry(region["value"])
    caption = next((r["value"]["text"][0] for r in result if r["id"] == region["id"] and r["type"] == "textarea"),
                   None)
    return item["value"][cfg.tag][0], caption


def test_interactive_error_is_reported_through_label_studio(ls: LabelStudioClient, ml_backend):
    """A region the backend cannot label: the backend answers 422, Label Studio relays an error, stores nothing."""
    cfg = shipped_config("rectangle" if "rectangle" in SHIPPED else SHIPPED[0])
    project, ml = new_project(ls, cfg, ml_backend.url)
    (task,) = ls.upload_images(project["id"], [("scene.png", scene_png(seed=2))])
    bad = {"id": "kp1", "from_name": "kp", "to_name": cfg.image, "type": "keypointlabels",
           "original_width": 160, "original_height": 120, "value": {"x": 10, "y": 10, "keypointlabels": []}}
    answer = ls.interactive_annotating(ml["id"], task["id"], [bad])
    assert "data" not in answer
    # Label Studio 1.23 relays only the HTTP status line of a failed /predict (the backend's JSON message is in
    # the backend's log and in its /predict answer, see tests/backend/)
    assert any("422" in str(e) for e in answer.get("errors", [])), answer
    assert ls.predictions(task["id"]) == []


def wait_for_examples(backend_url: str, project_id: int, annotations: int, timeout_s: float = 120.0) -> None:
    """Wait until the backend's example store holds ``annotations`` annotations of the project (GET /examples)."""
    import requests

    deadline = time.monotonic() + timeout_s
    seen = None
    while time.monotonic() < deadline:
        resp = requests.get(f"{backend_url}/examples", params={"project": project_id}, timeout=10)
        seen = resp.json() if resp.ok else resp.text
        if resp.ok and seen.get("annotations") == annotations:
            return
        time.sleep(0.5)
    raise AssertionError(f"the backend did not record the project's {annotations} annotations: {seen}")


def test_batch_predictions_for_annotated_tasks(ls: LabelStudioClient, request, backend_mode: str):
    cfg = shipped_config("polygon" if "polygon" in SHIPPED else SHIPPED[0])
    project, ml = new_project(ls, cfg, backend_for(request, backend_mode).url)
    n_tasks, boxes = 4, [(5.0, 10.0, 40.0, 60.0), (55.0, 25.0, 35.0, 50.0), (30.0, 5.0, 30.0, 30.0)]
    tasks = ls.upload_images(project["id"], [(f"scene{k}.png", scene_png(seed=10 + k)) for k in range(n_tasks + 1)])
    annotated, unannotated = tasks[:n_tasks], tasks[n_tasks]

    drawn: dict[int, list[dict]] = {}
    annotations_before: dict[int, list[dict]] = {}
    for k, task in enumerate(annotated):
        regions = [drawn_region(cfg, 160, 120, box) for box in boxes[: 1 + k % len(boxes)]]
        # annotators named the first region; the others are still unlabelled
        regions[0]["value"][cfg.tag] = [cfg.labels[k % len(cfg.labels)]]
        ls.create_annotation(task["id"], regions)
        drawn[task["id"]] = regions
        annotations_before[task["id"]] = copy.deepcopy(ls.annotations(task["id"]))
    # the backend learns from these annotations (webhook), and the model version names the example set:
    # let the example set settle, so that both Retrieve actions below ask for the same version
    wait_for_examples(backend_for(request, backend_mode).url, project["id"], n_tasks)

    ans = ls.retrieve_predictions(project["id"])
    assert ans.get("processed_items") == n_tasks + 1, ans

    versions = set()
    for task in annotated:
        preds = ls.predictions(task["id"])
        assert len(preds) == 1, f"task {task['id']}: expected one prediction, got {preds}"
        pred = preds[0]
        assert isinstance(pred["score"], float) and 0.0 < pred["score"] <= 1.0, pred
        labelled = check_labelled(cfg, drawn[task["id"]], pred["result"])
        region_scores = [r["score"] for r in pred["result"] if r.get("type") == cfg.tag]
        assert region_scores and all(0.0 <= s <= 1.0 for s in region_scores), region_scores
        assert pred["score"] == pytest.approx(prediction_score(pred["result"]))  # backend.trust.score
        assert len(labelled) == len(drawn[task["id"]])
        versions.add(pred["model_version"])
        # annotations are untouched
        assert ls.annotations(task["id"]) == annotations_before[task["id"]]
    assert len(versions) == 1 and versions.pop().startswith("maskinversion")
    # a task without regions gets proposed regions (tests/e2e/test_proposals.py), marked as proposed
    assert all(r.get("meta", {}).get("proposed") for p in ls.predictions(unannotated["id"]) for r in p["result"]
               if r.get("type") == cfg.tag)

    # running the action again adds nothing: Label Studio skips tasks that have this model version's prediction
    ls.retrieve_predictions(project["id"])
    again = {t["id"]: [(q["model_version"], len(q["result"])) for q in ls.predictions(t["id"])] for t in annotated}
    assert all(len(v) == 1 for v in again.values()), again

    # the Data Manager lists them as predicted
    listed = {t["id"]: t for t in ls.tasks(project["id"])}
    assert all(listed[t["id"]]["total_predictions"] == 1 for t in annotated)
