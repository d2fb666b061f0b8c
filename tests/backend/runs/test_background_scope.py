"""What a background run (backend.runs.background) may write, and how many runs and tasks it takes: only tasks of the
request's project as Label Studio has them, labelled with the project's own label config, under the model version
/setup answers; at most MASKINV_MAX_RUN_TASKS tasks per run and MASKINV_MAX_RUNS runs at once."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest

from backend.runs import background

from backend.runs import project_run
from backend.runs.store import ResumeRecord, RunStatus
from backend.service import Service
from backend.settings import Settings
from backend_support import FAST, config, rect
from fake_label_studio import FakeLabelStudio

VERSION = "maskinversion-scope-v1"
PROJECT = 1
OTHER = 2


def ls_task(tid: int, project: int = PROJECT, image: str | None = None) -> dict[str, Any]:
    ann = {"id": tid * 10, "result": [rect(f"r{tid}")], "was_cancelled": False, "updated_at": "2024-01-01T00:00:00Z"}
    return {"id": tid, "project": project, "data": {"image": image or f"/data/upload/{project}/{tid}.png"},
            "annotations": [ann], "predictions": []}


def forged(tid: int) -> dict[str, Any]:
    """The request's copy of a task: another image, another label on its region."""
    ann = {"id": 1, "result": [rect(f"r{tid}", labels=("forged",))], "updated_at": "2030-01-01T00:00:00Z"}
    return {"id": tid, "data": {"image": "https://evil.test/forged.png"}, "annotations": [ann], "predictions": []}


@pytest.fixture
def stub(monkeypatch):
    """Batch mode replaced: within the request every task misses the deadline; in a run it is labelled.
    ``seen`` lists ``(task id, image, label config, project)`` per task a run labelled; ``gate`` holds runs."""
    state: dict[str, Any] = {"seen": [], "gate": threading.Event()}
    state["gate"].set()

    def fake(service, cfg, tasks, context=None, overrides=None, timeout_s=None, project=None):
        out = []
        for t in tasks:
            if not threading.current_thread().name.startswith("maskinv-run"):
                out.append({"error": "timeout", "maskinv": {"errors": [{"kind": "timeout", "error": "x"}]}})
                continue
            state["gate"].wait(10)
            state["seen"].append((t["id"], t["data"]["image"], cfg.xml, project))
            ids = [r["id"] for r in t["annotations"][0]["result"]]
            out.append({"result": [{"id": i, "type": "rectanglelabels", "value": {"rectanglelabels": ["car"]}}
                                   for i in ids], "score": 0.5, "model_version": "ignored",
                        "maskinv": {"labelled": len(ids), "errors": [], "regions": len(ids)}})
        return out
    monkeypatch.setattr(project_run, "predict_tasks", fake)
    monkeypatch.setattr(background, "predict_tasks", fake)
    return state


def backend_with(monkeypatch, **env: str) -> tuple[Service, FakeLabelStudio]:
    settings = Settings.from_env({**FAST, "MASKINV_MODEL_VERSION": VERSION, "MASKINV_MAX_TASKS": "1",
                                  "LABEL_STUDIO_URL": "http://ls.test", "LABEL_STUDIO_API_KEY": "tok", **env})
    service = Service(settings)
    api = FakeLabelStudio(projects={PROJECT: config("polygon"), OTHER: config("rectangle")},
                          tasks={**{i: ls_task(i) for i in range(1, 9)}, 50: ls_task(50, OTHER)})
    monkeypatch.setattr(background.runs_for(service), "api", lambda: api)
    return service, api


