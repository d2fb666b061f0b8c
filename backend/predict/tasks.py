"""/predict: Label Studio tasks (+ interactive context) -> one prediction per task.

* Interactive mode: ``context.result`` holds the regions the annotator just drew on the one task; those
  regions are returned labelled (same ids, geometry and types).
* Batch mode (no context): the regions of each task's latest annotation (not cancelled) are labelled, else
  those of its latest prediction (imported pre-annotations). Annotations are never modified: the backend
  only answers with predictions.

All images of a request are dispatched together (one job per image and label set), so a batch runs in
parallel on several workers. Per task the answer is

* a prediction ``{"result": [...], "score": lowest region score, "model_version", "maskinv": diagnostics}``;
* ``[]`` when the task has no region to label;
* ``{"error": str, "maskinv": diagnostics}`` (no ``"result"``: Label Studio stores nothing and will ask
  again) when no region of the task could be labelled.

Interactive requests whose regions all fail raise :class:`PredictError` with an HTTP status (413 over a limit,
422 bad region or refused/unusable image, 502 image host or worker failure, 503 no worker / no Redis, 504
timeout). Redis that cannot be reached when the jobs are sent raises
``backend.dispatch.QueueUnavailable`` (a
``ConnectionError``; the app answers 503); Redis lost while waiting gives the task's error entries
``"kind": "failed", "code": "queue_unavailable"`` (interactive: 503).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from backend.dispatch import QUEUE_UNAVAILABLE, DispatchError, LabelRequest, QueueUnavailable
from backend.images.fetch import ImageError, image_size
from backend.labelstudio.label_config import ProjectConfig
from backend.labelstudio.predictions import region_results, task_prediction
from backend.predict.propose import decide, propose_answers, split_override, untouched
from backend.labelstudio.regions import Region, RegionError, collect_regions, region_mask
from backend.service import PredictError, Service

log = logging.getLogger(__name__)

#: HTTP status for an interactive request that produced no labelled region, by the worst failure kind
#: ("image": the image host failed; "source": the task names an image that is refused or unusable)
STATUS = {"timeout": 504, "queue_unavailable": 503, "no_worker": 503, "failed": 502, "image": 502, "limit": 413,
          "source": 422, "rejected": 422, "region": 422}
SEVERITY = ("timeout", "queue_unavailable", "no_worker", "failed", "image", "limit", "source", "rejected", "region")
#: images of one request fetched at the same time
FETCH_THREADS = 4


@dataclass
class _TaskPlan:
    task_id: Any
    source: str
    errors: list[dict[str, Any]] = field(default_factory=list)
    groups: list[tuple[int, list[Region]]] = field(default_factory=list)  # (request index, regions)
    n_regions: int = 0

    def error(self, region: str | None, message: str, kind: str) -> None:
        """Record one error entry ``{"region", "error", "kind"}``; Redis lost while waiting is kind ``failed`` (what
        older readers retry) with ``"code": "queue_unavailable"``."""
        if kind == QUEUE_UNAVAILABLE:
            self.errors.append({"region": region, "error": message, "kind": "failed", "code": QUEUE_UNAVAILABLE})
            return
        self.errors.append({"region": region, "error": message, "kind": kind})


def task_regions(task: dict[str, Any]) -> tuple[list[dict], str]:
    """Result items to label in batch mode and where they came from."""
    def latest(items: list[dict]) -> dict:
        return max(items, key=lambda a: (str(a.get("updated_at") or a.get("created_at") or ""),
                                         a.get("id") if isinstance(a.get("id"), int) else 0))

    def items(key: str) -> list:
        value = task.get(key)
        return value if isinstance(value, list) else []

    anns = [a for a in items("annotations") if isinstance(a, dict) and not a.get("was_cancelled")
            and isinstance(a.get("result"), list) and a["result"]]
    if anns:
        ann = latest(anns)
        return ann["result"], f"annotation {ann.get('id')}"
    preds = [p for p in items("predictions") if isinstance(p, dict) and isinstance(p.get("result"), list)
             and p["result"]]
    if preds:
        pred = latest(preds)
        return pred["result"], f"prediction {pred.get('id')}"
    return [], "none"


def predict_tasks(service: Service, cfg: ProjectConfig, tasks: Any, context: Any = None,
                  overrides: Any = None, timeout_s: float | None = None, project: Any = None) -> list[Any]:
    """One answer per task (see module docstring).

    The whole request (image downloads and the wait for the jobs) is bounded by MASKINV_TIMEOUT (interactive)
    or MASKINV_BATCH_TIMEOUT (batch), or by ``timeout_s`` when given (project runs: backend.runs.project_run).
    """
    t0 = time.perf_counter()
    settings = service.settings
    if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        raise PredictError(400, "'tasks' must be a list of task objects")
    if len(tasks) > settings.max_tasks:
        raise PredictError(413, f"the request has {len(tasks)} tasks, more than MASKINV_MAX_TASKS="
                                f"{settings.max_tasks}; send them in smaller batches")
    overrides, proposal_override = split_override(overrides)
    params, label_override = service.params(overrides)
    interactive = isinstance(context, dict) and isinstance(context.get("result"), list) and bool(context["result"])
    if interactive and len(tasks) != 1:
        raise PredictError(400, f"an interactive context applies to exactly one task, got {len(tasks)}")
    timeout = settings.timeout_s if interactive else settings.batch_timeout_s
    if timeout_s is not None:
        timeout = timeout_s
    deadline = time.monotonic() + timeout

    plans: list[_TaskPlan] = []
    fetches: list[_Fetch] = []
    propose_for: list[int] = []  # tasks that get proposed regions (backend.predict.propose)
    for task in tasks:
        items, source = (context["result"], "context") if interactive else task_regions(task)
        plan = _TaskPlan(task.get("id"), source)
        plans.append(plan)
        if (not interactive and source == "none" and untouched(task)
                and decide(settings.proposals, cfg, proposal_override)):
            propose_for.append(len(plans) - 1)
            continue
        regions, problems = collect_regions(items, cfg)
        plan.n_regions = len(regions) + len(problems)
        if plan.n_regions > settings.max_regions:
            plan.error(None, f"the task has {plan.n_regions} regions, more than MASKINV_MAX_REGIONS="
                             f"{settings.max_regions}", "limit")
            continue
        for p in problems:
            plan.error(p.id, p.error, "region")
        groups: dict[tuple[str, tuple[str, ...]], list[Region]] = defaultdict(list)
        for r in regions:
            vocab = tuple(label_override or r.control.labels)
            if not vocab:
                plan.error(r.id, f"control {r.control.name!r} has no labels (add <Label> values or set "
                                 "MASKINV_LABELS)", "region")
                continue
            groups[(r.control.to_name, vocab)].append(r)
        data = task.get("data") if isinstance(task.get("data"), dict) else {}
        for (image_name, vocab), regs in groups.items():
            fetches.append(_Fetch(plan, data.get(cfg.images[image_name].data_key), task.get("id"), vocab, regs))

    _fetch_all(service, fetches, deadline)
    requests: list[LabelRequest] = []
    mask_pixels = 0  # rasterised mask pixels held by this request (bounded by MASKINV_MAX_MASK_MPIX)
    for f in fetches:
        if f.error is not None:
            log.warning("task %s: %s", f.plan.task_id, f.error)
            for r in f.regions:
                f.plan.error(r.id, f.error, "image" if f.upstream else "source")
            continue
        masks, ok = [], []
        for r in f.regions:
            if mask_pixels >= settings.max_mask_pixels:
                f.plan.error(r.id, f"the request's masks exceed MASKINV_MAX_MASK_MPIX="
                                   f"{settings.max_mask_pixels // (1024 * 1024)}; send fewer tasks per request",
                             "limit")
                continue
            try:
                masks.append(region_mask(r, f.size, settings.mask_max_side, settings.max_image_pixels))
                ok.append(r)
                mask_pixels += masks[-1].size
            except RegionError as exc:
                f.plan.error(r.id, str(exc), "region")
            except Exception as exc:  # noqa: BLE001 - any parser failure is this region's error only
                log.exception("region %s of task %s", r.id, f.plan.task_id)
                f.plan.error(r.id, f"malformed {r.kind} region: {exc.__class__.__name__}: {str(exc)[:200]}", "region")
        if ok:
            requests.append(LabelRequest(f.blob, masks, list(f.vocab), params))
            f.plan.groups.append((len(requests) - 1, ok))

    used_examples = attach_prototypes(service, project, tasks, requests)
    try:
        outcomes = (service.dispatcher.label(requests, max(0.0, deadline - time.monotonic()))
                    if requests else [])
    except QueueUnavailable:  # a ConnectionError: HTTP 503 in the app; a project run waits for Redis and retries
        raise
    except DispatchError as exc:
        log.error("dispatch failed: %s", exc)
        raise PredictError(503, str(exc)) from None
    # the same string /setup answers for this config (Label Studio skips tasks that have this version's prediction)
    version_base = service.model_version(cfg, params, label_override)
    version = version_base + used_examples

    answers: list[Any] = []
    for plan in plans:
        results, scores, jobs = [], [], []
        model: dict[str, Any] = {}
        for idx, regs in plan.groups:
            outcome = outcomes[idx]
            model = model or outcome.model
            jobs.append(outcome.info)
            for r, res in zip(regs, outcome.regions):
                if res.get("error") or not res.get("labels"):
                    plan.error(r.id, res.get("error") or "no label scores for this region",
                               outcome.kind or "rejected")
                    continue
                results.extend(region_results(r, res, cfg))
                scores.append(float(res["labels"][0]["score"]))
        diagnostics = {"source": plan.source, "regions": plan.n_regions, "labelled": len(scores),
                       "errors": plan.errors, "jobs": jobs, "model": model}
        for e in plan.errors:
            log.warning("task %s region %s: %s", plan.task_id, e["region"], e["error"])
        if results:
            answers.append(task_prediction(results, scores, version, diagnostics))
        elif not plan.errors:
            answers.append([])
        else:
            answers.append({"error": _summary(plan.errors), "maskinv": diagnostics})
    if propose_for:
        proposed = propose_answers(service, cfg, [tasks[i] for i in propose_for], params, label_override,
                                   proposal_override, deadline, version_base, project)
        for i, answer in zip(propose_for, proposed):
            answers[i] = answer
    log.info("predict: %d task(s), %d job(s), %s mode, %.2fs", len(tasks), len(requests),
             "interactive" if interactive else "batch", time.perf_counter() - t0)

    if interactive and "result" not in answers[0] and plans[0].errors:
        kinds = {e.get("code") or e["kind"] for e in plans[0].errors}
        worst = next(k for k in SEVERITY if k in kinds)
        raise PredictError(STATUS[worst], _summary(plans[0].errors), plans[0].errors)
    return answers


@dataclass
class _Fetch:
    """One image to fetch for a group of regions of a task (filled in by :func:`_fetch_all`)."""

    plan: _TaskPlan
    url: Any
    task_id: Any
    vocab: tuple[str, ...]
    regions: list[Region]
    blob: bytes = b""
    size: tuple[int, int] | None = None
    error: str | None = None
    upstream: bool = False  # the error is the image host's fault (HTTP 502), not the request's (422)


def _fetch_all(service: Service, fetches: list[_Fetch], deadline: float) -> None:
    """Fetch and size-check every image, a few at a time, all by ``deadline`` (``time.monotonic()``)."""
    if not fetches:
        return
    hostname, fallback_token = service.setup_fallbacks()
    max_pixels = service.settings.max_image_pixels

    def one(f: _Fetch) -> None:
        try:
            blob = service.fetcher.fetch(f.url, f.task_id, hostname, fallback_token, deadline=deadline)
            w, h = image_size(blob)
            if w * h > max_pixels:
                raise ImageError(f"image is {w}x{h} pixels, more than the limit of {max_pixels} "
                                 "(MASKINV_MAX_IMAGE_PIXELS)")
            f.blob, f.size = blob, (w, h)
        except ImageError as exc:
            f.error, f.upstream = str(exc), exc.upstream
        except Exception as exc:  # noqa: BLE001 - reported for this task only, never as a 500
            log.exception("fetching %s failed", str(f.url)[:200])
            f.error, f.upstream = f"cannot fetch image: {exc.__class__.__name__}: {exc}", True

    if len(fetches) == 1:
        one(fetches[0])
        return
    pool = ThreadPoolExecutor(max_workers=min(FETCH_THREADS, len(fetches)), thread_name_prefix="maskinv-fetch")
    futures = {pool.submit(one, f): f for f in fetches}
    done, _ = wait(futures, timeout=max(0.0, deadline - time.monotonic()) + 1.0)
    pool.shutdown(wait=False, cancel_futures=True)
    for fut, f in futures.items():
        if fut not in done:
            f.error = "the image was not fetched before the request deadline (MASKINV_TIMEOUT/MASKINV_BATCH_TIMEOUT)"
            f.upstream = True


def _summary(errors: list[dict[str, Any]]) -> str:
    """Errors grouped by message: ``region a, b: message; ...``."""
    by_msg: dict[str, list[str]] = defaultdict(list)
    for e in errors:
        by_msg[e["error"]].append(str(e["region"]) if e["region"] else "")
    parts = []
    for msg, ids in list(by_msg.items())[:3]:
        ids = [i for i in ids if i]
        parts.append(f"region {', '.join(ids[:5])}{' ...' if len(ids) > 5 else ''}: {msg}" if ids else msg)
    return "; ".join(parts) + (f" (+{len(by_msg) - 3} more)" if len(by_msg) > 3 else "")


def example_project(service: Service, project: Any, tasks: list[dict]) -> str | None:
    """The Label Studio project whose examples score these tasks (the request's ``project``, else the tasks'),
    or None (learning off, no project, or an id that is not one)."""
    from backend.learning.learner import LearningError, project_id

    if not service.settings.learn:
        return None
    raw = project if project is not None else next((t.get("project") for t in tasks if t.get("project")), None)
    try:
        return project_id(raw) if raw is not None else None
    except LearningError:
        return None


def attach_prototypes(service: Service, project: Any, tasks: list[dict], requests: list[LabelRequest]) -> str:
    """Give each request its project's example prototypes (backend.learning.learner); returns the ``model_version``
    suffix naming the project's example set ("" when none: text only; the same string ``/setup`` answers). Never
    fails a prediction: on trouble the regions are scored by text alone (logged)."""
    from backend.learning.learner import LearningError

    pid = example_project(service, project, tasks) if requests else None
    if pid is None:
        return ""
    zero_shot = [req.params for req in requests]
    try:
        for req in requests:
            req.prototypes = service.learner.prototypes(pid, req.labels, req.params)
            if req.prototypes is not None:  # embedded like the examples behind the prototypes
                req.params = service.learner.example_params(req.params)
    except (LearningError, DispatchError, Exception) as exc:  # noqa: BLE001 - text-only is always a valid answer
        log.warning("project %s: scoring without examples (%s: %s)", pid, exc.__class__.__name__, exc)
        for req, params in zip(requests, zero_shot):
            req.prototypes, req.params = None, params
        return ""
    if not any(r.prototypes for r in requests):
        return ""
    return service.learner.version_suffix(pid, requests[0].params)
