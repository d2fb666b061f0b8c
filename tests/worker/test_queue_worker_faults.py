"""Faults in queue mode, with real Redis and real worker processes (tiny model): a worker killed in the middle of
a batch, Redis restarted in the middle of a batch, and jobs the worker must refuse. Each test checks what the user
sees and that no other task's predictions are lost.

(Covered in test_queue.py and not repeated here: a killed worker during an interactive request, a job over its
time limit, the backend's own timeout keeping results, no worker at all, Redis down at request time.)
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from backend_support import (WorkerProcess, client_for, config, data_uri, delete_namespace, png_bytes,
                                  rect)

pytestmark = [pytest.mark.faults, pytest.mark.redis, pytest.mark.slow]

SLOW = {"steps": 300}  # about a second per job on the tiny model at size 64 (more on a busy machine)


def batch(n: int, seed: int) -> dict:
    tasks = [{"id": k, "data": {"image": data_uri(png_bytes(80, 60, seed + k))},
              "annotations": [{"id": 100 + k, "result": [rect(f"t{k}")]}]} for k in range(n)]
    return {"tasks": tasks, "label_config": config("rectangle"), "params": {"maskinv": SLOW}}


def post_in_background(client, body: dict) -> tuple[threading.Thread, dict]:
    answer: dict = {}

    def run():
        resp = client.post("/predict", json=body)
        answer.update(status=resp.status_code, body=resp.get_json())

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th, answer


def wait_for(condition, timeout: float, what: str, tail=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{tail()}"
        time.sleep(0.05)


def test_worker_killed_mid_batch_loses_only_its_job(redis_conn, redis_ns, tmp_path):
    """Three jobs, one worker: it finishes job 1 and is killed during job 2; a replacement worker takes job 3.
    Tasks 1 and 3 are answered, task 2 reports the dead worker; repeating the batch answers task 2 and serves
    tasks 1 and 3 from the result cache."""
    first = WorkerProcess(redis_ns, tmp_path, heartbeat=0.5)
    replacement = None
    try:
        first.wait_ready(redis_conn)
        body = batch(3, seed=900)
        th, answer = post_in_background(client_for(redis_ns, MASKINV_BATCH_TIMEOUT=240), body)
        wait_for(lambda: redis_conn.zcard(f"rq:finished:{redis_ns}") >= 1
                 and redis_conn.zcard(f"rq:wip:{redis_ns}") >= 1,
                 300, "job 1 done and job 2 running", first.tail)
        first.kill()
        replacement = WorkerProcess(redis_ns, tmp_path, heartbeat=0.5)
        th.join(300)
        assert not th.is_alive()
        assert answer["status"] == 200, answer
        one, two, three = answer["body"]["results"]
        assert [r["id"] for r in one["result"] if r["type"] == "rectanglelabels"] == ["t0"]
        assert [r["id"] for r in three["result"] if r["type"] == "rectanglelabels"] == ["t2"], replacement.tail()
        assert "result" not in two and "stopped sending heartbeats" in two["error"]

        again = client_for(redis_ns, MASKINV_BATCH_TIMEOUT=240).post("/predict", json=body)
        assert again.status_code == 200
        one2, two2, three2 = again.get_json()["results"]
        assert one2["result"] == one["result"] and three2["result"] == three["result"]
        assert one2["maskinv"]["jobs"] == [{"result_cache": {"hits": 1, "misses": 0}}]
        assert three2["maskinv"]["jobs"] == [{"result_cache": {"hits": 1, "misses": 0}}]
        assert [r["id"] for r in two2["result"] if r["type"] == "rectanglelabels"] == ["t1"]
        assert two2["maskinv"]["jobs"][0]["worker"] == replacement.name
    finally:
        first.kill()
        if replacement is not None:
            replacement.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A private redis-server without persistence on a free loopback port (never the shared one)."""

    def __init__(self, workdir: Path):
        self.port = _free_port()
        self.workdir = workdir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=(self.workdir / "redis.log").open("ab"), stderr=subprocess.STDOUT)
        from redis import Redis

        conn = Redis.from_url(self.url)
        wait_for(lambda: self._ping(conn), 20, "redis-server to start")

    @staticmethod
    def _ping(conn) -> bool:
        try:
            return bool(conn.ping())
        except Exception:  # noqa: BLE001
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> None:
        """Crash and come back empty (no persistence), as a Redis without AOF/RDB does."""
        self.kill()
        self.start()


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server to run a private Redis")
def test_redis_restart_mid_batch_loses_nothing(tmp_path):
    from redis import Redis

    server = RedisServer(tmp_path)
    ns = "maskinv-restart"
    conn = Redis.from_url(server.url)
    worker = WorkerProcess(ns, tmp_path, heartbeat=0.5, REDIS_URL=server.url)
    try:
        worker.wait_ready(conn)
        body = batch(4, seed=1200)
        client = client_for(ns, REDIS_URL=server.url, MASKINV_BATCH_TIMEOUT=240)
        th, answer = post_in_background(client, body)
        wait_for(lambda: RedisServer._ping(conn) and conn.zcard(f"rq:finished:{ns}") >= 1, 300,
                 "the first job to finish", worker.tail)
        server.restart()  # everything in Redis is gone: queued jobs, job states, results, the worker registry
        th.join(300)
        assert not th.is_alive()
        assert answer["status"] == 200, answer
        results = answer["body"]["results"]
        assert [[r["id"] for r in res.get("result", []) if r["type"] == "rectanglelabels"] for res in results] == \
            [["t0"], ["t1"], ["t2"], ["t3"]], (results, worker.tail(80))
        assert any(j.get("resubmitted") for res in results for j in res["maskinv"]["jobs"])  # lost jobs came back
        assert worker.proc.poll() is None, worker.tail()  # the worker survived the restart

        # the worker is known again (its registry entry is re-published), and serves new requests
        health = client.get("/health").get_json()
        assert health["workers"] == 1 and health["models"] == ["maskinv-test-tiny/random-seed0"]
        fresh = client.post("/predict", json={**batch(1, seed=1300), "params": {}})
        assert fresh.status_code == 200 and "result" in fresh.get_json()["results"][0]
    finally:
        worker.stop()
        server.kill()


