"""Learning from annotations: Label Studio events -> examples (LETs of labelled regions) -> prototypes.

What Label Studio 1.23 sends (checked against its source, ``label_studio/ml/models.py`` and ``webhooks/``, and
a live run, ``tests/e2e/test_active_learning.py``):

* Connecting an ML backend to a project creates a project webhook to ``<backend url>/webhook`` with
  ``send_payload=True, send_for_all_actions=True`` (``create_ml_webhook``; nothing to switch on). Every
  project event is then POSTed as ``{"action": ..., <payload>, "project": {project, incl. id and label_config}}``:

  - ``ANNOTATION_CREATED`` / ``ANNOTATION_UPDATED``: ``"annotation"`` (id, result, was_cancelled, task,
    project, ...) and ``"task"`` (id, data, ...);
  - ``ANNOTATIONS_CREATED`` (bulk, e.g. import): ``"annotation"`` a list and ``"task"`` a list;
  - ``ANNOTATIONS_DELETED``: ``"annotations": [{"id": ...}, ...]`` (ids only, hence the store's
    annotation -> examples index);
  - others (``TASKS_CREATED``, ``PROJECT_UPDATED``, ...): acknowledged and ignored.

* The model page's *Start training*: with the feature flag ``ff_back_dev_1417_start_training_mlbackend_webhooks``
  (on in 1.23's ``feature_flags.json``) Label Studio POSTs ``{"action": "START_TRAINING", "project": {...}}`` to
  ``/webhook``; without it, ``/train`` with ``{"annotations": [tasks with annotations], "project": "<id>.<ts>",
  "label_config": ...}``. Both rebuild the project's examples from *all* its annotations, read through the Label
  Studio API (label-studio-sdk), as does ``maskinv-rebuild-examples``.

For every labelled region of a submitted annotation, its LET (``embed_regions`` job) is recorded as an example of
each of its labels. Cancelled (skipped) annotations and unlabelled regions give no examples; predictions are
never read, and a region submitted exactly as a prediction proposed it (``origin: "prediction"``,
backend.learning.origin) is no example unless the project opts in (MASKINV_LEARN_PREDICTED).

An event obeys the limits of a /predict request: at most MASKINV_MAX_TASKS annotations, MASKINV_MAX_REGIONS
regions per annotation, MASKINV_MAX_MASK_MPIX rasterised mask pixels in all; a region's labels must be labels
of its control (the label config, or MASKINV_LABELS), at most MAX_REGION_LABELS of them. An annotation over a
limit is skipped whole (its stored examples stay as they were); a region with a bad label gives no example. The
event's answer lists what was skipped and why (``skipped``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Protocol

import numpy as np

from worker.protocol import (EmbedRegionsJob, InversionParams, PayloadError, check_label_caps, decode_vectors,
                             encode_vectors, sha256_hex)

from backend.bounded_cache import BoundedCache
from backend.learning.examples import Example, ExampleStore, ExampleStoreError, make_example_store
from backend.labelstudio.api import sdk_tasks
from backend.labelstudio.label_config import LabelConfigError, ProjectConfig
from backend.learning.fit import FIT_VERSION, example_features, fit_prototypes, vision_prototypes
from backend.trust.calibration import Calibration
from backend.trust.project import calibrate_examples
from backend.learning.origin import learns_untouched, untouched
from backend.labelstudio.regions import Region, RegionError, collect_regions, region_mask
from backend.search.index import RegionIndex, index_examples

if TYPE_CHECKING:
    from backend.images.fetch import ImageFetcher
    from backend.settings import Settings

log = logging.getLogger(__name__)

ANNOTATION_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED")
DELETE_EVENTS = ("ANNOTATIONS_DELETED", "ANNOTATION_DELETED")
#: project events that only remove regions from the search index (backend.search.index)
TASK_DELETE_EVENTS = ("TASKS_DELETED",)
TRAIN_EVENTS = ("START_TRAINING",)
#: value keys of a region result item that hold its labels
LABEL_KEYS = ("brushlabels", "polygonlabels", "rectanglelabels", "ellipselabels", "keypointlabels", "labels")
#: seconds an embed job (one annotation's regions) may take
EMBED_TIMEOUT_S = 300.0
#: prototype sets and text prototypes kept in memory (each cache: at most this many entries and CACHE_BYTES)
CACHE_ENTRIES = 64
CACHE_BYTES = 64 << 20
#: labels one region may carry (each label of a region is one example)
MAX_REGION_LABELS = 20
#: skipped regions/annotations listed in an event's answer (the rest are counted in ``skipped_more``)
SKIPPED_LISTED = 100


class LearningError(ValueError):
    """A webhook or training request that cannot be used; the message says why, ``status`` the HTTP status (400
    bad request, 404 project unknown to Label Studio, 422 unusable content, 502 Label Studio failed)."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


