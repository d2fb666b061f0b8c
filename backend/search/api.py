"""``POST /search`` and ``maskinv-search``'s shared answer: a request body -> hits, against the service's index.

Answer::

    {"query": "<digest>", "kind": "text" | "examples" | "label" | "coverage", "model": "<model key>",
     "hits": [{"project", "task", "annotation", "region", "label", "score", "source", "image_sha256", "box",
               "similarity", "link"}, ...]}

``link`` is the task in Label Studio's Data Manager (when ``LABEL_STUDIO_URL`` is set).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from backend.learning.learner import model_key
from backend.search.queries import parse_query, run_query, text_vector
from backend.search.records import SearchInputError
from backend.service import Service


class SearchUnavailable(RuntimeError):
    """Region search is off (MASKINV_SEARCH_STORE=off)."""


def current_model(service: Service) -> str:
    """The model key regions are indexed under now (model id + inversion size, steps, lr, alpha)."""
    return model_key(service.worker_model(), service.learner.example_params(service.settings.params))


def task_link(service: Service, project: str, task: int) -> str | None:
    base = (service.settings.label_studio_url or "").rstrip("/")
    return f"{base}/projects/{project}/data?task={task}" if base else None


def answer(service: Service, body: Any) -> dict[str, Any]:
    """Answer one search request (see the module docstring); SearchInputError for a bad request."""
    index = service.search_index
    if index is None:
        raise SearchUnavailable("region search is off (MASKINV_SEARCH_STORE=off)")
    model = current_model(service)
    q = parse_query(body, model)
    params = service.learner.example_params(service.settings.params)

    def text_embed(text: str) -> np.ndarray:
        return text_vector(service.dispatcher.run_embed, text, params)

    hits = run_query(index.store, q, text_embed)
    return {"query": q.digest, "kind": q.kind, "model": model,
            "hits": [{**h.to_dict(), "link": task_link(service, h.record.project, h.record.task)} for h in hits]}


__all__ = ["SearchInputError", "SearchUnavailable", "answer", "current_model"]
