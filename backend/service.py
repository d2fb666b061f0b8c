"""Process-wide backend state: settings, dispatcher, image fetcher, parsed configs, /setup fallbacks."""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from typing import Any

from worker.payload import InversionParams, PayloadError, check_limits, sha256_hex

from .dispatch import Dispatcher, make_dispatcher
from .images import ImageFetcher
from .label_config import ConfigCache, LabelConfigError, ProjectConfig
from .settings import Settings

log = logging.getLogger(__name__)

#: request-level overrides accepted in ``params.maskinv`` of /predict (besides ``labels``)
OVERRIDABLE = ("steps", "lr", "alpha", "size", "top_k", "templates", "caption")
#: seconds /setup and /predict wait for the embedded model to finish loading before answering a version
MODEL_WAIT_S = 2.5
#: longest label or template accepted in params.maskinv (CLIP reads 77 tokens anyway)
MAX_TEXT = 1000


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
                                    local_files_root=settings.local_files_root, media_root=settings.media_root)
        self.configs = ConfigCache()
        self._setup: dict[str, Any] = {}
        self._versions: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def config(self, xml: str) -> ProjectConfig:
        """The parsed label config; raises LabelConfigError (also for a vocabulary over MASKINV_MAX_LABELS)."""
        cfg = self.configs.get(xml, self.settings.extra_labels)
        for c in cfg.region_controls.values():
            if len(c.labels) > self.settings.max_labels:
                raise LabelConfigError(f"control {c.name!r} has {len(c.labels)} labels, more than "
                                       f"MASKINV_MAX_LABELS={self.settings.max_labels}")
        return cfg

    def remember_setup(self, hostname: str | None, access_token: str | None) -> None:
        """Keep what Label Studio sent to /setup (used when LABEL_STUDIO_URL / _API_KEY are unset)."""
        with self._lock:
            if hostname:
                self._setup["hostname"] = hostname
            if access_token:
                self._setup["access_token"] = access_token

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
        base = f"maskinversion-{info['id']}" if info and info.get("id") else "maskinversion"
        if cfg is None and params is None and labels is None:
            with self._lock:
                if self._versions:
                    return next(reversed(self._versions))
        params = params or self.settings.params
        vocab = ({"*": list(labels)} if labels is not None else
                 {n: list(c.labels) for n, c in sorted(cfg.region_controls.items())} if cfg is not None else {})
        blob = json.dumps({"params": params.to_dict(), "labels": vocab}, sort_keys=True, separators=(",", ":"))
        version = f"{base}-{sha256_hex(blob.encode())[:8]}"
        if cfg is not None and "maskinversion-" in base:
            with self._lock:
                self._versions[version] = None
                self._versions.move_to_end(version)
                while len(self._versions) > 16:
                    self._versions.popitem(last=False)
        return version

    def versions(self) -> list[str]:
        """Versions answered recently (newest first), for ``/versions``."""
        with self._lock:
            seen = list(reversed(self._versions))
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
        for key in ("lr", "alpha"):
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
        if any(len(t) > MAX_TEXT for t in params.templates):
            raise PredictError(400, f"params.maskinv.templates must be at most {MAX_TEXT} characters each")
        labels = overrides.get("labels")
        if labels is not None:
            if (not isinstance(labels, list) or not labels
                    or not all(isinstance(x, str) and x.strip() for x in labels)):
                raise PredictError(400, "params.maskinv.labels must be a non-empty list of non-empty strings")
            labels = list(dict.fromkeys(x.strip() for x in labels))
            if len(labels) > s.max_labels:
                raise PredictError(400, f"params.maskinv.labels has {len(labels)} labels, more than "
                                        f"MASKINV_MAX_LABELS={s.max_labels}")
            if any(len(x) > MAX_TEXT for x in labels):
                raise PredictError(400, f"params.maskinv.labels must be at most {MAX_TEXT} characters each")
        return params, labels

    def health(self) -> dict[str, Any]:
        return self.dispatcher.health()

    @property
    def learner(self):
        """The project examples' learner (backend.learning.Learner), created on first use."""
        with self._lock:
            if getattr(self, "_learner", None) is None:
                from .learning import Learner

                self._learner = Learner(self)
            return self._learner