def project_id(value: Any) -> str:
    """Label Studio project id as a string: from ``{"id": 3}``, ``3`` or ``"3.1700000000"`` (ML API's uid).
    ASCII digits only (``"²"`` and ``"１２"`` are digits to Python, not project ids), at most 18 (an int64)."""
    if isinstance(value, dict):
        value = value.get("id")
    if isinstance(value, bool) or value is None:
        raise LearningError("no project id in the request")
    text = str(value).split(".", 1)[0].strip() if isinstance(value, (int, str)) else ""
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise LearningError(f"bad project id {str(value)[:50]!r}: a Label Studio project id is a number", 400)
    return text


def region_labels(items: list[Any], region_id: str, geometry: dict[str, Any]) -> list[str]:
    """The labels an annotator gave one region: its geometry item's ``<tool>labels`` plus any ``labels`` item
    with the same id."""
    out: list[str] = []
    value = geometry.get("value")
    sources: list[dict[str, Any]] = [value if isinstance(value, dict) else {}]
    sources += [it["value"] for it in items if isinstance(it, dict) and str(it.get("id")) == region_id
                         and str(it.get("type") or "").lower() == "labels" and isinstance(it.get("value"), dict)]
    for v in sources:
        for key in LABEL_KEYS:
            labels = v.get(key)
            if isinstance(labels, list):
                out += [x.strip() for x in labels if isinstance(x, str) and x.strip()]
    return list(dict.fromkeys(out))


def model_key(model: dict[str, Any] | None, params: InversionParams) -> str:
    """What made a LET: model id + inversion size, steps, lr, alpha. Not the views: one- and two-view
    embeddings of examples and regions mix without loss (scene world, 8 examples per class: two-view regions
    scored by one-view examples 51.9 vs 52.0 Acc@1, one-view regions by two-view examples 48.1 vs 48.1;
    ``benchmarks/results/few_shot.md``), so examples stored before a change of MASKINV_EXAMPLE_VIEWS keep
    counting."""
    mid = (model or {}).get("id") or "?"
    return f"{mid}|{params.size}|{params.steps}|{params.lr!r}|{params.alpha!r}"


@dataclass
class EventOutcome:
    action: str | None
    project: str | None
    status: str  # "stored" | "deleted" | "rebuilt" | "ignored" | "unchanged" | "skipped"
    annotations: int = 0
    examples: int = 0
    reason: str = ""
    skipped: list[dict[str, Any]] = field(default_factory=list)  # {"annotation", "region", "error", "kind"}
    skipped_more: int = 0  # skipped beyond the SKIPPED_LISTED listed
    untouched: int = 0  # regions submitted as a prediction proposed them (no examples, backend.learning.origin)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v not in ("", None, [])
                and not (k in ("skipped_more", "untouched") and v == 0)}


@dataclass
class Allowance:
    """What one event (or one annotation of a rebuild) may still use, and what it left out.

    ``mask_pixels``: rasterised mask pixels left (MASKINV_MAX_MASK_MPIX, as for one /predict request).
    """

    mask_pixels: int
    skipped: list[dict[str, Any]] = field(default_factory=list)
    skipped_more: int = 0
    untouched: int = 0  # regions left out because they were submitted as predicted

    def skip(self, annotation: Any, region: str | None, error: str, kind: str) -> None:
        """Record (and log) what was left out: ``kind`` "limit" (a request limit), "label" or "region"."""
        log.info("annotation %s region %s not used: %s", annotation, region, error)
        if len(self.skipped) < SKIPPED_LISTED:
            self.skipped.append({"annotation": str(annotation), "region": region, "error": error, "kind": kind})
        else:
            self.skipped_more += 1


class AnnotationSkipped(Exception):
    """An annotation over a limit: left out whole, its stored examples kept (recorded in the Allowance)."""


