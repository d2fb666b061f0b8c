"""*Retrieve predictions* on more tasks than fit in MASKINV_BATCH_TIMEOUT: answer what is ready, finish the rest
in a background run that writes its predictions into Label Studio through the API.

What Label Studio 1.23 sends (``label_studio/ml/models.py`` ``MLBackend.predict_tasks``, ``ml/api_connector.py``):
the Data Manager action ``retrieve_tasks_predictions`` runs inside the HTTP request and sends **one** ``POST
/predict`` with **every** selected task that has no prediction of the backend's current model version (no
batching; ``MLBackendPredictionJob.batch_size`` is not used by this path), with a read timeout of
``ML_TIMEOUT_PREDICT`` (default 100 s; the backend's own ``timeout`` field is not used here) and up to 2
retries of failed connections. On a timeout or an error answer it stores nothing. When the answer arrives it
stores a prediction for each task whose answer has a ``"result"``.

So when background runs are possible (LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY set, MASKINV_BACKGROUND_RUNS
on; never with the hostname and token /setup sends), a batch ``/predict``

1. labels the first MASKINV_MAX_TASKS tasks with the usual deadline (MASKINV_BATCH_TIMEOUT);
2. answers the tasks that are done (Label Studio stores them) and, for the tasks whose jobs did not finish in
   time (still queued or running) or beyond MASKINV_MAX_TASKS, an error naming the background run (Label
   Studio stores nothing for them);
3. starts a background run (backend.project_run) on those tasks: their jobs keep running (queue mode: the same
   deterministic job ids; embedded mode: the same in-process jobs), and each prediction is written into Label
   Studio as it finishes, with the model version Label Studio knows, so a repeated *Retrieve predictions*
   skips those tasks. Tasks a live run holds are answered with an error naming that run (never labelled
   twice). ``GET /runs`` shows the progress.

A run survives its backend (queue mode: the records live in Redis): while it runs, it keeps a
:class:`~backend.runs.ResumeRecord` (label config, ``params.maskinv``, model version, task ids). A backend that
starts finds the records of runs that stopped beating (their process died: a restart, a crash, an OOM kill),
takes each one (one process per record) and starts a new run on its tasks; tasks the dead run had written are
skipped as predicted. It is not resumed when the model version would now differ (the old record says why), when
LABEL_STUDIO_URL points elsewhere, or after the record's TTL (MASKINV_JOB_TIMEOUT + 1 h).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from .label_config import ProjectConfig
from .ls_api import LabelStudioAPI, LabelStudioAPIError
from .predict import predict_tasks
from .project_run import ProjectRun
from .runs import ALIVE_TTL_S, MemoryRunStore, RedisRunStore, ResumeRecord, RunStore, claim_key, new_run_id
from .service import Service

log = logging.getLogger(__name__)

#: marks the answer of a task that continues in a background run (Label Studio stores nothing for it)
DEADLINE_MARK = "before the request deadline"


class RunManager:
    """The runs of one backend process: their store (Redis in queue mode) and the Label Studio client."""

    def __init__(self, service: Service):
        self.service = service
        settings = service.settings
        if settings.embedded:
            self.store: RunStore = MemoryRunStore()
        else:
            self.store = RedisRunStore(service.dispatcher.connection, settings.redis_prefix,
                                       settings.job_timeout_s + 3600)
        self._apis: dict[tuple[str, str], LabelStudioAPI] = {}
        self._lock = threading.Lock()
        self.threads: dict[str, threading.Thread] = {}

    def api(self) -> LabelStudioAPI | None:
        """Label Studio's API when background runs are on and a URL and token are known, else None."""
        settings = self.service.settings
        if not getattr(settings, "background_runs", True):
            return None
        # only the operator's LABEL_STUDIO_URL + LABEL_STUDIO_API_KEY: never a hostname/token that /setup sent
        # (anyone who can reach /setup could otherwise make us write task data to a server of their choosing)
        url, token = settings.label_studio_url, settings.label_studio_api_key
        if not url or not token:
            return None
        with self._lock:
            api = self._apis.get((url, token))
            if api is None:
                api = self._apis[(url, token)] = LabelStudioAPI(url, token, timeout_s=settings.fetch_timeout_s)
            return api

    def runs(self) -> list[dict[str, Any]]:
        return self.store.runs()

    def start(self, cfg: ProjectConfig, tasks: list[dict], overrides: Any, version: str, project: Any,
              api: LabelStudioAPI) -> tuple[ProjectRun, list[dict], list[tuple[dict, str]]]:
        """Claim ``tasks`` for a new run and start it in a daemon thread.

        Returns the run, the tasks it took, and ``(task, holder)`` for tasks another live run holds.
        """
        settings = self.service.settings
        run_id = new_run_id("retrieve")
        self.store.beat(run_id)  # alive before its claims exist
        taken, busy = [], []
        for t in tasks:
            holder = self.store.claim(run_id, claim_key(api.url, t.get("id"), version))
            (busy.append((t, holder)) if holder else taken.append(t))
        workers = getattr(settings, "run_workers", 0) or _default_workers(self.service)
        run = ProjectRun(self.service, cfg, api, self.store, model_version=version, kind="retrieve",
                         project=project, overrides=overrides, workers=workers, run_id=run_id)
        if taken:
            self.store.keep_for_resume(run_id, ResumeRecord(
                label_studio_url=api.url, project=None if project is None else str(project), label_config=cfg.xml,
                overrides=overrides, model_version=version, task_ids=tuple(t.get("id") for t in taken)))
        thread = threading.Thread(target=self._run, args=(run, taken), name=f"maskinv-{run_id}", daemon=True)
        with self._lock:
            self.threads = {k: v for k, v in self.threads.items() if v.is_alive()}
            self.threads[run_id] = thread
        thread.start()
        return run, taken, busy

    def _run(self, run: ProjectRun, tasks: list[dict]) -> None:
        log.info("background run %s: %d task(s), model version %s", run.run_id, len(tasks), run.version)
        try:
            s = run.run(tasks, total=len(tasks))
        except Exception:  # noqa: BLE001 - reported in the log and by GET /runs (state stays as saved)
            log.exception("background run %s failed", run.run_id)
            return
        finally:  # the run ended in this process: nothing for another backend to resume
            try:
                self.store.forget_resume(run.run_id)
            except Exception:  # noqa: BLE001 - Redis trouble: the record expires by itself
                log.warning("background run %s: could not drop its resume record", run.run_id)
        log.info("background run %s finished in %.1fs: %d labelled, %d skipped, %d failed", run.run_id,
                 s.seconds, s.labelled, s.skipped, s.failed)

    # -- resuming the runs of a backend that died ------------------------------------------------------------
    def resume_interrupted(self) -> list[str]:
        """Start a new run for every run whose process died while it ran (see the module docstring); returns the
        new runs' ids. Never raises: what cannot be resumed is logged and written into the old run's record."""
        started = []
        try:
            dead = self.store.resumable()
        except Exception as exc:  # noqa: BLE001 - Redis trouble at start: nothing resumed this time
            log.warning("could not look for interrupted runs to resume: %s", exc)
            return started
        for old_id in dead:
            try:
                record = self.store.take_resume(old_id)
                if record is not None:
                    new_id = self._resume(old_id, record)
                    if new_id:
                        started.append(new_id)
            except Exception as exc:  # noqa: BLE001 - one bad record must not stop the others
                log.warning("background run %s could not be resumed: %s", old_id, exc)
                self._note(old_id, f"not resumed: {exc}")
        return started

    def _resume(self, old_id: str, record: ResumeRecord) -> str | None:
        api = self.api()
        if api is None or api.url != record.label_studio_url:
            self._note(old_id, "not resumed: background runs are off or LABEL_STUDIO_URL changed")
            return None
        cfg = self.service.config(record.label_config)
        params, labels = self.service.params(record.overrides)
        version = self.service.model_version(cfg, params, labels)
        if version != record.model_version:
            self._note(old_id, f"not resumed: the model version is now {version} (was {record.model_version})")
            return None
        tasks, missing = [], 0
        for tid in record.task_ids:  # one by one: a task deleted meanwhile is left out, not the whole run
            try:
                tasks.extend(api.get_tasks([tid]))
            except LabelStudioAPIError:
                missing += 1
        run, taken, busy = self.start(cfg, tasks, record.overrides, version, record.project, api)
        self._note(old_id, f"interrupted (its process stopped); resumed by run {run.run_id}"
                   + (f" ({missing} task(s) no longer readable)" if missing else ""))
        log.info("background run %s resumes interrupted run %s: %d task(s) (%d held by live runs, %d unreadable)",
                 run.run_id, old_id, len(taken), len(busy), missing)
        return run.run_id

    def _note(self, run_id: str, message: str) -> None:
        """Mark a dead run's record ``interrupted`` with ``message`` (kept for GET /runs)."""
        for status in self.store.load_all():
            if status.id == run_id:
                if status.state == "running":
                    status.state = "interrupted"
                status.message = message
                self.store.save(status)
                return


