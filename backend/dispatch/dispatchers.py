"""Run label jobs: through RQ + Redis (``REDIS_URL`` set) or in this process (embedded), with a result cache.

One :class:`LabelRequest` = all regions of one image that share a vocabulary. For each request the
dispatcher

1. encodes the masks (packed bits, worker.protocol) and drops duplicates (same mask digest);
2. looks every region up in the result cache (worker.protocol's caches and keys) and keeps only the misses;
3. runs one ``worker.jobs.regions.label_regions`` job for the misses, waits up to a deadline, and merges.

Queue mode: jobs have a deterministic id (hash of image, masks, params and labels), so a request that
repeats one whose job is still queued or running attaches to it instead of enqueueing it again; the worker
stores results in the cache when a job finishes, so nothing is lost when the backend stops waiting.
A job whose worker stops sending heartbeats (killed, crashed) is reported at once; a later identical
request re-enqueues it. A job a worker took and died with before starting it is put back on the queue after
MASKINV_ORPHAN_GRACE. Redis that cannot be reached raises :class:`QueueUnavailable` (a ``ConnectionError``).

Embedded mode: the same job function runs in one background thread (``worker.jobs.regions`` is imported lazily, at
the first job); results go to an in-process LRU, so a request that timed out is served from it later.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from worker.protocol.deadline import time_limit
from worker.protocol import (JOB_META_KEY, LET_META_KEY, STORE_CALLBACK, InversionParams, JobResult, LabelRegionsJob,
                             MemoryResultCache, PrepareLabelsJob, ProtocolError, RedisResultCache, RegionResult,
                             RegistryReader, ResultCache, allowed_functions, answer_digest, encode_mask,
                             entries_from_result, job_function, job_serializer, region_from_cache, result_keys,
                             sha256_hex)

from backend.settings import Settings

log = logging.getLogger(__name__)

JOB_FUNCTION = job_function("label_regions")
EMBED_FUNCTION = job_function("embed_regions")
JOB_RESULT_TTL_S = 600  # finished jobs (results are also in the result cache, with MASKINV_RESULT_TTL)
#: times one request re-enqueues a job that vanished from Redis (Redis restarted without persistence)
MAX_RESUBMITS = 2


class DispatchError(RuntimeError):
    """Jobs cannot be run at all (e.g. Redis unreachable); maps to HTTP 503."""


class QueueUnavailable(DispatchError, ConnectionError):
    """Queue mode: Redis (the queue) cannot be reached, e.g. while it restarts. A ``ConnectionError`` (callers that
    can wait, such as project runs, catch that and retry later) and a :class:`DispatchError` (HTTP 503). Where a
    failure travels as a per-region / per-task entry instead, it is marked :data:`QUEUE_UNAVAILABLE`."""


#: LabelOutcome.kind of a job that Redis' absence left unknown (Redis lost while waiting); in a task's answer the
#: error entry's ``code`` (its ``kind`` stays ``failed``: backend.predict.tasks)
QUEUE_UNAVAILABLE = "queue_unavailable"


@dataclass
class LabelRequest:
    """All regions of one image that share a label set. ``masks``: one bool ``[H, W]`` per region."""

    image: bytes
    masks: list[np.ndarray]
    labels: list[str]
    params: InversionParams
    image_sha256: str = ""
    prototypes: dict | None = None  # the project's example prototypes for these labels (backend.learning.learner)

    def __post_init__(self) -> None:
        if not self.image_sha256:
            self.image_sha256 = sha256_hex(self.image)


@dataclass
class LabelOutcome:
    """Per-region results (same order as the request's masks) or a job-level error."""

    regions: list[dict[str, Any]]  # {"labels": [...], "caption", "caption_mode", "error", "cached": bool}
    model: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    kind: str | None = None  # None, or why: "timeout" | "no_worker" | "failed" | "rejected" | "queue_unavailable"
    info: dict[str, Any] = field(default_factory=dict)  # job id/status, worker cache counters, timings


@dataclass
class _Prepared:
    request: LabelRequest
    shas: list[str]  # per mask
    encoded: dict[str, dict]  # unique sha -> encoded mask
    pdigest: str
    hits: dict[str, dict] = field(default_factory=dict)  # sha -> cached value
    payload: dict | None = None
    job_id: str | None = None
    function: str = JOB_FUNCTION  # the worker job that runs the payload (a worker.protocol.JOB_KINDS function)


@dataclass
class _RunResult:
    result: dict | None
    error: str | None
    info: dict[str, Any]
    kind: str | None = None  # see LabelOutcome.kind


def _outcome_region(region: RegionResult, cached: bool) -> dict[str, Any]:
    """One region of a :class:`LabelOutcome`: the protocol's region result plus whether it came from the cache."""
    out = region.to_dict()
    out["cached"] = cached
    return out


class Dispatcher:
    """Common part: cache lookups, payloads and merging. Subclasses run the payloads."""

    mode = "?"

    def __init__(self, settings: Settings, cache: ResultCache):
        self.settings = settings
        self.cache = cache

    # -- to implement ------------------------------------------------------------------------------
    def model_info(self, wait_s: float = 0.0) -> dict[str, Any] | None:
        """The model that will run the jobs, when known (needed for cache keys); embedded mode may wait up to
        ``wait_s`` for the model to load."""
        raise NotImplementedError

    def _run(self, items: list[_Prepared], timeout_s: float) -> list[_RunResult]:
        raise NotImplementedError

    def health(self) -> dict[str, Any]:
        raise NotImplementedError

    def prepare_labels(self, label_sets: list[tuple[str, ...]], params: InversionParams) -> None:
        """Have the worker build the text prototypes of ``label_sets`` in the background (never raises, never
        waits): the first suggestion after ``/setup`` then finds them cached."""
        sets = [tuple(s) for s in dict.fromkeys(tuple(s) for s in label_sets) if s]
        if not sets:
            return
        payload = PrepareLabelsJob(label_sets=tuple(sets), templates=params.templates,
                                   captions=params.caption).to_dict()
        try:
            self._send_prepare_labels(payload)
        except Exception as exc:  # noqa: BLE001 - a warm-up that cannot be sent only costs the first request time
            log.warning("could not ask for the label prototypes to be prepared: %s", exc)

    def _send_prepare_labels(self, payload: dict) -> None:
        raise NotImplementedError

    # -- the pipeline --------------------------------------------------------------------------------
    def label(self, requests: list[LabelRequest], timeout_s: float) -> list[LabelOutcome]:
        """Label every request's regions; never raises for a single job's failure (see LabelOutcome.error)."""
        model = self.model_info()
        prepared = [self._prepare(r, model) for r in requests]
        todo = [p for p in prepared if p.payload is not None]
        runs = dict(zip((id(p) for p in todo), self._run(todo, timeout_s))) if todo else {}
        return [self._merge(p, runs.get(id(p)), model) for p in prepared]

    def run_jobs(self, function: str, requests: list[tuple[bytes, dict]], timeout_s: float) -> list[_RunResult]:
        """Run one job of ``function`` (a worker.protocol.JOB_KINDS function) per ``(image, payload)`` and wait up
        to ``timeout_s``; no result cache (used by the proposal jobs, whose results depend on no drawn mask)."""
        from worker.protocol import allowed_functions

        if function not in allowed_functions():
            raise DispatchError(f"{function!r} is not a worker job function")
        items = []
        for image, payload in requests:
            req = LabelRequest(image, [], list(payload.get("labels") or []), InversionParams())
            ident = "\n".join([self.settings.queue, function, sha256_hex(repr(sorted(
                (k, v) for k, v in payload.items() if k != "image")).encode()), req.image_sha256])
            job_id = re.sub(r"[^A-Za-z0-9_-]", "_", self.settings.queue) + "-" + sha256_hex(ident.encode())[:40]
            items.append(_Prepared(req, [], {}, "", payload=payload, job_id=job_id, function=function))
        return self._run(items, timeout_s) if items else []

    def _prepare(self, req: LabelRequest, model: dict[str, Any] | None) -> _Prepared:
        shas, encoded = [], {}
        for m in req.masks:
            enc = encode_mask(np.asarray(m, dtype=bool))
            shas.append(enc["sha256"])
            encoded.setdefault(enc["sha256"], enc)
        # the job's identity: everything its answer depends on (the examples' content included) but the model
        pdigest = answer_digest(req.params.to_dict(), req.labels, req.prototypes)
        p = _Prepared(req, shas, encoded, pdigest)
        if model and model.get("id") and encoded:
            keys = result_keys(self.settings.redis_prefix, model, req.image_sha256, encoded, req.params.to_dict(),
                               req.labels, req.prototypes)
            try:
                values = self.cache.get_many(list(keys.values()))
            except Exception as exc:  # noqa: BLE001 - a cache read failure only costs recomputation
                log.warning("result cache read failed: %s", exc)
                values = [None] * len(keys)
            p.hits = {sha: v for sha, v in zip(keys, values) if v is not None}
        missing = [sha for sha in encoded if sha not in p.hits]
        if missing:
            p.payload = LabelRegionsJob.build(req.image, [(sha, encoded[sha]) for sha in missing], req.labels,
                                              req.params, prototypes=req.prototypes or None).to_dict()
            ident = "\n".join([self.settings.queue, req.image_sha256, pdigest, *sorted(missing)])
            p.job_id = re.sub(r"[^A-Za-z0-9_-]", "_", self.settings.queue) + "-" + sha256_hex(ident.encode())[:40]
        return p

    def _merge(self, p: _Prepared, run: _RunResult | None, model: dict[str, Any] | None) -> LabelOutcome:
        by_sha: dict[str, dict] = {}
        for sha, v in p.hits.items():
            try:
                by_sha[sha] = _outcome_region(region_from_cache(sha, v), cached=True)
            except ProtocolError as exc:  # a malformed cache entry is recomputed next time, reported now
                log.warning("result cache entry for mask %s is malformed: %s", sha[:12], exc)
        info: dict[str, Any] = {"result_cache": {"hits": len(p.hits), "misses": len(p.encoded) - len(p.hits)}}
        error, kind = None, None
        out_model = dict(model or {})
        if run is not None:
            info.update(run.info)
            if run.result is not None:
                try:
                    res = JobResult.from_dict(run.result)
                except ProtocolError as exc:
                    res = JobResult.rejected(f"worker returned a malformed result: {exc}", [])
                out_model = dict(res.model or out_model)
                info.update({"cache": dict(res.cache), "timings": dict(res.timings)})
                error = res.error
                kind = "rejected" if error else None
                for region in res.regions:
                    by_sha[region.id] = _outcome_region(region, cached=False)
            else:
                error, kind = run.error, run.kind or "failed"
        if not out_model and p.hits:
            out_model = dict(next(iter(p.hits.values())).get("model") or {})
        regions = [by_sha.get(sha) or _outcome_region(RegionResult.failed(sha, error or "no result for this region"),
                                                      cached=False) for sha in p.shas]
        return LabelOutcome(regions=regions, model=out_model, error=error, kind=kind, info=info)


class EmbeddedDispatcher(Dispatcher):
    """Runs ``worker.jobs.regions.label_regions`` in this process, one job at a time, in a background thread."""

    mode = "embedded"

    def __init__(self, settings: Settings):
        super().__init__(settings, MemoryResultCache(settings.memory_cache_entries, settings.result_ttl_s))
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="maskinv-embedded")
        self._model: dict[str, Any] | None = None
        self._model_error: str | None = None
        self._loading: Future | None = None
        self._lock = threading.Lock()
        #: job id -> future of a job still queued or running here (a repeated request attaches to it)
        self._inflight: dict[str, Future] = {}

    def warm_up(self) -> Future:
        """Load the model in the background (so the first request does not pay for it)."""
        with self._lock:
            if self._loading is None or (self._loading.done() and self._model is None):
                self._loading = self._pool.submit(self._load_model)
            return self._loading

    def _load_model(self) -> dict[str, Any]:
        from worker.jobs import regions as jobs  # torch is imported here, lazily

        with self._lock:
            if self._model is not None:
                return dict(self._model)
        try:
            info = dict(jobs.warm_up() if hasattr(jobs, "warm_up") else jobs.get_runtime().model_info())
        except Exception as exc:
            with self._lock:
                self._model_error = f"{exc.__class__.__name__}: {exc}"
            log.error("embedded model failed to load: %s", self._model_error)
            raise
        with self._lock:
            self._model, self._model_error = info, None
        return info

    def model_info(self, wait_s: float = 0.0) -> dict[str, Any] | None:
        if wait_s > 0 and self._model is None:
            try:
                self.warm_up().result(timeout=wait_s)
            except Exception:  # noqa: BLE001 - still loading, or failed (reported by /health and the jobs)
                pass
        with self._lock:
            return dict(self._model) if self._model else None

    def health(self) -> dict[str, Any]:
        with self._lock:
            return {"mode": self.mode, "model": self._model, "model_error": self._model_error,
                    "ready": self._model is not None}

    def _time_limit(self) -> AbstractContextManager[None]:
        """MASKINV_JOB_TIMEOUT for the job about to run in this (the job) thread. A thread cannot be stopped from
        outside: worker code checks the limit between its steps (``worker.protocol.deadline.check_time``: every
        inversion step; a proposal job also before each candidate source, MaskCut round, de-duplication, crop mixing,
        scoring and captions) and stops with ``worker.protocol.deadline.JobTimeout``."""

        return time_limit(self.settings.job_timeout_s, "MASKINV_JOB_TIMEOUT")

    def _job(self, payload: dict, function: str = JOB_FUNCTION) -> dict:
        from worker.jobs import regions as jobs

        if self._model is None:
            self._load_model()
        if function != JOB_FUNCTION:  # another job kind (run_jobs): no result cache
            import importlib

            if function not in allowed_functions():
                raise DispatchError(f"refusing to run job function {function!r}: not in worker.protocol.JOB_KINDS")

            module, name = function.rsplit(".", 1)
            with self._time_limit():
                return getattr(importlib.import_module(module), name)(payload)
        with self._time_limit():
            result = jobs.label_regions(payload)
        entries = entries_from_result(self.settings.redis_prefix, payload, result)
        self.cache.put_many(entries)
        return result

    def _prepare_job(self, payload: dict) -> dict:
        from worker.jobs import regions as jobs

        if self._model is None:
            self._load_model()
        return jobs.prepare_labels(payload)

    def _send_prepare_labels(self, payload: dict) -> None:
        # the one job thread runs it after the model load and before any later label job
        self._pool.submit(self._prepare_job, payload)

    def _submit(self, p: _Prepared) -> Future:
        """Run ``p``'s job, or attach to the identical job (same deterministic id) still queued or running."""
        with self._lock:
            fut = self._inflight.get(p.job_id) if p.job_id else None
            if fut is not None and not fut.done():
                return fut
            fut = self._pool.submit(self._job, p.payload, p.function)
            if p.job_id:
                self._inflight[p.job_id] = fut
        if p.job_id:  # outside the lock: the callback runs at once if the job is already done
            fut.add_done_callback(lambda f, key=p.job_id: self._forget(key, f))
        return fut

    def _forget(self, job_id: str, fut: Future) -> None:
        with self._lock:
            if self._inflight.get(job_id) is fut:
                del self._inflight[job_id]

    def run_embed(self, payload: dict, timeout_s: float) -> dict:
        """Run one ``embed_regions`` job (worker.jobs.embed) in the model's thread; DispatchError on failure."""
        def job() -> dict:
            from worker.jobs import embed as embed_jobs

            if self._model is None:
                self._load_model()
            return embed_jobs.embed_regions(payload)

        try:
            return self._pool.submit(job).result(timeout=timeout_s)
        except FutureTimeout:
            raise DispatchError(f"embed job: no result after {timeout_s:g}s") from None
        except DispatchError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported to the caller
            raise DispatchError(f"embed job failed: {exc.__class__.__name__}: {exc}") from None

    def _run(self, items: list[_Prepared], timeout_s: float) -> list[_RunResult]:
        futures = [self._submit(p) for p in items]
        deadline = time.monotonic() + timeout_s
        out = []
        for p, fut in zip(items, futures):
            t0 = time.monotonic()
            try:
                result = fut.result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                msg = (f"no result after {timeout_s:g}s (MASKINV_TIMEOUT/MASKINV_BATCH_TIMEOUT); the job keeps "
                       "running and a repeated request will be served from the result cache")
                log.warning("embedded job for image %s: %s", p.request.image_sha256[:12], msg)
                out.append(_RunResult(None, msg, {"status": "running"}, "timeout"))
                continue
            except Exception as exc:  # noqa: BLE001 - reported per job
                # worker.protocol.deadline.JobTimeout: stopped in time
                if getattr(exc, "time_limit_s", None) is not None:
                    log.warning("embedded job for image %s: %s", p.request.image_sha256[:12], exc)
                    out.append(_RunResult(None, f"job {exc}", {"status": "stopped"}, "failed"))
                    continue
                log.exception("embedded job for image %s failed", p.request.image_sha256[:12])
                out.append(_RunResult(None, f"worker error: {exc.__class__.__name__}: {exc}", {"status": "failed"},
                                      "failed"))
                continue
            out.append(_RunResult(result, None, {"status": "finished", "waited_s": time.monotonic() - t0}))
        return out