def _doc_bytes(key: tuple, doc: dict | None) -> int:
    """Bytes of a cached prototypes document (its base64 vectors dominate) and its key."""
    return (len(json.dumps(doc)) if doc else 0) + len(repr(key))


class EmbedRunner(Protocol):
    """The part of a dispatcher the learner uses: one ``embed_regions`` job (worker.jobs.embed)."""

    def run_embed(self, payload: dict, timeout_s: float) -> dict: ...


class Learner:
    """Owns the example store and turns events into examples and examples into prototypes.

    What it needs, and nothing more: ``settings``; ``dispatcher`` (embed jobs); ``fetcher`` (annotation images);
    ``parse_config`` (label config XML -> ProjectConfig, raising LabelConfigError); ``setup_fallbacks`` (Label
    Studio's /setup hostname and token); ``model_info`` (the worker's model, waited for a little); ``open_store``
    (opens the example store on first use) or ``store``.
    """

    def __init__(self, settings: Settings, dispatcher: EmbedRunner, fetcher: ImageFetcher,
                 parse_config: Callable[[str], ProjectConfig],
                 setup_fallbacks: Callable[[], tuple[str | None, str | None]],
                 model_info: Callable[[], dict[str, Any] | None],
                 open_store: Callable[[], ExampleStore] | None = None, store: ExampleStore | None = None):
        self.settings = settings
        self.dispatcher = dispatcher
        self.fetcher = fetcher
        self._parse_config = parse_config
        self._setup_fallbacks = setup_fallbacks
        self._model_info = model_info
        self._open_store = open_store or (lambda: make_example_store(settings, None))
        self._store = store
        # (model id, labels, templates) -> ([L, D] text prototypes, logit scale)
        self._text: BoundedCache[tuple, tuple[np.ndarray, float]] = BoundedCache(
            CACHE_ENTRIES, CACHE_BYTES, lambda k, v: v[0].nbytes + len(repr(k)))
        self._protos: BoundedCache[tuple, dict | None] = BoundedCache(CACHE_ENTRIES, CACHE_BYTES, _doc_bytes)
        # calibrations (backend.trust), by the same key as the prototypes plus the target precision
        self._trust: BoundedCache[tuple, dict | None] = BoundedCache(CACHE_ENTRIES, CACHE_BYTES, _doc_bytes)
        self._lock = threading.Lock()
        #: the region search index the examples also go to (None: MASKINV_SEARCH_STORE=off)
        self.search_index: RegionIndex | None = None

    @property
    def store(self) -> ExampleStore:
        """The example store, opened (SQLite: created) on first use."""
        with self._lock:
            if self._store is None:
                self._store = self._open_store()
            return self._store

    def has_store(self) -> bool:
        """Whether examples can exist yet (embedded mode: the SQLite file was created by a first event)."""
        if self._store is not None or not self.settings.embedded:
            return True
        from pathlib import Path
        import os

        return (Path(os.path.expanduser(self.settings.data_dir)) / "examples.sqlite3").exists()

    def example_params(self, params: InversionParams) -> InversionParams:
        """``params`` as examples are embedded with, and as the predictions that use them are made:
        ``MASKINV_EXAMPLE_VIEWS`` views (the region's embedding is then the mean direction of its views' LETs)."""
        return dataclasses.replace(params, views=self.settings.example_views)

    # ------------------------------------------------------------------ events
    def handle_event(self, data: dict[str, Any]) -> EventOutcome:
        """One webhook body (see the module docstring)."""
        action = data.get("action") if isinstance(data.get("action"), str) else None
        log.info("webhook %s (payload keys: %s)", str(action)[:60], ", ".join(sorted(map(str, data))[:20]))
        if action in TASK_DELETE_EVENTS and self.search_index is not None:
            tasks = [t.get("id") for t in data.get("tasks") or [] if isinstance(t, dict)]
            removed = self.search_index.remove_tasks(project_id(data.get("project")), tasks)
            return EventOutcome(action, project_id(data.get("project")), "deleted" if removed else "unchanged")
        if action not in ANNOTATION_EVENTS + DELETE_EVENTS + TRAIN_EVENTS:
            return EventOutcome(action, None, "ignored", reason="not an annotation or training event")
        project = project_id(data.get("project"))
        if action in TRAIN_EVENTS:
            return self.rebuild(project)
        if action in DELETE_EVENTS:
            anns = data.get("annotations") if action == "ANNOTATIONS_DELETED" else [data.get("annotation")]
            ids = [str(a.get("id")) for a in anns or [] if isinstance(a, dict) and a.get("id") is not None]
            removed = sum(self.store.delete_annotation(project, i) for i in ids)
            if self.search_index is not None:
                self.search_index.remove_annotations(project, ids)
            log.info("project %s: %d annotation(s) deleted, %d had examples", project, len(ids), removed)
            return EventOutcome(action, project, "deleted" if removed else "unchanged", annotations=removed)
        cfg = self._config((data.get("project") or {}).get("label_config") if isinstance(data.get("project"), dict)
                           else None)
        return self._store_annotations(action, project, cfg, data.get("annotation"), data.get("task"))

    def _store_annotations(self, action: str, project: str, cfg: ProjectConfig, anns: Any, tasks: Any
                           ) -> EventOutcome:
        """The examples of an event's annotations, within the limits of one /predict request (module docstring)."""
        anns = anns if isinstance(anns, list) else [anns]
        anns = [a for a in anns if isinstance(a, dict) and a.get("id") is not None]
        tasks = tasks if isinstance(tasks, list) else [tasks]
        by_id = {t.get("id"): t for t in tasks if isinstance(t, dict)}
        allowance = Allowance(self.settings.max_mask_pixels)
        changed, n_examples = 0, 0
        for i, ann in enumerate(anns):
            if i >= self.settings.max_tasks:
                allowance.skip(ann["id"], None, f"the event has {len(anns)} annotations, more than MASKINV_MAX_TASKS="
                               f"{self.settings.max_tasks}; Start training reads them all from Label Studio", "limit")
                continue
            task = by_id.get(ann.get("task")) or (tasks[0] if len(tasks) == 1 and isinstance(tasks[0], dict) else None)
            try:
                examples = self.annotation_examples(cfg, ann, task, allowance, project)
            except AnnotationSkipped:
                continue
            changed += self.store.replace_annotation(project, str(ann["id"]), examples)
            index_examples(self.search_index, project, ann, task, examples)
            n_examples += len(examples)
        log.info("project %s: %s -> %d example(s), %d annotation(s) changed, %d skipped", project, action, n_examples,
                 changed, len(allowance.skipped) + allowance.skipped_more)
        status = "stored" if changed else "skipped" if allowance.skipped else "unchanged"
        return EventOutcome(action, project, status, annotations=changed, examples=n_examples,
                            skipped=allowance.skipped, skipped_more=allowance.skipped_more,
                            untouched=allowance.untouched)

    def _config(self, xml: Any) -> ProjectConfig:
        if not isinstance(xml, str) or not xml.strip():
            raise LearningError("the event has no project.label_config", 400)
        try:
            return self._parse_config(xml)
        except LabelConfigError as exc:
            raise LearningError(f"label config: {exc}", 400) from None

    def region_examples_labels(self, items: list[Any], region: Region) -> tuple[list[str], str | None]:
        """The labels of ``region`` that become examples, and why any were refused: at most MAX_REGION_LABELS, each
        within the label caps (MASKINV_MAX_LABEL_CHARS) and a label of its control (config or MASKINV_LABELS)."""
        labels = region_labels(items, region.id, region.item)
        if len(labels) > MAX_REGION_LABELS:
            return [], f"the region has {len(labels)} labels, more than {MAX_REGION_LABELS}"
        try:
            check_label_caps(labels, self.settings.max_label_chars, self.settings.max_vocab_bytes, "label")
        except PayloadError as exc:
            return [], str(exc)
        vocab = set(region.control.labels) | set(self.settings.extra_labels)
        unknown = [lab for lab in labels if lab not in vocab]
        if not unknown:
            return labels, None
        return ([lab for lab in labels if lab in vocab],
                f"{', '.join(repr(u[:40]) for u in unknown[:5])} not a label of control {region.control.name!r} "
                "(its <Label> values, or MASKINV_LABELS): not an example")

    # ------------------------------------------------------------------ annotations -> examples
    def annotation_examples(self, cfg: ProjectConfig, ann: dict[str, Any], task: dict[str, Any] | None,
                            allowance: Allowance | None = None, project: str | None = None) -> list[Example]:
        """Examples of one annotation: every labelled region's LET, once per label; none for a cancelled one,
        none for a region submitted untouched from a prediction unless ``project`` opts in (MASKINV_LEARN_PREDICTED;
        counted in the allowance's ``untouched``).

        Within ``allowance`` (default: one /predict request's); what is left out is recorded there. Raises
        AnnotationSkipped when the annotation is over a limit (MASKINV_MAX_REGIONS, MASKINV_MAX_MASK_MPIX).
        """
        allowance = allowance or Allowance(self.settings.max_mask_pixels)
        items = ann.get("result")
        if ann.get("was_cancelled") or not isinstance(items, list) or not items:
            return []
        if not isinstance(task, dict):
            raise LearningError(f"annotation {ann.get('id')}: the event has no task (needed for the image)")
        regions, problems = collect_regions(items, cfg)
        if len(regions) + len(problems) > self.settings.max_regions:
            allowance.skip(ann.get("id"), None, f"the annotation has {len(regions) + len(problems)} regions, more "
                           f"than MASKINV_MAX_REGIONS={self.settings.max_regions}; its stored examples are kept",
                           "limit")
            raise AnnotationSkipped()
        for p in problems:
            allowance.skip(ann.get("id"), p.id, p.error, "region")
        labelled = []
        keep_untouched = learns_untouched(self.settings.learn_predicted, project)
        for r in regions:
            if not keep_untouched and untouched(items, r.id):
                allowance.untouched += 1
                continue
            labs, refused = self.region_examples_labels(items, r)
            if refused:
                allowance.skip(ann.get("id"), r.id, refused, "label")
            if labs:
                labelled.append((r, labs))
        if not labelled:
            return []
        raw_data = task.get("data")
        data: dict[str, Any] = raw_data if isinstance(raw_data, dict) else {}
        params = self.example_params(self.settings.params)
        out: list[Example] = []
        by_image: dict[str, list[tuple[Region, list[str]]]] = {}
        for r, labs in labelled:
            by_image.setdefault(r.control.to_name, []).append((r, labs))
        hostname, token = self._setup_fallbacks()
        for image_name, regs in by_image.items():
            url = data.get(cfg.images[image_name].data_key)
            deadline = time.monotonic() + self.settings.fetch_timeout_s
            blob = self.fetcher.fetch(url, task.get("id"), hostname, token, deadline=deadline)
            out += self._image_examples(ann.get("id"), blob, regs, params, allowance)
        return out

    def _image_examples(self, annotation: Any, blob: bytes, regs: list[tuple[Region, list[str]]],
                        params: InversionParams, allowance: Allowance) -> list[Example]:
        """The examples of one image's labelled regions: their masks (bool ``[H, W]``, within the allowance's
        pixels) embedded by one ``embed_regions`` job, each region's LET ``[D]`` once per label."""
        from backend.images.fetch import image_size

        size = image_size(blob)
        masks, used = [], []
        for r, labs in regs:
            if allowance.mask_pixels <= 0:
                allowance.skip(annotation, r.id, "the event's masks exceed MASKINV_MAX_MASK_MPIX="
                               f"{self.settings.max_mask_pixels >> 20}; the annotation's stored examples are "
                               "kept (Start training rebuilds it)", "limit")
                raise AnnotationSkipped()
            try:
                masks.append(region_mask(r, size, self.settings.mask_max_side, self.settings.max_image_pixels))
                used.append((r, labs))
                allowance.mask_pixels -= masks[-1].size
            except RegionError as exc:
                allowance.skip(annotation, r.id, str(exc), "region")
        if not masks:
            return []
        payload = EmbedRegionsJob.build(blob, [(r.id, np.asarray(m, bool)) for (r, _), m in zip(used, masks)],
                                        params, dtype="float32")
        result = self.dispatcher.run_embed(payload.to_dict(), EMBED_TIMEOUT_S)
        if result.get("error"):
            raise LearningError(f"annotation {annotation}: embedding failed: {result['error']}")
        key = model_key(result.get("model"), params)
        out: list[Example] = []
        for (r, labs), reg in zip(used, result.get("regions") or []):
            let_doc = (reg.get("meta") or {}).get("let")
            if reg.get("error") or not let_doc:
                allowance.skip(annotation, r.id, str(reg.get("error") or "no embedding")[:300], "region")
                continue
            crop_doc = (reg.get("meta") or {}).get("crop")
            crop = decode_vectors(crop_doc)[0] if crop_doc else None
            out += [Example(r.id, lab, key, decode_vectors(let_doc)[0], crop) for lab in labs]
        return out

    # ------------------------------------------------------------------ rebuild from Label Studio
    def rebuild(self, project: str, client: Any = None) -> EventOutcome:
        """Re-derive a project's examples from all its annotations in Label Studio (the source of truth). Each
        annotation has the allowance of one /predict request; one over a limit keeps its stored examples."""
        project = project_id(project)
        client = client or self._client()
        with label_studio_errors(project):
            proj = client.projects.get(id=int(project))
            cfg = self._config(getattr(proj, "label_config", None))
            seen: set[str] = set()
            n_ann = n_ex = 0
            outcome = EventOutcome("START_TRAINING", project, "rebuilt")
            for t in annotated_tasks(client, int(project)):
                for ann in t.get("annotations") or []:
                    if not isinstance(ann, dict) or ann.get("id") is None:
                        continue
                    seen.add(str(ann["id"]))
                    allowance = Allowance(self.settings.max_mask_pixels, outcome.skipped, outcome.skipped_more)
                    try:
                        examples = self.annotation_examples(cfg, ann, t, allowance, project)
                    except AnnotationSkipped:
                        continue
                    finally:
                        outcome.skipped_more = allowance.skipped_more
                        outcome.untouched += allowance.untouched
                    self.store.replace_annotation(project, str(ann["id"]), examples)
                    index_examples(self.search_index, project, ann, t, examples)
                    n_ann += bool(examples)
                    n_ex += len(examples)
        for stale in self.store.annotation_ids(project) - seen:
            self.store.delete_annotation(project, stale)
            if self.search_index is not None:
                self.search_index.remove_annotations(project, [stale])
        log.info("project %s: examples rebuilt from Label Studio: %d annotation(s), %d example(s)", project, n_ann,
                 n_ex)
        outcome.annotations, outcome.examples = n_ann, n_ex
        return outcome

    def _client(self) -> Any:
        url = self.settings.label_studio_url or self._setup_fallbacks()[0]
        key = self.settings.label_studio_api_key or self._setup_fallbacks()[1]
        if not url or not key:
            raise LearningError("rebuilding examples needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (or a /setup "
                                "that sent hostname and access_token)")
        from label_studio_sdk import LabelStudio

        return LabelStudio(base_url=url, api_key=key)

    # ------------------------------------------------------------------ prototypes
    def text_prototypes(self, labels: tuple[str, ...], params: InversionParams, model_id: str
                        ) -> tuple[np.ndarray, float]:
        """Normalised text prototypes ``[L, D]`` and the logit scale, from the worker (cached)."""
        key = (model_id, labels, tuple(params.templates))
        hit, cached = self._text.lookup(key)
        if hit and cached is not None:
            return cached
        result = self.dispatcher.run_embed(
            EmbedRegionsJob.build(None, [], params, labels, dtype="float32").to_dict(),
            EMBED_TIMEOUT_S)
        meta = result.get("meta") or {}
        if result.get("error") or "text" not in meta:
            raise LearningError(f"text prototypes: {result.get('error') or 'missing in the worker result'}")
        value = (decode_vectors(meta["text"]), float(meta["logit_scale"]))
        self._text.put(key, value)
        return value

    def version_suffix(self, project: Any, params: InversionParams) -> str:
        """``-ex<digest>`` naming the project's example set for the model and ``params`` ("" without examples, or
        when learning is off): what Service.examples_state writes into the predictions' regions
        (``meta.examples_state``), apart from the model version Label Studio compares."""
        if project is None or not self.settings.learn or not self.has_store():
            return ""
        try:
            pid = project_id(project)
        except LearningError:
            return ""
        version = self.store.version(pid)
        if not version:
            return ""
        mkey = model_key(self._model_info(), params)
        # the views the predictions are made with are part of what Label Studio must tell apart
        digest = sha256_hex(f"{version}\n{mkey}\n{FIT_VERSION}\nviews={self.settings.example_views}".encode())
        return f"-ex{digest[:8]}"

    def prototypes(self, project: str | None, labels: Iterable[str], params: InversionParams) -> dict | None:
        """The compact prototypes (worker.jobs.embed format) of a project's examples for ``labels``; None
        without examples for any of them (text only).

        Cached (CACHE_ENTRIES / CACHE_BYTES) by everything the answer depends on: the project and its example
        version, the model key (model id and inversion parameters), the labels, the templates (text prototypes)
        and FIT_VERSION. A cached answer costs one read of the version (Redis: one GET), no example is read.
        """
        if project is None or not self.settings.learn or not self.has_store():
            return None
        labels = tuple(labels)
        params = self.example_params(params)
        version = self.store.version(project)
        if not version:
            return None
        model = self._model_info()
        mkey = model_key(model, params)
        key = (project, version, mkey, labels, tuple(params.templates), FIT_VERSION)
        hit, doc = self._protos.lookup(key)
        if hit:
            return doc
        version, stored = self.store.snapshot(project, mkey)  # the examples of exactly one version
        key = (project, version, mkey, labels, tuple(params.templates), FIT_VERSION)
        index = {lab: i for i, lab in enumerate(labels)}
        examples = [e for e in stored if e.label in index]
        doc = None
        if examples:
            text, scale = self.text_prototypes(labels, params, (model or {}).get("id") or "?")
            x, text, anchor = example_features(examples, text)
            y = np.asarray([index[e.label] for e in examples])
            w, b = fit_prototypes(text, x, y, scale, anchor=anchor)
            means, counts = vision_prototypes(text, x, y)
            has = counts > 0
            doc = {"version": sha256_hex(f"{version}\n{mkey}\n{labels}\n{FIT_VERSION}".encode())[:12],
                   "labels": [lab for lab, h in zip(labels, has) if h],
                   "weights": encode_vectors(w[has], "float32"), "bias": [float(v) for v in b[has]],
                   "means": encode_vectors(means[has], "float32"), "counts": [int(c) for c in counts[has]]}
        self._protos.put(key, doc)
        return doc

    def calibration(self, project: str | None, labels: Iterable[str], params: InversionParams
                    ) -> Calibration | None:
        """The project's calibration of ``labels`` at MASKINV_TRUST_PRECISION (:mod:`backend.trust.project`: its
        examples scored out of sample); None without enough examples. Cached like :meth:`prototypes`, by the
        example version among others: recomputed, once, when the examples change."""
        if project is None or not self.settings.learn or not self.has_store():
            return None
        labels = tuple(labels)
        params = self.example_params(params)
        if not self.store.version(project):
            return None
        model = self._model_info()
        mkey = model_key(model, params)
        target = self.settings.trust_precision
        key = (project, self.store.version(project), mkey, labels, tuple(params.templates), FIT_VERSION, target)
        hit, doc = self._trust.lookup(key)
        if not hit:
            version, stored = self.store.snapshot(project, mkey)
            key = (project, version, mkey, labels, tuple(params.templates), FIT_VERSION, target)
            calib = None
            if any(e.label in labels for e in stored):
                text, scale = self.text_prototypes(labels, params, (model or {}).get("id") or "?")
                calib = calibrate_examples(text, scale, labels, stored, target)
            doc = calib.to_dict() if calib is not None else None
            self._trust.put(key, doc)
        return Calibration.from_dict(doc) if doc is not None else None



