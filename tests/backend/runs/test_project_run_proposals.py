"""Project runs propose regions for tasks nobody drew on (backend.runs.project_run + backend.predict.propose).

* which tasks get proposals, and who decides (run flag > request's ``params.maskinv.proposals`` > label config's
  ``maskinvProposals`` > MASKINV_PROPOSALS), with batch mode replaced by a stub;
* the real path: embedded mode (tiny random model), and queue mode through RQ on the real Redis with one
  ``python -m worker``: the written prediction has the same structure in both.
"""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest

from backend.runs import project_run
from backend.cli.annotate import format_summary
from backend.runs.project_run import ProjectRun, classify
from backend.predict.propose import CONFIG_ATTRIBUTE, config_switch, decide
from backend.runs.store import MemoryRunStore, RedisRunStore
from backend.service import PredictError, Service
from backend.settings import Settings
from backend_support import FAST, H, W, WorkerProcess, config, delete_namespace, rect, settings_for
from backend_support import task as image_task

VERSION = "maskinversion-test-v1"
#: a random model's probabilities are near uniform: keep every proposal, MaskCut only, at most 3 (fast)
PROPOSAL_ENV = {"MASKINV_PROPOSAL_MIN_SCORE": "0", "MASKINV_PROPOSAL_SOURCES": "maskcut", "MASKINV_MAX_PROPOSALS": "3"}


class FakeAPI:
    """Label Studio's API in memory: the predictions written, per task."""

    url = "http://ls.test"

    def __init__(self):
        self.preds: dict[Any, list[str]] = {}
        self.results: dict[Any, list] = {}
        self.lock = threading.Lock()

    def prediction_versions(self, task_id):
        with self.lock:
            return list(self.preds.get(task_id, []))

    def create_prediction(self, task_id, result, score, model_version):
        with self.lock:
            self.preds.setdefault(task_id, []).append(model_version)
            self.results[task_id] = result
        return len(self.preds)


def with_attr(xml: str, where: str, value: str) -> str:
    """``xml`` with ``maskinvProposals=value`` on the root <View> (``where="view"``) or the RectangleLabels."""
    tag = "<View" if where == "view" else "<RectangleLabels"
    return xml.replace(tag, f'{tag} {CONFIG_ATTRIBUTE}="{value}"', 1)


def regioned(tid: int) -> dict:
    return {"id": tid, "data": {"image": f"/data/upload/{tid}.png"},
            "annotations": [{"id": tid, "result": [rect(f"r{tid}")], "updated_at": "2024-01-01"}], "predictions": []}


def empty(tid: int, **extra) -> dict:
    return {"id": tid, "data": {"image": f"/data/upload/{tid}.png"}, "annotations": [], "predictions": [], **extra}


def proposal_answer(n: int = 2) -> dict:
    result = [{"id": f"prop{k}_abc", "type": "rectanglelabels", "meta": {"proposed": True},
               "value": {"rectanglelabels": ["car"]}} for k in range(n)]
    return {"result": result, "score": 0.3, "model_version": VERSION,
            "maskinv": {"source": "proposals", "proposed": n, "regions": 0, "errors": []}}


@pytest.fixture
def service():
    return Service(Settings.from_env({**FAST, "MASKINV_MODEL_VERSION": VERSION}))


@pytest.fixture
def stub(monkeypatch):
    """Batch mode replaced: records (task id, overrides) and answers proposals for tasks without regions."""
    state: dict[str, Any] = {"calls": [], "nothing": set()}

    def fake(service, cfg, tasks, context=None, overrides=None, timeout_s=None, project=None):
        out = []
        for t in tasks:
            state["calls"].append((t["id"], overrides))
            if any(a.get("result") for a in t["annotations"]):
                out.append({"result": [{"id": f"r{t['id']}", "type": "rectanglelabels"}], "score": 0.5,
                            "model_version": VERSION, "maskinv": {"labelled": 1, "errors": [], "regions": 1}})
            else:
                out.append([] if t["id"] in state["nothing"] else proposal_answer())
        return out
    monkeypatch.setattr(project_run, "predict_tasks", fake)
    return state


def run(service, xml, tasks, **kw):
    api = FakeAPI()
    r = ProjectRun(service, service.config(xml), api, MemoryRunStore(), model_version=VERSION, **kw)
    return r, r.run(iter(tasks), total=len(tasks)), api


