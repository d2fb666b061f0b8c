"""End-to-end active labelling with a real Label Studio 1.23: annotations become examples, suggestions use them.

Connecting the backend makes Label Studio register ``<backend>/webhook`` for all actions with payloads; every
annotation created, updated or deleted through Label Studio's API reaches the backend as an event; the next
suggestion on a new task keeps its ``model_version``, names the example set in its regions' meta and takes its
labels from the examples (the events are learnt from after the backend's answer); a deleted
annotation's examples are gone; the examples survive a backend restart; a wiped store is rebuilt by *Start
training* (``POST /api/ml/{id}/train``) from Label Studio's annotations.

Two labels only (``car`` = the red box, ``dog`` = the blue disc), so that every label has examples and the tiny
random-init model's arbitrary text prototypes cannot decide: the examples must.

The backend runs authenticated as a deployment should: MASKINV_URL_SECRET (the model URL is
``<backend>/<secret>``, so the webhook Label Studio registers is ``<backend>/<secret>/webhook``) and basic auth
(the model's *Basic Auth* settings, which Label Studio sends on its ML API calls but not on webhooks).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import requests

from ls_harness import BackendServer, started, LabelStudioClient
from test_label_studio import scene_png

pytestmark = pytest.mark.e2e

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image">
    <Label value="car"/>
    <Label value="dog"/>
  </RectangleLabels>
</View>"""
#: as tests/e2e/conftest.py's BACKEND_ENV: the tiny random-init model on CPU at 112 px
BACKEND_ENV = {"MASKINV_MODEL": "maskinv-test-tiny", "MASKINV_PRETRAINED": "none", "MASKINV_DEVICE": "cpu",
               "MASKINV_LOG_LEVEL": "INFO", "MASKINV_SIZE": "112"}
#: the backend's URL secret and basic-auth credentials in this test
SECRET = "e2e-learning-secret-0123456789"
AUTH = ("label-studio", "e2e-basic-pass")
W, H = 160, 120
BOX = {"x": 10.0, "y": 20.0, "width": 35.0, "height": 50.0}  # the red box of scene_png
DISC = {"x": 55.0, "y": 30.0, "width": 35.0, "height": 55.0}  # the blue disc


def region(rid: str, geom: dict, labels: list[str]) -> dict:
    return {"id": rid, "from_name": "label", "to_name": "image", "type": "rectanglelabels", "original_width": W,
            "original_height": H, "image_rotation": 0, "origin": "manual",
            "value": {**geom, "rotation": 0, "rectanglelabels": labels}}


