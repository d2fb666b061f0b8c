"""Index an existing Label Studio project: every task's annotated regions (``human``) and predicted regions
(``suggested``, or ``proposed`` for a region the backend proposed), embedded as the product scores them.

Resumable: a task already indexed under the current model is skipped (``force`` re-indexes it): one with
annotations once its ``human`` regions are there (regions the product indexed live as it labelled them do not
count, so a project's older annotations still come in), one without once any of its regions is. Predicted
regions get the region id ``p<prediction id>:<region id>`` and no annotation, so they never collide with a
person's regions; their label and score are the prediction's. A task's regions indexed live are replaced.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from backend.labelstudio.api import sdk_tasks
from backend.labelstudio.label_config import ProjectConfig
from backend.learning.learner import Allowance, AnnotationSkipped, Learner, label_studio_errors
from backend.search.api import current_model
from backend.search.index import RegionIndex, index_examples, predicted_record
from backend.search.records import RegionRecord, SearchFilter
from backend.service import Service

log = logging.getLogger(__name__)
#: seconds a backfill waits for the model to load (embedded mode) or a worker to announce it (queue mode)
MODEL_LOAD_S = 600.0


@dataclass
class BackfillReport:
    """What a backfill did, per task outcome."""

    project: str
    tasks: int = 0
    indexed_tasks: int = 0
    skipped_tasks: int = 0
    human: int = 0
    predicted: int = 0
    failed: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"project": self.project, "tasks": self.tasks, "indexed_tasks": self.indexed_tasks,
                "skipped_tasks": self.skipped_tasks, "human_regions": self.human,
                "predicted_regions": self.predicted, "failed": self.failed[:100], "failed_count": len(self.failed)}


def project_tasks(client: Any, project: int, page_size: int = 100) -> Iterator[dict[str, Any]]:
    """Every task of ``project`` with its annotations and predictions (:func:`backend.labelstudio.api.sdk_tasks`)."""
    return sdk_tasks(client, project, page_size)


def _predictions(client: Any, task: dict[str, Any]) -> list[dict[str, Any]]:
    preds = task.get("predictions")
    if isinstance(preds, list) and preds and all(isinstance(p, dict) and "result" in p for p in preds):
        return preds
    # the task list may leave predictions out (or list their ids only): ask for them
    listed = client.predictions.list(task=int(task["id"]))
    return [p.model_dump() if hasattr(p, "model_dump") else dict(p) for p in listed]


def _prediction_records(learner: Learner, cfg: ProjectConfig, project: str, task: dict[str, Any],
                        pred: dict[str, Any]) -> tuple[list[RegionRecord], np.ndarray]:
    # a prediction's items say origin "prediction", which makes an annotation's region no example: not here
    items = [{k: v for k, v in it.items() if k != "origin"} for it in pred.get("result") or [] if isinstance(it, dict)]
    pseudo = {"id": f"p{pred.get('id')}", "result": items, "was_cancelled": False}
    examples = learner.annotation_examples(cfg, pseudo, task, Allowance(learner.settings.max_mask_pixels), project)
    by_id = {str(it.get("id")): it for it in items}
    seen: dict[str, tuple[RegionRecord, np.ndarray]] = {}
    for ex in examples:
        if ex.region_id in seen:
            continue
        item: dict[str, Any] = by_id.get(ex.region_id) or {}
        score = item.get("score", pred.get("score"))
        rec = predicted_record(ex.model_key, project, int(task["id"]), f"p{pred.get('id')}:{ex.region_id}", item,
                               ex.label, float(score) if isinstance(score, (int, float)) else 0.0)
        seen[ex.region_id] = (rec, np.asarray(ex.let, np.float32))
    if not seen:
        return [], np.zeros((0, 0), np.float32)
    return [r for r, _ in seen.values()], np.stack([v for _, v in seen.values()])


def indexed(index: RegionIndex, model: str, project: str, task: dict[str, Any]) -> bool:
    """Whether ``task`` is in the index under ``model`` (see the module docstring)."""
    annotated = any(isinstance(a, dict) and a.get("result") and not a.get("was_cancelled")
                    for a in task.get("annotations") or [])
    flt = SearchFilter(model=model, projects=(project,), sources=("human",) if annotated else ())
    return bool(index.store.fetch(flt, 1, [int(task["id"])])[0])


def backfill_project(service: Service, index: RegionIndex, project: str, client: Any, force: bool = False,
                     tasks: Iterable[dict[str, Any]] | None = None,
                     progress: Callable[[BackfillReport], None] | None = None) -> BackfillReport:
    """Index every task of ``project`` (see the module docstring); one task's failure is reported, not fatal."""
    report = BackfillReport(project)
    learner = service.learner
    model = current_model(service, MODEL_LOAD_S)
    with label_studio_errors(project):
        proj = client.projects.get(id=int(project))
        cfg = service.config(getattr(proj, "label_config", None))
        for task in tasks if tasks is not None else project_tasks(client, int(project)):
            report.tasks += 1
            tid = int(task["id"])
            if not force and indexed(index, model, project, task):
                report.skipped_tasks += 1
            else:
                try:
                    index.store.delete_tasks(project, [tid])
                    for ann in task.get("annotations") or []:
                        if not isinstance(ann, dict) or ann.get("id") is None:
                            continue
                        try:
                            examples = learner.annotation_examples(cfg, ann, task, None, project)
                        except AnnotationSkipped:
                            continue
                        report.human += index_examples(index, project, ann, task, examples)
                    for pred in _predictions(client, task):
                        recs, vecs = _prediction_records(learner, cfg, project, task, pred)
                        if recs:
                            report.predicted += index.store.upsert(recs, vecs)
                    report.indexed_tasks += 1
                except Exception as exc:  # noqa: BLE001 - one task's failure is reported, the run goes on
                    report.failed.append({"task": tid, "error": f"{exc.__class__.__name__}: {exc}"[:300]})
            if progress:
                progress(report)
    return report