# ------------------------------------------------------------------------------------------------------------
def test_tasks_without_regions_get_proposals_by_default(service, stub):
    submitted_nothing = empty(3, annotations=[{"id": 30, "result": [], "was_cancelled": False}])
    cancelled = empty(4, annotations=[{"id": 40, "result": [], "was_cancelled": True}])
    r, s, api = run(service, config("rectangle"), [regioned(1), empty(2), submitted_nothing, cancelled])
    assert r.proposing
    assert set(api.preds) == {1, 2, 4}  # a cancelled annotation does not count; an empty submitted one does
    assert (s.labelled, s.skipped, s.regions, s.proposed, s.proposal_tasks) == (3, 1, 5, 4, 2)
    assert s.skipped_by == {"no_regions": 1}
    assert all(o == {"proposals": True} for _, o in stub["calls"])  # batch mode is told, not left to guess
    assert r.status.proposed == 4 and r.status.regions == 5
    assert all(x["meta"]["proposed"] for x in api.results[2])
    text = format_summary(s, False, VERSION, r.run_id)
    assert "2 task(s) without regions, 4 proposed region(s)" in text


def test_regions_get_no_proposals_and_nothing_proposed_is_a_skip(service, stub):
    stub["nothing"].add(2)
    _, s, api = run(service, config("rectangle"), [regioned(1), empty(2)])
    assert set(api.preds) == {1} and api.results[1] == [{"id": "r1", "type": "rectanglelabels"}]
    assert s.skipped_by == {"no_proposals": 1} and s.proposal_tasks == 0


def test_dry_run_counts_the_tasks_that_would_get_proposals(service, stub):
    _, s, api = run(service, config("rectangle"), [regioned(1), empty(2), empty(3)], dry_run=True)
    assert api.preds == {} and stub["calls"] == []
    assert s.skipped_by == {"dry_run": 3} and s.proposal_tasks == 2
    assert "2 task(s) without regions would get proposals" in format_summary(s, True, VERSION, "r")


@pytest.mark.parametrize("env, xml_attr, overrides, flag, expected", [
    ({}, None, None, False, False),  # the run's flag (maskinv-annotate --proposals off)
    ({"MASKINV_PROPOSALS": "off"}, None, None, None, False),  # the env var
    ({"MASKINV_PROPOSALS": "off"}, None, None, True, True),  # --proposals on beats the env var
    ({}, ("view", "false"), None, None, False),  # the label config's switch on <View> ...
    ({}, ("control", "off"), None, None, False),  # ... or on the region control
    ({"MASKINV_PROPOSALS": "off"}, ("view", "true"), None, None, True),  # the config beats the env var
    ({}, ("view", "false"), {"proposals": True}, None, True),  # the request beats the config
    ({}, None, {"proposals": False}, None, False),  # a Retrieve predictions with proposals off, continued
    ({}, ("view", "false"), {"proposals": {"max_proposals": 2}}, None, True),  # options also turn it on
    ({}, ("view", "false"), {"proposals": True}, False, False),  # the run's flag beats everything
])
def test_who_decides(env, xml_attr, overrides, flag, expected, stub):
    service = Service(Settings.from_env({**FAST, "MASKINV_MODEL_VERSION": VERSION, **env}))
    xml = config("rectangle") if xml_attr is None else with_attr(config("rectangle"), *xml_attr)
    r, s, api = run(service, xml, [empty(1)], overrides=overrides, proposals=flag)
    assert r.proposing is expected and (1 in api.preds) is expected
    if expected:
        ((_, sent),) = stub["calls"]
        assert sent["proposals"] == (overrides["proposals"] if isinstance((overrides or {}).get("proposals"), dict)
                                     else True)
    else:
        assert stub["calls"] == [] and s.skipped_by == {"no_regions": 1}


def test_config_switch_precedence_and_bad_values(service):
    xml = config("rectangle")
    assert config_switch(service.config(xml)) is None
    both = with_attr(with_attr(xml, "view", "false"), "control", "true")
    assert config_switch(service.config(both)) is True  # the control's attribute wins over the <View>'s
    assert decide("off", service.config(both), None) and not decide("auto", service.config(both), False)
    bad = service.config(with_attr(xml, "view", "sometimes"))
    with pytest.raises(PredictError, match="maskinvProposals"):
        config_switch(bad)
    with pytest.raises(PredictError):
        ProjectRun(service, bad, FakeAPI(), MemoryRunStore(), model_version=VERSION)
    with pytest.raises(PredictError):
        ProjectRun(service, service.config(xml), FakeAPI(), MemoryRunStore(), model_version=VERSION,
                   overrides={"proposals": "yes"})


