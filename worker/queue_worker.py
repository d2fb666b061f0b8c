"""The RQ worker process and the Redis registry of live workers (torch-free at import time).

A worker loads the model once (``worker.jobs.regions.warm_up()``), then serves jobs from one RQ queue in its own
process with a non-forking :class:`rq.SimpleWorker`, so the engine's image-state cache survives across jobs.
Several workers may serve the same queue.

Registry (all keys under ``{prefix}``, default ``maskinv``)::

    {prefix}:workers:{queue}        sorted set  worker name -> unix time of its last heartbeat
    {prefix}:worker-models:{queue}  hash        worker name -> JSON {"model": {"name", "pretrained", "id", ...},
                                                                    "heartbeat_s": float}

A background thread beats every ``heartbeat_s`` seconds, also while a job runs, and re-publishes the model
entry with every beat (so a restarted Redis knows the workers again within one period). A worker is alive
while its last beat is younger than 4 of its own heartbeat periods.

Jobs travel as JSON (RQ's ``JSONSerializer``, never pickle) and the worker runs only the functions and
callbacks on :data:`ALLOWED_FUNCTIONS` / :data:`ALLOWED_CALLBACKS` (:class:`LabelJob`): whoever can write to
Redis can make the worker label images, not run arbitrary code. A job enqueued by the previous release under a
former function or callback name (``worker.protocol.kinds.FORMER_FUNCTIONS``) runs under today's name.

If the connection to Redis is lost (Redis restarted), the worker waits for Redis, marks the job it was running
as failed if Redis still has it, and serves the queue again. The backend uses the registry to (a) refuse to wait
when no worker is alive, (b) report a clear error as soon as the worker running a job stops beating (killed, OOM),
and (c) learn the model id it needs for result-cache keys (:mod:`worker.protocol`).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any, Callable, Sequence

from rq.job import Job, JobStatus
from rq.utils import import_attribute

from worker.protocol.kinds import (allowed_callbacks, allowed_functions, job_serializer, runnable_callback,
                                   runnable_function)
from worker.protocol.registry import RegistryReader
from worker.settings import WorkerSettings, WorkerSettingsError

log = logging.getLogger(__name__)

#: the job functions a worker runs (protocol.JOB_KINDS; anything else enqueued fails without being imported)
ALLOWED_FUNCTIONS = allowed_functions()
#: the job callbacks it runs (others are ignored)
ALLOWED_CALLBACKS = allowed_callbacks()


#: serializer of job data and results on the queue (backend and worker must agree): JSON, never pickle
JOB_SERIALIZER = job_serializer()


class LabelJob(Job):
    """An RQ job that resolves only allow-listed functions and callbacks (a former name: today's function)."""

    @property
    def func(self) -> Callable[..., Any]:
        name = self.func_name
        current = runnable_function(name) if self.instance is None else None
        if current is None:
            raise PermissionError(f"refusing to run job function {str(name)[:200]!r}: this worker runs only "
                                  f"{sorted(ALLOWED_FUNCTIONS)}")
        return import_attribute(current)

    def _allowed_callback(self, kind: str) -> Callable[..., Any] | None:
        name = getattr(self, f"_{kind}_callback_name", None)
        if not name:
            return None
        current = runnable_callback(name)
        if current is None:
            log.warning("job %s: ignoring %s callback %r (not allowed)", self.id, kind, str(name)[:200])
            return None
        return import_attribute(current)

    @property
    def success_callback(self) -> Callable[..., Any] | None:
        return self._allowed_callback("success")

    @property
    def failure_callback(self) -> Callable[..., Any] | None:
        return self._allowed_callback("failure")

    @property
    def stopped_callback(self) -> Callable[..., Any] | None:
        return self._allowed_callback("stopped")


class WorkerRegistry(RegistryReader):
    """Heartbeats and model identity of the workers serving one queue (the read side: protocol.RegistryReader)."""

    def __init__(self, connection: Any, queue: str, prefix: str = "maskinv", heartbeat_s: float = 5.0):
        super().__init__(connection, queue, prefix=prefix, heartbeat_s=heartbeat_s)  # heartbeat_s: this worker's
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._entry_json: str | None = None

    # -- worker side ---------------------------------------------------------------------------------
    def beat(self, name: str) -> None:
        now = time.time()
        pipe = self.connection.pipeline(transaction=False)
        pipe.zadd(self.workers_key, {name: now})
        if self._entry_json is not None:  # re-published every beat: a restarted Redis learns it again
            pipe.hset(self.models_key, name, self._entry_json)
        # forget workers that have been silent for an hour
        stale = self.connection.zrangebyscore(self.workers_key, "-inf", now - 3600)
        if stale:
            pipe.zrem(self.workers_key, *stale)
            pipe.hdel(self.models_key, *stale)
        pipe.execute()

    def register(self, name: str, model_info: dict[str, Any]) -> None:
        """Publish the worker's model and heartbeat period, and start beating in a daemon thread."""
        others = {m.get("id") for m in self.live_models().values()} - {None, model_info.get("id")}
        if others:
            log.warning("queue %r is also served by workers with model(s) %s; this worker serves %s — "
                        "results then depend on which worker takes a job", self.queue, sorted(map(str, others)),
                        model_info.get("id"))
        self._entry_json = self.entry_json(model_info, self.heartbeat_s)
        self.beat(name)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(name,), name="maskinv-heartbeat", daemon=True)
        self._thread.start()

    def _run(self, name: str) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.beat(name)
            except Exception as exc:  # noqa: BLE001 - keep beating through transient Redis errors
                log.warning("heartbeat failed: %s", exc)

    def unregister(self, name: str) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.heartbeat_s + 1)
        try:
            self.connection.zrem(self.workers_key, name)
            self.connection.hdel(self.models_key, name)
        except Exception as exc:  # noqa: BLE001 - shutting down anyway
            log.warning("could not unregister worker %s: %s", name, exc)