class _Boom:
    """Pickled, this would create a file when unpickled."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_worker_runs_only_label_jobs(redis_conn, redis_ns, tmp_path):
    """Whoever can write to Redis still cannot make the worker run other code: jobs are JSON (never unpickled)
    and only worker.jobs.regions.label_regions (with its cache callback) is run."""
    from rq import Queue, SimpleWorker

    from worker.queue_worker import JOB_SERIALIZER, LabelJob

    marker = tmp_path / "pwned"
    json_queue = Queue(redis_ns, connection=redis_conn, serializer=JOB_SERIALIZER)
    shell = json_queue.enqueue_call("os.system", args=(f"touch {marker}",))
    pickled = Queue(redis_ns, connection=redis_conn).enqueue_call("builtins.print", args=(_Boom(str(marker)),))
    worker = SimpleWorker([Queue(redis_ns, connection=redis_conn, serializer=JOB_SERIALIZER, job_class=LabelJob)],
                          connection=redis_conn, serializer=JOB_SERIALIZER, job_class=LabelJob,
                          name=f"{redis_ns}-inproc")
    worker.work(burst=True, with_scheduler=False)
    assert not marker.exists()
    job = LabelJob.fetch(shell.id, connection=redis_conn, serializer=JOB_SERIALIZER)
    assert job.get_status() == "failed"
    assert "refusing to run job function 'os.system'" in job.latest_result().exc_string
    status = redis_conn.hget(f"rq:job:{pickled.id}", "status")
    assert status in (b"failed", None)  # refused (or dropped) without being unpickled
    assert not marker.exists()
    delete_namespace(redis_conn, redis_ns)
