"""Project runs (backend.runs.project_run, backend.runs.store, backend.runs.background, backend.cli.annotate) without
a Label
Studio: a fake Label Studio API in memory, batch mode replaced by a stub where the model does not matter."""

from __future__ import annotations

import threading
import time
import tracemalloc
from typing import Any

import pytest

from backend.runs import background

from backend.runs import project_run
from backend.cli.annotate import FailureState, format_summary, parse_task_ids
from backend.runs.project_run import ProjectRun, classify
from backend.runs.store import MemoryRunStore, RedisRunStore, ResumeRecord, RunStatus, claim_key
from backend.settings import Settings
from backend_support import FAST, config, rect

VERSION = "maskinversion-test-v1"


class FakeAPI:
    """Label Studio's API in memory: predictions per task; counts writes."""

    url = "http://ls.test"

    def __init__(self, keep_results: bool = True):
        self.preds: dict[Any, list[str]] = {}
        self.results: dict[Any, list] = {}
        self.writes = 0
        self.keep_results = keep_results
        self.lock = threading.Lock()
        self.before_check = None  # hook: called with the task id right before prediction_versions

    def prediction_versions(self, task_id):
        if self.before_check is not None:
            self.before_check(task_id)
        with self.lock:
            return list(self.preds.get(task_id, []))

    def create_prediction(self, task_id, result, score, model_version):
        with self.lock:
            self.writes += 1
            self.preds.setdefault(task_id, []).append(model_version)
            if self.keep_results:
                self.results[task_id] = result
        return self.writes

    def get_task(self, tid):
        """Task ``tid`` of ``self.tasks`` as Label Studio has it (with the predictions written so far)."""
        from backend.labelstudio.api import LabelStudioAPIError

        if tid not in getattr(self, "tasks", {}):
            raise LabelStudioAPIError(f"Label Studio GET task {tid} failed (HTTP 404): not found", status=404)
        with self.lock:
            preds = [{"model_version": v, "result": []} for v in self.preds.get(tid, [])]
        return {**self.tasks[tid], "predictions": preds}

    def get_tasks(self, task_ids):
        for tid in task_ids:
            yield self.get_task(tid)

    def label_config(self, project):
        return config("rectangle")


def task(tid: int, n_regions: int = 1, predictions: list | None = None) -> dict:
    ann = {"id": tid * 10, "result": [rect(f"r{tid}-{k}") for k in range(n_regions)], "was_cancelled": False,
           "updated_at": "2024-01-01T00:00:00Z"}
    return {"id": tid, "project": 1, "data": {"image": f"/data/upload/1/{tid}.png"},
            "annotations": [ann] if n_regions else [],
            "predictions": predictions or []}


def answer_for(t: dict) -> dict:
    """What batch mode answers for a task whose regions were all labelled."""
    ids = [r["id"] for r in t["annotations"][0]["result"]]
    return {"result": [{"id": i, "type": "rectanglelabels", "value": {"rectanglelabels": ["car"]}} for i in ids],
            "score": 0.5, "model_version": VERSION,
            "maskinv": {"labelled": len(ids), "errors": [], "regions": len(ids)}}


@pytest.fixture
def service():
    from backend.service import Service

    return Service(Settings.from_env({**FAST, "MASKINV_MODEL_VERSION": VERSION}))


@pytest.fixture
def cfg(service):
    return service.config(config("rectangle"))


@pytest.fixture
def stub_predict(monkeypatch):
    """Replace batch mode with a stub: ``calls`` lists the task ids it labelled; ``answer`` can be swapped."""
    state = {"calls": [], "answer": answer_for, "delay": 0.0}

    def fake(service, cfg, tasks, context=None, overrides=None, timeout_s=None, project=None):
        out = []
        for t in tasks:
            state["calls"].append(t["id"])
            if state["delay"]:
                time.sleep(state["delay"])
            out.append(state["answer"](t))
        return out
    monkeypatch.setattr(project_run, "predict_tasks", fake)
    monkeypatch.setattr(background, "predict_tasks", fake)
    return state


