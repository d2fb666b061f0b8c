"""Proposals in embedded mode are bounded: they run on the grid MASKINV_PROPOSAL_MAX_SIZE allows whatever size the
request asks for, and a proposal job over MASKINV_JOB_TIMEOUT stops and answers a clear error for its task."""

from __future__ import annotations

import pytest

from backend_support import predict, task


@pytest.fixture(autouse=True, scope="module")
def proposal_env():
    """Worker proposal settings for a random model: every proposal kept, MaskCut only, at most 3 per image."""
    from worker.jobs import runtime as jobs

    mp = pytest.MonkeyPatch()
    for k, v in {"MASKINV_PROPOSAL_MIN_SCORE": "0", "MASKINV_PROPOSAL_SOURCES": "maskcut",
                 "MASKINV_MAX_PROPOSALS": "3", "MASKINV_PROPOSAL_PRECISION": "0"}.items():
        mp.setenv(k, v)
    mp.setattr(jobs, "_runtime", None)  # the worker reads its settings once, when its runtime is built
    yield
    mp.undo()


SLOW_OK = {"MASKINV_BATCH_TIMEOUT": "600"}  # the first job of a module loads the runtime


def _spy_jobs(client) -> list[dict]:
    """The payloads of the jobs the client's dispatcher is asked to run (appended as they are sent)."""
    sent: list[dict] = []
    dispatcher = client.application.config["MASKINV_SERVICE"].dispatcher
    run_jobs = dispatcher.run_jobs
    dispatcher.run_jobs = lambda fn, reqs, t: sent.extend(p for _, p in reqs) or run_jobs(fn, reqs, t)
    return sent


def test_proposals_run_at_most_at_the_proposal_size_whatever_the_request_asks(make_client):
    c = make_client(MASKINV_PROPOSAL_MAX_SIZE="64", **SLOW_OK)
    sent = _spy_jobs(c)
    resp = predict(c, "brush", [task(1, 1)], maskinv={"size": 128})
    assert resp.status_code == 200, resp.get_json()
    (pred,) = resp.get_json()["results"]
    (payload,) = sent
    assert payload["params"]["size"] == 64
    assert pred and pred["maskinv"]["source"] == "proposals" and pred["result"], pred


def test_a_proposal_job_over_the_job_time_limit_stops_and_the_next_one_runs(make_client, monkeypatch):
    """MASKINV_JOB_TIMEOUT holds in embedded mode: a proposal job whose candidate step runs past it (made slow with
    a fake clock) stops before inverting anything and its task gets a clear error; the job thread then takes the
    next job."""
    from worker.proposals import pipeline as P
    from worker.protocol import deadline

    now = [0.0]
    monkeypatch.setattr(deadline, "clock", lambda: now[0])
    real = P.maskcut_candidates
    inverted = []
    real_label = P.label_candidates

    def slow_maskcut(*a, **k):
        now[0] += 5.0
        return real(*a, **k)

    monkeypatch.setattr(P, "maskcut_candidates", slow_maskcut)
    monkeypatch.setattr(P, "label_candidates", lambda *a, **k: inverted.append(1) or real_label(*a, **k))
    c = make_client(MASKINV_JOB_TIMEOUT="2", **SLOW_OK)
    (ans,) = predict(c, "brush", [task(1, 1)]).get_json()["results"]
    assert "result" not in ans and "MASKINV_JOB_TIMEOUT=2s" in ans["error"], ans
    assert ans["maskinv"]["errors"][0]["kind"] == "failed" and inverted == []
    monkeypatch.setattr(P, "maskcut_candidates", real)
    (ans,) = predict(c, "brush", [task(1, 1)]).get_json()["results"]
    assert ans["result"] and inverted == [1], ans
