"""End-to-end region search with a real Label Studio 1.23: annotations reach the index through the webhook, the
backend's own predictions as it makes them, predictions from elsewhere (imported) through ``maskinv-search
backfill``; a text query from the CLI and from ``POST /search`` finds them;
``--to-label-studio`` writes the hits as their own prediction set (``search:<digest>``), annotations untouched;
deleting a task in Label Studio (``TASKS_DELETED``) takes its regions out of the index."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from ls_harness import BackendServer, LabelStudioClient, started
from test_active_learning import BOX, CONFIG, DISC, H, W, region
from test_label_studio import scene_png

pytestmark = pytest.mark.e2e

BACKEND_ENV = {"MASKINV_MODEL": "maskinv-test-tiny", "MASKINV_PRETRAINED": "none", "MASKINV_DEVICE": "cpu",
               "MASKINV_LOG_LEVEL": "INFO", "MASKINV_SIZE": "112", "MASKINV_CAPTION": "false"}


@pytest.fixture
def search_backend(ls_server, ls_token, tmp_path):
    env = dict(BACKEND_ENV, LABEL_STUDIO_URL=ls_server.url, LABEL_STUDIO_API_KEY=ls_token,
               MASKINV_DATA_DIR=str(tmp_path / "data"))
    server = BackendServer(tmp_path / "backend.log", env=env)
    started(server)
    yield server, env
    server.stop()


def cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "maskinv-search"
    full = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY")}
    return subprocess.run([str(exe), *args], env={**full, **env}, capture_output=True, text=True, timeout=600)


def search(backend: BackendServer, pid: int, **body) -> dict:
    resp = requests.post(f"{backend.url}/search", json={"projects": [pid], **body}, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()


def wait_hits(backend: BackendServer, pid: int, want: int, timeout_s: float = 180) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        doc = search(backend, pid, text="car", k=50)
        if len(doc["hits"]) == want or time.monotonic() > deadline:
            return doc
        time.sleep(0.5)


def test_index_search_and_hits_in_label_studio(ls: LabelStudioClient, search_backend):
    backend, env = search_backend
    pid = ls.create_project("region search", CONFIG)["id"]
    tasks = ls.upload_images(pid, [(f"scene{i}.png", scene_png(W, H, seed=i)) for i in range(4)])
    ml = ls.connect_ml_backend(pid, backend.url)
    assert ml["state"] == "CO", ml
    anns = [ls.create_annotation(t["id"], [region("b", BOX, ["car"]), region("d", DISC, ["dog"])])
            for t in tasks[:2]]
    doc = wait_hits(backend, pid, 4)  # the two annotations' regions, through the webhook
    assert {(h["task"], h["region"], h["source"]) for h in doc["hits"]} == {
        (t["id"], r, "human") for t in tasks[:2] for r in ("b", "d")}
    # the third task gets the backend's prediction: its regions are indexed as the backend makes them
    ls.retrieve_predictions(pid, [tasks[2]["id"]])
    assert ls.predictions(tasks[2]["id"])
    predicted = {r["id"] for r in ls.predictions(tasks[2]["id"])[0]["result"] if r["type"].endswith("labels")}
    doc = wait_hits(backend, pid, 4 + len(predicted))
    live = {(h["region"], h["source"]) for h in doc["hits"] if h["task"] == tasks[2]["id"]}
    assert {r for r, _ in live} == predicted and {s for _, s in live} <= {"suggested", "proposed"}, live
    # the fourth holds a prediction imported from elsewhere: backfill embeds and indexes it, skips the rest
    ls.request("POST", "/api/predictions/", json={"task": tasks[3]["id"], "model_version": "imported",
                                                  "score": 0.5, "result": [region("p", BOX, ["car"])]},
               expect=(201,))
    done = cli(env, "backfill", str(pid), "--no-progress")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert (report["tasks"], report["skipped_tasks"], report["indexed_tasks"]) == (4, 3, 1), report
    assert report["predicted_regions"] == 1, report

    q = cli(env, "query", "--project", str(pid), "--text", "car", "-k", "50", "--json", "--to-label-studio")
    assert q.returncode == 0, q.stderr[-2000:]
    answer = json.loads(q.stdout)
    assert {h["task"] for h in answer["hits"]} == {t["id"] for t in tasks}
    version = f"search:{answer['query']}"
    written = answer["label_studio"][0]
    assert written["model_version"] == version and written["tasks"] == 4, written
    for t, ann in zip(tasks[:2], anns):
        preds = [p for p in ls.predictions(t["id"]) if p["model_version"] == version]
        assert len(preds) == 1 and {r["id"] for r in preds[0]["result"]} == {"b", "d"}
        assert [a["id"] for a in ls.annotations(t["id"])] == [ann["id"]]  # annotations untouched
        assert ls.annotations(t["id"])[0]["result"] == ann["result"]

    # deleting a task in Label Studio: TASKS_DELETED reaches the webhook, its regions leave the index
    ls.request("DELETE", f"/api/tasks/{tasks[0]['id']}/", expect=(204,))
    doc = wait_hits(backend, pid, len(answer["hits"]) - 2)
    assert tasks[0]["id"] not in {h["task"] for h in doc["hits"]}