def make_run(service, cfg, api, store=None, **kw) -> ProjectRun:
    return ProjectRun(service, cfg, api, store or MemoryRunStore(), model_version=VERSION, **kw)


# ------------------------------------------------------------------------------------------------------------
def test_run_writes_one_prediction_per_task_and_skips_the_rest(service, cfg, stub_predict):
    api = FakeAPI()
    tasks = [task(1, 2), task(2, 0), task(3, 1, predictions=[{"model_version": VERSION, "result": []}]),
             task(4, 3, predictions=[{"model_version": "other", "result": []}])]
    run = make_run(service, cfg, api, workers=2, proposals=False)  # proposals: test_project_run_proposals.py
    s = run.run(iter(tasks), total=4)
    assert (s.labelled, s.skipped, s.failed, s.regions) == (2, 2, 0, 5)
    assert s.skipped_by == {"no_regions": 1, "predicted": 1}
    assert api.preds == {1: [VERSION], 4: [VERSION]}
    assert sorted(stub_predict["calls"]) == [1, 4]
    assert run.status.state == "done" and run.status.done == 2 and run.status.queued == 0
    # annotations (the tasks' own objects) are never touched
    assert tasks[0]["annotations"][0]["result"][0]["value"]["rectanglelabels"] == ["car"]

    # a second run over the same listing (now holding the predictions) writes nothing
    relisted = [dict(t, predictions=t["predictions"] + [{"model_version": v, "result": []}
                                                        for v in api.preds.get(t["id"], [])]) for t in tasks]
    again = make_run(service, cfg, api, proposals=False).run(relisted, total=4)
    assert again.labelled == 0 and api.writes == 2 and again.skipped_by["predicted"] == 3


def test_verified_regions_are_also_written_as_the_verified_prediction(service, cfg, stub_predict):
    api = FakeAPI(keep_results=False)
    written: list[tuple[Any, list, Any, str]] = []
    api.create_prediction = lambda tid, result, score, version: written.append((tid, result, score, version))

    def answers(t):
        a = answer_for(t)
        for item, verified in zip(a["result"], (True, False)):
            item.update(score=0.9, meta={"verified": verified, "calibrated": 0.97 if verified else 0.6})
        return a
    stub_predict["answer"] = answers
    s = make_run(service, cfg, api, proposals=False).run([task(1, 2), task(2, 0)], total=2)
    assert s.labelled == 1
    assert [(tid, version) for tid, _, _, version in written] == [(1, VERSION), (1, f"{VERSION}-verified")]
    (_, full, _, _), (_, only, score, _) = written
    assert [r["id"] for r in full] == ["r1-0", "r1-1"] and [r["id"] for r in only] == ["r1-0"] and score == 0.97


def test_prediction_written_meanwhile_is_not_written_twice(service, cfg, stub_predict):
    api = FakeAPI()

    def someone_else_writes(tid):
        if tid == 7 and not api.preds.get(7):
            api.preds[7] = [VERSION]  # e.g. Label Studio stored a Retrieve predictions answer meanwhile
    api.before_check = someone_else_writes
    s = make_run(service, cfg, api).run([task(7)], total=1)
    assert s.labelled == 0 and s.skipped_by == {"predicted": 1} and api.preds[7] == [VERSION] and api.writes == 0


def test_transient_failures_are_not_written_permanent_partial_ones_are(service, cfg, stub_predict):
    api = FakeAPI()

    def answers(t):
        a = answer_for(t)
        if t["id"] == 1:  # one region timed out: retry later, write nothing
            a["maskinv"]["errors"] = [{"region": "r1-1", "error": "no result after 1s", "kind": "timeout"}]
        if t["id"] == 2:  # one region has bad geometry: the others are written
            a["maskinv"]["errors"] = [{"region": "r2-1", "error": "polygon needs 3 points", "kind": "region"}]
        if t["id"] == 3:
            return {"error": "cannot decode image", "maskinv": {"errors": [
                {"region": "r3-0", "error": "cannot decode image", "kind": "source"}]}}
        return a
    stub_predict["answer"] = answers
    s = make_run(service, cfg, api).run([task(1, 2), task(2, 2), task(3, 1)], total=3)
    assert set(api.preds) == {2}
    assert (s.labelled, s.failed) == (1, 2)
    kinds = {reason: kind for reason, (_, _, kind) in s.failures.items()}
    assert "timeout" in kinds.values() and "source" in kinds.values()
    text = format_summary(s, False, VERSION, "run-x")
    assert "cannot decode image" in text and "labelled: 1 task(s)" in text and "failed:   2 task(s)" in text


