"""``POST /search`` and ``maskinv-search``'s shared answer: a request body -> hits, against the service's index.

Answer::

    {"query": "<digest>", "kind": "text" | "examples" | "label" | "coverage", "model": "<model key>",
     "hits": [{"project", "task", "annotation", "region", "label", "score", "source", "image_sha256", "box",
               "similarity", "link"}, ...]}

``link`` is the task in Label Studio's Data Manager (when ``LABEL_STUDIO_URL`` is set). With
``"to_label_studio": true`` the hits are also written as the prediction set ``search:<digest>`` of each project
(:mod:`backend.search.label_studio`), reported under ``"label_studio"``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from backend.labelstudio.api import LabelStudioAPI, LabelStudioAPIError
from backend.learning.learner import model_key
from backend.search.label_studio import write_prediction_set
from backend.search.queries import parse_query, run_query, text_vectors
from backend.search.records import SearchInputError
from backend.service import Service


#: seconds a search waits for the embedded model to load before answering 503
MODEL_WAIT_S = 5.0


class SearchUnavailable(RuntimeError):
    """Region search is off (MASKINV_SEARCH_STORE=off)."""


class ModelNotReady(RuntimeError):
    """The model is not known yet (still loading, or no worker): the model key of the index cannot be named."""


def current_model(service: Service, wait_s: float = MODEL_WAIT_S) -> str:
    """The model key regions are indexed under now (model id + inversion size, steps, lr, alpha); ModelNotReady
    while the model is not known (the index is keyed by it, so no answer can be right before)."""
    info = service.dispatcher.model_info(wait_s=wait_s)
    if not info or not info.get("id"):
        raise ModelNotReady("the model is not loaded yet (or no worker serves the queue): ask again")
    return model_key(info, service.learner.example_params(service.settings.params))


def task_link(service: Service, project: str, task: int) -> str | None:
    base = (service.settings.label_studio_url or "").rstrip("/")
    return f"{base}/projects/{project}/data?task={task}" if base else None


def label_studio_api(service: Service) -> LabelStudioAPI:
    """Label Studio's API with the backend's credentials (LABEL_STUDIO_URL / _API_KEY, else /setup's)."""
    url = service.settings.label_studio_url or service.setup_fallbacks()[0]
    key = service.settings.label_studio_api_key or service.setup_fallbacks()[1]
    if not url or not key:
        raise SearchInputError("to_label_studio needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (or a /setup that "
                               "sent hostname and access_token)")
    return LabelStudioAPI(url, key)


def answer(service: Service, body: Any, wait_s: float = MODEL_WAIT_S) -> dict[str, Any]:
    """Answer one search request (see the module docstring); SearchInputError for a bad request."""
    index = service.search_index
    if index is None:
        raise SearchUnavailable("region search is off (MASKINV_SEARCH_STORE=off)")
    to_ls = body.get("to_label_studio", False) if isinstance(body, Mapping) else False
    if not isinstance(to_ls, bool):
        raise SearchInputError("to_label_studio must be true or false")
    model = current_model(service, wait_s)
    q = parse_query(body, model)
    params = service.learner.example_params(service.settings.params)

    def text_embed(texts: Sequence[str]) -> tuple[np.ndarray, float]:
        return text_vectors(service.dispatcher.run_embed, texts, params)

    hits = run_query(index.store, q, text_embed)
    doc: dict[str, Any] = {
        "query": q.digest, "kind": q.kind, "model": model,
        "hits": [{**h.to_dict(), "link": task_link(service, h.record.project, h.record.task)} for h in hits]}
    if to_ls:
        ls = label_studio_api(service)
        doc["label_studio"] = [write_prediction_set(ls, p, hits, q.digest) for p in q.flt.projects]
    return doc


__all__ = ["LabelStudioAPIError", "ModelNotReady", "SearchInputError", "SearchUnavailable", "answer",
           "current_model"]
