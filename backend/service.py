"""Process-wide backend state (the composition root): settings, dispatcher, image fetcher, parsed configs, /setup
fallbacks, the examples' learner, and the one ``model_version`` a project's predictions carry."""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from typing import Any

from worker.protocol import (InversionParams, PayloadError, RegistryReader, check_label_caps, check_limits,
                             check_templates, sha256_hex)

from backend.bounded_cache import BoundedCache
from backend.dispatch import Dispatcher, make_dispatcher
from backend.images.policy import FetchRefused, Origin
from backend.images.fetch import ImageFetcher
from backend.labelstudio.label_config import ConfigCache, LabelConfigError, ProjectConfig
from backend.learning.events import MemoryEvents, RedisEvents
from backend.learning.examples import ExampleStore, make_example_store
from backend.learning.learner import Learner
from backend.search.index import RegionIndex
from backend.settings import Settings

log = logging.getLogger(__name__)

#: request-level overrides accepted in ``params.maskinv`` of /predict (besides ``labels``)
OVERRIDABLE = ("steps", "lr", "alpha", "size", "top_k", "templates", "caption", "crop_weight")
#: seconds /setup and /predict wait for the embedded model to finish loading before answering a version
MODEL_WAIT_S = 2.5
#: versions answered for a config, kept for ``/versions``
RECENT_VERSIONS = 16


_MODEL_ID = re.compile(r"^[A-Za-z0-9._+-]{1,64}(/[A-Za-z0-9._:+-]{1,64})?$")


def short_model_id(info: dict[str, Any]) -> str:
    """The model id for ``model_version``: ``<name>/<weights>`` as the worker reports it (a pretrained tag,
    ``random-seed<N>`` or ``sha256-<digest of the checkpoint's content>``); an id that is not of that short,
    path-free form (e.g. from an older worker that put the checkpoint's path in it) is replaced by
    ``<name>/id-<digest of the id>``, so no path reaches Label Studio."""
    ident = str(info.get("id") or "")
    if _MODEL_ID.match(ident):
        return ident
    name = str(info.get("name") or ident.split("/", 1)[0])
    name = name if re.match(r"^[A-Za-z0-9._+-]{1,64}$", name) else "model"
    return f"{name}/id-{sha256_hex(ident.encode())[:12]}"