class QueueDispatcher(Dispatcher):
    """Enqueues jobs on an RQ queue served by ``python -m worker`` processes and waits for them."""

    mode = "queue"

    def __init__(self, settings: Settings, connection: Any | None = None):
        from redis import Redis
        from rq import Queue

        conn = connection if connection is not None else Redis.from_url(settings.redis_url)
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

    # -- enqueue ---------------------------------------------------------------------------------------
    def _send_prepare_labels(self, payload: dict) -> None:
        """Enqueue one ``prepare_labels`` job (deterministic id: a repeated /setup while it waits adds nothing)."""
        from rq.exceptions import DuplicateJobError

        ident = json.dumps(payload, sort_keys=True)
        job_id = (re.sub(r"[^A-Za-z0-9_-]", "_", self.settings.queue) + "-prepare-"
                  + sha256_hex(ident.encode())[:32])
        try:
            self.queue.enqueue_call(job_function("prepare_labels"), args=(payload,), job_id=job_id, unique=True,
                                    timeout=self.settings.job_timeout_s, result_ttl=60, failure_ttl=JOB_RESULT_TTL_S,
                                    ttl=max(3600, 2 * self.settings.job_timeout_s),
                                    description=f"prepare {sum(len(s) for s in payload['label_sets'])} label(s)")
        except DuplicateJobError:
            pass

    def _enqueue(self, p: _Prepared):
        from rq import Callback

        return self.queue.enqueue_call(
            p.function, args=(p.payload,), job_id=p.job_id, unique=True,
            timeout=self.settings.job_timeout_s, result_ttl=JOB_RESULT_TTL_S, failure_ttl=JOB_RESULT_TTL_S,
            ttl=max(3600, 2 * self.settings.job_timeout_s),
            on_success=Callback(STORE_CALLBACK) if p.function == JOB_FUNCTION else None,
            meta={JOB_META_KEY: {"prefix": self.settings.redis_prefix, "ttl_s": self.settings.result_ttl_s},
                  LET_META_KEY: {"prefix": self.settings.redis_prefix, "ttl_s": self.settings.let_ttl_s}},
            description=f"{p.function.rsplit('.', 1)[-1]}: {len(p.payload.get('regions') or [])} region(s) of image "
                        f"{p.request.image_sha256[:12]}")

    def run_embed(self, payload: dict, timeout_s: float) -> dict:
        """Enqueue one ``embed_regions`` job and wait for its result; DispatchError on failure or timeout."""
        from redis.exceptions import RedisError

        try:
            if not self.registry.live_workers():
                raise DispatchError(f"no MaskInversion worker is serving queue {self.settings.queue!r}")
            job = self.queue.enqueue_call(
                EMBED_FUNCTION, args=(payload,), timeout=self.settings.job_timeout_s, result_ttl=JOB_RESULT_TTL_S,
                failure_ttl=JOB_RESULT_TTL_S, ttl=max(3600, 2 * self.settings.job_timeout_s),
                meta={LET_META_KEY: {"prefix": self.settings.redis_prefix, "ttl_s": self.settings.let_ttl_s}},
                description=f"embed {len(payload.get('regions') or [])} region(s)")
            deadline = time.monotonic() + timeout_s
            poll = 0.02
            while True:
                status = self._peek(job)[0]
                if status == "finished":
                    result = job.return_value(refresh=True)
                    if isinstance(result, dict):
                        return result
                    raise DispatchError(f"embed job {job.id} finished without a result")
                if status in ("failed", "stopped", "canceled") or status is None:
                    raise DispatchError(self._failure(job, status or "vanished"))
                if time.monotonic() >= deadline:
                    raise DispatchError(f"embed job {job.id}: no result after {timeout_s:g}s (status {status})")
                time.sleep(poll)
                poll = min(poll * 1.5, 0.25)
        except RedisError as exc:
            raise self._unavailable(exc) from None

    def _submit(self, p: _Prepared):
        """Enqueue, or attach to the live job with the same id; replace a failed or orphaned one."""
        from rq.exceptions import DuplicateJobError, NoSuchJobError
        from rq.job import Job

        for _ in range(3):
            try:
                return self._enqueue(p)
            except DuplicateJobError:
                pass
            try:
                job = Job.fetch(p.job_id, connection=self.connection, serializer=self.serializer)
            except NoSuchJobError:
                continue  # expired in between: enqueue again
            status, worker = self._peek(job)
            if status == "queued" and self._orphans([job]):
                self._requeue(job)  # its worker died before starting it: back on the queue, then attach
            if status in ("queued", "deferred", "scheduled", "finished", "created") or (
                    status == "started" and (not worker or not self.registry.is_dead(worker))):
                log.info("attaching to existing job %s (%s)", job.id, status)
                return job
            log.info("replacing job %s (status %s, worker %s)", job.id, status, worker or "-")
            job.delete()
        raise DispatchError(f"could not enqueue job {p.job_id}")

    def _peek(self, job) -> tuple[str | None, str | None]:
        status, worker = self.connection.hmget(job.key, "status", "worker_name")
        def dec(b):
            return b.decode() if isinstance(b, bytes) else b

        return dec(status), dec(worker)

    # -- wait ------------------------------------------------------------------------------------------
    def _run(self, items: list[_Prepared], timeout_s: float) -> list[_RunResult]:
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
            return [_RunResult(None, msg, {"job_id": j.id, "status": "queued"}, "no_worker") for j in jobs]
        results: dict[int, _RunResult] = {}
        pending = dict(enumerate(jobs))
        resubmits: dict[int, int] = {}
        deadline = t0 + timeout_s
        poll = 0.02
        redis_error: Exception | None = None
        requeued: dict[int, int] = {}
        next_orphan_check = t0
        while pending:
            try:
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
                job = pending[k]
                if resubmits.get(k, 0) >= MAX_RESUBMITS:
                    results[k] = _RunResult(None, f"job {job.id} disappeared from Redis {MAX_RESUBMITS + 1} times "
                                                  "(expired, deleted or Redis restarted)",
                                            {"job_id": job.id, "status": None}, "failed")
                    del pending[k]
                    continue
                try:
                    pending[k] = self._submit(items[k])
                    resubmits[k] = resubmits.get(k, 0) + 1
                    log.warning("job %s disappeared from Redis (restarted?); enqueued it again", job.id)
                except (RedisError, DispatchError) as exc:
                    redis_error = exc  # try again at the next poll
            if not pending:
                break
            if time.monotonic() >= deadline:
                for k, job in pending.items():
                    results[k] = self._overdue(job, timeout_s, redis_error)
                break
            time.sleep(min(poll, max(0.0, deadline - time.monotonic())))
            poll = min(poll * 1.5, 0.25)
        out = [results[k] for k in range(len(jobs))]
        for k, n in resubmits.items():
            out[k].info["resubmitted"] = n
        for k, n in requeued.items():
            out[k].info["requeued"] = n
        return out

    # -- orphans: jobs a worker took off the queue and died with before starting them -------------------------
    @property
    def _orphan_check_s(self) -> float:
        """How often a waiting request looks for orphaned jobs: min(1 s, MASKINV_ORPHAN_GRACE / 2)."""
        return min(1.0, self.settings.orphan_grace_s / 2)

    def _orphans(self, jobs: list) -> list:
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

    def _requeue(self, job) -> bool:
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

    def _revive_orphans(self, pending: dict) -> list[int]:
        """Re-enqueue the orphaned jobs among ``pending`` (key -> job); returns the keys re-enqueued."""
        orphans = {job.id for job in self._orphans(list(pending.values()))}
        return [k for k, job in pending.items() if job.id in orphans and self._requeue(job)]

    def _overdue(self, job, timeout_s: float, redis_error: Exception | None) -> _RunResult:
        from redis.exceptions import RedisError

        if redis_error is not None:
            msg = (f"Redis at {self.settings.redis_url_redacted} is not reachable: {redis_error} "
                   f"(waited {timeout_s:g}s); "
                   "a repeated request will enqueue the job again")
            log.error(msg)
            return _RunResult(None, msg, {"job_id": job.id, "status": "unknown"}, QUEUE_UNAVAILABLE)
        try:
            status, worker = self._peek(job)
        except RedisError:
            status, worker = "unknown", None
        msg = (f"no result after {timeout_s:g}s (job {job.id} is {status or 'gone'}"
               f"{' on worker ' + worker if worker and status == 'started' else ''}); the job keeps "
               "running and a repeated request will be served from the result cache")
        log.warning(msg)
        return _RunResult(None, msg, {"job_id": job.id, "status": status or "gone"}, "timeout")

    def _poll(self, pending: dict, results: dict, t0: float) -> list[int]:
        """Move finished/failed jobs from ``pending`` to ``results``; return the keys of vanished jobs."""
        pipe = self.connection.pipeline(transaction=False)
        for job in pending.values():
            pipe.hmget(job.key, "status", "worker_name")
        states = pipe.execute()
        vanished = []
        for (k, job), (status, worker) in zip(list(pending.items()), states):
            status = status.decode() if isinstance(status, bytes) else status
            worker = worker.decode() if isinstance(worker, bytes) else worker
            info = {"job_id": job.id, "status": status, "worker": worker, "waited_s": time.monotonic() - t0}
            if status == "finished":
                result = job.return_value(refresh=True)
                if isinstance(result, dict):
                    results[k] = _RunResult(result, None, info)
                elif result is None and not self.connection.exists(job.key):
                    vanished.append(k)  # gone between the two reads
                    continue
                else:
                    results[k] = _RunResult(None, f"job {job.id} finished without a result", info, "failed")
            elif status in ("failed", "stopped", "canceled"):
                results[k] = _RunResult(None, self._failure(job, status), info, "failed")
            elif status is None:
                vanished.append(k)
                continue
            elif status == "started" and worker and self.registry.is_dead(worker):
                msg = (f"worker {worker} stopped sending heartbeats while running job {job.id} (killed or "
                       "crashed?); a repeated request will re-enqueue it")
                log.error(msg)
                results[k] = _RunResult(None, msg, info, "failed")
            else:
                continue
            del pending[k]
        return vanished

    @staticmethod
    def _failure(job, status: str) -> str:
        last = ""
        try:
            res = job.latest_result()
            if res is not None and res.exc_string:
                lines = [ln for ln in res.exc_string.strip().splitlines() if ln.strip()]
                last = lines[-1].strip() if lines else ""
        except Exception:  # noqa: BLE001 - the status alone is still a clear error
            pass
        return f"worker job {job.id} {status}" + (f": {last}" if last else "")


def make_dispatcher(settings: Settings) -> Dispatcher:
    return EmbeddedDispatcher(settings) if settings.embedded else QueueDispatcher(settings)
