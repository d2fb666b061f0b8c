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
3. starts a background run (backend.runs.project_run) on those tasks: their jobs keep running (queue mode: the same
   deterministic job ids; embedded mode: the same in-process jobs), and each prediction is written into Label
   Studio as it finishes, with the model version /setup answers for the project (the example set it was
   scored with in its regions' ``meta.examples_state``), so a repeated *Retrieve predictions* skips those
   tasks. Tasks a live run holds are answered with an error naming that run (never labelled twice). ``GET
   /runs`` shows the progress (embedded mode: also the runs of ``maskinv-annotate``, backend.runs.file_store).

What a run writes is Label Studio's, not the request's: the run belongs to the request's project (its
``project`` field, ``"<id>.<timestamp>"``), labels each task as Label Studio has it (re-read through the API;
a task of another project is reported, never written) with the project's label config as Label Studio has it
(read when the run starts) and the environment's inversion parameters. A request without a usable ``project``,
or with ``params.maskinv`` overrides, gets no background run: its late tasks are answered with an error that
says why. Budgets: a run takes at most MASKINV_MAX_RUN_TASKS tasks (the rest are answered with an error saying
how many were left out), and at most MASKINV_MAX_RUNS runs run at once in one backend (a further request's late
tasks are answered as deferred).

A run survives its backend (queue mode: the records live in Redis): while it runs, it keeps a
:class:`~backend.runs.store.ResumeRecord` (Label Studio URL, project id, model version, task ids). A backend that
starts finds the records of runs that stopped beating (their process died: a restart, a crash, an OOM kill),
takes each one (one process per record) and starts a new run on its tasks; tasks the dead run had written are
skipped as predicted; the new run re-reads the project's label config and every task. It is not resumed when
the model version would now differ (the old record says why), when LABEL_STUDIO_URL points elsewhere, or after
the record's TTL (MASKINV_JOB_TIMEOUT + 1 h).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from backend.labelstudio.label_config import LabelConfigError, ProjectConfig
from backend.labelstudio.api import LabelStudioAPI, LabelStudioAPIError
from backend.predict.tasks import predict_tasks
from backend.runs.project_run import ProjectRun, run_version
from backend.predict.propose import split_override
from backend.runs.file_store import embedded_run_store
from backend.runs.store import ALIVE_TTL_S, RedisRunStore, ResumeRecord, RunStore, claim_key, new_run_id
from backend.service import PredictError, Service

log = logging.getLogger(__name__)

#: marks the answer of a task that continues in a background run (Label Studio stores nothing for it)
DEADLINE_MARK = "before the request deadline"


class RunRefused(Exception):
    """No background run could be started; the message says why (it is answered for each of its tasks)."""


class RunManager:
    """The runs of one backend process: their store (Redis in queue mode) and the Label Studio client."""

    def __init__(self, service: Service):
        self.service = service
        settings = service.settings
        if settings.embedded:  # SQLite under MASKINV_DATA_DIR: maskinv-annotate's runs show too
            self.store: RunStore = embedded_run_store(settings.data_dir, settings.max_run_records)
        else:
            self.store = RedisRunStore(service.queue_connection(), settings.redis_prefix,
                                       settings.job_timeout_s + 3600, settings.max_run_records)
        self._apis: dict[tuple[str, str], LabelStudioAPI] = {}
        self._lock = threading.Lock()
        self.threads: dict[str, threading.Thread] = {}
        self._starting = 0  # runs between the MASKINV_MAX_RUNS check and their thread's start

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

    def start(self, project: str, task_ids: list[Any], api: LabelStudioAPI, expect_version: str | None = None
              ) -> tuple[ProjectRun, list[Any], list[tuple[Any, str]]]:
        """Claim tasks ``task_ids`` of ``project`` for a new run and start it in a daemon thread; the project's
        label config is read from Label Studio now, each task by the run. Raises RunRefused (MASKINV_MAX_RUNS
        runs alive, the config unreadable or unusable, the version not ``expect_version``).

        Returns the run, the task ids it took, and ``(task id, holder)`` for tasks another live run holds.
        """
        with self._lock:
            self.threads = {k: v for k, v in self.threads.items() if v.is_alive()}
            if len(self.threads) + self._starting >= self.service.settings.max_runs:
                raise RunRefused(f"{len(self.threads) + self._starting} background run(s) are running in this "
                                 f"backend, the most MASKINV_MAX_RUNS={self.service.settings.max_runs} allows; "
                                 "deferred: ask again for its predictions when one has finished (GET /runs)")
            self._starting += 1
        try:
            return self._start(project, task_ids, api, expect_version)
        finally:
            with self._lock:
                self._starting -= 1

    def _start(self, project: str, task_ids: list[Any], api: LabelStudioAPI, expect_version: str | None
               ) -> tuple[ProjectRun, list[Any], list[tuple[Any, str]]]:
        cfg = self._project_config(project, api)
        version = run_version(self.service, cfg, project)
        if expect_version is not None and version != expect_version:
            raise RunRefused(f"the model version is now {version} (was {expect_version})")
        settings = self.service.settings
        workers = getattr(settings, "run_workers", 0) or _default_workers(self.service)
        run_id = new_run_id("retrieve")
        try:
            run = ProjectRun(self.service, cfg, api, self.store, model_version=version, kind="retrieve",
                             project=project, workers=workers, run_id=run_id)
        except PredictError as exc:
            raise RunRefused(f"project {project}: {exc.message}") from None
        self.store.beat(run_id)  # alive before its claims exist
        taken, busy = [], []
        for tid in task_ids:
            holder = self.store.claim(run_id, claim_key(api.url, tid, version))
            (busy.append((tid, holder)) if holder else taken.append(tid))
        if taken:
            self.store.keep_for_resume(run_id, ResumeRecord(label_studio_url=api.url, project=project,
                                                            model_version=version, task_ids=tuple(taken)))
        thread = threading.Thread(target=self._run, args=(run, taken), name=f"maskinv-{run_id}", daemon=True)
        with self._lock:
            self.threads[run_id] = thread
        thread.start()
        return run, taken, busy

    def _project_config(self, project: str, api: LabelStudioAPI) -> ProjectConfig:
        """The project's label config as Label Studio has it; RunRefused when it cannot be read or used."""
        try:
            xml = api.label_config(int(project))
        except LabelStudioAPIError as exc:
            raise RunRefused(f"project {project}'s label config could not be read: {exc}") from None
        try:
            return self.service.config(xml)
        except LabelConfigError as exc:
            raise RunRefused(f"project {project}'s label config: {exc}") from None

    def _run(self, run: ProjectRun, tasks: list[Any]) -> None:
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
        started: list[str] = []
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
        project = _project_id(record.project)
        if project is None:
            self._note(old_id, "not resumed: its record names no Label Studio project")
            return None
        try:
            run, taken, busy = self.start(project, list(record.task_ids), api, expect_version=record.model_version)
        except RunRefused as exc:
            self._note(old_id, f"not resumed: {exc}")
            return None
        self._note(old_id, f"interrupted (its process stopped); resumed by run {run.run_id}")
        log.info("background run %s resumes interrupted run %s: %d task(s) (%d held by live runs)",
                 run.run_id, old_id, len(taken), len(busy))
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
        registry = service.worker_registry()
        return max(2, 2 * len(registry.live_workers())) if registry is not None else 2
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
    """The project id of Label Studio's ``"<project id>.<created timestamp>"`` (or a plain id); None when the
    value names no project."""
    from backend.learning.learner import LearningError, project_id

    try:
        return project_id(project) if isinstance(project, (str, int)) and not isinstance(project, bool) else None
    except LearningError:
        return None