def test_classify_counts_proposed_regions():
    o = classify(1, proposal_answer(3))
    assert (o.status, o.regions, o.proposed, o.regionless) == ("labelled", 3, 3, True)
    timed_out = {"error": "proposals: no result", "maskinv": {"source": "proposals", "errors": [
        {"region": None, "error": "proposals: no result", "kind": "timeout"}]}}
    assert classify(1, timed_out).kind == "timeout"  # transient: not remembered, retried by the next run


# -- the real thing: embedded mode and queue mode ------------------------------------------------------------
@pytest.fixture(scope="module")
def proposal_env(tiny_runtime):
    """The embedded worker runtime reads PROPOSAL_ENV (it reads its settings once, when built)."""
    from worker.jobs import runtime as jobs

    mp = pytest.MonkeyPatch()
    for k, v in PROPOSAL_ENV.items():
        mp.setenv(k, v)
    mp.setattr(jobs, "_runtime", None)
    yield
    mp.undo()


def structure(result: list[dict]) -> list[tuple]:
    """What a written prediction looks like, without the numbers: per item its type, control names, value and
    meta keys, and whether it is marked proposed."""
    return sorted({(r["type"], r["from_name"], r["to_name"], tuple(sorted(r["value"])),
                    tuple(sorted(r.get("meta", {}))), bool(r.get("meta", {}).get("proposed"))) for r in result})


def project_tasks() -> list[dict]:
    t1 = image_task(1, 1, annotations=[], predictions=[])
    t2 = image_task(2, 2, annotations=[{"id": 20, "result": [rect("a1")], "updated_at": "2024-01-01"}],
                    predictions=[])
    return [t1, t2]


def check_written(api: FakeAPI, s, cfg) -> list[dict]:
    assert set(api.preds) == {1, 2} and s.failed == 0, s.to_dict()
    proposed = api.results[1]
    regions = [r for r in proposed if r["type"] == "polygonlabels"]
    assert 1 <= len(regions) <= 3 and all(r["meta"]["proposed"] for r in regions)
    assert all((r["original_width"], r["original_height"]) == (W, H) for r in regions)
    assert cfg.validate_prediction({"result": proposed}) == []
    assert {r["id"] for r in api.results[2]} == {"a1"}  # drawn regions are labelled, never proposed for
    assert s.proposed == len(regions) and s.proposal_tasks == 1
    return proposed


@pytest.fixture(scope="module")
def embedded_result(proposal_env):
    service = Service(Settings.from_env({**FAST, "MASKINV_MODEL_VERSION": VERSION}))
    cfg = service.config(config("polygon"))
    api = FakeAPI()
    tasks = project_tasks()
    tasks[1]["annotations"][0]["result"][0].update(
        type="polygonlabels", value={"points": [[10, 10], [60, 10], [30, 70]], "polygonlabels": ["car"]})
    r = ProjectRun(service, cfg, api, MemoryRunStore(), model_version=VERSION, timeout_s=600)
    s = r.run(iter(tasks), total=2)
    return check_written(api, s, cfg)


def test_embedded_run_writes_proposals(embedded_result):
    assert embedded_result


@pytest.mark.redis
@pytest.mark.slow
def test_queue_run_writes_proposals_like_embedded_mode(embedded_result, redis_conn, tmp_path):
    """The propose job goes through RQ on the real Redis to a ``python -m worker``; the run's claims and status
    live in Redis; the written prediction has the embedded mode's structure."""
    ns = f"maskinv-test-{uuid.uuid4().hex[:10]}"
    worker = WorkerProcess(ns, tmp_path, **PROPOSAL_ENV)
    try:
        worker.wait_ready(redis_conn)
        service = Service(settings_for(ns, MASKINV_MODEL_VERSION=VERSION, MASKINV_BATCH_TIMEOUT=600))
        assert service.dispatcher.mode == "queue"
        cfg = service.config(config("polygon"))
        api = FakeAPI()
        tasks = project_tasks()
        tasks[1]["annotations"][0]["result"][0].update(
            type="polygonlabels", value={"points": [[10, 10], [60, 10], [30, 70]], "polygonlabels": ["car"]})
        store = RedisRunStore(service.dispatcher.connection, ns)
        r = ProjectRun(service, cfg, api, store, model_version=VERSION, timeout_s=600)
        s = r.run(iter(tasks), total=2)
        queued = check_written(api, s, cfg)
        (record,) = store.runs()
        assert record["state"] == "done" and record["proposed"] == s.proposed, record
    finally:
        worker.stop()
        delete_namespace(redis_conn, ns)
    assert structure(queued) == structure(embedded_result)
