"""Annotation events obey /predict's request limits and the label vocabulary (embedded mode, tiny model).

Every limit of a /predict request applies to an annotation event: regions per annotation (MASKINV_MAX_REGIONS),
annotations per event (MASKINV_MAX_TASKS, as tasks per request), rasterised mask pixels per event
(MASKINV_MAX_MASK_MPIX), and the labels a region carries must be labels of its control (the project's label
config, or MASKINV_LABELS). What is left out is listed in the answer's ``skipped``; what was stored stays.
"""

from __future__ import annotations

import io

from PIL import Image

from backend_support import config, data_uri, rect, task

PROJECT = {"id": 1, "label_config": config("rectangle")}


def event(annotations: list[dict], tasks: list[dict], action: str = "ANNOTATIONS_CREATED") -> dict:
    if action != "ANNOTATIONS_CREATED":
        return {"action": action, "project": PROJECT, "annotation": annotations[0], "task": tasks[0]}
    return {"action": action, "project": PROJECT, "annotation": annotations, "task": tasks}


def ann(ann_id: int, regions: list[dict], task_id: int = 1) -> dict:
    return {"id": ann_id, "task": task_id, "project": 1, "result": regions, "was_cancelled": False}


def examples(client) -> dict:
    return client.get("/examples?project=1").get_json()


def skipped(answer: dict, kind: str) -> list[dict]:
    return [s for s in answer.get("skipped", []) if s["kind"] == kind]


def test_an_annotation_over_max_regions_is_skipped_and_keeps_what_was_stored(make_client, tmp_path):
    c = make_client(MASKINV_DATA_DIR=str(tmp_path / "d"), MASKINV_WEBHOOK_QUEUE="0", MASKINV_MAX_REGIONS="3")
    first = c.post("/webhook", json=event([ann(11, [rect("a", labels=("car",))])], [task(1)], "ANNOTATION_CREATED"))
    assert first.get_json()["status"] == "stored"
    many = [rect(f"r{i}", x=2 + 5 * i, w=5, labels=("dog",)) for i in range(4)]
    resp = c.post("/webhook", json=event([ann(11, many)], [task(1)], "ANNOTATION_UPDATED"))
    body = resp.get_json()
    assert resp.status_code == 200, body
    (limit,) = skipped(body, "limit")
    assert limit["annotation"] == "11" and "MASKINV_MAX_REGIONS=3" in limit["error"] and "4 regions" in limit["error"]
    assert examples(c)["labels"] == {"car": 1}  # the stored examples of annotation 11 are not lost


def test_annotations_beyond_max_tasks_in_one_event_are_skipped(make_client, tmp_path):
    c = make_client(MASKINV_DATA_DIR=str(tmp_path / "d"), MASKINV_WEBHOOK_QUEUE="0", MASKINV_MAX_TASKS="2")
    anns = [ann(10 + i, [rect("a", labels=("car",))], task_id=i + 1) for i in range(3)]
    body = c.post("/webhook", json=event(anns, [task(i + 1, seed=i) for i in range(3)])).get_json()
    assert body["annotations"] == 2
    (limit,) = skipped(body, "limit")
    assert limit["annotation"] == "12" and "MASKINV_MAX_TASKS=2" in limit["error"]
    assert examples(c)["annotations"] == 2


def _big_task(task_id: int, side: int = 1024) -> dict:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (120, 30, 200)).save(buf, "PNG")
    return {"id": task_id, "data": {"image": data_uri(buf.getvalue())}}


def _full_frame(rid: str, side: int = 1024) -> dict:
    item = rect(rid, x=0, y=0, w=100, h=100, labels=("car",))
    item["original_width"] = item["original_height"] = side
    return item


def test_mask_pixels_of_one_event_are_bounded(make_client, tmp_path):
    """One full-frame mask of 1024 x 1024 fills MASKINV_MAX_MASK_MPIX=1: the next annotation is skipped whole."""
    c = make_client(MASKINV_DATA_DIR=str(tmp_path / "d"), MASKINV_WEBHOOK_QUEUE="0", MASKINV_MAX_MASK_MPIX="1")
    anns = [ann(20, [_full_frame("a")], task_id=1), ann(21, [_full_frame("b")], task_id=2)]
    body = c.post("/webhook", json=event(anns, [_big_task(1), _big_task(2)])).get_json()
    (limit,) = skipped(body, "limit")
    assert limit["annotation"] == "21" and "MASKINV_MAX_MASK_MPIX=1" in limit["error"]
    assert examples(c)["annotations"] == 1


def test_labels_outside_the_vocabulary_are_not_examples(make_client, tmp_path):
    c = make_client(MASKINV_DATA_DIR=str(tmp_path / "d"), MASKINV_WEBHOOK_QUEUE="0")
    long_label = "x" * 100_000
    regions = [rect("a", labels=("car", "zebra")), rect("b", x=50, w=20, labels=(long_label,)),
               rect("c", x=5, w=10, labels=("dog",))]
    body = c.post("/webhook", json=event([ann(11, regions)], [task(1)], "ANNOTATION_CREATED")).get_json()
    bad = {s["region"]: s["error"] for s in skipped(body, "label")}
    assert set(bad) == {"a", "b"}
    assert "'zebra'" in bad["a"] and "not a label of control 'label'" in bad["a"]
    assert len(bad["b"]) < 300 and "MASKINV_MAX_LABEL_CHARS=200" in bad["b"]
    assert examples(c)["labels"] == {"car": 1, "dog": 1}


def test_a_region_carries_a_bounded_number_of_labels(make_client, tmp_path):
    c = make_client(MASKINV_DATA_DIR=str(tmp_path / "d"), MASKINV_WEBHOOK_QUEUE="0")
    labels = tuple(f"label {i}" for i in range(19_991))
    body = c.post("/webhook", json=event([ann(11, [rect("a", labels=labels)])], [task(1)],
                                         "ANNOTATION_CREATED")).get_json()
    (bad,) = skipped(body, "label")
    assert bad["region"] == "a" and "19991 labels" in bad["error"]
    assert examples(c)["count"] == 0


def test_extra_labels_belong_to_the_vocabulary(make_client, tmp_path):
    """A control without <Label> children takes its vocabulary from MASKINV_LABELS."""
    xml = '<View><Image name="image" value="$image"/><Rectangle name="label" toName="image"/></View>'
    c = make_client(MASKINV_DATA_DIR=str(tmp_path / "d"), MASKINV_WEBHOOK_QUEUE="0", MASKINV_LABELS="zebra,okapi")
    region = rect("a", labels=())
    region["type"] = "rectangle"
    region["value"].pop("rectanglelabels")
    labelled = {"id": "a", "from_name": "label", "to_name": "image", "type": "labels",
                "value": {"labels": ["zebra", "car"]}}
    body = {"action": "ANNOTATION_CREATED", "project": {"id": 1, "label_config": xml},
            "annotation": ann(11, [region, labelled]), "task": task(1)}
    answer = c.post("/webhook", json=body).get_json()
    assert examples(c)["labels"] == {"zebra": 1}, answer
    assert [s["region"] for s in skipped(answer, "label")] == ["a"]
