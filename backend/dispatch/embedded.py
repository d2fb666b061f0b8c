"""Embedded mode: the worker's job functions run in this process, one at a time, in one background thread.

A job runs by its allow-listed name only (worker.protocol.JOB_KINDS, the dotted names RQ runs), resolved to its
function as RQ resolves it (:func:`call_job`), so this module imports no worker module: torch and the model load
in the job thread, at the first job or at :meth:`EmbeddedDispatcher.warm_up`. Label results go to an in-process
result cache, so a request that timed out is served from it later.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import AbstractContextManager
from functools import partial
from typing import Any

from worker.protocol import MemoryResultCache, allowed_functions, job_function
from worker.protocol.deadline import time_limit

from backend.dispatch.base import LABEL_FUNCTION, Dispatcher, DispatchError, PreparedJob, RunResult
from backend.dispatch.result_cache import store
from backend.settings import Settings

log = logging.getLogger(__name__)


def call_job(function: str, *args: Any) -> Any:
    """Run the allow-listed job function ``function`` (a worker.protocol.JOB_KINDS dotted name) with ``args``,
    imported the way RQ imports it (``rq.utils.import_attribute``); DispatchError for any other name."""
    from rq.utils import import_attribute

    if function not in allowed_functions():
        raise DispatchError(f"refusing to run job function {function!r}: not in worker.protocol.JOB_KINDS")
    return import_attribute(function)(*args)


#: what a person can do when the model does not load (said by /health, /setup and /predict)
OFFLINE_HINT = ("Without network access, set MASKINV_PRETRAINED to a local checkpoint file, or run the offline demo "
                "with the shipped model: MASKINV_MODEL=maskinv-scene-tiny "
                "MASKINV_PRETRAINED=assets/tiny_scene_clip/maskinv-scene-tiny.safetensors MASKINV_SIZE=112 "
                "MASKINV_CAPTIONER=assets/tiny_clipcap bash scripts/run.sh (README, Offline demo).")


def model_load_error(exc: BaseException) -> str:
    """The message for a model that failed to load: the error, the variables that choose the model, the hint."""
    return (f"the model (MASKINV_MODEL / MASKINV_PRETRAINED) could not be loaded: {exc.__class__.__name__}: {exc}. "
            f"{OFFLINE_HINT}")


class EmbeddedDispatcher(Dispatcher):
    """Runs the worker's job functions in this process, one job at a time, in a background thread."""

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

    # -- the model -------------------------------------------------------------------------------------
    def warm_up(self) -> Future:
        """Load the model in the background (so the first request does not pay for it)."""
        with self._lock:
            if self._loading is None or (self._loading.done() and self._model is None):
                self._loading = self._pool.submit(self._load_model)
            return self._loading

    def _load_model(self) -> dict[str, Any]:
        """Run the ``warm_up`` job (loads torch and the model, once); returns the model's identity."""
        with self._lock:
            if self._model is not None:
                return dict(self._model)
        try:
            info = dict(call_job(job_function("warm_up")))
        except Exception as exc:  # noqa: BLE001 - any load failure is said to the user (health, setup, predict)
            with self._lock:
                self._model_error = model_load_error(exc)
            log.error("embedded model failed to load: %s", self._model_error)
            raise DispatchError(self._model_error) from None
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

    # -- jobs (all in the one job thread) --------------------------------------------------------------
    def _time_limit(self) -> AbstractContextManager[None]:
        """MASKINV_JOB_TIMEOUT for the job about to run in this (the job) thread. A thread cannot be stopped from
        outside: worker code checks the limit between its steps (``worker.protocol.deadline.check_time``: every
        inversion step; a proposal job also before each candidate source, MaskCut round, de-duplication, crop mixing,
        scoring and captions) and stops with ``worker.protocol.deadline.JobTimeout``."""
        return time_limit(self.settings.job_timeout_s, "MASKINV_JOB_TIMEOUT")

    def _call(self, function: str, payload: dict, limited: bool = True) -> Any:
        """Run job ``function`` on ``payload`` after the model has loaded, within MASKINV_JOB_TIMEOUT if
        ``limited``; a model that failed to load answers its error at once (a restart loads it again)."""
        if self._model is None:
            if self._model_error is not None:
                raise DispatchError(self._model_error)
            self._load_model()
        if not limited:
            return call_job(function, payload)
        with self._time_limit():
            return call_job(function, payload)

    def _job(self, payload: dict, function: str = LABEL_FUNCTION) -> Any:
        """Run one job; a label job's results are also stored in the result cache."""
        result = self._call(function, payload)
        if function == LABEL_FUNCTION:
            store(self.cache, self.settings.redis_prefix, payload, result)
        return result

    def _send_prepare_labels(self, payload: dict) -> None:
        # the one job thread runs it after the model load and before any later label job
        self._pool.submit(self._call, job_function("prepare_labels"), payload, False)

    def run_embed(self, payload: dict, timeout_s: float) -> dict:
        """Run one ``embed_regions`` job in the model's thread; DispatchError on failure."""
        try:
            return self._pool.submit(self._call, job_function("embed_regions"), payload, False).result(
                timeout=timeout_s)
        except FutureTimeout:
            raise DispatchError(f"embed job: no result after {timeout_s:g}s") from None
        except DispatchError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported to the caller
            raise DispatchError(f"embed job failed: {exc.__class__.__name__}: {exc}") from None

    def _submit(self, p: PreparedJob) -> Future:
        """Run ``p``'s job, or attach to the identical job (same deterministic id) still queued or running."""
        key, payload = p.job_id, p.payload or {}
        with self._lock:
            fut = self._inflight.get(key) if key else None
            if fut is not None and not fut.done():
                return fut
            fut = self._pool.submit(self._job, payload, p.function)
            if key:
                self._inflight[key] = fut
        if key:  # outside the lock: the callback runs at once if the job is already done
            fut.add_done_callback(partial(self._forget, key))
        return fut

    def _forget(self, job_id: str, fut: Future) -> None:
        with self._lock:
            if self._inflight.get(job_id) is fut:
                del self._inflight[job_id]

    def _run(self, items: list[PreparedJob], timeout_s: float) -> list[RunResult]:
        futures = [self._submit(p) for p in items]
        deadline = time.monotonic() + timeout_s
        return [self._wait(p, fut, deadline, timeout_s) for p, fut in zip(items, futures)]

    def _wait(self, p: PreparedJob, fut: Future, deadline: float, timeout_s: float) -> RunResult:
        """``p``'s job result when it ends before ``deadline``, else why not."""
        t0 = time.monotonic()
        image = p.request.image_sha256[:12]
        try:
            result = fut.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            msg = (f"no result after {timeout_s:g}s (MASKINV_TIMEOUT/MASKINV_BATCH_TIMEOUT); the job keeps "
                   "running and a repeated request will be served from the result cache")
            log.warning("embedded job for image %s: %s", image, msg)
            return RunResult(None, msg, {"status": "running"}, "timeout")
        except Exception as exc:  # noqa: BLE001 - reported per job
            if getattr(exc, "time_limit_s", None) is not None:  # worker.protocol.deadline.JobTimeout: stopped in time
                log.warning("embedded job for image %s: %s", image, exc)
                return RunResult(None, f"job {exc}", {"status": "stopped"}, "failed")
            log.exception("embedded job for image %s failed", image)
            return RunResult(None, f"worker error: {exc.__class__.__name__}: {exc}", {"status": "failed"}, "failed")
        return RunResult.finished(result, {"status": "finished", "waited_s": time.monotonic() - t0})
