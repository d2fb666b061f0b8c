"""End-to-end: project runs against a real Label Studio 1.23 and the real Redis.

* ``maskinv-annotate`` on a 30-task project (annotated brush, polygon and rectangle regions, tasks without
  regions, one task whose regions come from an imported prediction, one broken image), in queue mode with one
  worker: every region of every task with regions is labelled, the broken image is reported, the empty tasks
  get proposed regions (skipped with ``--proposals off``), annotations stay byte-for-byte the same; a second
  run writes nothing;
* a run killed with SIGKILL mid-way and run again: every task ends with exactly one prediction of the model
  version;
* *Retrieve predictions* on more tasks than fit in a low MASKINV_BATCH_TIMEOUT: Label Studio stores what was
  ready, the backend writes the rest through the API (a background run, listed by ``GET /runs``), and every
  task ends with exactly one prediction without the user repeating the action (repeating it meanwhile adds
  nothing).

The model is the tiny random-init test model: the tests check the plumbing, not the labels.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from ls_harness import REPO_ROOT, BackendServer, LabelStudioClient, WorkerProcess
from test_label_studio import scene_png

pytestmark = [pytest.mark.e2e, pytest.mark.redis, pytest.mark.slow]

LABELS = ("red box", "blue disc", "grass")
KINDS = {"rectangle": ("box", "rectanglelabels"), "polygon": ("poly", "polygonlabels"),
         "brush": ("paint", "brushlabels")}
W, H = 160, 120
#: tiny model, small input: an inversion takes a fraction of a second on 2 busy cores
MODEL_ENV = {"MASKINV_MODEL": "maskinv-test-tiny", "MASKINV_PRETRAINED": "none", "MASKINV_DEVICE": "cpu",
             "MASKINV_SIZE": "112", "MASKINV_LOG_LEVEL": "INFO"}
REDIS_URL = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
#: a random model's probabilities are near uniform: keep every proposal, MaskCut only, at most 3 (fast)
PROPOSAL_ENV = {"MASKINV_PROPOSAL_MIN_SCORE": "0", "MASKINV_PROPOSAL_SOURCES": "maskcut", "MASKINV_MAX_PROPOSALS": "3"}


def all_kinds_config() -> str:
    labels = "".join(f'<Label value="{lab}"/>' for lab in LABELS)
    return ("<View>"
            '<Image name="image" value="$image"/>'
            f'<RectangleLabels name="box" toName="image">{labels}</RectangleLabels>'
            f'<PolygonLabels name="poly" toName="image">{labels}</PolygonLabels>'
            f'<BrushLabels name="paint" toName="image">{labels}</BrushLabels>'
            '<TextArea name="caption" toName="image" perRegion="true" editable="true"/>'
            "</View>")


def region(kind: str, box: tuple[float, float, float, float], label: str | None = None) -> dict:
    """One region of ``kind`` covering ``box`` = (x, y, w, h) percent of the image."""
    control, rtype = KINDS[kind]
    x, y, w, h = box
    if kind == "rectangle":
        value = {"x": x, "y": y, "width": w, "height": h, "rotation": 0}
    elif kind == "polygon":
        value = {"points": [[x, y], [x + w, y], [x + w / 2, y + h]], "closed": True}
    else:
        from label_studio_sdk.converter.brush import mask2rle

        mask = np.zeros((H, W), dtype=np.uint8)
        mask[int(y * H / 100):int((y + h) * H / 100), int(x * W / 100):int((x + w) * W / 100)] = 255
        value = {"format": "rle", "rle": [int(v) for v in mask2rle(mask)]}
    value[rtype] = [label] if label else []
    return {"id": uuid.uuid4().hex[:10], "from_name": control, "to_name": "image", "type": rtype,
            "original_width": W, "original_height": H, "image_rotation": 0, "origin": "manual", "value": value}


BOXES = [(5.0, 10.0, 40.0, 60.0), (55.0, 25.0, 35.0, 50.0), (30.0, 5.0, 30.0, 30.0)]


def build_project(ls: LabelStudioClient, n_annotated: int, n_empty: int, broken: bool,
                  from_prediction: bool, seed: int = 100) -> dict:
    """A project whose tasks are: annotated (1-3 regions, kinds rotating), without regions, optionally one with
    a broken image (annotated) and one whose regions come from an imported prediction. Images come from scene
    seeds ``seed``, ``seed + 1``, ...: another ``seed`` gives images whose regions no earlier test left in the
    result cache.

    Returns ``{"project", "regions": {task id: [region ids]}, "empty": [ids], "broken": id | None}``.
    """
    project = ls.create_project(f"run {uuid.uuid4().hex[:6]}", all_kinds_config())
    images = [(f"scene{k}.png", scene_png(W, H, seed=seed + k)) for k in range(n_annotated + n_empty)]
    if broken:
        images.append(("broken.png", b"\x89PNG\r\n\x1a\n this is not an image"))
    if from_prediction:
        images.append(("imported.png", scene_png(W, H, seed=99)))
    tasks = ls.upload_images(project["id"], images)
    kinds = list(KINDS)
    out = {"project": project, "regions": {}, "empty": [], "broken": None}
    for k, task in enumerate(tasks[:n_annotated]):
        regs = [region(kinds[(k + j) % 3], BOXES[j], LABELS[k % 3] if j == 0 else None) for j in range(1 + k % 3)]
        ls.create_annotation(task["id"], regs)
        out["regions"][task["id"]] = [r["id"] for r in regs]
    out["empty"] = [t["id"] for t in tasks[n_annotated:n_annotated + n_empty]]
    rest = tasks[n_annotated + n_empty:]
    if broken:
        task, rest = rest[0], rest[1:]
        ls.create_annotation(task["id"], [region("rectangle", BOXES[0])])
        out["broken"] = task["id"]
    if from_prediction:
        task = rest[0]
        regs = [region("polygon", BOXES[1]), region("brush", BOXES[2])]
        ls.request("POST", "/api/predictions/", json={"task": task["id"], "result": regs, "score": 0.5,
                                                      "model_version": "imported"})
        out["regions"][task["id"]] = [r["id"] for r in regs]
    return out


def snapshot_annotations(ls: LabelStudioClient, task_ids) -> dict:
    """Every annotation of the tasks as Label Studio stores it, serialised (byte-for-byte comparison); minus
    ``created_ago``, which the API computes from the clock ("0 minutes", "1 minute")."""
    return {tid: json.dumps([{k: v for k, v in a.items() if k != "created_ago"} for a in ls.annotations(tid)],
                            sort_keys=True) for tid in task_ids}


def ours(ls: LabelStudioClient, task_id: int, version: str) -> list[dict]:
    return [p for p in ls.predictions(task_id) if p["model_version"] == version]


def check_prediction(pred: dict, region_ids: list[str]) -> None:
    """Every region labelled: one labelled item per region (same id), a caption, a task score."""
    labelled = {r["id"] for r in pred["result"] if r["type"] in ("rectanglelabels", "polygonlabels", "brushlabels")}
    assert labelled == set(region_ids), (labelled, region_ids)
    for r in pred["result"]:
        if r["type"] != "textarea":
            assert r["value"][r["type"]][0] in LABELS
    assert 0.0 < pred["score"] <= 1.0


# ----------------------------------------------------------------------------------------------------------------
# fixtures: one queue worker; the CLI as a subprocess
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def queue_env(redis_conn, tmp_path_factory):
    """A fresh queue + key prefix served by one ``python -m worker`` (tiny model); deleted afterwards."""
    ns = f"maskinv-e2e-run-{uuid.uuid4().hex[:8]}"
    env = dict(MODEL_ENV, REDIS_URL=REDIS_URL, MASKINV_QUEUE=ns, MASKINV_REDIS_PREFIX=ns, **PROPOSAL_ENV)
    worker = WorkerProcess(tmp_path_factory.mktemp("run-worker") / "worker.log", env=env).start()
    from worker.queue_worker import WorkerRegistry

    registry = WorkerRegistry(redis_conn, ns, prefix=ns)
    deadline = time.monotonic() + 900  # a safety net against a hang, not a speed bound
    while not registry.live_workers():
        assert worker.process.alive(), worker.process.log_tail()
        assert time.monotonic() < deadline, "the worker did not register"
        time.sleep(0.5)
    yield env
    worker.stop()
    from backend_support import delete_namespace

    delete_namespace(redis_conn, ns)


def annotate_argv(ls_server, ls_token, project_id: int, summary: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "backend.cli.annotate", "--url", ls_server.url, "--token", ls_token,
            "--project", str(project_id), "--summary-json", str(summary), *extra]


def run_annotate(ls_server, ls_token, env: dict, project_id: int, tmp_path: Path, name: str, *extra: str) -> dict:
    summary = tmp_path / f"{name}.json"
    full_env = {**os.environ, **env, "MASKINV_RUN_STATE_DIR": str(tmp_path / "state"), "PYTHONUNBUFFERED": "1"}
    full_env.pop("LABEL_STUDIO_URL", None)
    proc = subprocess.run(annotate_argv(ls_server, ls_token, project_id, summary, *extra), env=full_env,
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert summary.exists(), f"exit {proc.returncode}\n{proc.stderr[-4000:]}"
    out = json.loads(summary.read_text())
    out["exit"], out["stderr"] = proc.returncode, proc.stderr
    return out


# ----------------------------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------------------------
def test_annotate_labels_a_project_and_a_second_run_writes_nothing(ls, ls_server, ls_token, queue_env, tmp_path):
    built = build_project(ls, n_annotated=24, n_empty=4, broken=True, from_prediction=True)
    pid = built["project"]["id"]
    all_ids = [t["id"] for t in ls.tasks(pid)]
    assert len(all_ids) == 30
    before = snapshot_annotations(ls, all_ids)

    dry = run_annotate(ls_server, ls_token, queue_env, pid, tmp_path, "dry", "--dry-run")
    assert dry["skipped_by"].get("dry_run") == 30 and dry["labelled"] == 0, dry
    assert dry["proposal_tasks"] == 4, dry
    dry_off = run_annotate(ls_server, ls_token, queue_env, pid, tmp_path, "dry-off", "--dry-run", "--proposals", "off")
    assert dry_off["skipped_by"] == {"dry_run": 26, "no_regions": 4}, dry_off
    assert all(p["model_version"] == "imported" for t in all_ids for p in ls.predictions(t)), "a dry run writes nothing"

    first = run_annotate(ls_server, ls_token, queue_env, pid, tmp_path, "first")
    version = first["model_version"]
    assert first["labelled"] == 29, first["stderr"][-3000:]
    assert first["failed"] == 1 and first["exit"] == 1, first
    assert first["failures"][0]["tasks"] == [built["broken"]], first["failures"]
    assert first["skipped_by"] == {}, first
    assert first["proposal_tasks"] == 4 and 4 <= first["proposed"] <= 12, first
    assert first["regions"] - first["proposed"] == sum(len(v) for v in built["regions"].values())
    assert "labelled: 29 task(s)" in first["stderr"] and "failed:   1 task(s)" in first["stderr"]

    for tid, region_ids in built["regions"].items():
        preds = ours(ls, tid, version)
        assert len(preds) == 1, (tid, preds)
        check_prediction(preds[0], region_ids)
    for tid in built["empty"]:  # tasks nobody drew on: proposed regions, marked as such
        (pred,) = ours(ls, tid, version)
        regions = [r for r in pred["result"] if r["type"] != "textarea"]
        assert 1 <= len(regions) <= 3 and all(r["meta"]["proposed"] for r in regions), pred
        assert all(r["value"][r["type"]][0] in LABELS for r in regions)
    assert ours(ls, built["broken"], version) == []
    assert snapshot_annotations(ls, all_ids) == before, "annotations must stay byte-for-byte the same"

    counts = {t: len(ls.predictions(t)) for t in all_ids}
    second = run_annotate(ls_server, ls_token, queue_env, pid, tmp_path, "second")
    assert second["labelled"] == 0 and second["failed"] == 0, second
    assert second["skipped_by"].get("predicted") == 29, second
    assert {t: len(ls.predictions(t)) for t in all_ids} == counts, "a second run must write nothing"

    # the broken image failed for a reason a retry cannot fix: remembered, retried only on request
    assert second["skipped_by"].get("failed_before") == 1, second
    retry = run_annotate(ls_server, ls_token, queue_env, pid, tmp_path, "retry", "--retry-failed")
    assert retry["failed"] == 1 and retry["labelled"] == 0, retry
    assert snapshot_annotations(ls, all_ids) == before


def test_killed_run_is_finished_by_a_rerun_with_one_prediction_per_task(ls, ls_server, ls_token, queue_env,
                                                                         tmp_path):
    built = build_project(ls, n_annotated=20, n_empty=0, broken=False, from_prediction=False)
    pid = built["project"]["id"]
    ids = list(built["regions"])
    before = snapshot_annotations(ls, ids)
    # slower inversions (40 steps at 448 px: 785 tokens), so that the kill lands mid-run
    env = dict(queue_env, MASKINV_STEPS="40", MASKINV_SIZE="448")
    full_env = {**os.environ, **env, "MASKINV_RUN_STATE_DIR": str(tmp_path / "state")}
    proc = subprocess.Popen(annotate_argv(ls_server, ls_token, pid, tmp_path / "killed.json", "--no-progress"),
                            env=full_env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 900  # a safety net against a hang, not a speed bound
        while True:
            written = sum(1 for t in ids if ls.predictions(t))
            if written >= 3:
                break
            assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "no prediction was written in time"
            time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stderr.close()
    assert written < len(ids), "the run finished before the kill"

    rerun = run_annotate(ls_server, ls_token, env, pid, tmp_path, "rerun")
    version = rerun["model_version"]
    assert rerun["failed"] == 0, rerun
    assert rerun["labelled"] + rerun["skipped_by"].get("predicted", 0) == len(ids), rerun
    assert rerun["labelled"] >= 1, rerun
    for tid, region_ids in built["regions"].items():
        preds = ours(ls, tid, version)
        assert len(preds) == 1, (tid, preds)
        check_prediction(preds[0], region_ids)
    assert snapshot_annotations(ls, ids) == before


@pytest.fixture(scope="module")
def slow_backend(ls_server, ls_token, queue_env, tmp_path_factory):
    """The backend in queue mode (the module's worker) with a 1 s MASKINV_BATCH_TIMEOUT and a Label Studio token."""
    env = dict(queue_env, MASKINV_BATCH_TIMEOUT="1", MASKINV_STEPS="30", MASKINV_SIZE="224",
               LABEL_STUDIO_URL=ls_server.url,
               LABEL_STUDIO_API_KEY=ls_token)
    server = BackendServer(tmp_path_factory.mktemp("run-backend") / "backend.log", env=env).start()
    yield server
    server.stop()


def test_retrieve_predictions_beyond_the_batch_timeout_finishes_in_the_background(ls, slow_backend):
    import requests

    built = build_project(ls, n_annotated=14, n_empty=0, broken=False, from_prediction=False)
    pid = built["project"]["id"]
    ids = list(built["regions"])
    before = snapshot_annotations(ls, ids)
    ml = ls.connect_ml_backend(pid, slow_backend.url, interactive=False)
    assert ml["state"] == "CO", ml

    ans = ls.retrieve_predictions(pid)
    assert ans.get("processed_items") == len(ids), ans
    ready = sum(1 for t in ids if ls.predictions(t))

    # The run keeps writing while this test looks, so `ready` (counted first) holds the tasks answered within
    # the batch timeout plus those the run wrote before the count; the run's `done` (read after) bounds the latter.
    runs = requests.get(f"{slow_backend.url}/runs", timeout=30).json()["runs"]
    run = next(r for r in runs if r["kind"] == "retrieve" and r["project"] == str(pid))
    assert run["total"] > 0, "every task fit in the 1 s batch timeout: the test needs slower jobs"
    answered = len(ids) - run["total"]
    assert answered <= ready <= answered + run["done"] and run["state"] in ("running", "done"), (ready, run)
    assert run["queued"] + run["running"] + run["done"] + run["skipped"] + run["failed"] == run["total"], run

    # the curator repeats the action meanwhile: the tasks the run holds are not labelled twice
    ls.retrieve_predictions(pid)

    deadline = time.monotonic() + 900  # a safety net against a hang, not a speed bound
    while sum(1 for t in ids if ls.predictions(t)) < len(ids):
        assert time.monotonic() < deadline, requests.get(f"{slow_backend.url}/runs", timeout=30).json()
        time.sleep(1.0)
    run = next(r for r in requests.get(f"{slow_backend.url}/runs", timeout=30).json()["runs"] if r["id"] == run["id"])
    deadline = time.monotonic() + 300  # a safety net against a hang, not a speed bound
    while run["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.5)
        run = next(r for r in requests.get(f"{slow_backend.url}/runs", timeout=30).json()["runs"]
                   if r["id"] == run["id"])
    assert run["state"] == "done" and run["failed"] == 0, run
    assert run["done"] + run["skipped"] == run["total"], run

    versions = set()
    for tid, region_ids in built["regions"].items():
        preds = ls.predictions(tid)
        assert len(preds) == 1, (tid, preds)
        check_prediction(preds[0], region_ids)
        versions.add(preds[0]["model_version"])
    assert len(versions) == 1
    # Label Studio now sees every task as predicted with its backend's version: the action adds nothing
    ls.retrieve_predictions(pid)
    assert all(len(ls.predictions(t)) == 1 for t in ids)
    assert snapshot_annotations(ls, ids) == before


def test_background_run_of_a_killed_backend_is_resumed_by_the_next_one(ls, ls_server, ls_token, queue_env,
                                                                        tmp_path):
    """Retrieve predictions hands tasks to a background run; the backend is SIGKILLed mid-run; a new backend
    (same Redis, same Label Studio) resumes the run: every task ends with exactly one prediction, annotations
    untouched, and the dead run's record names the run that resumed it."""
    import requests

    # images of its own: the killed-run test above labels seeds 100.. with these settings, and the result cache
    # would answer them within the batch timeout
    built = build_project(ls, n_annotated=14, n_empty=0, broken=False, from_prediction=False, seed=500)
    pid = built["project"]["id"]
    ids = list(built["regions"])
    before = snapshot_annotations(ls, ids)
    env = dict(queue_env, MASKINV_BATCH_TIMEOUT="1", MASKINV_STEPS="40", MASKINV_SIZE="448",
               LABEL_STUDIO_URL=ls_server.url, LABEL_STUDIO_API_KEY=ls_token)
    first = BackendServer(tmp_path / "first.log", env=env).start()
    try:
        assert ls.connect_ml_backend(pid, first.url, interactive=False)["state"] == "CO"
        ls.retrieve_predictions(pid)
        runs = requests.get(f"{first.url}/runs", timeout=30).json()["runs"]
        (run,) = [r for r in runs if r["kind"] == "retrieve" and r["project"] == str(pid)] or [None]
        assert run is not None, f"every task was answered within the batch timeout: {runs}"
        deadline = time.monotonic() + 900  # a safety net against a hang, not a speed bound
        while sum(1 for t in ids if ls.predictions(t)) < len(ids) - run["total"] + 1:  # one written by the run
            assert time.monotonic() < deadline, "the background run wrote nothing"
            time.sleep(0.3)
        os.killpg(first.process.proc.pid, signal.SIGKILL)
        first.process.proc.wait(timeout=30)
    finally:
        first.stop()
    assert sum(1 for t in ids if ls.predictions(t)) < len(ids), "the run finished before the kill"

    second = BackendServer(tmp_path / "second.log", env=env).start()
    try:
        deadline = time.monotonic() + 900  # a safety net against a hang, not a speed bound
        while sum(1 for t in ids if ls.predictions(t)) < len(ids):
            assert time.monotonic() < deadline, second.process.log_tail()
            time.sleep(1.0)
        runs = {r["id"]: r for r in requests.get(f"{second.url}/runs", timeout=30).json()["runs"]}
        old = runs[run["id"]]
        assert old["state"] == "interrupted" and "resumed by run" in old["message"], old
        new_id = old["message"].split("resumed by run ")[1].split()[0]
        deadline = time.monotonic() + 300  # a safety net against a hang, not a speed bound
        while runs[new_id]["state"] == "running" and time.monotonic() < deadline:
            time.sleep(0.5)
            runs = {r["id"]: r for r in requests.get(f"{second.url}/runs", timeout=30).json()["runs"]}
        assert runs[new_id]["state"] == "done" and runs[new_id]["failed"] == 0, runs[new_id]
    finally:
        second.stop()
    for tid, region_ids in built["regions"].items():
        preds = ls.predictions(tid)
        assert len(preds) == 1, (tid, preds)
        check_prediction(preds[0], region_ids)
    assert snapshot_annotations(ls, ids) == before