def resume_in_background(service: Service, delay_s: float = ALIVE_TTL_S + 1) -> threading.Thread | None:
    """At backend start in queue mode with background runs possible: resume the interrupted runs after
    ``delay_s`` (a run of the process this one replaces counts as alive until its last heartbeat expires)."""
    if service.settings.embedded or runs_for(service).api() is None:
        return None

    def later() -> None:
        time.sleep(delay_s)
        resumed = runs_for(service).resume_interrupted()
        if resumed:
            log.info("resumed %d interrupted background run(s): %s", len(resumed), ", ".join(resumed))
    thread = threading.Thread(target=later, name="maskinv-resume-runs", daemon=True)
    thread.start()
    return thread


def _default_workers(service: Service) -> int:
    if service.settings.embedded:
        return 2
    try:
        return max(2, 2 * len(service.dispatcher.registry.live_workers()))
    except Exception:  # noqa: BLE001 - Redis trouble: the run reports it per task
        return 2


_managers: dict[int, RunManager] = {}
_managers_lock = threading.Lock()


def runs_for(service: Service) -> RunManager:
    """The process's RunManager for ``service`` (created on first use)."""
    with _managers_lock:
        mgr = _managers.get(id(service))
        if mgr is None or mgr.service is not service:
            mgr = _managers[id(service)] = RunManager(service)
        return mgr