class PredictError(Exception):
    """A request that cannot be answered with predictions; ``status`` is the HTTP status to return."""

    def __init__(self, status: int, message: str, details: list[Any] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = details or []


class Service:
    """Everything a web worker process needs to answer /setup, /predict and /health."""

    def __init__(self, settings: Settings, dispatcher: Dispatcher | None = None):
        self.settings = settings
        self.dispatcher = dispatcher or make_dispatcher(settings)
        self.fetcher = ImageFetcher(settings.label_studio_url, settings.label_studio_api_key,
                                    timeout_s=settings.fetch_timeout_s, max_bytes=settings.max_image_bytes,
                                    cache_bytes=settings.image_cache_bytes, allowed_hosts=settings.allowed_hosts,
                                    local_files_root=settings.local_files_root, media_root=settings.media_root,
                                    cache_ttl_s=settings.image_cache_ttl_s)
        self.configs = ConfigCache()
        self._setup: dict[str, Any] = {}
        self._versions: BoundedCache[str, None] = BoundedCache(RECENT_VERSIONS)  # version -> None, newest last
        self._learner: Learner | None = None
        #: region search (MASKINV_SEARCH_STORE; None: off); the store opens on first use
        self.search_index = (RegionIndex(settings.search_store, os.path.expanduser(settings.data_dir))
                             if settings.search_store != "off" else None)
        self._events: MemoryEvents | RedisEvents | None = None
        self._lock = threading.Lock()

    def config(self, xml: object) -> ProjectConfig:
        """The parsed label config of ``xml`` (its XML text); raises LabelConfigError for anything else, and for a
        vocabulary over MASKINV_MAX_LABELS."""
        cfg = self.configs.get(xml, self.settings.extra_labels)
        for c in cfg.region_controls.values():
            if len(c.labels) > self.settings.max_labels:
                raise LabelConfigError(f"control {c.name!r} has {len(c.labels)} labels, more than "
                                       f"MASKINV_MAX_LABELS={self.settings.max_labels}")
            try:
                check_label_caps(c.labels, self.settings.max_label_chars, self.settings.max_vocab_bytes,
                             f"control {c.name!r}: label")
            except PayloadError as exc:
                raise LabelConfigError(str(exc)) from None
        return cfg

    def remember_setup(self, hostname: str | None, access_token: str | None) -> None:
        """Keep what Label Studio sent to /setup (used when LABEL_STUDIO_URL / _API_KEY are unset).

        Hostname and token are one pair, replaced together: a /setup naming a new host without a token clears
        the token (it belonged to the old host). A /setup with neither leaves the pair as it was. A hostname
        that is not a plain http(s) origin (userinfo, backslash, control characters, ...) is a 400.
        """
        hostname = hostname.strip().rstrip("/") if hostname and hostname.strip() else None
        access_token = access_token.strip() if access_token and access_token.strip() else None
        if hostname is not None:
            try:
                Origin.of(hostname)
            except FetchRefused as exc:
                raise PredictError(400, f"/setup hostname refused: {exc}") from None
        if hostname is None and access_token is None:
            return
        with self._lock:
            self._setup = {"hostname": hostname, "access_token": access_token}

    def setup_fallbacks(self) -> tuple[str | None, str | None]:
        with self._lock:
            return self._setup.get("hostname"), self._setup.get("access_token")

    def model_version(self, cfg: ProjectConfig | None = None, params: InversionParams | None = None,
                      labels: list[str] | None = None) -> str:
        """``maskinversion-<model id>-<digest>``: the digest covers the inversion parameters and the label sets
        of ``cfg`` (or the ``labels`` override), so Label Studio re-predicts when either changes.

        Without ``cfg`` (``/versions``, ``/health``): the last version answered for a config, else the version
        of the default parameters alone. ``MASKINV_MODEL_VERSION`` pins the string.
        """
        if self.settings.model_version:
            return self.settings.model_version
        try:
            # embedded mode: a /setup that races the model's warm-up waits for it a little (the version must
            # name the model, or Label Studio would see two versions)
            info = self.dispatcher.model_info(wait_s=MODEL_WAIT_S if cfg is not None else 0.0)
        except Exception:  # noqa: BLE001 - the version string must always be answerable
            info = None
        base = f"maskinversion-{short_model_id(info)}" if info and info.get("id") else "maskinversion"
        if cfg is None and params is None and labels is None:
            recent = self._versions.keys()
            if recent:
                return recent[-1]
        params = params or self.settings.params
        vocab = ({"*": list(labels)} if labels is not None else
                 {n: list(c.labels) for n, c in sorted(cfg.region_controls.items())} if cfg is not None else {})
        blob = json.dumps({"params": params.to_dict(), "labels": vocab}, sort_keys=True, separators=(",", ":"))
        version = f"{base}-{sha256_hex(blob.encode())[:8]}"
        if cfg is not None and "maskinversion-" in base:
            self._versions.put(version, None)
        return version

    def project_version(self, cfg: ProjectConfig, params: InversionParams | None = None,
                        labels: list[str] | None = None, project: Any = None) -> str:
        """The ``model_version`` of a project's predictions: :meth:`model_version` (model, inversion parameters,
        label sets), the same whatever the project's examples, so accepting an annotation does not make Label
        Studio treat every prediction as stale, and its score column keeps showing them. The example set a
        prediction was scored with is in its regions' ``meta.examples_state`` (:meth:`examples_state`).

        ``/setup``, ``/predict``, background runs and ``maskinv-annotate`` all answer this string, so Label
        Studio's *Retrieve predictions* skips exactly the tasks that hold a prediction of the current version.
        ``project`` is accepted for the callers' symmetry and does not change the answer.
        """
        return self.model_version(cfg, params or self.settings.params, labels)

    def examples_state(self, project: Any, params: InversionParams | None = None) -> str:
        """``ex<8 hex>`` naming ``project``'s example set for the model and ``params`` (``""`` without examples or
        with learning off): what the predictions carry in their regions' ``meta.examples_state``, so a curator
        can tell predictions made before the latest examples (docs/learning.md, "Refreshing predictions")."""
        if project is None or not self.settings.learn:
            return ""
        return self.learner.version_suffix(project, params or self.settings.params).lstrip("-")

    def stamp_examples(self, answers: list[Any], state: str) -> list[Any]:
        """Write ``state`` (:meth:`examples_state`) into every region's ``meta.examples_state`` of the predictions
        in ``answers`` (in place; error answers and ``[]`` unchanged); returns ``answers``."""
        if not state:
            return answers
        for answer in answers:
            items = answer.get("result") if isinstance(answer, dict) else None
            for item in items if isinstance(items, list) else []:
                if isinstance(item, dict) and isinstance(item.get("meta", {}), dict):
                    item.setdefault("meta", {})["examples_state"] = state
        return answers

    def versions(self) -> list[str]:
        """Versions answered recently (newest first), for ``/versions``."""
        seen = self._versions.keys()[::-1]
        return seen or [self.model_version()]

    def params(self, overrides: Any) -> tuple[InversionParams, list[str] | None]:
        """Inversion params = env defaults updated by ``params.maskinv`` of the request; plus a label override."""
        if overrides is None:
            return self.settings.params, None
        if not isinstance(overrides, dict):
            raise PredictError(400, "params.maskinv must be an object")
        unknown = set(overrides) - set(OVERRIDABLE) - {"labels"}
        if unknown:
            raise PredictError(400, f"unknown key(s) in params.maskinv: {sorted(unknown)}; "
                                    f"allowed: {sorted((*OVERRIDABLE, 'labels'))}")
        s = self.settings
        for key in ("steps", "size", "top_k"):
            if isinstance(overrides.get(key), bool):
                raise PredictError(400, f"params.maskinv.{key} must be an integer, got {overrides[key]!r}")
        for key in ("lr", "alpha", "crop_weight"):
            if isinstance(overrides.get(key), bool):
                raise PredictError(400, f"params.maskinv.{key} must be a number, got {overrides[key]!r}")
        if "caption" in overrides and not isinstance(overrides["caption"], bool):
            raise PredictError(400, f"params.maskinv.caption must be true or false, got {overrides['caption']!r}")
        templates = overrides.get("templates")
        if isinstance(templates, list) and len(templates) > s.max_templates:
            raise PredictError(400, f"params.maskinv.templates has {len(templates)} templates, more than "
                                    f"MASKINV_MAX_TEMPLATES={s.max_templates}")
        base = s.params.to_dict()
        base.update({k: v for k, v in overrides.items() if k != "labels"})
        try:
            params = InversionParams.from_dict(base)
            check_limits(params, s.max_steps, s.max_size)
        except (PayloadError, TypeError) as exc:
            raise PredictError(400, f"bad params.maskinv: {exc}") from None
        try:
            check_templates(params.templates, s.max_template_chars)
        except PayloadError as exc:
            raise PredictError(400, f"bad params.maskinv.templates: {exc}") from None
        labels = overrides.get("labels")
        if labels is not None:
            if (not isinstance(labels, list) or not labels
                    or not all(isinstance(x, str) and x.strip() for x in labels)):
                raise PredictError(400, "params.maskinv.labels must be a non-empty list of non-empty strings")
            labels = list(dict.fromkeys(x.strip() for x in labels))
            if len(labels) > s.max_labels:
                raise PredictError(400, f"params.maskinv.labels has {len(labels)} labels, more than "
                                        f"MASKINV_MAX_LABELS={s.max_labels}")
            try:
                check_label_caps(labels, s.max_label_chars, s.max_vocab_bytes, "params.maskinv.labels: label")
            except PayloadError as exc:
                raise PredictError(400, str(exc)) from None
        return params, labels

    def health(self) -> dict[str, Any]:
        """The dispatcher's health, plus the webhook events' outcome counts once an event came
        (backend.learning.events)."""
        info = self.dispatcher.health()
        with self._lock:
            events = self._events
        if events is not None:
            try:
                info["webhooks"] = events.counts()
            except Exception as exc:  # noqa: BLE001 - health must answer; Redis trouble is reported above
                info["webhooks"] = {"error": exc.__class__.__name__}
        return info

    @property
    def events(self) -> MemoryEvents | RedisEvents:
        """The queue of webhook events handled after the answer (backend.learning.events), started on first use."""
        learner = self.learner
        with self._lock:
            if self._events is None:
                if self.settings.embedded:
                    self._events = MemoryEvents(learner.handle_event, self.settings.webhook_queue)
                else:
                    self._events = RedisEvents(learner.handle_event, self.queue_connection(),
                                               self.settings.redis_prefix, self.settings.webhook_queue)
            return self._events

    def prepare_labels(self, cfg: ProjectConfig) -> None:
        """After ``/setup``: have the worker build the text prototypes of ``cfg``'s label sets in the background
        (``MASKINV_PREPARE_LABELS``), so that the project's first suggestion does not wait for the text encoder."""
        if self.settings.prepare_labels:
            self.dispatcher.prepare_labels([c.labels for c in cfg.region_controls.values()], self.settings.params)

    def worker_model(self) -> dict[str, Any] | None:
        """The worker's model; right after a restart the embedded dispatcher may still be loading it: wait a
        little (MODEL_WAIT_S), as ``model_version`` does."""
        return self.dispatcher.model_info(wait_s=MODEL_WAIT_S)

    def queue_connection(self) -> Any:
        """The Redis connection of the queue dispatcher; None in embedded mode."""
        return getattr(self.dispatcher, "connection", None)

    def worker_registry(self) -> RegistryReader | None:
        """The live workers and their models (queue mode); None in embedded mode."""
        return getattr(self.dispatcher, "registry", None)

    def open_example_store(self) -> ExampleStore:
        """The example store: SQLite under MASKINV_DATA_DIR in embedded mode, the dispatcher's Redis in queue mode."""
        return make_example_store(self.settings, self.queue_connection())

    @property
    def learner(self) -> Learner:
        """The project examples' learner, created on first use."""
        with self._lock:
            if self._learner is None:
                self._learner = Learner(self.settings, self.dispatcher,
                                        self.fetcher, self.config, self.setup_fallbacks, self.worker_model,
                                        open_store=self.open_example_store)
                self._learner.search_index = self.search_index
            return self._learner
