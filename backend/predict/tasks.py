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

The steps live in their own modules: backend.predict.plan (validation, each task's regions), backend.predict.fetch
(images), backend.predict.propose (tasks nobody drew on), backend.predict.assembly (results -> Label Studio JSON)
and backend.predict.live (with a region index: each region's ``meta.labelled_similarity``, and the regions indexed
after the answer).

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
from typing import Any

from worker.protocol import InversionParams

from backend.dispatch import DispatchError, LabelOutcome, LabelRequest, QueueUnavailable
from backend.labelstudio.label_config import ProjectConfig
from backend.labelstudio.regions import Region, RegionError, collect_regions, region_mask
from backend.predict.assembly import (STATUS, SEVERITY, interactive_failure, request_calibrations, take_outcomes,
                                      task_answer)
from backend.predict.fetch import ImageFetch, fetch_all
from backend.predict.live import LiveRegions
from backend.predict.plan import (TaskPlan, check_tasks, example_project, is_interactive, job_prompt, task_data,
                                  task_regions)
from backend.predict.propose import decide, propose_answers, split_override, untouched
from backend.service import PredictError, Service
from backend.settings import Settings

log = logging.getLogger(__name__)

__all__ = ["STATUS", "SEVERITY", "predict_tasks", "task_regions", "attach_prototypes"]


def predict_tasks(service: Service, cfg: ProjectConfig, tasks: Any, context: Any = None,
                  overrides: Any = None, timeout_s: float | None = None, project: Any = None) -> list[Any]:
    """One answer per task (see module docstring): the front door of interactive and batch requests.

    The whole request (image downloads and the wait for the jobs) is bounded by MASKINV_TIMEOUT (interactive)
    or MASKINV_BATCH_TIMEOUT (batch), or by ``timeout_s`` when given (project runs: backend.runs.project_run).
    """
    t0 = time.perf_counter()
    settings = service.settings
    tasks = check_tasks(tasks, settings)
    overrides, proposal_override = split_override(overrides)
    params, label_override = service.params(overrides)
    interactive = is_interactive(context)
    if interactive and len(tasks) != 1:
        raise PredictError(400, f"an interactive context applies to exactly one task, got {len(tasks)}")
    timeout = timeout_s if timeout_s is not None else settings.timeout_s if interactive else settings.batch_timeout_s
    deadline = time.monotonic() + timeout

    plans: list[TaskPlan] = []
    fetches: list[ImageFetch] = []
    propose_for: list[int] = []  # tasks that get proposed regions (backend.predict.propose)
    for task in tasks:
        items, source = (context["result"], "context") if interactive else task_regions(task)
        plans.append(TaskPlan(task.get("id"), source))
        if (not interactive and source == "none" and untouched(task)
                and decide(settings.proposals, cfg, proposal_override)):
            propose_for.append(len(plans) - 1)
            continue
        fetches += _plan_regions(plans[-1], settings, cfg, task, items, label_override)

    fetch_all(service.fetcher, fetches, deadline, settings.max_image_pixels, service.setup_fallbacks())
    live = LiveRegions.of(service, project, tasks)  # region search: embeddings asked for, regions indexed
    requests = _label_requests(settings, fetches, params, embedding=live is not None)
    examples = attach_prototypes(service, project, tasks, requests)
    outcomes = _label(service, requests, deadline)
    # the string /setup answers for this project (Label Studio skips tasks that hold this version's prediction)
    version = service.project_version(cfg, params, label_override, examples)
    calibrations = request_calibrations(service, examples, requests)  # backend.trust: verified regions
    take_outcomes(live, requests, outcomes)
    answers = [task_answer(plan, outcomes, cfg, version, calibrations, live) for plan in plans]
    if propose_for:
        proposed = propose_answers(service, cfg, [tasks[i] for i in propose_for], params, label_override,
                                   proposal_override, deadline, project, live)
        for i, answer in zip(propose_for, proposed):
            answers[i] = answer
    if live is not None:
        live.submit()  # written by the index's background writer: the answer does not wait for the store
    log.info("predict: %d task(s), %d job(s), %s mode, %.2fs", len(tasks), len(requests),
             "interactive" if interactive else "batch", time.perf_counter() - t0)
    if interactive and "result" not in answers[0] and plans[0].errors:
        raise interactive_failure(plans[0])
    return answers


def _plan_regions(plan: TaskPlan, settings: Settings, cfg: ProjectConfig, task: dict[str, Any], items: list[Any],
                  label_override: list[str] | None) -> list[ImageFetch]:
    """The images to fetch for a task's regions, one per (image, vocabulary); what cannot be labelled (over
    MASKINV_MAX_REGIONS, a malformed region, a control without labels) goes into ``plan``'s errors."""
    regions, problems = collect_regions(items, cfg)
    plan.n_regions = len(regions) + len(problems)
    if plan.n_regions > settings.max_regions:
        plan.error(None, f"the task has {plan.n_regions} regions, more than MASKINV_MAX_REGIONS="
                         f"{settings.max_regions}", "limit")
        return []
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
    data = task_data(task)
    return [ImageFetch(plan, data.get(cfg.images[image_name].data_key), task.get("id"), vocab, regs)
            for (image_name, vocab), regs in groups.items()]


def _label_requests(settings: Settings, fetches: list[ImageFetch], params: InversionParams,
                    embedding: bool = False) -> list[LabelRequest]:
    """One label request per fetched image: its regions rasterised to bool ``[H, W]`` masks, all of the request's
    masks within MASKINV_MAX_MASK_MPIX; failed fetches and regions become their plan's errors. ``embedding``: ask
    for the regions' embeddings (backend.predict.live)."""
    requests: list[LabelRequest] = []
    mask_pixels = 0
    for f in fetches:
        if f.error is not None:
            log.warning("task %s: %s", f.plan.task_id, f.error)
            for r in f.regions:
                f.plan.error(r.id, f.error, f.error_kind)
            continue
        masks, ok, prompts = [], [], []
        for r in f.regions:
            if mask_pixels >= settings.max_mask_pixels:
                f.plan.error(r.id, f"the request's masks exceed MASKINV_MAX_MASK_MPIX="
                                   f"{settings.max_mask_pixels // (1024 * 1024)}; send fewer tasks per request",
                             "limit")
                continue
            try:
                prompt = job_prompt(r, f.size, settings.max_image_pixels)  # box or clicks (RegionError first)
                masks.append(region_mask(r, f.size, settings.mask_max_side, settings.max_image_pixels))
                prompts.append(prompt)
                ok.append(r)
                mask_pixels += masks[-1].size
            except RegionError as exc:
                f.plan.error(r.id, str(exc), "region")
            except Exception as exc:  # noqa: BLE001 - any parser failure is this region's error only
                log.exception("region %s of task %s", r.id, f.plan.task_id)
                f.plan.error(r.id, f"malformed {r.kind} region: {exc.__class__.__name__}: {str(exc)[:200]}", "region")
        if ok:
            requests.append(LabelRequest(f.blob, masks, list(f.vocab), params, prompts=prompts, embedding=embedding))
            f.plan.groups.append((len(requests) - 1, ok))
    return requests


def _label(service: Service, requests: list[LabelRequest], deadline: float) -> list[LabelOutcome]:
    """The dispatcher's outcomes; QueueUnavailable passes through (the app answers 503, a project run waits for
    Redis and retries), any other DispatchError is a PredictError 503."""
    if not requests:
        return []
    try:
        return service.dispatcher.label(requests, max(0.0, deadline - time.monotonic()))
    except QueueUnavailable:
        raise
    except DispatchError as exc:
        log.error("dispatch failed: %s", exc)
        raise PredictError(503, str(exc)) from None


def attach_prototypes(service: Service, project: Any, tasks: list[dict], requests: list[LabelRequest]
                      ) -> str | None:
    """Give each request its project's example prototypes (backend.learning.learner); returns the project whose
    examples were used (None: text only), whose example set the ``model_version`` then names. Never fails a
    prediction: on trouble the regions are scored by text alone (logged)."""
    pid = example_project(service.settings, project, tasks) if requests else None
    if pid is None:
        return None
    zero_shot = [req.params for req in requests]
    try:
        for req in requests:
            req.prototypes = service.learner.prototypes(pid, req.labels, req.params)
            if req.prototypes is not None:  # embedded like the examples behind the prototypes
                req.params = service.learner.example_params(req.params)
    except Exception as exc:  # noqa: BLE001 - text-only is always a valid answer
        log.warning("project %s: scoring without examples (%s: %s)", pid, exc.__class__.__name__, exc)
        for req, params in zip(requests, zero_shot):
            req.prototypes, req.params = None, params
        return None
    return pid if any(r.prototypes for r in requests) else None
