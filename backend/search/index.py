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

from backend.search.records import RegionRecord, SearchFilter
from backend.search.store import RegionStore, open_store

log = logging.getLogger(__name__)
#: seconds a project and model found without human regions is believed to stay so (another process may add some)
NO_HUMANS_TTL_S = 60.0
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
        #: (project, model) -> (has human regions, when that was learned; None: never)
        self._humans: dict[tuple[str, str], tuple[bool, float | None]] = {}

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
        """``project`` has human regions of ``model`` now (an annotation was just indexed)."""
        self._humans[(str(project), model)] = (True, time.monotonic())

    def _check_humans(self, key: tuple[str, str]) -> None:
        """Whether the project has a human region of the model at all (an exact scan of the store: in the
        background, once per :data:`NO_HUMANS_TTL_S` at most)."""
        flt = SearchFilter(model=key[1], projects=(key[0],), sources=("human",))
        self._humans[key] = (bool(self.store.fetch(flt, 1)[0]), time.monotonic())

    def labelled_similarity(self, project: str, model: str, vectors: np.ndarray) -> list[float | None]:
        """Per row of ``vectors`` ``[N, D]``: the largest cosine similarity to a ``human`` region of ``project``
        indexed under ``model`` (one filtered top-1 query a row), None when there is none (or an approximate
        store index found none for the row). Never raises: on a store failure every row is None (logged).

        Whether the project has human regions of the model at all is known in this process (an annotation it
        indexed, a query that found one) or checked in the background; until then, and for
        :data:`NO_HUMANS_TTL_S` after a check found none, every row is None without a query (a filtered query
        that finds nothing costs a scan of the project's regions)."""
        x = np.asarray(vectors, np.float32)
        n = int(x.shape[0]) if x.ndim == 2 else 0
        key = (str(project), model)
        known, when = self._humans.get(key, (False, None))
        if n == 0 or not known:
            if n and (when is None or time.monotonic() - when >= NO_HUMANS_TTL_S):
                self._humans[key] = (False, time.monotonic())  # one check at a time
                self._later(lambda: self._check_humans(key))
            return [None] * n
        flt = SearchFilter(model=model, projects=key[:1], sources=("human",))
        try:
            hits = [self.store.search(row, flt, 1) for row in x]
            return [float(h[0].similarity) if h else None for h in hits]
        except Exception as exc:  # noqa: BLE001 - a similarity is an extra of the answer, never its failure
            log.warning("project %s: no labelled similarity (%s: %s)", project, exc.__class__.__name__, exc)
            return [None] * n

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
            index.humans_added(project, model)
        return n
    except Exception as exc:  # noqa: BLE001 - the index is derived; learning must not fail on it
        log.warning("project %s: annotation %s not indexed for search (%s: %s)", project, ann.get("id"),
                    exc.__class__.__name__, exc)
        return 0