def _continues(answer: Any) -> bool:
    """Did this task's answer miss the deadline (jobs still queued/running, image not fetched in time)?"""
    if not isinstance(answer, dict):
        return False
    errors = (answer.get("maskinv") or {}).get("errors") or []
    return any(e.get("kind") == "timeout" or DEADLINE_MARK in str(e.get("error") or "")
               for e in errors if isinstance(e, dict))


def _project_id(project: Any) -> str | None:
    """Label Studio sends ``"<project id>.<created timestamp>"``."""
    if project is None:
        return None
    return str(project).split(".", 1)[0][:50]


def predict_batch(service: Service, cfg: ProjectConfig, tasks: Any, overrides: Any = None,
                  project: Any = None) -> list[Any]:
    """Batch ``/predict`` with background runs (see the module docstring); without a Label Studio token it is
    :func:`backend.predict.predict_tasks`."""
    mgr = runs_for(service)
    api = mgr.api()
    if api is None or not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        return predict_tasks(service, cfg, tasks, overrides=overrides, project=project)
    params, labels = service.params(overrides)
    version = service.model_version(cfg, params, labels)
    answers: list[Any] = [None] * len(tasks)
    now, later = [], []
    for i, t in enumerate(tasks):
        key = claim_key(api.url, t.get("id"), version)
        holder = mgr.store.holder(key)
        writer = mgr.store.written_by(key) if holder is None else None
        if holder is not None:
            answers[i] = _busy(holder)
        elif writer is not None:
            answers[i] = {"error": f"run {writer} already wrote this task's prediction of this model version "
                                   "into Label Studio", "maskinv": {"run": writer}}
        elif len(now) < service.settings.max_tasks:
            now.append(i)
        else:
            later.append(i)
    if now:
        answered = predict_tasks(service, cfg, [tasks[i] for i in now], overrides=overrides, project=project)
        for i, a in zip(now, answered):
            if _continues(a):
                later.append(i)
            else:
                answers[i] = a
    if later:
        later.sort()
        run, taken, busy = mgr.start(cfg, [tasks[i] for i in later], overrides, version, _project_id(project), api)
        busy_ids = {id(t): h for t, h in busy}
        for i in later:
            holder = busy_ids.get(id(tasks[i]))
            answers[i] = _busy(holder) if holder else {
                "error": f"not finished within MASKINV_BATCH_TIMEOUT={service.settings.batch_timeout_s:g}s: "
                         f"background run {run.run_id} labels it and writes the prediction into Label Studio "
                         "(GET /runs shows progress)",
                "maskinv": {"run": run.run_id}}
        log.info("predict: %d of %d task(s) continue in background run %s", len(taken), len(tasks), run.run_id)
    return answers


def _busy(holder: str) -> dict[str, Any]:
    return {"error": f"background run {holder} is labelling this task and will write its prediction into Label "
                     "Studio (GET /runs shows progress)", "maskinv": {"run": holder}}
