"""Nothing overwritten, nothing drifting (embedded mode, tiny model): predictions never touch annotations, a
repeated batch gives the same predictions, and model_version follows the model, parameters and label set."""

from __future__ import annotations

import copy
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from backend_support import config, png_bytes, rect

pytestmark = pytest.mark.hardening

IMAGE = png_bytes(80, 60, seed=21)
TOKEN = "0123456789abcdef0123456789abcdef01234567"


class FakeLS(BaseHTTPRequestHandler):
    """Serves uploads; records every request the backend makes to Label Studio."""

    seen: list[tuple[str, str]] = []

    def log_message(self, *args):
        pass

    def _record(self):
        self.seen.append((self.command, self.path))

    def do_GET(self):
        self._record()
        body = IMAGE if self.path.startswith(("/data/upload/", "/storage-data/")) else b"{}"
        self.send_response(200 if body is IMAGE else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _refuse(self):
        self._record()
        self.send_response(405)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_POST = do_PUT = do_PATCH = do_DELETE = _refuse


@pytest.fixture(scope="module")
def fake_ls():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeLS)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def rect_config(labels: list[str]) -> str:
    return config("rectangle").replace('<Label value="sky" background="#fabebe"/>',
                                       "".join(f'<Label value="{lab}"/>' for lab in labels[10:])) \
        if len(labels) > 10 else config("rectangle")


def batch_tasks() -> list[dict]:
    ann = {"id": 11, "result": [rect("a"), rect("b", x=50, y=40, w=30, h=30)], "completed_by": 1,
           "updated_at": "2024-05-01T00:00:00Z", "was_cancelled": False}
    return [{"id": 1, "data": {"image": "/data/upload/1/a.png"}, "annotations": [ann], "predictions": []},
            {"id": 2, "data": {"image": "/data/upload/1/b.png"},
             "annotations": [{**ann, "id": 12, "result": [rect("c", x=20, y=20, w=50, h=50)]}]}]


def run_batch(make_client, fake_ls, xml: str, **maskinv):
    client = make_client(LABEL_STUDIO_URL=fake_ls, LABEL_STUDIO_API_KEY=TOKEN)
    setup = client.post("/setup", json={"project": "1.1", "schema": xml, "hostname": fake_ls}).get_json()
    tasks = batch_tasks()
    sent = copy.deepcopy(tasks)
    params = {"maskinv": maskinv} if maskinv else {}
    resp = client.post("/predict", json={"tasks": tasks, "label_config": xml, "params": params})
    assert resp.status_code == 200, resp.get_json()
    assert tasks == sent
    return setup["model_version"], resp.get_json()


def stable(results: list[dict]) -> list:
    """What Label Studio stores of each prediction."""
    return [(r["model_version"], r["score"], r["result"]) for r in results]


def test_predictions_never_write_to_label_studio_or_touch_annotations(make_client, fake_ls):
    FakeLS.seen.clear()
    _, body = run_batch(make_client, fake_ls, config("rectangle"))
    assert FakeLS.seen and all(method == "GET" for method, _ in FakeLS.seen), FakeLS.seen
    for pred, task in zip(body["results"], batch_tasks()):
        assert set(pred) == {"result", "score", "model_version", "maskinv"}  # a prediction, nothing else
        ann_ids = {r["id"] for r in task["annotations"][0]["result"]}
        assert {r["id"] for r in pred["result"]} == ann_ids
        assert pred["maskinv"]["source"] == f"annotation {task['annotations'][0]['id']}"


def test_repeated_batch_is_idempotent_and_versions_follow_labels_and_params(make_client, fake_ls, monkeypatch):
    from worker.jobs import runtime as jobs

    version, first = run_batch(make_client, fake_ls, config("rectangle"))
    assert version == first["model_version"] == first["results"][0]["model_version"]
    assert version.startswith("maskinversion-maskinv-test-tiny/random-seed0-")
    monkeypatch.setattr(jobs, "_runtime", None)  # a new process: model, engine and caches built again
    again_version, again = run_batch(make_client, fake_ls, config("rectangle"))
    assert again_version == version and stable(again["results"]) == stable(first["results"])
    assert again["results"][0]["maskinv"]["jobs"][0]["result_cache"]["hits"] == 0  # recomputed, not cached

    # another label set: another version (Label Studio predicts again), and labels from the new vocabulary
    labels = ["person", "car", "bicycle", "dog", "cat", "bird", "tree", "building", "road", "sky", "boat", "horse"]
    xml = rect_config(labels)
    new_version, changed = run_batch(make_client, fake_ls, xml)
    assert new_version != version and changed["model_version"] == new_version
    assert all(r["model_version"] == new_version for r in changed["results"])
    # other inversion parameters: another version too
    steps_version, steps = run_batch(make_client, fake_ls, config("rectangle"), steps=3)
    assert steps["model_version"] not in (version, new_version)
    assert steps_version == version  # /setup knows only the defaults


def test_versions_endpoint_lists_what_setup_answered(make_client):
    client = make_client()
    answered = client.post("/setup", json={"schema": config("polygon")}).get_json()["model_version"]
    assert client.get("/versions").get_json()["versions"][0] == answered