def test_classify():
    assert classify(1, []).status == "skipped"
    assert classify(1, {"error": "x", "maskinv": {"errors": [{"kind": "no_worker", "error": "x"}]}}).kind == "no_worker"
    ok = classify(1, {"result": [1], "maskinv": {"labelled": 3, "errors": []}})
    assert ok.status == "labelled" and ok.regions == 3


def test_in_flight_tasks_are_bounded_and_memory_stays_flat_on_10000_tasks(service, cfg, stub_predict):
    """The listing is read lazily: never more than ``workers`` tasks between listed and finished."""
    api = FakeAPI(keep_results=False)
    workers = 4
    listed = {"n": 0}
    finished = {"n": 0}
    gaps = []

    def listing(n):
        for tid in range(1, n + 1):
            listed["n"] += 1
            gaps.append(listed["n"] - finished["n"])
            yield task(tid, 2)

    def on_task(o):
        finished["n"] += 1

    run = make_run(service, cfg, api, workers=workers, on_task=on_task)
    tracemalloc.start()
    try:
        s = run.run(listing(10_000), total=10_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert s.labelled == 10_000 and api.writes == 10_000
    assert run.max_in_flight <= workers
    assert max(gaps) <= workers + 1  # the task being listed + the ones in flight
    assert peak < 16 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB for 10 000 tasks"


def test_live_claim_defers_and_dead_claim_is_taken_over(service, cfg, stub_predict, monkeypatch):
    monkeypatch.setattr(project_run, "ALIVE_TTL_S", 1)
    store = MemoryRunStore()
    api = FakeAPI()
    store.beat("other-run")
    assert store.claim("other-run", claim_key(api.url, 1, VERSION)) is None
    assert store.claim("other-run", claim_key(api.url, 2, VERSION)) is None

    def other_run_finishes():
        time.sleep(0.5)
        api.create_prediction(1, [], None, VERSION)  # it writes task 1 ...
        store.release("other-run", claim_key(api.url, 1, VERSION))
        time.sleep(0.5)
        store.end("other-run")  # ... and dies holding task 2
    threading.Thread(target=other_run_finishes, daemon=True).start()
    s = make_run(service, cfg, api, store, timeout_s=5).run([task(1), task(2), task(3)], total=3)
    assert api.preds == {1: [VERSION], 2: [VERSION], 3: [VERSION]}
    assert s.labelled == 2 and s.skipped_by == {"predicted": 1}
    assert 1 not in stub_predict["calls"]


@pytest.mark.parametrize("kind", ["memory", pytest.param("redis", marks=pytest.mark.redis)])
def test_run_store_claims_and_records(kind, request):
    if kind == "redis":
        ns = request.getfixturevalue("redis_ns")
        store = RedisRunStore(request.getfixturevalue("redis_conn"), ns)
    else:
        store = MemoryRunStore()
    store.beat("a")
    assert store.claim("a", "k") is None and store.claim("a", "k") is None  # ours again: fine
    store.beat("b")
    assert store.claim("b", "k") == "a" and store.holder("k") == "a"
    store.end("a")  # a died: its claim is free for b at once
    assert store.holder("k") is None and store.claim("b", "k") is None
    store.release("a", "k")  # not a's any more: nothing happens
    assert store.holder("k") == "b"
    store.release("b", "k")
    assert store.holder("k") is None
    store.mark_written("b", "k")
    assert store.written_by("k") == "b" and store.written_by("other") is None

    st = RunStatus(id="run-1", kind="annotate", project="3", model_version=VERSION, total=5, done=2, queued=3)
    store.save(st)
    (listed,) = store.runs()
    assert listed["id"] == "run-1" and listed["state"] == "interrupted"  # running, but not beating
    store.beat("run-1")
    assert store.runs()[0]["state"] == "running" and store.runs()[0]["done"] == 2

    record = ResumeRecord(label_studio_url="http://ls.test", project="3", model_version=VERSION, task_ids=(4, 5))
    store.keep_for_resume("run-1", record)
    assert store.resumable() == []  # alive: nothing to resume
    store.end("run-1")
    assert store.resumable() == ["run-1"]
    assert store.take_resume("run-1") == record  # the same record, back from storage
    assert store.take_resume("run-1") is None and store.resumable() == []  # taken once only
    store.keep_for_resume("run-2", record)
    store.forget_resume("run-2")
    assert store.resumable() == []


def test_retrieve_predictions_answers_what_is_ready_and_finishes_the_rest(monkeypatch, stub_predict):
    """A batch /predict with a Label Studio token: timed-out tasks and tasks beyond MASKINV_MAX_TASKS go to a
    background run that writes them; a repeated request while it runs does not label them again."""
    from backend.service import Service

    settings = Settings.from_env({**FAST, "MASKINV_MODEL_VERSION": VERSION, "MASKINV_MAX_TASKS": "4",
                                  "LABEL_STUDIO_URL": "http://ls.test", "LABEL_STUDIO_API_KEY": "tok"})
    service = Service(settings)
    cfg = service.config(config("rectangle"))
    api = FakeAPI()
    api.tasks = {i: task(i) for i in range(1, 7)}
    mgr = background.runs_for(service)
    monkeypatch.setattr(mgr, "api", lambda: api)
    release = threading.Event()

    def answers(t):
        in_run = threading.current_thread().name.startswith("maskinv-run")  # a background run's worker thread
        if t["id"] in (2, 3) and not in_run:
            errors = [{"region": "r", "error": "no result", "kind": "timeout"}]
            return {"error": "timeout", "maskinv": {"errors": errors}}
        if in_run:
            release.wait(5)
        return answer_for(t)
    stub_predict["answer"] = answers
    tasks = [task(i) for i in range(1, 7)]
    out = background.predict_batch(service, cfg, tasks, None, "1.1700000000")
    assert [("result" in a) for a in out] == [True, False, False, True, False, False]
    run_id = out[1]["maskinv"]["run"]
    assert all(out[i]["maskinv"]["run"] == run_id for i in (1, 2, 4, 5))

    # the curator repeats the action while the run works: its tasks are answered with the run, not labelled
    again = background.predict_batch(service, cfg, [tasks[1], tasks[4]], None, "1.1700000000")
    assert all("error" in a and a["maskinv"]["run"] == run_id for a in again)
    release.set()
    deadline = time.monotonic() + 10
    while mgr.threads[run_id].is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert api.preds == {2: [VERSION], 3: [VERSION], 5: [VERSION], 6: [VERSION]}
    (run,) = [r for r in mgr.runs() if r["id"] == run_id]
    assert run["state"] == "done" and run["total"] == 4 and run["done"] == 4 and run["kind"] == "retrieve"
    # written tasks are remembered: a request that races the write gets no second prediction
    late = background.predict_batch(service, cfg, [tasks[1]], None, "1.1700000000")
    assert "error" in late[0] and "already wrote" in late[0]["error"]


def test_without_a_token_batch_mode_is_unchanged(monkeypatch, stub_predict, service, cfg):
    stub_predict["answer"] = lambda t: {"error": "timeout", "maskinv": {"errors": [{"kind": "timeout", "error": "x"}]}}
    out = background.predict_batch(service, cfg, [task(1)])
    assert out == [{"error": "timeout", "maskinv": {"errors": [{"kind": "timeout", "error": "x"}]}}]
    assert background.runs_for(service).runs() == []


def test_runs_endpoint_needs_the_same_auth_as_predict(make_client):
    client = make_client(BASIC_AUTH_USER="u", BASIC_AUTH_PASS="p")
    assert client.get("/runs").status_code == 401
    import base64

    ok = client.get("/runs", headers={"Authorization": "Basic " + base64.b64encode(b"u:p").decode()})
    assert ok.status_code == 200 and ok.get_json() == {"runs": []}


def test_cli_helpers(tmp_path):
    assert parse_task_ids("3, 1,5-7,3") == [3, 1, 5, 6, 7]
    with pytest.raises(ValueError, match="'x'"):
        parse_task_ids("1,x")
    state = FailureState(tmp_path, "http://ls", 3, VERSION)
    state.record(5, "cannot decode image")
    state.record(6, "bad polygon")
    state.record(6, None, ok=True)
    with open(state.path, "a") as f:
        f.write('{"task": 9, "ok"')  # a line cut short by a kill
    assert state.load() == {"5": "cannot decode image"}


def test_cli_refuses_bad_arguments(capsys):
    from backend.cli.annotate import main

    assert main(["--project", "1", "--url", "ftp://x", "--token", "t"]) == 2
    assert "--url" in capsys.readouterr().err
    assert main(["--project", "1", "--url", "http://x", "--token", "t", "--tasks", "1,a"]) == 2
    assert main(["--project", "1", "--url", "http://x", "--token", "t", "--workers", "0"]) == 2


def test_embedded_dispatcher_attaches_a_repeated_job_to_the_one_still_running(tiny_runtime, monkeypatch):
    """A background run asks again for jobs the timed-out request left running: they are not run twice."""
    import numpy as np

    from backend.dispatch import EmbeddedDispatcher, LabelRequest
    from backend_support import png_bytes
    from worker.jobs import regions as jobs
    from worker.protocol import InversionParams

    calls = []
    real = jobs.label_regions

    def slow(payload):
        calls.append(1)
        time.sleep(0.5)
        return real(payload)
    monkeypatch.setattr(jobs, "label_regions", slow)
    d = EmbeddedDispatcher(Settings.from_env(FAST))
    mask = np.zeros((60, 80), bool)
    mask[10:40, 10:50] = True
    req = LabelRequest(png_bytes(), [mask], ["cat", "dog"], InversionParams(steps=2, size=64, caption=False))
    (first,) = d.label([req], 0.01)
    assert first.kind == "timeout"
    (second,) = d.label([req], 60)
    assert second.error is None and second.regions[0]["labels"]
    assert len(calls) == 1


def test_stopped_run_loses_only_what_it_had_not_started(service, cfg, stub_predict):
    """Ctrl-C (ProjectRun.stop): no new task starts, tasks in flight are finished and written, the record says
    interrupted; a re-run labels exactly the rest."""
    api = FakeAPI()
    stub_predict["delay"] = 0.02
    tasks = [task(i) for i in range(1, 21)]
    run = make_run(service, cfg, api, workers=2)
    run.on_task = lambda o: run.stop() if len(api.preds) >= 3 else None
    s = run.run(iter(tasks), total=20)
    assert s.interrupted and run.status.state == "interrupted"
    assert 3 <= s.labelled < 20 and set(api.preds) == set(stub_predict["calls"])
    assert run.status.queued == 20 - s.labelled
    relisted = [dict(t, predictions=[{"model_version": v} for v in api.preds.get(t["id"], [])]) for t in tasks]
    rest = make_run(service, cfg, api, workers=2).run(relisted, total=20)
    assert rest.labelled == 20 - s.labelled and all(v == [VERSION] for v in api.preds.values()) and len(api.preds) == 20


def _dead_run(store, api, cfg, version=VERSION, task_ids=(1, 2, 3)) -> str:
    """A background run whose process died mid-run: its record says running, it no longer beats, it holds the
    claim of task 2 and had written task 1."""
    run_id = "retrieve-20260101T000000-deadbeef"
    store.save(RunStatus(id=run_id, kind="retrieve", project="1", model_version=version, total=len(task_ids),
                         done=1, running=1, queued=len(task_ids) - 2))
    assert store.claim(run_id, claim_key(api.url, 2, version)) is None
    api.create_prediction(1, [], None, version)
    store.keep_for_resume(run_id, ResumeRecord(label_studio_url=api.url, project="1", model_version=version,
                                               task_ids=tuple(task_ids)))
    return run_id


@pytest.fixture
def resuming(monkeypatch):
    """A backend with a Label Studio token (background runs on) and its run manager, talking to a FakeAPI."""
    from backend.service import Service

    settings = Settings.from_env({**FAST, "MASKINV_MODEL_VERSION": VERSION,
                                  "LABEL_STUDIO_URL": "http://ls.test", "LABEL_STUDIO_API_KEY": "tok"})
    service = Service(settings)
    api = FakeAPI()
    api.tasks = {i: task(i) for i in (1, 2, 3)}
    mgr = background.runs_for(service)
    monkeypatch.setattr(mgr, "api", lambda: api)
    return service, service.config(config("rectangle")), mgr, api


def _wait(mgr, run_id):
    deadline = time.monotonic() + 10
    while mgr.threads[run_id].is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not mgr.threads[run_id].is_alive()


def test_a_run_whose_process_died_is_resumed_once_and_skips_what_it_wrote(resuming, stub_predict):
    service, cfg, mgr, api = resuming
    old = _dead_run(mgr.store, api, cfg, task_ids=(1, 2, 3, 99))  # task 99 was deleted meanwhile
    (new,) = mgr.resume_interrupted()
    _wait(mgr, new)
    assert api.preds == {1: [VERSION], 2: [VERSION], 3: [VERSION]}  # one prediction each, 2 despite the dead claim
    assert sorted(stub_predict["calls"]) == [2, 3]
    runs = {r["id"]: r for r in mgr.runs()}
    assert runs[old]["state"] == "interrupted" and f"resumed by run {new}" in runs[old]["message"]
    assert runs[new]["state"] == "done" and runs[new]["total"] == 4  # 1 written before, 99 deleted: skipped
    assert runs[new]["done"] == 2 and runs[new]["skipped"] == 2 and runs[new]["project"] == "1"
    # nothing left to resume: not the old run (taken), not the new one (it finished in this process)
    assert mgr.store.resumable() == [] and mgr.resume_interrupted() == []


def test_a_run_is_not_resumed_under_another_model_version(resuming, stub_predict):
    service, cfg, mgr, api = resuming
    old = _dead_run(mgr.store, api, cfg, version="maskinversion-older")
    assert mgr.resume_interrupted() == []
    (run,) = [r for r in mgr.runs() if r["id"] == old]
    assert run["state"] == "interrupted" and "model version is now" in run["message"]
    assert stub_predict["calls"] == [] and mgr.store.resumable() == []


def test_a_live_run_keeps_its_resume_record_until_it_finishes(resuming, stub_predict):
    service, cfg, mgr, api = resuming
    release = threading.Event()
    stub_predict["answer"] = lambda t: (release.wait(5), answer_for(t))[1]
    run, taken, busy = mgr.start("1", [2, 3], api)
    assert len(taken) == 2 and busy == []
    assert mgr.store.resumable() == []  # alive: not for another backend to take
    deadline = time.monotonic() + 10
    while not stub_predict["calls"] and time.monotonic() < deadline:  # its heartbeat began (before any task)
        time.sleep(0.01)
    mgr.store.end(run.run_id)  # as if its heartbeat had stopped: its record is there to be resumed
    assert mgr.store.resumable() == [run.run_id]
    release.set()
    _wait(mgr, run.run_id)
    assert mgr.store.resumable() == [] and mgr.store.take_resume(run.run_id) is None


def test_resume_starts_only_in_queue_mode_with_a_token(stub_predict):
    from backend.service import Service

    embedded = Service(Settings.from_env({**FAST, "LABEL_STUDIO_URL": "http://ls.test",
                                          "LABEL_STUDIO_API_KEY": "tok"}))
    assert background.resume_in_background(embedded, delay_s=0) is None