def wait_runs(service: Service) -> None:
    mgr = background.runs_for(service)
    deadline = time.monotonic() + 20
    while any(t.is_alive() for t in mgr.threads.values()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not any(t.is_alive() for t in mgr.threads.values())


def request(service: Service, tasks: list[dict], project: Any = f"{PROJECT}.1700000000") -> list[Any]:
    cfg = service.config(config("rectangle"))  # the request's config: not the project's (polygon)
    return background.predict_batch(service, cfg, tasks, None, project)


# ------------------------------------------------------------------------------------------------------------
def test_a_run_writes_only_tasks_of_the_requests_project_as_label_studio_has_them(monkeypatch, stub):
    service, api = backend_with(monkeypatch)
    out = request(service, [forged(1), forged(2), forged(50), forged(404)])
    assert all("error" in a for a in out)
    wait_runs(service)
    assert set(api.preds) == {1, 2}  # task 50 is another project's, 404 does not exist
    assert sorted(s[0] for s in stub["seen"]) == [1, 2]
    for _, image, xml, project in stub["seen"]:
        assert image.startswith("/data/upload/1/") and xml == config("polygon") and project == "1"
    assert "forged" not in json.dumps(api.results)
    (run,) = background.runs_for(service).runs()
    reasons = " ".join(f["reason"] for f in run["failures"])
    assert "task 50 belongs to project 2, not to project 1" in reasons
    assert run["project"] == "1" and run["done"] == 2


@pytest.mark.parametrize("project", [None, "", "abc", {"x": 1}, "-3.17"])
def test_a_request_without_a_usable_project_gets_no_background_run(monkeypatch, stub, project):
    service, api = backend_with(monkeypatch)
    out = request(service, [forged(1), forged(2)], project=project)
    assert all("no background run" in a["error"] and "'project'" in a["error"] for a in out)
    assert background.runs_for(service).runs() == [] and api.writes == 0 and stub["seen"] == []


def test_the_resume_record_names_only_project_tasks_and_version(monkeypatch, stub):
    service, api = backend_with(monkeypatch, MASKINV_MAX_TASKS="1")
    stub["gate"].clear()
    out = request(service, [forged(1), forged(2)], project="1.1700000000")
    mgr = background.runs_for(service)
    run_id = out[0]["maskinv"]["run"]
    raw = json.loads(mgr.store._resume[run_id].to_json())
    assert set(raw) == {"label_studio_url", "project", "model_version", "task_ids"}
    assert raw["project"] == "1" and raw["task_ids"] == [1, 2] and raw["model_version"] == VERSION
    stub["gate"].set()
    wait_runs(service)


def test_a_resumed_run_rereads_tasks_and_config(monkeypatch, stub):
    service, api = backend_with(monkeypatch)
    mgr = background.runs_for(service)
    old = "retrieve-20260101T000000-deadbeef"
    mgr.store.save(RunStatus(id=old, kind="retrieve", project="1", model_version=VERSION, total=3))
    mgr.store.keep_for_resume(old, ResumeRecord.from_json(json.dumps({
        "label_studio_url": api.url, "project": "1", "model_version": VERSION, "task_ids": [3, 50],
        "label_config": config("rectangle"), "overrides": {"labels": ["forged"]}})))  # an older record's extras
    (new,) = mgr.resume_interrupted()
    wait_runs(service)
    assert set(api.preds) == {3} and [(s[0], s[2]) for s in stub["seen"]] == [(3, config("polygon"))]


def test_a_run_takes_at_most_max_run_tasks_and_says_what_it_left_out(monkeypatch, stub):
    service, api = backend_with(monkeypatch, MASKINV_MAX_RUN_TASKS="3")
    out = request(service, [forged(i) for i in range(1, 8)])
    wait_runs(service)
    taken = [a for a in out if "maskinv" in a and a["maskinv"].get("run")]
    left = [a for a in out if "MASKINV_MAX_RUN_TASKS=3" in a["error"]]
    assert len(taken) == 3 and len(left) == 4 and len(api.preds) == 3
    assert all("4 task(s)" in a["error"] and "not labelled" in a["error"] for a in left)


def test_runs_at_once_are_capped_per_backend(monkeypatch, stub):
    service, api = backend_with(monkeypatch, MASKINV_MAX_RUNS="1")
    stub["gate"].clear()
    first = request(service, [forged(1), forged(2)])
    threads = dict(background.runs_for(service).threads)
    second = request(service, [forged(3), forged(4)])
    assert all("MASKINV_MAX_RUNS=1" in a["error"] for a in second)
    assert background.runs_for(service).threads.keys() == threads.keys()  # no new thread
    stub["gate"].set()
    wait_runs(service)
    assert set(api.preds) == {1, 2} and first[0]["maskinv"]["run"]
    third = request(service, [forged(3)])  # the run finished: a new one may start
    wait_runs(service)
    assert third[0]["maskinv"]["run"] and set(api.preds) == {1, 2, 3}


def test_runs_write_the_model_version_setup_answers_for_the_project(monkeypatch, stub):
    """With examples the project's version stays the one /setup answers; a run writes exactly that string."""
    from backend.learning import learner as learning

    monkeypatch.setattr(learning.Learner, "version_suffix",
                        lambda self, project, params: "-exabcdef12" if str(project).split(".")[0] == "1" else "")
    service, api = backend_with(monkeypatch)
    cfg = service.config(config("polygon"))
    setup = service.project_version(cfg, project="1.1700000000")
    assert project_run.run_version(service, cfg, "1") == setup == VERSION
    assert service.examples_state("1") == "exabcdef12"
    request(service, [forged(1), forged(2)])
    wait_runs(service)
    assert api.preds == {1: [setup], 2: [setup]}