@contextlib.contextmanager
def label_studio_errors(project: str) -> Iterator[None]:
    """Label Studio API failures as LearningError: 404 for an unknown project, 502 otherwise. The message names
    the HTTP status only: never Label Studio's response headers or body, nor a URL with its query string."""
    from label_studio_sdk.core.api_error import ApiError

    try:
        yield
    except ApiError as exc:
        code = getattr(exc, "status_code", None)
        if code == 404:
            raise LearningError(f"project {project} not found in Label Studio (HTTP 404)", 404) from None
        hint = ": check LABEL_STUDIO_API_KEY" if code in (401, 403) else ""
        raise LearningError(f"Label Studio answered HTTP {code} while reading project {project}{hint}", 502) from None
    except Exception as exc:
        if type(exc).__module__.split(".")[0] == "httpx":  # transport errors (their text holds the URL)
            raise LearningError(f"Label Studio could not be read for project {project}: "
                                f"{exc.__class__.__name__}", 502) from None
        raise


def annotated_tasks(client: Any, project: int, page_size: int = 100) -> Iterable[dict[str, Any]]:
    """Every task of ``project`` with annotations, as dicts (:func:`backend.labelstudio.api.sdk_tasks`)."""
    return sdk_tasks(client, project, page_size, only_annotated=True)


__all__ = ["Learner", "LearningError", "EventOutcome", "ExampleStoreError", "project_id", "region_labels"]