def _warm_up() -> dict[str, Any]:
    from worker.jobs import regions as jobs  # torch and the model are loaded here, once

    if hasattr(jobs, "warm_up"):
        return dict(jobs.warm_up())
    return dict(jobs.get_runtime().model_info())


def run_worker(redis_url: str, queue: str, prefix: str = "maskinv", name: str | None = None,
               burst: bool = False, heartbeat_s: float = 5.0, log_level: str = "INFO") -> int:
    """Load the model, then serve ``queue`` until stopped (SIGINT/SIGTERM: warm shutdown after the job).

    When RQ's work loop ends because Redis went away (restart, network), the worker waits for Redis to answer
    again, fails the job it was running if Redis still knows it, and serves the queue again.
    """
    from redis import Redis
    from redis.exceptions import RedisError
    from rq.exceptions import StopRequested

    conn = Redis.from_url(redis_url)
    try:
        conn.ping()
    except RedisError as exc:
        log.error("cannot reach Redis at %s: %s", redis_url, exc)
        return 2
    t0 = time.perf_counter()
    info = _warm_up()
    log.info("model %s ready in %.1fs; serving queue %r on %s", info.get("id"), time.perf_counter() - t0,
             queue, redis_url)
    name = name or f"maskinv-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    registry = WorkerRegistry(conn, queue, prefix=prefix, heartbeat_s=heartbeat_s)
    registry.register(name, info)
    try:
        _serve(conn, queue, name, burst, log_level)
    except StopRequested:  # SIGTERM/SIGINT between two work loops
        pass
    finally:
        registry.unregister(name)
    return 0


def _serve(conn: Any, queue: str, name: str, burst: bool, log_level: str) -> None:
    """RQ work loops until a stop request (a new loop after each lost Redis connection)."""
    from redis.exceptions import RedisError
    from rq import Queue, SimpleWorker

    while True:
        worker = SimpleWorker([Queue(queue, connection=conn, serializer=JOB_SERIALIZER, job_class=LabelJob)],
                              connection=conn, name=name, serializer=JOB_SERIALIZER, job_class=LabelJob)
        try:
            worker.work(burst=burst, logging_level=log_level, with_scheduler=False)
        except RedisError as exc:  # raised by RQ's teardown when Redis is gone
            log.error("worker %s lost Redis: %s", name, exc)
        if burst or _stop_requested(worker):
            break
        # without a stop request RQ's loop only ends on trouble (Redis gone, an unexpected error)
        log.error("worker %s: RQ's work loop ended without a stop request (Redis connection lost?); "
                  "serving the queue again", name)
        time.sleep(1.0)
        _wait_for_redis(conn)
        _forget_interrupted(conn, worker, queue)


