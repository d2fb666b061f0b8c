"""Queue mode: jobs go to an RQ queue over Redis (``REDIS_URL``), served by ``python -m worker`` processes.

Jobs have a deterministic id (hash of image, masks, params and labels), so a request that repeats one whose job is
still queued or running attaches to it instead of enqueueing it again; the worker stores results in the result
cache when a job finishes, so nothing is lost when the backend stops waiting. Waiting blocks on RQ's result stream
(``Job.latest_result(timeout=...)``) for at most one check period at a time; between two blocks the dispatcher
reads the jobs' states: a job whose worker stops sending heartbeats (killed, crashed) is reported at once (a later
identical request re-enqueues it), and a job a worker took and died with before starting it is put back on the
queue after MASKINV_ORPHAN_GRACE. Redis that cannot be reached raises :class:`QueueUnavailable`.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

from worker.protocol import (JOB_META_KEY, LET_META_KEY, STORE_CALLBACK, RedisResultCache, RegistryReader,
                             job_function, job_serializer, sha256_hex)

from backend.dispatch.base import (LABEL_FUNCTION, QUEUE_UNAVAILABLE, Dispatcher, DispatchError, PreparedJob,
                                   QueueUnavailable, RunResult, safe_queue_name)
from backend.settings import Settings

if TYPE_CHECKING:
    from rq.job import Job

log = logging.getLogger(__name__)

JOB_RESULT_TTL_S = 600  # finished jobs (results are also in the result cache, with MASKINV_RESULT_TTL)
#: times one request re-enqueues a job that vanished from Redis (Redis restarted without persistence)
MAX_RESUBMITS = 2
#: job states that end a job without a result
FAILED_STATES = ("failed", "stopped", "canceled")
#: states of a job a repeated request may attach to
LIVE_STATES = ("queued", "deferred", "scheduled", "finished", "created")


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def wait_for_result(job: Job, seconds: float) -> None:
    """Block until ``job`` has a result in RQ's result stream or ``seconds`` have passed. RQ blocks in whole seconds
    (Redis ``XREAD BLOCK``); a shorter wait sleeps."""
    if int(seconds) >= 1:
        job.latest_result(timeout=int(seconds))
    elif seconds > 0:
        time.sleep(seconds)


def return_value(job: Job) -> Any:
    """The return value of ``job``'s latest successful run, or None."""
    res = job.latest_result()
    return res.return_value if res is not None and res.type == res.Type.SUCCESSFUL else None


def failure(job: Job, status: str) -> str:
    """Why ``job`` ended in ``status``: the last line of its traceback when RQ kept one."""
    last = ""
    try:
        res = job.latest_result()
        if res is not None and res.exc_string:
            lines = [ln for ln in res.exc_string.strip().splitlines() if ln.strip()]
            last = lines[-1].strip() if lines else ""
    except Exception:  # noqa: BLE001 - the status alone is still a clear error
        pass
    return f"worker job {job.id} {status}" + (f": {last}" if last else "")


