"""The region index: what the product embeds goes in, what Label Studio deletes comes out.

* An annotation's labelled regions (the examples of :mod:`backend.learning.learner`, source ``human``), written
  when an annotation event stores them; the annotation's previous regions are replaced.
* Every region the product labels, as it labels it: ``/predict`` (interactive suggestions, *Retrieve
  predictions*, background runs) and ``maskinv-annotate`` runs index their regions (:mod:`backend.predict.live`)
  as ``suggested`` (a label for a region an annotator drew) or ``proposed`` (a region the backend proposed), each
  with its top label and score, written in the background (:meth:`RegionIndex.index_later`) after the answer.
* ``maskinv-search backfill`` indexes a project's existing annotations and predictions
  (:mod:`backend.cli.search`) the same way (:func:`predicted_record`).
* ``ANNOTATIONS_DELETED`` / ``ANNOTATION_DELETED`` remove an annotation's regions, ``TASKS_DELETED`` (a project
  event Label Studio 1.23 sends to the ML backend's webhook, ``{"tasks": [{"id"}]}``) every region of the tasks.

The vector of a region is the one labels are scored on: the ``embed_regions`` LET of the region (or the
embedding a ``label_regions`` / ``propose_regions`` job returned with its labels), mixed with its masked crop at
``MASKINV_CROP_WEIGHT``; its model key (model id + inversion size, steps, lr, alpha) goes into every row, so a
model change indexes anew and never mixes. :meth:`RegionIndex.labelled_similarity` tells how close a region is
to the nearest ``human`` region of its project and model.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from backend.bounded_cache import BoundedCache
from backend.search.records import RegionRecord, SearchFilter
from backend.search.store import RegionStore, open_store

log = logging.getLogger(__name__)
#: seconds a project's human vectors are served from memory (another process may index annotations meanwhile)
HUMANS_TTL_S = 60.0
#: human regions of a project that labelled_similarity compares with, and the memory their cache may hold
HUMAN_ROWS = 20_000
HUMAN_CACHE_MB = 256
#: seconds the process waits at exit for the background writes still queued
EXIT_FLUSH_S = 10.0


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


def predicted_record(model: str, project: str, task: int, region: str, item: Mapping[str, Any], label: str,
                     score: float, image_sha256: str = "") -> RegionRecord:
    """The record of a region the product labelled: ``proposed`` when its result item says so
    (``meta.proposed``), else ``suggested``; its box from the item (:func:`region_box`); no annotation."""
    meta = item.get("meta")
    meta = meta if isinstance(meta, Mapping) else {}
    return RegionRecord(model=model, project=project, task=task, region=region, label=label, score=float(score),
                        source="proposed" if meta.get("proposed") else "suggested", image_sha256=image_sha256,
                        box=region_box(dict(item)))


class RegionIndex:
    """The project's regions in a :class:`backend.search.store.RegionStore` (opened on first use)."""

    def __init__(self, url: str, data_dir: str, opener: Callable[[str, str], RegionStore] = open_store):
        self.url = url
        self.data_dir = data_dir
        self._opener = opener
        self._store: RegionStore | None = None
        self._lock = threading.Lock()
        self._work: queue.Queue[Callable[[], None]] = queue.Queue()  # the background writer's jobs
        self._worker: threading.Thread | None = None
        #: (project, model) -> the project's human vectors [H, D] (labelled_similarity)
        self._humans: BoundedCache[tuple[str, str], np.ndarray] = BoundedCache(
            None, HUMAN_CACHE_MB << 20, lambda _k, v: int(v.nbytes) + 64, ttl_s=HUMANS_TTL_S)

    @property
    def store(self) -> RegionStore:
        with self._lock:
            if self._store is None:
                self._store = self._opener(self.url, self.data_dir)
            return self._store

    def index_records(self, records: Sequence[RegionRecord], vectors: np.ndarray) -> int:
        """Index records (any source) with their vectors ``[N, D]``."""
        return self.store.upsert(records, vectors)

    def index_later(self, records: Sequence[RegionRecord], vectors: np.ndarray) -> None:
        """Index records (any models) with their vectors ``[N, D]`` in this process's background writer, so the
        caller (a /predict answer) does not wait for the store; a failed write is logged (:meth:`flush` waits)."""
        if records:
            rows, vecs = list(records), np.asarray(vectors, np.float32)
            self._later(lambda: self._write(rows, vecs))

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until the background work queued so far is done (at most ``timeout_s``); False on timeout."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self._work.unfinished_tasks:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def _later(self, job: Callable[[], None]) -> None:
        with self._lock:
            if self._worker is None:
                self._worker = threading.Thread(target=self._work_loop, name="region-index-writer", daemon=True)
                self._worker.start()
                atexit.register(self.flush, EXIT_FLUSH_S)
        self._work.put(job)

    def _work_loop(self) -> None:
        while True:
            job = self._work.get()
            try:
                job()
            except Exception as exc:  # noqa: BLE001 - the index is derived: lost work never fails an answer
                log.warning("region index: background work failed (%s: %s)", exc.__class__.__name__, exc)
            finally:
                self._work.task_done()

    def _write(self, records: list[RegionRecord], vectors: np.ndarray) -> None:
        try:
            for model in dict.fromkeys(r.model for r in records):  # a store write holds one model
                rows = [i for i, r in enumerate(records) if r.model == model]
                self.store.upsert([records[i] for i in rows], vectors[rows])
                if any(records[i].source == "human" for i in rows):
                    self.humans_added(records[rows[0]].project, model)
        except Exception as exc:  # noqa: BLE001 - see _work_loop
            log.warning("%d region(s) of project %s not indexed for search (%s: %s)", len(records),
                        records[0].project, exc.__class__.__name__, exc)

    def humans_added(self, project: str, model: str) -> None:
        """``project`` has new human regions (an annotation was just indexed): forget its cached ones."""
        self._forget_humans(str(project))

    def _forget_humans(self, project: str) -> None:
        self._humans.discard(lambda key: key[0] == project)

    def human_vectors(self, project: str, model: str) -> np.ndarray:
        """The unit vectors ``[H, D]`` of the project's ``human`` regions under ``model`` (at most
        :data:`HUMAN_ROWS`, the first indexed), from a cache bounded by :data:`HUMAN_CACHE_MB` and kept
        :data:`HUMANS_TTL_S` seconds (another process may index annotations; this one's own writes and deletions
        drop the project's entry at once). ``[0, 0]`` without any."""
        key = (str(project), model)
        hit, cached = self._humans.lookup(key)
        if hit and cached is not None:
            return cached
        flt = SearchFilter(model=model, projects=(key[0],), sources=("human",))
        vectors = self.store.fetch(flt, HUMAN_ROWS)[1]
        vectors = np.asarray(vectors, np.float32) if len(vectors) else np.zeros((0, 0), np.float32)
        self._humans.put(key, vectors)
        return vectors

    def labelled_similarity(self, project: str, model: str, vectors: np.ndarray) -> list[float | None]:
        """Per row of ``vectors`` ``[N, D]``: the largest cosine similarity to a ``human`` region of ``project``
        indexed under ``model`` (exact, against :meth:`human_vectors`), None when there is none. Never raises: on
        a store failure every row is None (logged)."""
        x = np.asarray(vectors, np.float32)
        n = int(x.shape[0]) if x.ndim == 2 else 0
        if n == 0:
            return []
        try:
            humans = self.human_vectors(project, model)
        except Exception as exc:  # noqa: BLE001 - a similarity is an extra of the answer, never its failure
            log.warning("project %s: no labelled similarity (%s: %s)", project, exc.__class__.__name__, exc)
            return [None] * n
        if humans.shape[0] == 0 or humans.shape[1] != x.shape[1]:
            return [None] * n
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return [float(v) for v in (x @ humans.T).max(axis=1)]

    def remove_annotations(self, project: str, annotations: Iterable[Any]) -> int:
        n = self.store.delete_annotations(project, [str(a) for a in annotations])
        self._forget_humans(str(project))
        log.info("project %s: %d region(s) of deleted annotations left the search index", project, n)
        return n

    def remove_tasks(self, project: str, tasks: Iterable[Any]) -> int:
        ids = [int(t) for t in tasks if isinstance(t, int) or (isinstance(t, str) and t.isdigit())]
        n = self.store.delete_tasks(project, ids)
        self._forget_humans(str(project))
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
            index.humans_added(project, model)
        return n
    except Exception as exc:  # noqa: BLE001 - the index is derived; learning must not fail on it
        log.warning("project %s: annotation %s not indexed for search (%s: %s)", project, ann.get("id"),
                    exc.__class__.__name__, exc)
        return 0
