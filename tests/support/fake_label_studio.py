"""Label Studio's API in memory, the calls a project run makes (backend.labelstudio.api.LabelStudioAPI's interface):
projects with label configs, tasks with their project and data, predictions written (counted)."""

from __future__ import annotations

import threading
from typing import Any, Iterable, Iterator

from backend.labelstudio.api import LabelStudioAPIError


class FakeLabelStudio:
    """``projects``: project id -> label config XML; ``tasks``: task id -> task JSON (with ``"project"``)."""

    url = "http://ls.test"

    def __init__(self, projects: dict[int, str] | None = None, tasks: dict[int, dict] | None = None):
        self.projects: dict[int, str] = dict(projects or {})
        self.tasks: dict[int, dict] = dict(tasks or {})
        self.preds: dict[Any, list[str]] = {}
        self.results: dict[Any, list] = {}
        self.writes = 0
        self.reads: list[Any] = []  # task ids read through get_task / get_tasks
        self.lock = threading.Lock()

    def label_config(self, project: int) -> str:
        if int(project) not in self.projects:
            raise LabelStudioAPIError(f"Label Studio GET project {project} failed (HTTP 404): not found",
                                      status=404)
        return self.projects[int(project)]

    def get_task(self, task_id: Any) -> dict[str, Any]:
        with self.lock:
            self.reads.append(task_id)
            known = self.tasks.get(task_id)
            preds = [{"model_version": v, "result": []} for v in self.preds.get(task_id, [])]
        if known is None:
            raise LabelStudioAPIError(f"Label Studio GET task {task_id} failed (HTTP 404): not found", status=404)
        return {**known, "predictions": list(known.get("predictions") or []) + preds}

    def get_tasks(self, task_ids: Iterable[Any]) -> Iterator[dict[str, Any]]:
        for tid in task_ids:
            yield self.get_task(tid)

    def prediction_versions(self, task_id: Any) -> list[str]:
        with self.lock:
            return list(self.preds.get(task_id, []))

    def create_prediction(self, task_id: Any, result: list, score: float | None, model_version: str) -> int:
        with self.lock:
            self.writes += 1
            self.preds.setdefault(task_id, []).append(model_version)
            self.results[task_id] = result
            return self.writes
