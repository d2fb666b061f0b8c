"""The regions a /predict labels, into the region index as it labels them (``MASKINV_SEARCH_STORE`` set).

With a region index the label and proposal jobs are asked for each region's embedding (the vector its labels
were scored on). Per region the answer then gets ``meta.labelled_similarity``: the largest cosine similarity of
its embedding to a ``human`` region of the same project and model (exact, against the project's human vectors
that :meth:`backend.search.index.RegionIndex.human_vectors` keeps; absent when the project has no human region
of that model yet). After the answers are built, the regions are indexed
in the background (:meth:`backend.search.index.RegionIndex.index_later`) as ``suggested`` (drawn regions) or
``proposed`` with task, region id, top label, score (the item's, as Label Studio shows it), model key, image
digest and box; the embedding itself never goes into the prediction. Nothing here fails a prediction: trouble
is logged and the answer stays as it is.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np

from worker.protocol import InversionParams, ProtocolError, RegionResult

from backend.learning.learner import LearningError, model_key, project_id
from backend.search.index import RegionIndex, predicted_record
from backend.search.records import RegionRecord
from backend.service import Service

log = logging.getLogger(__name__)

#: digits a region's ``meta.labelled_similarity`` keeps
SIMILARITY_DIGITS = 4


def region_project(project: Any, tasks: Sequence[Any]) -> str | None:
    """The Label Studio project of a request (its ``project``, else the tasks'), None when none is known."""
    raw = project if project is not None else next(
        (t.get("project") for t in tasks if isinstance(t, dict) and t.get("project")), None)
    try:
        return project_id(raw) if raw is not None else None
    except LearningError:
        return None


class LiveRegions:
    """One request's labelled regions on their way into ``index`` (project ``project``)."""

    def __init__(self, index: RegionIndex, project: str):
        self.index = index
        self.project = project
        self._records: list[RegionRecord] = []
        self._vectors: list[np.ndarray] = []
        #: per label request: (model key, image digest, vectors by position, similarities by position)
        self._requests: dict[int, tuple[str, str, list[np.ndarray | None], list[float | None]]] = {}

    @classmethod
    def of(cls, service: Service, project: Any, tasks: Sequence[Any]) -> "LiveRegions | None":
        """The live indexing of a request, None without a region index or a known project."""
        pid = region_project(project, tasks)
        if service.search_index is None or pid is None:
            return None
        return cls(service.search_index, pid)

    def vectors(self, regions: Sequence[RegionResult]) -> list[np.ndarray | None]:
        """Each region's embedding ``[D]`` (None: a failed region, none sent, or one that does not decode)."""
        out: list[np.ndarray | None] = []
        for region in regions:
            try:
                out.append(region.vector() if region.ok and region.labels else None)
            except ProtocolError as exc:
                log.warning("project %s: %s", self.project, exc)
                out.append(None)
        return out

    def similarities(self, model: str, vectors: Sequence[np.ndarray | None]) -> list[float | None]:
        """:meth:`RegionIndex.labelled_similarity` of the vectors that are there (None elsewhere)."""
        rows = [i for i, v in enumerate(vectors) if v is not None]
        out: list[float | None] = [None] * len(vectors)
        if rows:
            found = self.index.labelled_similarity(self.project, model,
                                                   np.stack([vectors[i] for i in rows]))  # type: ignore[misc]
            for i, sim in zip(rows, found):
                out[i] = sim
        return out

    def label_request(self, idx: int, model: dict[str, Any], params: InversionParams, image_sha256: str,
                      regions: Sequence[RegionResult]) -> None:
        """Take label request ``idx``'s outcome (``regions`` in mask order; ``model``: the worker's model info):
        its embeddings and their similarities, for :meth:`label_region`."""
        key = model_key(model, params)
        vectors = self.vectors(regions)
        self._requests[idx] = (key, image_sha256, vectors, self.similarities(key, vectors))

    def label_region(self, idx: int, pos: int, task: Any, region_id: str, items: list[dict[str, Any]],
                     res: RegionResult) -> None:
        """A drawn region labelled (position ``pos`` of request ``idx``) and answered as ``items``: its
        similarity into their meta, its record queued."""
        key, sha, vectors, sims = self._requests.get(idx, ("", "", [], []))
        vector = vectors[pos] if pos < len(vectors) else None
        if vector is not None:
            self._add(key, sha, task, region_id, items, res, vector, sims[pos])

    def proposals(self, model: dict[str, Any], params: InversionParams, image_sha256: str, task: Any,
                  answered: Sequence[tuple[str, list[dict[str, Any]], RegionResult]]) -> None:
        """One image's proposals answered as ``(region id, items, result)``: similarities into the items' meta,
        records queued. ``params``: as the job ran (its size)."""
        key = model_key(model, params)
        vectors = self.vectors([res for _, _, res in answered])
        for (rid, items, res), vec, sim in zip(answered, vectors, self.similarities(key, vectors)):
            if vec is not None:
                self._add(key, image_sha256, task, rid, items, res, vec, sim)

    def _add(self, key: str, sha: str, task: Any, region_id: str, items: list[dict[str, Any]], res: RegionResult,
             vector: np.ndarray, similarity: float | None) -> None:
        with_meta = [it for it in items if isinstance(it.get("meta"), dict)]
        if similarity is not None:
            for it in with_meta:
                it["meta"]["labelled_similarity"] = round(float(similarity), SIMILARITY_DIGITS)
        item = with_meta[0] if with_meta else {}
        score = item.get("score")  # as Label Studio shows it (a proposal's: label probability x objectness)
        score = score if isinstance(score, (int, float)) and not isinstance(score, bool) else res.labels[0].score
        try:
            self._records.append(predicted_record(key, self.project, int(task), str(region_id), item,
                                                  res.labels[0].label, float(score), sha))
            self._vectors.append(np.asarray(vector, np.float32))
        except (TypeError, ValueError) as exc:  # a task without a numeric id, a record the index refuses
            log.warning("project %s: region %s of task %r not indexed (%s)", self.project, region_id, task, exc)

    def submit(self) -> int:
        """Queue the regions taken so far for the background writer; returns how many."""
        n = len(self._records)
        if n:
            self.index.index_later(self._records, np.stack(self._vectors))
            self._records, self._vectors = [], []
        return n
