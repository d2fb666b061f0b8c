"""Label many Label Studio tasks and write one prediction per task through Label Studio's API.

Used by ``maskinv-annotate`` (backend.cli.annotate: the tasks of a project or view) and by the backend itself
for the rest of a *Retrieve predictions* request that would overrun MASKINV_BATCH_TIMEOUT (backend.runs.background).

A run started with a ``project`` writes only into that project's tasks as Label Studio has them: tasks given by
id are re-read through the API (``maskinv-annotate --tasks``, background runs, resumed runs), and a task whose
``project`` is another one is reported and never written. Its label config is the project's, read from Label
Studio by the caller, and its model version the one ``/setup`` answers for the project (:func:`run_version`).

Per task, in order:

0. (a task id) re-read from Label Studio; a task of another project fails (kind ``project``), a deleted one is
   skipped;
1. skipped when it already holds a prediction of the current model version (so a re-run writes nothing and a
   killed run finishes only the rest), or when it failed before for a reason a retry cannot fix (unless
   ``retry_failed``). A task without regions (batch mode: latest annotation, else latest prediction) gets
   regions proposed (backend.predict.propose) when the run proposes — ``proposals`` (``maskinv-annotate
   --proposals``), else ``params.maskinv.proposals`` of the request it continues, else the label config's
   ``maskinvProposals``, else MASKINV_PROPOSALS (default ``auto``: on) — and no annotator submitted anything on
   it; otherwise it is skipped;
2. claimed for this run (backend.runs.store): a task a live run is labelling is deferred until that run lets it go;
3. labelled with batch mode itself (:func:`backend.predict.tasks.predict_tasks` on the one task: same region finding,
   image fetching, dispatching and prediction JSON as ``/predict``; one job per image, queue or embedded);
4. checked again right before writing (another writer may have stored this version's prediction meanwhile),
   then written: ``{"result", "score", "model_version"}``. Annotations are never written.

At most ``workers`` tasks are in flight at once (their images fetched, their jobs queued or running): the
task listing is read lazily, page by page, so memory stays flat on any project size. With ``workers`` at least
twice the number of queue workers, every worker has a job running and the next one queued with its image
already fetched.

A task whose regions failed for a transient reason (timeout, no worker, worker crash, image host error) is not
written: it is reported and labelled by the next run. A queue outage (Redis unreachable: the dispatcher's
QueueUnavailable or redis' ConnectionError/TimeoutError, a 503 from batch mode, an error entry
``queue_unavailable``) defers the task instead: it is retried with back-off (OUTAGE_FIRST_DELAY_S doubling to
OUTAGE_MAX_DELAY_S) and fails as ``queue_unavailable`` only once the outage has lasted OUTAGE_GIVE_UP_S.
A task whose regions failed for a permanent reason (bad geometry, unusable image) is reported; when some of its
regions were labelled, its prediction holds those.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from backend.labelstudio.label_config import ProjectConfig
from backend.labelstudio.api import LabelStudioAPI, LabelStudioAPIError
from backend.predict.tasks import predict_tasks, task_regions
from backend.predict.propose import decide, split_override, untouched
from backend.labelstudio.regions import collect_regions
from backend.runs.store import ALIVE_TTL_S, Heartbeat, RunStatus, RunStore, claim_key, new_run_id, redact_urls
from backend.service import PredictError, Service
from backend.trust.verified import verified_prediction

log = logging.getLogger(__name__)

#: failure kinds a later run may fix by itself (see backend.predict.tasks.STATUS for all kinds)
TRANSIENT_KINDS = frozenset({"timeout", "no_worker", "failed", "image", "api", "queue_unavailable"})
#: a queue outage: seconds before the first retry of a task (doubling per retry up to OUTAGE_MAX_DELAY_S)
OUTAGE_FIRST_DELAY_S = 0.5
OUTAGE_MAX_DELAY_S = 10.0
#: a queue outage that lasts this long (seconds, run-wide) fails the tasks it holds up instead of deferring them
OUTAGE_GIVE_UP_S = 300.0
#: tasks held by another live run that this run waits for at its end (more are counted as skipped)
MAX_DEFERRED = 10_000
#: distinct failure reasons kept for the summary
MAX_REASONS = 100
#: seconds between two saves of the run status (besides the heartbeat)
SAVE_EVERY_S = 0.5


@dataclass
class TaskOutcome:
    """What happened to one task."""

    task_id: Any
    status: str  # "labelled" | "skipped" | "failed" | "deferred"
    reason: str | None = None
    kind: str | None = None  # failure kind (backend.predict.tasks.STATUS keys, "api"), or the skip reason's key
    regions: int = 0  # regions labelled in the written prediction
    region_errors: int = 0
    proposed: int = 0  # of those, regions proposed for a task without regions (backend.predict.propose)
    regionless: bool = False  # the task had no region: its prediction holds proposals


@dataclass
class Summary:
    """Totals of a run, with failures and skips grouped by reason."""

    labelled: int = 0
    skipped: int = 0
    failed: int = 0
    regions: int = 0
    region_errors: int = 0
    proposed: int = 0  # regions proposed (in written predictions), part of ``regions``
    proposal_tasks: int = 0  # tasks without regions that got proposals (dry run: would get them)
    seconds: float = 0.0
    skipped_by: dict[str, int] = field(default_factory=dict)
    failures: OrderedDict = field(default_factory=OrderedDict)  # reason -> [count, [task ids (first 10)], kind]
    interrupted: bool = False

    def add(self, o: TaskOutcome) -> None:
        if o.regionless and o.status in ("labelled", "skipped") and o.kind in (None, "dry_run"):
            self.proposal_tasks += 1
        if o.status == "labelled":
            self.labelled += 1
            self.regions += o.regions
            self.proposed += o.proposed
            self.region_errors += o.region_errors
            if o.region_errors and o.reason:
                self._reason(f"(labelled, some regions failed) {o.reason}", o)
        elif o.status == "skipped":
            self.skipped += 1
            if o.kind == "dry_run":
                self.regions += o.regions  # regions a real run would label
            self.skipped_by[o.kind or "other"] = self.skipped_by.get(o.kind or "other", 0) + 1
        elif o.status == "failed":
            self.failed += 1
            self._reason(o.reason or "unknown error", o)

    def _reason(self, reason: str, o: TaskOutcome) -> None:
        entry = self.failures.get(reason)
        if entry is None:
            if len(self.failures) >= MAX_REASONS:
                reason = "(other reasons)"
                entry = self.failures.setdefault(reason, [0, [], o.kind])
            else:
                entry = self.failures[reason] = [0, [], o.kind]
        entry[0] += 1
        if len(entry[1]) < 10:
            entry[1].append(o.task_id)

    def to_dict(self) -> dict[str, Any]:
        return {"labelled": self.labelled, "skipped": self.skipped, "failed": self.failed, "regions": self.regions,
                "region_errors": self.region_errors, "proposed": self.proposed,
                "proposal_tasks": self.proposal_tasks, "seconds": round(self.seconds, 3),
                "skipped_by": dict(self.skipped_by), "interrupted": self.interrupted,
                "failures": [{"reason": r, "count": c, "tasks": ids, "kind": k}
                             for r, (c, ids, k) in self.failures.items()]}


def existing_versions(task: dict[str, Any]) -> set[str]:
    """Model versions of the predictions a listed task carries."""
    preds = task.get("predictions")
    out = set()
    for p in preds if isinstance(preds, list) else []:
        if isinstance(p, dict) and p.get("model_version"):
            out.add(str(p["model_version"]))
    return out


def run_version(service: Service, cfg: ProjectConfig, project: Any) -> str:
    """The model version ``/setup`` and ``/predict`` answer for ``project`` with its label config ``cfg``: the
    service's version of the environment's parameters (the same whatever the project's examples; the example set
    a prediction used is in its regions' ``meta.examples_state``)."""
    return service.project_version(cfg, service.settings.params, None, project)


def outage_errors() -> tuple[type[BaseException], ...]:
    """What a queue outage raises: Python's ConnectionError / TimeoutError (the queue dispatcher's
    QueueUnavailable is a ConnectionError) and redis' ConnectionError / TimeoutError."""
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    return ConnectionError, TimeoutError, RedisConnectionError, RedisTimeoutError


def queue_outage(exc: BaseException) -> bool:
    """Is ``exc`` a queue outage (Redis unreachable) rather than a problem of the task? Batch mode turns the
    dispatcher's DispatchError into a 503 PredictError."""
    if isinstance(exc, PredictError):
        return exc.status == 503
    return isinstance(exc, outage_errors())


def count_regions(task: dict[str, Any], cfg: ProjectConfig) -> int:
    """Regions batch mode would label on ``task`` (its latest annotation, else latest prediction)."""
    items, _ = task_regions(task)
    regions, problems = collect_regions(items, cfg) if items else ([], [])
    return len(regions) + len(problems)


class ProjectRun:
    """One run over a stream of tasks (see the module docstring).

    ``tasks`` given to :meth:`run` are task JSON (as Label Studio lists them) or task ids (re-read through
    ``api.get_task``). ``project``: when given, only tasks whose ``project`` is this one are written (the others
    fail with kind ``project``), and batch mode scores with the project's examples.
    ``on_task(outcome)`` is called for every finished task (from worker threads, one at a time).
    ``failed_before``: task ids that failed permanently in an earlier run (skipped unless ``retry_failed``).
    ``proposals``: True / False forces region proposals for tasks without regions on / off; None (default)
    leaves it to ``overrides["proposals"]``, the label config and MASKINV_PROPOSALS (backend.predict.propose.decide).
    Raises PredictError for a bad ``overrides["proposals"]`` or label-config switch.
    """

    def __init__(self, service: Service, cfg: ProjectConfig, api: LabelStudioAPI, store: RunStore, *,
                 model_version: str, kind: str = "annotate", project: Any = None, overrides: Any = None,
                 workers: int = 2, timeout_s: float | None = None, dry_run: bool = False,
                 retry_failed: bool = False, failed_before: Iterable[Any] = (),
                 on_task: Callable[[TaskOutcome], None] | None = None, run_id: str | None = None,
                 proposals: bool | None = None):
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.service = service
        self.cfg = cfg
        self.api = api
        self.store = store
        self.version = model_version
        rest, override = split_override(overrides)
        if proposals is not None:
            override = bool(proposals)
        #: whether tasks without regions get proposals in this run (decided once)
        self.proposing = decide(service.settings.proposals, cfg, override)
        # batch mode gets the decision explicitly (a dict of job options is passed on as it is)
        self.overrides = {**(rest or {}), "proposals": override if isinstance(override, dict) else self.proposing}
        self.workers = int(workers)
        self.timeout_s = float(timeout_s if timeout_s is not None else service.settings.job_timeout_s)
        self.dry_run = dry_run
        self.retry_failed = retry_failed
        self.failed_before = {str(t) for t in failed_before}
        self.on_task = on_task
        #: the only project whose tasks this run writes (None: not checked, for callers that list tasks themselves)
        self.project_id = None if project is None else str(project)
        self._outage_since: float | None = None  # monotonic time the current queue outage began
        self.status = RunStatus(id=run_id or new_run_id(kind), kind=kind,
                                project=None if project is None else str(project),
                                model_version=model_version)
        self.summary = Summary()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._slots = threading.BoundedSemaphore(self.workers)
        self._last_save = 0.0
        self._deferred: list[dict[str, Any]] = []
        self.max_in_flight = 0  # the most tasks in flight at once (tests check the bound)
        self._in_flight = 0

    @property
    def run_id(self) -> str:
        return self.status.id

    def stop(self) -> None:
        """Stop taking new tasks (Ctrl-C); tasks in flight finish."""
        self._stop.set()

    # -- the run -------------------------------------------------------------------------------------------
    def run(self, tasks: Iterable[dict[str, Any] | int], total: int | None = None) -> Summary:
        """Label ``tasks`` (task objects, or ids read from Label Studio one by one); ``total`` for the progress."""
        t0 = time.monotonic()
        with self._lock:
            self.status.total = total or 0
            self.status.queued = total or 0
        self._save(force=True)
        beat = Heartbeat(self.store, self.run_id, on_beat=lambda: self._save(force=True)).start()
        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="maskinv-run")
        try:
            seen = 0
            for task in tasks:
                if self._stop.is_set():
                    break
                seen += 1
                if total is None or seen > total:
                    with self._lock:
                        self.status.total = max(self.status.total, seen)
                        self.status.queued = self.status.total - self._settled()
                quick = self._precheck(task) if isinstance(task, dict) else None
                if quick is not None:
                    self._finish(quick)
                    continue
                self._slots.acquire()  # backpressure: at most `workers` tasks in flight
                if self._stop.is_set():
                    self._slots.release()
                    break
                self._start_one()
                pool.submit(self._work, task)
            pool.shutdown(wait=True)
            if not self._stop.is_set():
                self._retry_deferred()
        except KeyboardInterrupt:
            self._stop.set()
            self.summary.interrupted = True
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        finally:
            self.summary.seconds = time.monotonic() - t0
            with self._lock:
                interrupted = self._stop.is_set() or self.summary.interrupted
                self.summary.interrupted = interrupted
                self.status.state = "interrupted" if interrupted else "done"
                self.status.finished_at = time.time()
                self.status.queued = max(0, self.status.total - self._settled())
            self._save(force=True)
            beat.stop()
        return self.summary

    def _settled(self) -> int:
        s = self.status
        return s.done + s.skipped + s.failed + s.running

    def _start_one(self) -> None:
        with self._lock:
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
            self.status.running += 1
            self.status.queued = max(0, self.status.total - self._settled())

    def _work(self, item: dict[str, Any] | Any) -> None:
        """One task (JSON, or an id to re-read) from start to outcome, in a pool thread."""
        task: Any = item
        try:
            task = item if isinstance(item, dict) else self._reread(item)
            outcome = task if isinstance(task, TaskOutcome) else (
                self._precheck(task) if not isinstance(item, dict) else None) or self._label_deferring(task)
        except LabelStudioAPIError as exc:
            outcome = TaskOutcome(_tid(item), "failed", str(exc), "api")
        except Exception as exc:  # noqa: BLE001 - one task's trouble never ends the run
            log.exception("task %s failed", _tid(item))
            outcome = TaskOutcome(_tid(item), "failed", f"{exc.__class__.__name__}: {exc}", "failed")
        finally:
            with self._lock:
                self._in_flight -= 1
                self.status.running -= 1
            self._slots.release()
        if outcome.status == "deferred":
            with self._lock:
                if len(self._deferred) < MAX_DEFERRED:
                    self._deferred.append(task)
                    return
            outcome = TaskOutcome(outcome.task_id, "skipped", outcome.reason, "other_run")
        self._finish(outcome)

    # -- one task ------------------------------------------------------------------------------------------
    def _reread(self, task_id: Any) -> dict[str, Any] | TaskOutcome:
        """Task ``task_id`` as Label Studio has it now, or the outcome when it cannot be read."""
        try:
            return self.api.get_task(task_id)
        except LabelStudioAPIError as exc:
            if exc.status == 404:
                return TaskOutcome(task_id, "skipped", "no longer in Label Studio (deleted)", "gone")
            raise

    def _precheck(self, task: dict[str, Any]) -> TaskOutcome | None:
        """A decision that needs no work: another project's, already predicted, failed before, no regions
        (None: label it)."""
        tid = task.get("id")
        if self.project_id is not None and str(task.get("project")) != self.project_id:
            return TaskOutcome(tid, "failed", f"task {tid} belongs to project {task.get('project')}, not to project "
                                              f"{self.project_id}: not written", "project")
        if self.version in existing_versions(task):
            return TaskOutcome(tid, "skipped", "already has a prediction of this model version", "predicted")
        if not self.retry_failed and str(tid) in self.failed_before:
            return TaskOutcome(tid, "skipped", "failed in an earlier run (use --retry-failed)", "failed_before")
        n = count_regions(task, self.cfg)
        if n == 0:
            return self._regionless(task)
        if self.dry_run:
            return TaskOutcome(tid, "skipped", f"dry run: {n} region(s) would be labelled", "dry_run", regions=n)
        return None

    def _regionless(self, task: dict[str, Any]) -> TaskOutcome | None:
        """A task without regions: None (propose and label them) when the run proposes and no annotator
        submitted anything on the task, else a skip."""
        tid = task.get("id")
        if not self.proposing:
            return TaskOutcome(tid, "skipped", "no regions to label (proposals are off)", "no_regions")
        if task_regions(task)[1] != "none":  # results, but none is a region of this config: not proposed for
            return TaskOutcome(tid, "skipped", "no regions to label", "no_regions")
        if not untouched(task):  # batch mode proposes only for tasks nobody submitted anything on
            return TaskOutcome(tid, "skipped", "no regions to label (an annotator submitted an empty annotation)",
                               "no_regions")
        if self.dry_run:
            return TaskOutcome(tid, "skipped", "dry run: regions would be proposed", "dry_run", regionless=True)
        return None

    def _label_deferring(self, task: dict[str, Any], recheck: bool = False) -> TaskOutcome:
        """:meth:`_label`, retried with back-off while the queue is unavailable (bounded by OUTAGE_GIVE_UP_S)."""
        attempt = 0
        while True:
            try:
                outcome = self._label(task, recheck)
            except outage_errors() as exc:
                outcome = TaskOutcome(task.get("id"), "failed", f"the queue is unavailable: {exc}",
                                      "queue_unavailable")
            if outcome.kind != "queue_unavailable":
                with self._lock:
                    self._outage_since = None
                return outcome
            if not self._wait_out_outage(attempt, outcome.reason or ""):
                outcome.reason = f"{outcome.reason} (for {OUTAGE_GIVE_UP_S:g}s; not written, retry later)"
                return outcome
            attempt += 1

    def _wait_out_outage(self, attempt: int, reason: str) -> bool:
        """Sleep before retry ``attempt + 1``; False when the outage has lasted OUTAGE_GIVE_UP_S or the run stops."""
        now = time.monotonic()
        with self._lock:
            self._outage_since = self._outage_since if self._outage_since is not None else now
            lasted = now - self._outage_since
            self.status.message = f"queue unavailable for {lasted:.0f}s, tasks deferred: {redact_urls(reason)[:300]}"
        if lasted >= OUTAGE_GIVE_UP_S:
            return False
        if attempt == 0:
            log.warning("run %s: queue unavailable (%s); deferring its tasks", self.run_id, reason[:300])
        delay = min(OUTAGE_MAX_DELAY_S, OUTAGE_FIRST_DELAY_S * 2 ** attempt, OUTAGE_GIVE_UP_S - lasted)
        return not self._stop.wait(max(0.0, delay))

    def _label(self, task: dict[str, Any], recheck: bool = False) -> TaskOutcome:
        tid = task.get("id")
        key = claim_key(self.api.url, tid, self.version)
        holder = self.store.claim(self.run_id, key)
        if holder is not None:
            return TaskOutcome(tid, "deferred", f"being labelled by run {holder}", "other_run")
        try:
            if recheck and self._has_version(tid):
                return TaskOutcome(tid, "skipped", "already has a prediction of this model version", "predicted")
            try:
                answer = predict_tasks(self.service, self.cfg, [task], overrides=self.overrides,
                                       timeout_s=self.timeout_s, project=self.project_id)[0]
            except PredictError as exc:
                kind = "queue_unavailable" if queue_outage(exc) else "limit" if exc.status == 413 else "failed"
                return TaskOutcome(tid, "failed", exc.message, kind)
            outcome = classify(tid, answer)
            if outcome.status == "skipped" and self.proposing and task_regions(task)[1] == "none":
                return TaskOutcome(tid, "skipped", "no region proposed above the score threshold "
                                                   "(MASKINV_PROPOSAL_MIN_SCORE)", "no_proposals", regionless=True)
            if outcome.status != "labelled":
                return outcome
            # check again right before writing: another writer (a Retrieve predictions, another run) may have
            # stored this version's prediction while we labelled
            if self._has_version(tid):
                return TaskOutcome(tid, "skipped", "a prediction of this model version was written meanwhile",
                                   "predicted")
            self.service.stamp_examples([answer], self.service.examples_state(self.project_id))
            try:
                self.api.create_prediction(tid, answer["result"], answer.get("score"), self.version)
                verified = verified_prediction({**answer, "model_version": self.version})
                if verified is not None:  # as /predict does for a batch: the verified regions on their own
                    self.api.create_prediction(tid, verified["result"], verified["score"],
                                               verified["model_version"])
            except LabelStudioAPIError as exc:
                return TaskOutcome(tid, "failed", str(exc), "api")
            try:
                self.store.mark_written(self.run_id, key)
            except Exception as exc:  # noqa: BLE001 - the prediction is written; only the race guard is lost
                log.warning("run %s: could not mark task %s written: %s", self.run_id, tid, exc)
            return outcome
        finally:
            try:
                self.store.release(self.run_id, key)
            except outage_errors() as exc:  # the claim expires with its run's liveness
                log.warning("run %s: could not release the claim of task %s: %s", self.run_id, tid, exc)

    def _has_version(self, tid: Any) -> bool:
        return self.version in self.api.prediction_versions(tid)

    def _retry_deferred(self) -> None:
        """Tasks another live run held: wait for it to let them go (it writes them, or it died), then label
        what is still unpredicted."""
        with self._lock:
            todo, self._deferred = self._deferred, []
        deadline = time.monotonic() + self.timeout_s + 2 * ALIVE_TTL_S
        while todo and not self._stop.is_set():
            left = []
            for task in todo:
                try:
                    holder = self.store.holder(claim_key(self.api.url, task.get("id"), self.version))
                except outage_errors():
                    holder = "(unknown: the queue is unavailable)"
                if holder is not None and time.monotonic() < deadline:
                    left.append(task)
                    continue
                self._start_one()
                try:
                    outcome = self._label_deferring(task, recheck=True) if holder is None else TaskOutcome(
                        task.get("id"), "skipped", f"still being labelled by run {holder}", "other_run")
                except LabelStudioAPIError as exc:
                    outcome = TaskOutcome(task.get("id"), "failed", str(exc), "api")
                except Exception as exc:  # noqa: BLE001
                    outcome = TaskOutcome(task.get("id"), "failed", f"{exc.__class__.__name__}: {exc}", "failed")
                finally:
                    with self._lock:
                        self._in_flight -= 1
                        self.status.running -= 1
                if outcome.status == "deferred":
                    left.append(task)
                    continue
                self._finish(outcome)
            todo = left
            if todo:
                time.sleep(1.0)

    # -- bookkeeping ---------------------------------------------------------------------------------------
    def _finish(self, o: TaskOutcome) -> None:
        if o.reason:
            o.reason = redact_urls(o.reason)
        with self._lock:
            self.summary.add(o)
            s = self.status
            if o.status == "labelled":
                s.done += 1
                s.regions += o.regions
                s.proposed += o.proposed
            elif o.status == "skipped":
                s.skipped += 1
            else:
                s.failed += 1
                s.failures.append({"task": o.task_id, "reason": (o.reason or "")[:500], "kind": o.kind})
                del s.failures[:-50]
            s.total = max(s.total, self._settled())
            s.queued = max(0, s.total - self._settled())
            callback = self.on_task
            if callback is not None:
                callback(o)
        self._save()

    def _save(self, force: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            if not force and now - self._last_save < SAVE_EVERY_S:
                return
            self._last_save = now
            self.status.updated_at = time.time()
            snapshot = RunStatus.from_dict(self.status.to_dict())
        try:
            self.store.save(snapshot)
        except Exception as exc:  # noqa: BLE001 - progress records must never stop the run
            log.warning("could not save the status of run %s: %s", self.run_id, exc)


def classify(task_id: Any, answer: Any) -> TaskOutcome:
    """Turn batch mode's answer for one task into an outcome (see the module docstring)."""
    if answer == [] or answer is None:
        return TaskOutcome(task_id, "skipped", "no regions to label", "no_regions")
    diag = answer.get("maskinv") if isinstance(answer, dict) else None
    errors = (diag or {}).get("errors") or []
    kinds = {"queue_unavailable" if _outage_entry(e) else e.get("kind") for e in errors if isinstance(e, dict)}
    transient = sorted(k for k in kinds if k in TRANSIENT_KINDS)
    reason = _reason(errors) if errors else None
    if isinstance(answer, dict) and "result" in answer:
        if transient:
            return TaskOutcome(task_id, "failed", f"not written, retry later: {reason}", transient[0])
        proposed = int((diag or {}).get("proposed") or 0) if (diag or {}).get("source") == "proposals" else 0
        labelled = int((diag or {}).get("labelled") or 0) + proposed
        return TaskOutcome(task_id, "labelled", reason, None, regions=labelled, region_errors=len(errors),
                           proposed=proposed, regionless=bool(proposed))
    message = str(answer.get("error") if isinstance(answer, dict) else answer)
    named = sorted(str(k) for k in kinds if k is not None)
    kind = transient[0] if transient else (named[0] if named else "failed")
    return TaskOutcome(task_id, "failed", message, kind)


#: how the queue dispatcher words a Redis outage in a job's error ("Redis at <url> is not reachable: ...")
_REDIS_UNREACHABLE = re.compile(r"\bRedis at \S+ is not reachable\b")


def _outage_entry(error: dict[str, Any]) -> bool:
    """Is this error entry of batch mode's answer a queue outage?"""
    return "queue_unavailable" in (error.get("kind"), error.get("code")) or bool(
        _REDIS_UNREACHABLE.search(str(error.get("error") or "")))


def _tid(item: Any) -> Any:
    return item.get("id") if isinstance(item, dict) else item


def _reason(errors: list[dict[str, Any]]) -> str:
    first = errors[0]
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    region = f"region {first.get('region')}: " if first.get("region") else ""
    return f"{region}{first.get('error')}{more}"
