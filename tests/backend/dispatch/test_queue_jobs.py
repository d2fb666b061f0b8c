"""Backend -> real Redis -> real worker processes (``python -m worker``, tiny random-init model) -> result.

Every test uses its own queue name / key prefix and deletes its Redis keys afterwards.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import requests

from backend.http.app import create_app
from backend.service import Service
from backend.trust.score import prediction_score
from backend_support import (REDIS_URL, WorkerProcess, client_for, data_uri, delete_namespace, png_bytes,
                                  settings_for)

pytestmark = [pytest.mark.redis, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[3]
CONFIG = (ROOT / "label_config" / "rectangle.xml").read_text()
W, H = 80, 60


def rect(rid: str, x=10.0, y=10.0, w=40.0, h=50.0) -> dict:
    return {"id": rid, "from_name": "label", "to_name": "image", "type": "rectanglelabels", "original_width": W,
            "original_height": H, "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0,
                                            "rectanglelabels": ["car"]}}


def body(tasks, context=None, **maskinv) -> dict:
    params = {"context": context} if context else {}
    if maskinv:
        params["maskinv"] = maskinv
    return {"tasks": tasks, "label_config": CONFIG, "params": params}


def image_task(tid: int, seed: int, **extra) -> dict:
    return {"id": tid, "data": {"image": data_uri(png_bytes(W, H, seed))}, **extra}


@pytest.fixture(scope="module")
def shared(redis_conn, tmp_path_factory):
    """One worker (image limit 100k pixels) on its own namespace, shared by the tests of this module."""
    ns = f"maskinv-test-{uuid.uuid4().hex[:10]}"
    worker = WorkerProcess(ns, tmp_path_factory.mktemp("workers"), MASKINV_MAX_IMAGE_PIXELS="100000")
    try:
        worker.wait_ready(redis_conn)
        yield ns, worker
    finally:
        worker.stop()
        delete_namespace(redis_conn, ns)


def test_round_trip_image_cache_and_result_cache(shared):
    ns, worker = shared
    client = client_for(ns)
    t = image_task(1, seed=101)
    first = client.post("/predict", json=body([t], {"result": [rect("r1")]}))
    assert first.status_code == 200, first.get_json()
    p1 = first.get_json()["results"][0]
    (job1,) = p1["maskinv"]["jobs"]
    assert job1["status"] == "finished" and job1["worker"] == worker.name
    assert job1["cache"]["image_hit"] is False and job1["result_cache"] == {"hits": 0, "misses": 1}
    assert p1["model_version"].startswith("maskinversion-maskinv-test-tiny/random-seed0-")

    # a second region on the same image: r1 comes from the result cache, r2 from the worker, whose
    # image-state cache already holds this image
    second = client.post("/predict", json=body([t], {"result": [rect("r1"), rect("r2", x=50, y=40, w=30, h=30)]}))
    p2 = second.get_json()["results"][0]
    (job2,) = p2["maskinv"]["jobs"]
    assert job2["result_cache"] == {"hits": 1, "misses": 1}
    assert job2["cache"]["image_hit"] is True and job2["cache"]["hits"] >= 1
    r1 = [r for r in p1["result"] if r["id"] == "r1"]
    assert [r for r in p2["result"] if r["id"] == "r1"] == r1

    # the same request again: everything from the result cache, no job at all
    third = client.post("/predict", json=body([t], {"result": [rect("r1"), rect("r2", x=50, y=40, w=30, h=30)]}))
    (job3,) = third.get_json()["results"][0]["maskinv"]["jobs"]
    assert job3 == {"result_cache": {"hits": 2, "misses": 0}}
    assert third.get_json()["results"][0]["result"] == p2["result"]


def test_batch_failed_task_leaves_the_others_intact(shared):
    ns, _ = shared
    big = {"id": 2, "data": {"image": data_uri(png_bytes(400, 300, 7))},  # over the worker's pixel limit
           "annotations": [{"id": 20, "result": [rect("big")]}]}
    tasks = [image_task(1, 201, annotations=[{"id": 10, "result": [rect("a"), rect("b", x=60, y=5, w=20, h=20)]}]),
             big,
             image_task(3, 203, predictions=[{"id": 30, "result": [rect("c")]}])]
    resp = client_for(ns).post("/predict", json=body(tasks))
    assert resp.status_code == 200
    first, failed, third = resp.get_json()["results"]
    assert {r["id"] for r in first["result"]} == {"a", "b"}
    assert {r["id"] for r in third["result"]} == {"c"}
    assert "result" not in failed and "MASKINV_MAX_IMAGE_PIXELS" in failed["error"]
    assert first["score"] == pytest.approx(prediction_score(first["result"]))  # backend.trust.score


def test_job_over_its_time_limit_fails_clearly_and_the_worker_goes_on(shared):
    ns, _ = shared
    client = client_for(ns, MASKINV_JOB_TIMEOUT=1)
    resp = client.post("/predict", json=body([image_task(1, 301)], {"result": [rect("slow")]}, steps=1000, size=448))
    assert resp.status_code == 502, resp.get_json()
    assert "failed" in resp.get_json()["error"] and "timeout" in resp.get_json()["error"].lower()
    ok = client_for(ns).post("/predict", json=body([image_task(1, 302)], {"result": [rect("fast")]}))
    assert ok.status_code == 200


def test_backend_timeout_keeps_the_results(shared, redis_conn):
    ns, _ = shared
    # 1000 steps: well over the backend's 0.2 s wait on any machine (60 steps of the tiny model took 0.1 s on a
    # fast one), and a few seconds of work for the worker to finish afterwards
    request = body([image_task(1, 401)], {"result": [rect("r", x=5, y=5, w=70, h=70)]}, steps=1000)
    resp = client_for(ns, MASKINV_TIMEOUT=0.2).post("/predict", json=request)
    assert resp.status_code == 504
    err = resp.get_json()["error"]
    assert "no result after" in err and "served from the result cache" in err
    # the job goes on in the worker; when it is done, the same request is answered from the result cache
    from rq.job import Job

    job_id = err.split("(job ")[1].split(" ")[0]
    deadline = time.monotonic() + 120
    while Job.fetch(job_id, connection=redis_conn).get_status() != "finished":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    again = client_for(ns).post("/predict", json=request)
    assert again.status_code == 200
    assert again.get_json()["results"][0]["maskinv"]["jobs"] == [{"result_cache": {"hits": 1, "misses": 0}}]


def test_identical_requests_attach_to_one_job(shared):
    ns, _ = shared
    request = body([image_task(1, 501)], {"result": [rect("r")]}, steps=40)
    answers = []

    def post():
        answers.append(client_for(ns).post("/predict", json=request).get_json())

    threads = [threading.Thread(target=post) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    jobs = [a["results"][0]["maskinv"]["jobs"][0] for a in answers]
    ran = [j for j in jobs if "job_id" in j]
    assert len({j["job_id"] for j in ran}) == 1  # never two jobs for the same work
    assert answers[0]["results"][0]["result"] == answers[1]["results"][0]["result"]


def test_no_worker_is_a_fast_clear_error(redis_conn, redis_ns):
    t0 = time.monotonic()
    resp = client_for(redis_ns).post("/predict", json=body([image_task(1, 1)], {"result": [rect("r")]}))
    assert resp.status_code == 503
    assert "no MaskInversion worker is serving queue" in resp.get_json()["error"]
    assert time.monotonic() - t0 < 10
    assert redis_conn.llen(f"rq:queue:{redis_ns}") == 1  # stays queued for a worker to come


def test_health_in_queue_mode(shared, redis_ns):
    ns, worker = shared
    check = [sys.executable, "-m", "worker", "--check", "--redis-url", REDIS_URL, "--queue", ns, "--prefix", ns]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    assert subprocess.run([*check, "--name", worker.name], env=env, capture_output=True).returncode == 0
    assert subprocess.run([*check, "--name", "nobody"], env=env, capture_output=True).returncode == 1
    health = client_for(ns).get("/health").get_json()
    assert health["status"] == "UP" and health["mode"] == "queue" and health["workers"] == 1
    assert health["models"] == ["maskinv-test-tiny/random-seed0"]
    empty = client_for(redis_ns).get("/health").get_json()
    assert empty["ready"] is False and empty["workers"] == 0
    down = create_app(service=Service(settings_for(redis_ns, REDIS_URL="redis://127.0.0.1:1/0"))).test_client()
    resp = down.get("/health")
    assert resp.status_code == 503 and resp.get_json()["status"] == "DOWN"
    resp = down.post("/predict", json=body([image_task(1, 1)], {"result": [rect("r")]}))
    assert resp.status_code == 503 and "not reachable" in resp.get_json()["error"]


def test_worker_killed_mid_job(redis_conn, redis_ns, tmp_path):
    worker = WorkerProcess(redis_ns, tmp_path, heartbeat=1.0)
    try:
        worker.wait_ready(redis_conn)
        client = client_for(redis_ns)
        request = body([image_task(1, 601)], {"result": [rect("r")]}, steps=1000)  # minutes on the tiny model
        answer: dict = {}

        def post():
            t0 = time.monotonic()
            resp = client.post("/predict", json=request)
            answer.update(status=resp.status_code, body=resp.get_json(), elapsed=time.monotonic() - t0)

        th = threading.Thread(target=post)
        th.start()
        started = f"rq:wip:{redis_ns}"  # RQ's started-job registry of the queue
        deadline = time.monotonic() + 60
        while not redis_conn.zcard(started):
            assert time.monotonic() < deadline, worker.tail()
            time.sleep(0.05)
        worker.proc.kill()  # SIGKILL mid-job: no cleanup, no result
        th.join(60)
        assert not th.is_alive()
        assert answer["status"] == 502, answer
        assert "stopped sending heartbeats" in answer["body"]["error"]
        assert answer["elapsed"] < 60  # well within MASKINV_TIMEOUT
        # a new worker picks the repeated request up again (the orphaned job is replaced)
        replacement = WorkerProcess(redis_ns, tmp_path, heartbeat=1.0)
        try:
            replacement.wait_ready(redis_conn)
            quick = body([image_task(1, 601)], {"result": [rect("r")]}, steps=1000)
            retry = client_for(redis_ns, MASKINV_TIMEOUT=0.3).post("/predict", json=quick)
            assert retry.status_code == 504  # re-enqueued (not attached to the dead job), now running
            assert "is started on worker " + replacement.name in retry.get_json()["error"] or \
                "is queued" in retry.get_json()["error"]
        finally:
            replacement.proc.kill()  # it is busy with the long job: no warm shutdown
            replacement.proc.wait()
    finally:
        if worker.proc.poll() is None:
            worker.proc.kill()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_console_script_serves_with_gunicorn_without_torch(shared, tmp_path):
    """``python -m backend`` (gunicorn) in queue mode answers /predict; the web process never loads torch."""
    ns, _ = shared
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "REDIS_URL": REDIS_URL, "MASKINV_QUEUE": ns,
           "MASKINV_REDIS_PREFIX": ns, "MASKINV_SIZE": "64", "MASKINV_STEPS": "2", "MASKINV_PORT": str(port),
           "MASKINV_HOST": "127.0.0.1", "MASKINV_WEB_WORKERS": "1"}
    log = tmp_path / "backend.log"
    proc = subprocess.Popen([sys.executable, "-m", "backend"], cwd=ROOT, env=env, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        resp = requests.post(f"{url}/predict", json=body([image_task(1, 701)], {"result": [rect("r")]}), timeout=60)
        assert resp.status_code == 200, resp.text
        assert resp.json()["results"][0]["result"][0]["id"] == "r"
        workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                                  text=True).stdout.split()]
        assert workers
        for pid in [proc.pid, *workers]:
            maps = Path(f"/proc/{pid}/maps").read_text()
            assert "libtorch" not in maps, f"process {pid} loaded torch"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
