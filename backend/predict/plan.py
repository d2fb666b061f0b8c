"""Planning a /predict request: validation, which regions each task has, and the per-task record of what failed.

Shared by the drawn-region path (backend.predict.tasks) and the proposals (backend.predict.propose).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from backend.dispatch import QUEUE_UNAVAILABLE
from backend.labelstudio.regions import Region, region_prompt
from backend.learning.learner import LearningError, project_id
from backend.service import PredictError
from backend.settings import Settings


@dataclass
class TaskPlan:
    """One task of a request: where its regions came from, what failed, and which label requests hold them."""

    task_id: Any
    source: str  # "context", "annotation <id>", "prediction <id>", "none" or "proposals"
    errors: list[dict[str, Any]] = field(default_factory=list)
    groups: list[tuple[int, list[Region]]] = field(default_factory=list)  # (label request index, its regions)
    n_regions: int = 0

    def error(self, region: str | None, message: str, kind: str) -> None:
        """Record one error entry ``{"region", "error", "kind"}``; Redis lost while waiting is kind ``failed`` (what
        older readers retry) with ``"code": "queue_unavailable"``."""
        if kind == QUEUE_UNAVAILABLE:
            self.errors.append({"region": region, "error": message, "kind": "failed", "code": QUEUE_UNAVAILABLE})
            return
        self.errors.append({"region": region, "error": message, "kind": kind})


def job_prompt(region: Region, image_size: tuple[int, int] | None, max_pixels: int) -> dict[str, Any]:
    """What a region adds to its entry in the label job besides id and mask: ``{}`` for polygons and brush
    strokes; ``{"prompt": {"box": ...} | {"points": ...}, "refine": bool}`` for rectangles and keypoints (pixels of
    the ``image_size`` = (W, H) image). ``refine`` is true for a prompt control's box or clicks (the worker turns
    them into the object's mask, which the answer outlines) and false for a rectangle labelled as drawn (a worker
    may still refine it before inversion; its geometry is never changed). Raises RegionError."""
    prompt = region_prompt(region, image_size, max_pixels)
    if prompt is None:
        return {}
    return {"prompt": prompt, "refine": region.control.answers_as is not None}


def check_tasks(tasks: Any, settings: Settings) -> list[dict[str, Any]]:
    """``tasks`` as a list of task objects; PredictError 400 for anything else, 413 over MASKINV_MAX_TASKS."""
    if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        raise PredictError(400, "'tasks' must be a list of task objects")
    if len(tasks) > settings.max_tasks:
        raise PredictError(413, f"the request has {len(tasks)} tasks, more than MASKINV_MAX_TASKS="
                                f"{settings.max_tasks}; send them in smaller batches")
    return tasks


def is_interactive(context: Any) -> bool:
    """Whether ``context`` holds regions the annotator just drew (``context.result``, non-empty)."""
    return isinstance(context, dict) and isinstance(context.get("result"), list) and bool(context["result"])


def task_data(task: dict[str, Any]) -> dict[str, Any]:
    """The task's ``data`` object (``{}`` when missing or not an object)."""
    data = task.get("data")
    return data if isinstance(data, dict) else {}


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


def example_project(settings: Settings, project: Any, tasks: list[dict]) -> str | None:
    """The Label Studio project whose examples score these tasks (the request's ``project``, else the tasks'),
    or None (learning off, no project, or an id that is not one)."""
    if not settings.learn:
        return None
    raw = project if project is not None else next((t.get("project") for t in tasks if t.get("project")), None)
    try:
        return project_id(raw) if raw is not None else None
    except LearningError:
        return None