def examples(backend: BackendServer, project: int) -> dict:
    resp = requests.get(f"{backend.url}/{SECRET}/examples", params={"project": project}, auth=AUTH, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()


def wait_examples(backend: BackendServer, project: int, count: int, timeout_s: float = 180) -> dict:
    """Label Studio waits for a webhook at most WEBHOOK_TIMEOUT (1 s); the backend finishes on its own time."""
    deadline = time.monotonic() + timeout_s
    while True:
        ex = examples(backend, project)
        if ex["count"] == count or time.monotonic() > deadline:
            return ex
        time.sleep(0.5)


def suggest(ls: LabelStudioClient, ml_id: int, task_id: int) -> dict:
    answer = ls.interactive_annotating(ml_id, task_id, [region("b", BOX, []), region("d", DISC, [])])
    assert "errors" not in answer, answer
    return answer["data"]


def labels_of(prediction: dict) -> dict[str, str]:
    return {r["id"]: r["value"]["rectanglelabels"][0] for r in prediction["result"] if r["type"] == "rectanglelabels"}


@pytest.fixture
def learning_backend(ls_server, ls_token, tmp_path):
    data_dir = tmp_path / "examples"
    env = dict(BACKEND_ENV, LABEL_STUDIO_URL=ls_server.url, LABEL_STUDIO_API_KEY=ls_token,
               MASKINV_DATA_DIR=str(data_dir), MASKINV_CAPTION="false", MASKINV_URL_SECRET=SECRET,
               BASIC_AUTH_USER=AUTH[0], BASIC_AUTH_PASS=AUTH[1])
    server = BackendServer(tmp_path / "backend.log", env=env)
    started(server)
    yield server, data_dir
    server.stop()


def test_annotations_become_examples_and_suggestions_use_them(ls: LabelStudioClient, learning_backend):
    backend, data_dir = learning_backend
    project = ls.create_project("active labelling", CONFIG)
    pid = project["id"]
    tasks = ls.upload_images(pid, [(f"scene{i}.png", scene_png(W, H, seed=i)) for i in range(7)])
    # the bare routes are closed: only <backend>/<secret>/... is served (bare /health says up/ready only)
    assert requests.post(f"{backend.url}/webhook", json={"action": "START_TRAINING"}, auth=AUTH,
                         timeout=30).status_code == 404
    ml = ls.connect_ml_backend(pid, f"{backend.url}/{SECRET}", basic_auth=AUTH)
    assert ml["state"] == "CO", ml

    # what connecting did: a project webhook to <model URL>/webhook, all actions, with payloads, no credentials
    hooks = ls.request("GET", "/api/webhooks/", params={"project": pid})
    hook = next(h for h in hooks if h["url"] == f"{backend.url}/{SECRET}/webhook")
    assert hook["send_payload"] is True and hook["send_for_all_actions"] is True and hook["is_active"] is True
    assert not hook.get("headers")

    new_task = tasks[-1]["id"]
    before = suggest(ls, ml["id"], new_task)
    v0 = before["model_version"]
    assert all(r["meta"]["examples"] == 0 for r in before["result"])

    # six annotated tasks, submitted through the API: each is an ANNOTATION_CREATED event at the backend
    anns = [ls.create_annotation(t["id"], [region("b", BOX, ["car"]), region("d", DISC, ["dog"])])
            for t in tasks[:6]]
    ex = wait_examples(backend, pid, 12)
    assert ex["labels"] == {"car": 6, "dog": 6} and ex["annotations"] == 6, ex

    after = suggest(ls, ml["id"], new_task)
    # the version Label Studio compares stays; the example set is named in the regions' meta
    assert after["model_version"] == v0, (v0, after["model_version"])
    assert all(r["meta"]["examples_state"].startswith("ex") for r in after["result"] if "meta" in r)
    assert labels_of(after) == {"b": "car", "d": "dog"}, after["result"]
    assert all(r["meta"]["examples"] == 6 and 0 <= r["meta"]["margin"] <= 1 for r in after["result"])

    # an updated annotation replaces its examples; a deleted one takes them away
    ls.request("PATCH", f"/api/annotations/{anns[0]['id']}/", json={"result": [region("b", BOX, ["car"])]})
    assert wait_examples(backend, pid, 11)["labels"] == {"car": 6, "dog": 5}
    ls.request("DELETE", f"/api/annotations/{anns[1]['id']}/", expect=(204,))
    ex = wait_examples(backend, pid, 9)
    assert ex["labels"] == {"car": 5, "dog": 4} and ex["annotations"] == 5, ex
    version = ex["version"]

    # a restarted backend still has them (SQLite under MASKINV_DATA_DIR)
    backend.stop()
    backend.start()
    assert examples(backend, pid)["version"] == version

    # a wiped store loses nothing: Start training rebuilds it from Label Studio's annotations
    backend.stop()
    for f in Path(data_dir).glob("examples.sqlite3*"):
        f.unlink()
    backend.start()
    assert examples(backend, pid)["count"] == 0
    ls.request("POST", f"/api/ml/{ml['id']}/train", json={}, expect=(200, 201))
    ex = wait_examples(backend, pid, 9)
    assert ex["labels"] == {"car": 5, "dog": 4} and ex["annotations"] == 5, ex
    assert labels_of(suggest(ls, ml["id"], new_task)) == {"b": "car", "d": "dog"}

    # what Label Studio sent, as the backend logged it: the events above, and Start training as a webhook
    # (feature flag ff_back_dev_1417_start_training_mlbackend_webhooks, on in 1.23)
    log = backend.log_path.read_text(errors="replace")
    for action in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED", "START_TRAINING"):
        assert f"webhook {action} (payload keys:" in log, action
