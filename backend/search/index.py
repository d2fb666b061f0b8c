"""The region index: what the product embeds goes in, what Label Studio deletes comes out.

* An annotation's labelled regions (the examples of :mod:`backend.learning.learner`, source ``human``), written
  when an annotation event stores them; the annotation's previous regions are replaced.
* ``maskinv-search backfill`` indexes a project's existing annotations and predictions
  (:mod:`backend.cli.search`): predicted regions as ``suggested`` (a label for a region an annotator drew) or
  ``proposed`` (a region the backend proposed), each with its top label and score.
* ``ANNOTATIONS_DELETED`` / ``ANNOTATION_DELETED`` remove an annotation's regions, ``TASKS_DELETED`` (a project
  event Label Studio 1.23 sends to the ML backend's webhook, ``{"tasks": [{"id"}]}``) every region of the tasks.

The vector of a region is the one labels are scored on: the ``embed_regions`` LET of the region, mixed with its
masked crop at ``MASKINV_CROP_WEIGHT``; its model key (model id + inversion size, steps, lr, alpha) goes into
every row, so a model change indexes anew and never mixes.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from backend.search.records import RegionRecord
from backend.search.store import RegionStore, open_store

log = logging.getLogger(__name__)


def region_box(item: dict[str, Any]) -> tuple[float, float, float, float]:
    """``[x, y, w, h]`` in percent of the image of a region result item (rectangles, polygons, keypoints; a brush
    gives zeros: its extent is in its RLE)."""
    value = item.get("value") if isinstance(item, dict) else None
    if not isinstance(value, dict):
        return (0.0, 0.0, 0.0, 0.0)
    try:
        if "points" in value and value["points"]:
            xs = [float(p[0]) for p in value["points"]]
            ys = [float(p[1]) for p in value["points"]]
            return (min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys))
        if "width" in value:
            return (float(value.get("x", 0)), float(value.get("y", 0)), float(value["width"]),
                    float(value.get("height", 0)))
    except (TypeError, ValueError, IndexError):
        pass
    return (0.0, 0.0, 0.0, 0.0)


class RegionIndex:
    """The project's regions in a :class:`backend.search.store.RegionStore` (opened on first use)."""

    def __init__(self, url: str, data_dir: str, opener: Callable[[str, str], RegionStore] = open_store):
        self.url = url
        self.data_dir = data_dir
        self._opener = opener
        self._store: RegionStore | None = None
        self._lock = threading.Lock()

    @property
    def store(self) -> RegionStore:
        with self._lock:
            if self._store is None:
                self._store = self._opener(self.url, self.data_dir)
            return self._store

    def index_records(self, records: Sequence[RegionRecord], vectors: np.ndarray) -> int:
        """Index records (any source) with their vectors ``[N, D]``."""
        return self.store.upsert(records, vectors)

    def remove_annotations(self, project: str, annotations: Iterable[Any]) -> int:
        n = self.store.delete_annotations(project, [str(a) for a in annotations])
        log.info("project %s: %d region(s) of deleted annotations left the search index", project, n)
        return n

    def remove_tasks(self, project: str, tasks: Iterable[Any]) -> int:
        ids = [int(t) for t in tasks if isinstance(t, int) or (isinstance(t, str) and t.isdigit())]
        n = self.store.delete_tasks(project, ids)
        log.info("project %s: %d task(s) deleted, %d region(s) left the search index", project, len(ids), n)
        return n

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None


def index_examples(index: RegionIndex | None, project: str, ann: Any, task: Any, examples: Sequence[Any]) -> int:
    """Index an annotation's examples (``backend.learning.examples.Example``: region id, label, model key, LET)
    as its ``human`` regions, one row per region (its labels joined by ``, ``). Never raises: a failed write is
    logged, learning goes on."""
    if index is None or not isinstance(ann, dict) or ann.get("id") is None:
        return 0
    try:
        items = {str(it.get("id")): it for it in ann.get("result") or [] if isinstance(it, dict)}
        task_id = task.get("id") if isinstance(task, dict) else ann.get("task")
        by_region: dict[str, tuple[list[str], np.ndarray, str]] = {}
        for ex in examples:
            labels, _, _ = by_region.setdefault(ex.region_id, ([], np.asarray(ex.let, np.float32), ex.model_key))
            labels.append(ex.label)
        index.store.delete_annotations(project, [str(ann["id"])])
        n = 0
        for model in {m for _, _, m in by_region.values()}:
            rows = [(rid, labs, vec) for rid, (labs, vec, m) in by_region.items() if m == model]
            recs = [RegionRecord(model=model, project=project, task=int(task_id or 0), annotation=str(ann["id"]),
                                 region=rid, label=", ".join(labs), score=1.0, source="human",
                                 box=region_box(items.get(rid, {}))) for rid, labs, _ in rows]
            n += index.store.upsert(recs, np.stack([v for _, _, v in rows]))
        return n
    except Exception as exc:  # noqa: BLE001 - the index is derived; learning must not fail on it
        log.warning("project %s: annotation %s not indexed for search (%s: %s)", project, ann.get("id"),
                    exc.__class__.__name__, exc)
        return 0