def _stop_requested(worker: Any) -> bool:
    """Did a signal ask this RQ worker to stop (warm shutdown during a job, or while idle)?"""
    return bool(getattr(worker, "_stop_requested", False) or getattr(worker, "_shutdown_requested_date", None))


def _redis_ok(conn: Any) -> bool:
    from redis.exceptions import RedisError

    try:
        return bool(conn.ping())
    except RedisError:
        return False


def _wait_for_redis(conn: Any, max_wait_s: float = 5.0) -> None:
    """Block until Redis answers (backoff up to ``max_wait_s`` between tries)."""
    wait = 0.2
    while not _redis_ok(conn):
        time.sleep(wait)
        wait = min(wait * 2, max_wait_s)


def _forget_interrupted(conn: Any, worker: Any, queue: str) -> None:
    """After a lost connection: fail jobs Redis still lists as started by this worker (nobody runs them any
    more; a waiting backend then reports them, a repeated request re-enqueues) and drop RQ's stale record of
    the worker so that it can register again under the same name."""
    from rq.registry import StartedJobRegistry

    try:
        registry = StartedJobRegistry(queue, connection=conn, job_class=LabelJob, serializer=JOB_SERIALIZER)
        for job_id in registry.get_job_ids():
            job = LabelJob.fetch(job_id, connection=conn, serializer=JOB_SERIALIZER)
            if job.worker_name == worker.name:
                job.set_status(JobStatus.FAILED)
                registry.remove(job)
                log.warning("job %s was interrupted by the lost Redis connection: marked failed", job_id)
        conn.delete(worker.key)
    except Exception as exc:  # noqa: BLE001 - best effort; a fresh Redis has nothing to clean
        log.warning("could not clean up after the lost connection: %s", exc)


def check_alive(redis_url: str, queue: str, prefix: str, name: str | None) -> int:
    """0 if the named worker (default: any worker started on this host) is alive on ``queue``, else 1."""
    from redis import Redis
    from redis.exceptions import RedisError

    try:
        live = WorkerRegistry(Redis.from_url(redis_url), queue, prefix=prefix).live_workers()
    except RedisError as exc:
        print(f"unhealthy: Redis at {redis_url}: {exc}", file=sys.stderr)
        return 1
    mine = [w for w in live if (w == name if name else w.startswith(f"maskinv-{socket.gethostname()}-"))]
    print(("healthy: " + ", ".join(mine)) if mine else f"unhealthy: no live worker of this host on {queue!r}")
    return 0 if mine else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m worker`` / ``maskinv-worker``."""
    try:
        settings = WorkerSettings.from_env()
    except WorkerSettingsError as exc:
        print(f"maskinv-worker: {exc}", file=sys.stderr)
        return 2
    p = argparse.ArgumentParser(prog="maskinv-worker", description=(
        "Serve MaskInversion jobs from an RQ queue. The model comes from MASKINV_MODEL / MASKINV_PRETRAINED "
        "/ MASKINV_DEVICE (see worker.settings)."))
    p.add_argument("--redis-url", default=settings.redis_url,
                   help="Redis URL [env REDIS_URL, default %(default)s]")
    p.add_argument("--queue", default=settings.queue, help="RQ queue [env MASKINV_QUEUE]")
    p.add_argument("--prefix", default=settings.redis_prefix,
                   help="Redis key prefix of the registry [env MASKINV_REDIS_PREFIX]")
    p.add_argument("--name", default=settings.worker_name,
                   help="worker name [env MASKINV_WORKER_NAME; default host-pid-random]")
    p.add_argument("--heartbeat", type=float, default=settings.heartbeat_s,
                   help="heartbeat period in seconds; dead after 4 missed beats [env MASKINV_WORKER_HEARTBEAT]")
    p.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    p.add_argument("--check", action="store_true",
                   help="health check: exit 0 if a worker of this host (or --name) is alive on the queue, else 1")
    p.add_argument("--log-level", default=settings.log_level)
    args = p.parse_args(argv)
    if args.heartbeat <= 0:
        p.error("--heartbeat must be > 0")
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s")
    if args.check:
        return check_alive(args.redis_url, args.queue, args.prefix, args.name)
    return run_worker(args.redis_url, args.queue, prefix=args.prefix, name=args.name, burst=args.burst,
                      heartbeat_s=args.heartbeat, log_level=args.log_level.upper())