def predict_batch(service: Service, cfg: ProjectConfig, tasks: Any, overrides: Any = None,
                  project: Any = None) -> list[Any]:
    """Batch ``/predict`` with background runs (see the module docstring); without a Label Studio token it is
    :func:`backend.predict.tasks.predict_tasks`."""
    mgr = runs_for(service)
    api = mgr.api()
    if api is None or not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        return predict_tasks(service, cfg, tasks, overrides=overrides, project=project)
    params, labels = service.params(split_override(overrides)[0])
    pid = _project_id(project)
    version = service.project_version(cfg, params, labels, pid)
    answers: list[Any] = [None] * len(tasks)
    now: list[int] = []
    later: list[int] = []
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
        for i, answer in _continue(mgr, api, [(i, tasks[i].get("id")) for i in later], pid, overrides).items():
            answers[i] = answer
    return answers


def _continue(mgr: RunManager, api: LabelStudioAPI, late: list[tuple[int, Any]], project: str | None,
              overrides: Any) -> dict[int, dict[str, Any]]:
    """The answers of the ``(index, task id)`` pairs that missed the request: taken by a new background run,
    held by a live one, left out (MASKINV_MAX_RUN_TASKS), or not continued (the error says why)."""
    settings = mgr.service.settings
    why = ("not labelled before the request deadline (MASKINV_BATCH_TIMEOUT="
           f"{settings.batch_timeout_s:g}s) or beyond MASKINV_MAX_TASKS={settings.max_tasks}")
    if project is None:
        return _refused(late, f"{why}, and no background run: the request's 'project' names no Label Studio "
                              "project (Label Studio sends \"<project id>.<timestamp>\"), so the tasks' project "
                              "cannot be checked; ask for fewer tasks at once")
    if overrides:
        return _refused(late, f"{why}, and no background run: a background run labels with the project's "
                              "settings as Label Studio has them, not with the request's params.maskinv; ask for "
                              "fewer tasks at once")
    cap = settings.max_run_tasks
    left = late[cap:]
    out = _refused(left, f"left out: a background run takes at most MASKINV_MAX_RUN_TASKS={cap} tasks; "
                         f"{len(left)} task(s) of this request were not labelled (ask again for their "
                         "predictions when the run has finished)")
    try:
        run, taken, busy = mgr.start(project, [tid for _, tid in late[:cap]], api)
    except RunRefused as exc:
        out.update(_refused(late[:cap], f"{why}, and no background run: {exc}"))
        return out
    holders = dict(busy)
    for i, tid in late[:cap]:
        out[i] = _busy(holders[tid]) if tid in holders else {
            "error": f"not finished within MASKINV_BATCH_TIMEOUT={settings.batch_timeout_s:g}s: background run "
                     f"{run.run_id} labels it and writes the prediction into Label Studio (GET /runs shows "
                     "progress)", "maskinv": {"run": run.run_id}}
    log.info("predict: %d task(s) continue in background run %s (%d held by live runs, %d left out)",
             len(taken), run.run_id, len(busy), len(left))
    return out


def _refused(late: list[tuple[int, Any]], message: str) -> dict[int, dict[str, Any]]:
    return {i: {"error": message, "maskinv": {"run": None}} for i, _ in late}


def _busy(holder: str) -> dict[str, Any]:
    return {"error": f"background run {holder} is labelling this task and will write its prediction into Label "
                     "Studio (GET /runs shows progress)", "maskinv": {"run": holder}}
