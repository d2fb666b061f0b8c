"""The few Label Studio API calls a project run needs, through label-studio-sdk 2.x (``LabelStudio`` client).

Tasks and predictions come back as plain JSON dicts (the SDK's models dumped in JSON mode), the shape batch
mode (backend.predict.tasks) reads. The token may be a personal access token (a JWT refresh token; the SDK trades it
for short-lived access tokens) or a legacy API token.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Iterator

from backend.runs.store import redact_urls

#: tasks per listing page (each page holds its tasks' annotations and predictions)
PAGE_SIZE = 100


class LabelStudioAPIError(RuntimeError):
    """A Label Studio API call failed; the message names the call, ``status`` is the HTTP status (None: no
    answer)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def _plain(obj: Any) -> Any:
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if hasattr(obj, "dict"):
        return json.loads(json.dumps(obj.dict(), default=str))
    return obj


class LabelStudioAPI:
    """Label Studio at ``url`` with ``token`` (label-studio-sdk)."""

    def __init__(self, url: str, token: str, timeout_s: float = 60.0, client: Any | None = None):
        self.url = url.rstrip("/")
        if client is None:
            from label_studio_sdk import LabelStudio

            client = LabelStudio(base_url=self.url, api_key=token, timeout=timeout_s)
        self.client = client

    def _call(self, what: str, fn, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the SDK raises ApiError, httpx errors, pydantic errors
            status = getattr(exc, "status_code", None)
            body = redact_urls(str(getattr(exc, "body", "") or exc))[:300]
            raise LabelStudioAPIError(f"Label Studio {what} failed{f' (HTTP {status})' if status else ''}: "
                                      f"{body}", status if isinstance(status, int) else None) from None

    def label_config(self, project: int) -> str:
        proj = self._call(f"GET project {project}", self.client.projects.get, id=project)
        return str(getattr(proj, "label_config", "") or "")

    def list_tasks(self, project: int, view: int | None = None) -> tuple[int | None, Iterator[dict[str, Any]]]:
        """``(total, tasks)``: every task of ``project`` (or of Data Manager view ``view``) with annotations and
        predictions, read one page at a time (memory: one page); ``total`` as the first page reports it."""
        pager = self._call(f"list tasks of project {project}", self.client.tasks.list, project=project, view=view,
                           fields="all", page_size=PAGE_SIZE)
        total = getattr(getattr(pager, "response", None), "total", None)
        return (int(total) if isinstance(total, int) else None), self._pages(pager, project)

    def iter_tasks(self, project: int, view: int | None = None) -> Iterator[dict[str, Any]]:
        return self.list_tasks(project, view)[1]

    def _pages(self, pager: Any, project: int) -> Iterator[dict[str, Any]]:
        it = iter(pager)
        while True:
            try:
                task = next(it)
            except StopIteration:
                return
            except Exception as exc:  # noqa: BLE001 - a later page failed
                raise LabelStudioAPIError(f"Label Studio: listing tasks of project {project} failed: "
                                          f"{str(exc)[:300]}") from None
            yield _plain(task)

    def get_task(self, task_id: int) -> dict[str, Any]:
        """One task as Label Studio has it (data, project, annotations, predictions)."""
        return _plain(self._call(f"GET task {task_id}", self.client.tasks.get, id=task_id))

    def get_tasks(self, task_ids: Iterable[int]) -> Iterator[dict[str, Any]]:
        for tid in task_ids:
            yield self.get_task(tid)

    def prediction_versions(self, task_id: int) -> list[str]:
        """The model versions of the task's predictions (fresh from the API)."""
        preds = self._call(f"list predictions of task {task_id}", self.client.predictions.list, task=task_id)
        return [str(getattr(p, "model_version", "") or "") for p in preds or []]

    def create_prediction(self, task_id: Any, result: list[dict], score: float | None, model_version: str) -> int:
        pred = self._call(f"POST prediction for task {task_id}", self.client.predictions.create, task=task_id,
                          result=result, score=score, model_version=model_version)
        return int(getattr(pred, "id", 0) or 0)


def sdk_tasks(client: Any, project: int, page_size: int = 100, **filters: Any) -> Iterator[dict[str, Any]]:
    """Every task of ``project`` with its annotations and predictions, as dicts: label-studio-sdk's
    ``tasks.list(fields="all", **filters)`` page by page.

    Label Studio 1.23 answers a page past the end with 404 "Invalid page" where the SDK's pager would ask for it
    (after a full last page), so pages are requested here until one comes back short or 404.
    """
    from label_studio_sdk.core.api_error import ApiError

    page = 1
    while True:
        try:
            items = client.tasks.list(project=project, fields="all", page=page, page_size=page_size,
                                      **filters).items or []
        except ApiError as exc:
            if page > 1 and getattr(exc, "status_code", None) == 404:
                return
            raise
        for task in items:
            yield task.model_dump() if hasattr(task, "model_dump") else dict(task)
        if len(items) < page_size:
            return
        page += 1
