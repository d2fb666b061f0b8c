"""Worker results -> one Label Studio answer per task (a prediction, ``[]`` or an error entry), and the HTTP status
of an interactive request that produced nothing."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from worker.protocol import ProtocolError, RegionResult

from backend.dispatch import LabelOutcome, LabelRequest
from backend.labelstudio.label_config import ProjectConfig
from backend.labelstudio.predictions import region_results, task_prediction
from backend.labelstudio.regions import RegionError
from backend.predict.live import LiveRegions
from backend.predict.plan import TaskPlan
from backend.service import PredictError, Service
from backend.trust.calibration import Calibration
from backend.trust.verified import mark_region

log = logging.getLogger(__name__)

#: HTTP status for an interactive request that produced no labelled region, by the worst failure kind
#: ("image": the image host failed; "source": the task names an image that is refused or unusable)
STATUS = {"timeout": 504, "queue_unavailable": 503, "no_worker": 503, "failed": 502, "image": 502, "limit": 413,
          "source": 422, "rejected": 422, "region": 422}
SEVERITY = ("timeout", "queue_unavailable", "no_worker", "failed", "image", "limit", "source", "rejected", "region")


def region_result(value: RegionResult | Mapping[str, Any]) -> RegionResult:
    """A worker's region result as the protocol's RegionResult (a malformed one: a failed result)."""
    if isinstance(value, RegionResult):
        return value
    try:
        return RegionResult.from_dict(value)
    except ProtocolError as exc:
        return RegionResult.failed(str(value.get("id", "?")) if isinstance(value, Mapping) else "?",
                                   f"malformed region result: {exc}")


def request_calibrations(service: Service, project: str | None, requests: list[LabelRequest]
                         ) -> list[Calibration | None]:
    """Per label request, the project's calibration of its labels (backend.trust; None: nothing is verified).
    Never fails a prediction: on trouble nothing is verified (logged)."""
    out: list[Calibration | None] = []
    for req in requests:
        try:
            out.append(service.learner.calibration(project, req.labels, req.params)
                       if project is not None and req.prototypes is not None else None)
        except Exception as exc:  # noqa: BLE001 - unverified suggestions are always a valid answer
            log.warning("project %s: no calibration (%s: %s)", project, exc.__class__.__name__, exc)
            out.append(None)
    return out


def take_outcomes(live: LiveRegions | None, requests: list[LabelRequest], outcomes: list[LabelOutcome]) -> None:
    """Hand each label request's outcome to ``live`` (its embeddings and their similarities); nothing without."""
    if live is None:
        return
    for idx, (req, outcome) in enumerate(zip(requests, outcomes)):
        if outcome.model and outcome.model.get("id"):
            live.label_request(idx, outcome.model, req.params, req.image_sha256, outcome.results)


def task_answer(plan: TaskPlan, outcomes: list[LabelOutcome], cfg: ProjectConfig, version: str,
                calibrations: list[Calibration | None] | None = None, live: LiveRegions | None = None) -> Any:
    """One task's answer from the outcomes of its label requests: a prediction (``model_version`` = ``version``),
    ``[]`` without regions to label, or ``{"error", "maskinv"}`` when none could be labelled. ``calibrations``
    (per request, :func:`request_calibrations`) mark each region ``calibrated`` / ``verified``; ``live``
    (:func:`take_outcomes` first) gives each region its ``labelled_similarity`` and takes it for the index."""
    results: list[dict[str, Any]] = []
    scores: list[float] = []
    jobs: list[dict[str, Any]] = []
    model: dict[str, Any] = {}
    for idx, regs in plan.groups:
        outcome = outcomes[idx]
        model = model or outcome.model
        jobs.append(outcome.info)
        for pos, (r, raw) in enumerate(zip(regs, outcome.regions)):
            res = region_result(raw)
            if res.error or not res.labels:
                plan.error(r.id, res.error or "no label scores for this region", outcome.kind or "rejected")
                continue
            try:
                items = region_results(r, res, cfg)
            except RegionError as exc:  # a prompt's outline that cannot be written (backend.labelstudio.predictions)
                plan.error(r.id, str(exc), "region")
                continue
            results.extend(items)
            if live is not None:
                live.label_region(idx, pos, plan.task_id, r.id, items, res)
            scores.append(float(res.labels[0].score))
            mark_region([it for it in results if it.get("id") == r.id], calibrations[idx] if calibrations else None,
                        res.labels[0].label, float(res.labels[0].score))
    diagnostics = {"source": plan.source, "regions": plan.n_regions, "labelled": len(scores),
                   "errors": plan.errors, "jobs": jobs, "model": model}
    for e in plan.errors:
        log.warning("task %s region %s: %s", plan.task_id, e["region"], e["error"])
    if results:
        return task_prediction(results, scores, version, diagnostics)
    if not plan.errors:
        return []
    return {"error": summary(plan.errors), "maskinv": diagnostics}


def interactive_failure(plan: TaskPlan) -> PredictError:
    """The error of an interactive request whose regions all failed, with the status of the worst failure."""
    kinds = {e.get("code") or e["kind"] for e in plan.errors}
    worst = next(k for k in SEVERITY if k in kinds)
    return PredictError(STATUS[worst], summary(plan.errors), plan.errors)


def summary(errors: list[dict[str, Any]]) -> str:
    """Errors grouped by message: ``region a, b: message; ...``."""
    by_msg: dict[str, list[str]] = defaultdict(list)
    for e in errors:
        by_msg[e["error"]].append(str(e["region"]) if e["region"] else "")
    parts = []
    for msg, ids in list(by_msg.items())[:3]:
        ids = [i for i in ids if i]
        parts.append(f"region {', '.join(ids[:5])}{' ...' if len(ids) > 5 else ''}: {msg}" if ids else msg)
    return "; ".join(parts) + (f" (+{len(by_msg) - 3} more)" if len(by_msg) > 3 else "")