class QueueDispatcher(Dispatcher):
    """Enqueues jobs on an RQ queue served by ``python -m worker`` processes and waits for them."""

    mode = "queue"

    def __init__(self, settings: Settings, connection: Any | None = None):
        from redis import Redis
        from rq import Queue

        if connection is None:
            if not settings.redis_url:
                raise DispatchError("queue mode needs REDIS_URL")
            connection = Redis.from_url(settings.redis_url)
        conn = connection
        super().__init__(settings, RedisResultCache(conn, settings.result_ttl_s))
        self.connection = conn
        self.serializer = job_serializer()
        self.queue = Queue(settings.queue, connection=conn, serializer=self.serializer)
        self.registry = RegistryReader(conn, settings.queue, prefix=settings.redis_prefix)

    def _unavailable(self, exc: Exception) -> QueueUnavailable:
        """The error for a Redis that does not answer (``exc``: redis-py's)."""
        return QueueUnavailable(f"Redis at {self.settings.redis_url_redacted} is not reachable: {exc}")

    def model_info(self, wait_s: float = 0.0) -> dict[str, Any] | None:
        from redis.exceptions import RedisError

        try:
            models = self.registry.live_models()
        except RedisError as exc:
            raise self._unavailable(exc) from None
        ids = {m.get("id") for m in models.values()}
        return next(iter(models.values())) if len(ids) == 1 else None

    def health(self) -> dict[str, Any]:
        from redis.exceptions import RedisError

        try:
            self.connection.ping()
            models = self.registry.live_models()
            queued = len(self.queue)
        except RedisError as exc:
            return {"mode": self.mode, "ready": False, "redis": f"unreachable: {exc}"}
        ids = sorted({str(m.get("id")) for m in models.values()})
        return {"mode": self.mode, "ready": bool(models), "redis": "ok", "queue": self.settings.queue,
                "queued_jobs": queued, "workers": len(models), "models": ids}

    def _job_options(self, result_ttl: int = JOB_RESULT_TTL_S) -> dict[str, Any]:
        """RQ's enqueue options every job shares: its time limit and how long it and its result are kept."""
        timeout = self.settings.job_timeout_s
        return {"timeout": timeout, "result_ttl": result_ttl, "failure_ttl": JOB_RESULT_TTL_S,
                "ttl": max(3600, 2 * timeout)}

    def _let_meta(self) -> dict[str, Any]:
        return {LET_META_KEY: {"prefix": self.settings.redis_prefix, "ttl_s": self.settings.let_ttl_s}}

    # -- enqueue ---------------------------------------------------------------------------------------
    def _send_prepare_labels(self, payload: dict) -> None:
        """Enqueue one ``prepare_labels`` job (deterministic id: a repeated /setup while it waits adds nothing)."""
        from rq.exceptions import DuplicateJobError

        prepare_id = safe_queue_name(self.settings.queue) + "-prepare-" + sha256_hex(
            json.dumps(payload, sort_keys=True).encode())[:32]
        try:
            self.queue.enqueue_call(job_function("prepare_labels"), args=(payload,), job_id=prepare_id, unique=True,
                                    **self._job_options(60),
                                    description=f"prepare {sum(len(s) for s in payload['label_sets'])} label(s)")
        except DuplicateJobError:
            pass

    def _enqueue(self, p: PreparedJob) -> Job:
        from rq import Callback

        assert p.payload is not None and p.job_id is not None
        return self.queue.enqueue_call(
            p.function, args=(p.payload,), job_id=p.job_id, unique=True, **self._job_options(),
            on_success=Callback(STORE_CALLBACK) if p.function == LABEL_FUNCTION else None,
            meta={JOB_META_KEY: {"prefix": self.settings.redis_prefix, "ttl_s": self.settings.result_ttl_s},
                  **self._let_meta()},
            description=f"{p.function.rsplit('.', 1)[-1]}: {len(p.payload.get('regions') or [])} region(s) of image "
                        f"{p.request.image_sha256[:12]}")

    def _submit(self, p: PreparedJob) -> Job:
        """Enqueue, or attach to the live job with the same id; replace a failed or orphaned one."""
        from rq.exceptions import DuplicateJobError, NoSuchJobError
        from rq.job import Job

        for _ in range(3):
            try:
                return self._enqueue(p)
            except DuplicateJobError:
                pass
            try:
                job = Job.fetch(str(p.job_id), connection=self.connection, serializer=self.serializer)
            except NoSuchJobError:
                continue  # expired in between: enqueue again
            status, worker = self._peek(job)
            if status == "queued" and self._orphans([job]):
                self._requeue(job)  # its worker died before starting it: back on the queue, then attach
            if status in LIVE_STATES or (status == "started" and (not worker or not self.registry.is_dead(worker))):
                log.info("attaching to existing job %s (%s)", job.id, status)
                return job
            log.info("replacing job %s (status %s, worker %s)", job.id, status, worker or "-")
            job.delete()
        raise DispatchError(f"could not enqueue job {p.job_id}")

    def _peek(self, job: Job) -> tuple[str | None, str | None]:
        status, worker = self.connection.hmget(job.key, "status", "worker_name")
        return _text(status), _text(worker)

    # -- embed jobs ----------------------------------------------------------------------------------------
    def run_embed(self, payload: dict, timeout_s: float) -> dict:
        """Enqueue one ``embed_regions`` job and wait for its result; DispatchError on failure or timeout."""
        from redis.exceptions import RedisError

        try:
            if not self.registry.live_workers():
                raise DispatchError(f"no MaskInversion worker is serving queue {self.settings.queue!r}")
            job = self.queue.enqueue_call(job_function("embed_regions"), args=(payload,), **self._job_options(),
                                          meta=self._let_meta(),
                                          description=f"embed {len(payload.get('regions') or [])} region(s)")
            deadline = time.monotonic() + timeout_s
            while True:
                wait_for_result(job, min(1.0, max(0.0, deadline - time.monotonic())))
                status = self._peek(job)[0]
                if status == "finished":
                    result = return_value(job)
                    if isinstance(result, dict):
                        return result
                    raise DispatchError(f"embed job {job.id} finished without a result")
                if status in FAILED_STATES or status is None:
                    raise DispatchError(failure(job, status or "vanished"))
                if time.monotonic() >= deadline:
                    raise DispatchError(f"embed job {job.id}: no result after {timeout_s:g}s (status {status})")
        except RedisError as exc:
            raise self._unavailable(exc) from None

    # -- wait ------------------------------------------------------------------------------------------
    def _run(self, items: list[PreparedJob], timeout_s: float) -> list[RunResult]:
        """Enqueue (or attach to) one job per item and wait for all of them until ``timeout_s``.

        Redis trouble while waiting (a restart) is waited out until the deadline; a job that vanished from
        Redis (restarted without persistence) is enqueued again, at most MAX_RESUBMITS times; a job whose worker
        died before starting it is put back on the queue within MASKINV_ORPHAN_GRACE (:meth:`_orphans`).
        """
        from redis.exceptions import RedisError

        t0 = time.monotonic()
        try:
            live = self.registry.live_workers()
            jobs = [self._submit(p) for p in items]
        except RedisError as exc:
            raise self._unavailable(exc) from None
        if not live:
            msg = (f"no MaskInversion worker is serving queue {self.settings.queue!r} (start one with "
                   "`python -m worker`); the job stays queued and its results will be cached when a worker "
                   "takes it")
            log.error(msg)
            return [RunResult(None, msg, {"job_id": j.id, "status": "queued"}, "no_worker") for j in jobs]
        results: dict[int, RunResult] = {}
        pending = dict(enumerate(jobs))
        resubmits: dict[int, int] = {}
        requeued: dict[int, int] = {}
        deadline = t0 + timeout_s
        redis_error: Exception | None = None
        next_orphan_check = t0
        while pending:
            first = next(iter(pending.values()))
            slice_end = time.monotonic() + min(self._orphan_check_s, max(0.0, deadline - time.monotonic()))
            try:
                # block on one job's result for at most one check period, then look at every job's state
                wait_for_result(first, slice_end - time.monotonic())
                vanished = self._poll(pending, results, t0)
                if time.monotonic() >= next_orphan_check:
                    for k in self._revive_orphans(pending):
                        requeued[k] = requeued.get(k, 0) + 1
                    next_orphan_check = time.monotonic() + self._orphan_check_s
                redis_error = None
            except RedisError as exc:
                if redis_error is None:
                    log.warning("Redis at %s is not reachable while waiting for %d job(s): %s; retrying until the "
                                "deadline", self.settings.redis_url_redacted, len(pending), exc)
                redis_error, vanished = exc, []
            for k in vanished:
                redis_error = self._resubmit(k, items, pending, results, resubmits) or redis_error
            if any(job is first for job in pending.values()):  # woken early (Redis down, an earlier run's result)
                time.sleep(max(0.0, slice_end - time.monotonic()))
            if pending and time.monotonic() >= deadline:
                for k, job in pending.items():
                    results[k] = self._overdue(job, timeout_s, redis_error)
                break
        out = [results[k] for k in range(len(jobs))]
        for k, n in resubmits.items():
            out[k].info["resubmitted"] = n
        for k, n in requeued.items():
            out[k].info["requeued"] = n
        return out

    def _resubmit(self, k: int, items: list[PreparedJob], pending: dict[int, Job], results: dict[int, RunResult],
                  resubmits: dict[int, int]) -> Exception | None:
        """Enqueue the vanished job ``pending[k]`` again (at most MAX_RESUBMITS times, then it fails); returns the
        Redis error that kept it from being enqueued, if any (it is tried again at the next check)."""
        from redis.exceptions import RedisError

        job = pending[k]
        if resubmits.get(k, 0) >= MAX_RESUBMITS:
            results[k] = RunResult(None, f"job {job.id} disappeared from Redis {MAX_RESUBMITS + 1} times "
                                         "(expired, deleted or Redis restarted)", {"job_id": job.id, "status": None},
                                   "failed")
            del pending[k]
            return None
        try:
            pending[k] = self._submit(items[k])
        except (RedisError, DispatchError) as exc:
            return exc
        resubmits[k] = resubmits.get(k, 0) + 1
        log.warning("job %s disappeared from Redis (restarted?); enqueued it again", job.id)
        return None

    def _poll(self, pending: dict[int, Job], results: dict[int, RunResult], t0: float) -> list[int]:
        """Move finished/failed jobs from ``pending`` to ``results``; return the keys of vanished jobs."""
        pipe = self.connection.pipeline(transaction=False)
        for job in pending.values():
            pipe.hmget(job.key, "status", "worker_name")
        states = pipe.execute()
        vanished = []
        for (k, job), (raw_status, raw_worker) in zip(list(pending.items()), states):
            status, worker = _text(raw_status), _text(raw_worker)
            info = {"job_id": job.id, "status": status, "worker": worker, "waited_s": time.monotonic() - t0}
            if status == "finished":
                result = return_value(job)
                if isinstance(result, dict):
                    results[k] = RunResult.finished(result, info)
                elif result is None and not self.connection.exists(job.key):
                    vanished.append(k)  # gone between the two reads
                    continue
                else:
                    results[k] = RunResult(None, f"job {job.id} finished without a result", info, "failed")
            elif status in FAILED_STATES:
                results[k] = RunResult(None, failure(job, status), info, "failed")
            elif status is None:
                vanished.append(k)
                continue
            elif status == "started" and worker and self.registry.is_dead(worker):
                msg = (f"worker {worker} stopped sending heartbeats while running job {job.id} (killed or "
                       "crashed?); a repeated request will re-enqueue it")
                log.error(msg)
                results[k] = RunResult(None, msg, info, "failed")
            else:
                continue
            del pending[k]
        return vanished

    def _overdue(self, job: Job, timeout_s: float, redis_error: Exception | None) -> RunResult:
        from redis.exceptions import RedisError

        if redis_error is not None:
            msg = (f"Redis at {self.settings.redis_url_redacted} is not reachable: {redis_error} "
                   f"(waited {timeout_s:g}s); a repeated request will enqueue the job again")
            log.error(msg)
            return RunResult(None, msg, {"job_id": job.id, "status": "unknown"}, QUEUE_UNAVAILABLE)
        try:
            status, worker = self._peek(job)
        except RedisError:
            status, worker = "unknown", None
        msg = (f"no result after {timeout_s:g}s (job {job.id} is {status or 'gone'}"
               f"{' on worker ' + worker if worker and status == 'started' else ''}); the job keeps "
               "running and a repeated request will be served from the result cache")
        log.warning(msg)
        return RunResult(None, msg, {"job_id": job.id, "status": status or "gone"}, "timeout")

    # -- orphans: jobs a worker took off the queue and died with before starting them -------------------------
    @property
    def _orphan_check_s(self) -> float:
        """How often a waiting request looks for orphaned jobs: min(1 s, MASKINV_ORPHAN_GRACE / 2)."""
        return min(1.0, self.settings.orphan_grace_s / 2)

    def _orphans(self, jobs: list[Job]) -> list[Job]:
        """Those of ``jobs`` that lost their worker: status ``queued`` but neither on the queue's list nor in its
        started registry (a worker took them, RQ's LMOVE, and died before starting them), and seen so for
        MASKINV_ORPHAN_GRACE minus one check period, so that a waiting request re-enqueues them within the grace.

        The first sighting is RQ's own mark (``IntermediateQueue.set_first_seen``); a mark older than the job's
        enqueue time belongs to an earlier run of the same job id and is set again. A live worker holds a job in
        that state for the few milliseconds between taking and starting it, far below the grace."""
        from rq.utils import now, str_to_date

        pipe = self.connection.pipeline(transaction=False)
        for job in jobs:
            pipe.hmget(job.key, "status", "enqueued_at")
        queued = [(job, enq) for job, (status, enq) in zip(jobs, pipe.execute() if jobs else [])
                  if status == b"queued"]
        if not queued:
            return []
        held = set(self.queue.get_job_ids()) | set(self.queue.started_job_registry.get_job_ids(cleanup=False))
        marks = self.queue.intermediate_queue
        out = []
        for job, enqueued in queued:
            if job.id in held:
                continue
            first = marks.get_first_seen(job.id)
            if first is None or (enqueued and first < str_to_date(enqueued)):
                self.connection.delete(marks.get_first_seen_key(job.id))
                marks.set_first_seen(job.id)
            elif (now() - first).total_seconds() >= self.settings.orphan_grace_s - self._orphan_check_s:
                out.append(job)
        return out

    def _requeue(self, job: Job) -> bool:
        """Put an orphaned job back at the front of its queue with RQ's ``Queue.enqueue_job`` (same id, payload,
        callbacks and TTLs). Only the backend that deletes the job's first-sighting mark does it, so two backends
        waiting for the same job never push it twice."""
        from rq.exceptions import NoSuchJobError
        from rq.job import Job

        marks = self.queue.intermediate_queue
        if not self.connection.delete(marks.get_first_seen_key(job.id)):
            return False
        marks.remove(job.id)
        try:
            fresh = Job.fetch(job.id, connection=self.connection, serializer=self.serializer)
        except NoSuchJobError:
            return False  # gone meanwhile: the waiting request enqueues it again
        self.queue.enqueue_job(fresh, at_front=True)
        log.warning("job %s was taken off queue %r by a worker that never started it (the worker died?); "
                    "re-enqueued it after MASKINV_ORPHAN_GRACE=%gs", job.id, self.settings.queue,
                    self.settings.orphan_grace_s)
        return True

    def _revive_orphans(self, pending: dict[int, Job]) -> list[int]:
        """Re-enqueue the orphaned jobs among ``pending`` (key -> job); returns the keys re-enqueued."""
        orphans = {job.id for job in self._orphans(list(pending.values()))}
        return [k for k, job in pending.items() if job.id in orphans and self._requeue(job)]
