"""The backend over HTTP (Flask test client) in embedded mode, on the tiny random-init model.

Interactive and batch predictions, their JSON shape (validated by label-studio-sdk), task scores, per-region
errors, malformed requests, basic auth, /setup, /health, /webhook and request-level overrides.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from backend.labelstudio.label_config import parse_label_config
from backend.trust.score import prediction_score, region_priority, task_score
from backend_support import H, W, brush, config, data_uri, labelled, poly, predict, rect, task

def test_interactive_returns_the_drawn_regions_labelled(client):
    drawn = [rect("a1", rotation=20), rect("a2", x=50, y=5, w=30, h=30)]
    resp = predict(client, "rectangle", [task(7)], context={"result": drawn})
    assert resp.status_code == 200, resp.get_json()
    body = resp.get_json()
    (pred,) = body["results"]
    assert body["model_version"] == pred["model_version"] and pred["model_version"].startswith("maskinversion-")
    cfg = parse_label_config(config("rectangle"))
    assert cfg.validate_prediction(pred) == []
    labels = labelled(pred["result"], "rectanglelabels")
    captions = labelled(pred["result"], "textarea")
    assert set(labels) == set(captions) == {"a1", "a2"}
    for d in drawn:
        got = labels[d["id"]]
        assert got["from_name"] == "label" and got["to_name"] == "image"
        assert {k: v for k, v in got["value"].items() if k != "rectanglelabels"} == \
            {k: v for k, v in d["value"].items() if k != "rectanglelabels"}
        assert got["original_width"] == W and got["original_height"] == H
        (label,) = got["value"]["rectanglelabels"]
        assert label in cfg.control("label").labels
        assert 0 < got["score"] <= 1
        assert got["meta"]["text"][0].startswith("MaskInversion top-3: " + label)
        assert captions[d["id"]]["value"]["text"][0].strip()
    assert pred["score"] == pytest.approx(prediction_score(pred["result"]))  # backend.trust.score
    assert pred["maskinv"]["labelled"] == 2 and pred["maskinv"]["errors"] == []


def test_batch_labels_annotations_then_predictions_and_scores_by_weakest_region(client):
    m1 = np.zeros((H, W), bool)
    m1[5:30, 10:40] = True
    m2 = np.zeros((H, W), bool)
    m2[35:55, 50:75] = True
    old = {"id": 1, "result": [brush("old", m2)], "updated_at": "2024-01-01T00:00:00Z"}
    new = {"id": 2, "result": [brush("b1", m1), brush("b2", m2)], "updated_at": "2024-02-01T00:00:00Z"}
    cancelled = {"id": 3, "result": [brush("skip", m1)], "was_cancelled": True, "updated_at": "2024-03-01T00:00:00Z"}
    tasks = [
        task(1, 1, annotations=[old, new, cancelled], predictions=[{"id": 9, "result": [brush("p0", m1)]}]),
        task(2, 2, annotations=[], predictions=[{"id": 10, "result": [brush("p1", m1)], "model_version": "import"}]),
        task(3, 3, annotations=[cancelled]),
        task(4, 4),
    ]
    sent = copy.deepcopy(tasks)
    resp = predict(client, "brush", tasks, maskinv={"proposals": False})  # proposals: predict/test_propose.py
    assert resp.status_code == 200, resp.get_json()
    res = resp.get_json()["results"]
    assert len(res) == 4
    cfg = parse_label_config(config("brush"))
    a, b, c, d = res
    assert set(labelled(a["result"], "brushlabels")) == {"b1", "b2"}  # the latest non-cancelled annotation
    assert a["maskinv"]["source"] == "annotation 2"
    assert set(labelled(b["result"], "brushlabels")) == {"p1"} and b["maskinv"]["source"] == "prediction 10"
    assert c == [] and d == []  # nothing to label: no prediction at all
    for p in (a, b):
        assert cfg.validate_prediction(p) == []
        scores = [r["score"] for r in p["result"] if r["type"] == "brushlabels"]
        # the task score (backend.trust.score): uncertainty + coverage, low = label first
        assert p["score"] == pytest.approx(task_score(region_priority(s, 0) for s in scores))
        rle_in = {r["id"]: r["value"]["rle"] for t in sent
                  for ann in t.get("annotations", []) + t.get("predictions", [])
                  for r in ann["result"]}
        for r in p["result"]:
            assert r["value"]["rle"] == rle_in[r["id"]]  # geometry returned untouched
    assert tasks == sent  # annotations and predictions of the request are not modified


def test_bad_regions_give_per_region_errors(client):
    good = poly("ok", [[10, 10], [60, 10], [40, 70]])
    two_points = poly("two", [[10, 10], [60, 10]])
    unknown = {"id": "kp", "from_name": "label", "to_name": "image", "type": "keypointlabels",
               "value": {"x": 1, "y": 2, "keypointlabels": ["car"]}}
    resp = predict(client, "polygon", [task(1, annotations=[{"id": 5, "result": [good, two_points, unknown]}])])
    assert resp.status_code == 200
    (pred,) = resp.get_json()["results"]
    assert set(labelled(pred["result"], "polygonlabels")) == {"ok"}
    errors = {e["region"]: e["error"] for e in pred["maskinv"]["errors"]}
    assert "at least 3 points" in errors["two"] and "unsupported region type 'keypointlabels'" in errors["kp"]


def test_interactive_with_only_bad_regions_is_422(client):
    m = np.ones((10, 10), bool)
    bad_rle = brush("r", m)
    bad_rle["original_width"] = 20  # the RLE holds 10 x 10 x 4 values
    resp = predict(client, "brush", [task(1)], context={"result": [bad_rle]})
    assert resp.status_code == 422
    body = resp.get_json()
    assert "encodes 400 values, expected 800" in body["error"]
    assert body["errors"][0]["region"] == "r"
    assert "Traceback" not in resp.get_data(as_text=True)


def test_empty_mask_region_is_an_error_for_that_region_only(client):
    outside = rect("out", x=150, y=150, w=10, h=10)  # entirely outside the image: empty mask
    resp = predict(client, "rectangle", [task(1)], context={"result": [outside, rect("in")]})
    assert resp.status_code == 200
    (pred,) = resp.get_json()["results"]
    assert set(labelled(pred["result"], "rectanglelabels")) == {"in"}
    assert [e["region"] for e in pred["maskinv"]["errors"]] == ["out"]


def test_image_problems_are_reported(client):
    resp = predict(client, "rectangle", [{"id": 1, "data": {}}], context={"result": [rect("a")]})
    assert resp.status_code == 422 and "no image URL" in resp.get_json()["error"]
    resp = predict(client, "rectangle", [{"id": 1, "data": {"image": data_uri(b"not an image")}}],
                   context={"result": [rect("a")]})
    assert resp.status_code == 422 and "cannot be decoded" in resp.get_json()["error"]
    resp = predict(client, "rectangle", [{"id": 1, "data": {}, "annotations": [{"id": 1, "result": [rect("a")]}]},
                                         task(2, annotations=[{"id": 2, "result": [rect("b")]}])])
    first, second = resp.get_json()["results"]
    assert "result" not in first and "no image URL" in first["error"]  # Label Studio stores nothing for it
    assert set(labelled(second["result"], "rectanglelabels")) == {"b"}  # the other task is unaffected


@pytest.mark.parametrize("body, status, match", [
    ("not json", 400, "not valid JSON"),
    ("[1, 2]", 400, "JSON object"),
    ({"label_config": "<View/>"}, 400, "no 'tasks'"),
    ({"tasks": "x", "label_config": None}, 400, "no label config"),
    ({"tasks": [], "label_config": "<View><Image name='i' value='$x'/></View>"}, 400, "no region control"),
    ({"tasks": [1, 2], "label_config": config("rectangle")}, 400, "list of task objects"),
    ({"tasks": [{"id": 1}], "label_config": config("rectangle"), "params": []}, 400, "'params' must be an object"),
    ({"tasks": [{"id": 1}], "label_config": config("rectangle"), "params": {"maskinv": {"steps": -1}}}, 400,
     "params.steps"),
    ({"tasks": [{"id": 1}], "label_config": config("rectangle"), "params": {"maskinv": {"K": 3}}}, 400,
     "unknown key"),
    ({"tasks": [{"id": 1}, {"id": 2}], "label_config": config("rectangle"),
      "params": {"context": {"result": [rect("a")]}}}, 400, "exactly one task"),
])
def test_malformed_requests_are_4xx_json(client, body, status, match):
    resp = client.post("/predict", data=body) if isinstance(body, str) else client.post("/predict", json=body)
    assert resp.status_code == status
    assert match in resp.get_json()["error"]


def test_request_overrides_labels_and_top_k(client):
    resp = predict(client, "rectangle", [task(1)], context={"result": [rect("a")]},
                   maskinv={"labels": ["dog", "cat"], "top_k": 2, "caption": False})
    (pred,) = resp.get_json()["results"]
    (item,) = pred["result"]  # no caption requested
    assert item["value"]["rectanglelabels"][0] in ("dog", "cat")
    assert item["meta"]["text"][0].startswith("MaskInversion top-2: ")


def test_setup_health_webhook_versions(client):
    resp = client.post("/setup", json={"project": "1.1", "schema": config("polygon"), "hostname": "http://ls:8080",
                                       "access_token": "abc", "model_version": "x"})
    assert resp.status_code == 200 and resp.get_json()["model_version"].startswith("maskinversion")
    resp = client.post("/setup", json={"project": "1.1", "schema": "<View><Text name='t' value='$t'/></View>"})
    assert resp.status_code == 400 and "no region control" in resp.get_json()["error"]
    health = client.get("/health").get_json()
    assert health["status"] == "UP" and health["mode"] == "embedded" and health["model_class"] == "MaskInversionModel"
    # annotation events are learnt from (tests/backend/learning/test_learner.py); one without a project is refused
    resp = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "annotation": {}})
    assert resp.status_code == 422 and "project" in resp.get_json()["error"]
    resp = client.post("/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 1}})
    assert resp.status_code == 200 and resp.get_json()["status"] == "ignored"
    assert client.post("/versions", json={"project": "1"}).get_json()["versions"]
    assert client.get("/versions").get_json()["versions"]
    assert client.get("/nope").status_code == 404


def test_basic_auth(make_client):
    c = make_client(BASIC_AUTH_USER="ann", BASIC_AUTH_PASS="s3cret")
    assert c.get("/health").status_code == 200  # open for container health checks
    resp = c.post("/setup", json={"schema": config("brush")})
    assert resp.status_code == 401 and resp.headers["WWW-Authenticate"].startswith("Basic")
    resp = c.post("/setup", json={"schema": config("brush")}, auth=("ann", "wrong"))
    assert resp.status_code == 401
    resp = c.post("/setup", json={"schema": config("brush")}, auth=("ann", "s3cret"))
    assert resp.status_code == 200


def test_repeated_request_is_served_from_the_result_cache(client):
    context = {"result": [rect("a", x=5, y=5, w=60, h=60)]}
    first = predict(client, "rectangle", [task(1, 11)], context=context).get_json()["results"][0]
    second = predict(client, "rectangle", [task(2, 11)], context=context).get_json()["results"][0]  # same image
    assert first["maskinv"]["jobs"][0]["result_cache"] == {"hits": 0, "misses": 1}
    assert second["maskinv"]["jobs"][0]["result_cache"] == {"hits": 1, "misses": 0}
    assert first["result"] == second["result"]
