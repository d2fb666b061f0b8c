"""Backend settings, read once from environment variables (every variable is in docs/configuration.md).

Nothing here imports torch. A malformed value raises :class:`SettingsError` naming the variable.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from worker.protocol import (DEFAULT_CROP_WEIGHT, DEFAULT_MAX_LABEL_CHARS, DEFAULT_MAX_SIZE, DEFAULT_MAX_STEPS,
                             DEFAULT_MAX_TEMPLATE_CHARS, DEFAULT_MAX_VOCAB_BYTES, DEFAULT_TEMPLATES, MAX_CROP_WEIGHT,
                             InversionParams, PayloadError, SettingError,
                             check_label_caps, check_templates, env_bool, env_choice, env_float, env_int, env_str)

from backend.images.policy import HostEntry, parse_allow_list
from backend.images.urls import UnsafeURL, parse_http_url


def redact_url(url: str | None) -> str | None:
    """``url`` with the password of its ``user:password@`` part replaced by ``***``."""
    if not url:
        return url
    return re.sub(r"^([a-z][a-z0-9+.-]*://[^:/@]*:)[^@/]*@", r"\1***@", url, flags=re.I)


class SettingsError(SettingError):
    """An environment variable has a value the backend cannot use."""


# the project's one family of parsers (worker.protocol), raising SettingsError naming the variable
def _str(env: Mapping[str, str], name: str, default: str) -> str:
    return env_str(env, name, default)


def _int(env: Mapping[str, str], name: str, default: int, lo: int | None = None, hi: int | None = None) -> int:
    return env_int(env, name, default, lo, hi, error=SettingsError)


def _float(env: Mapping[str, str], name: str, default: float, lo: float | None = None,
           hi: float | None = None) -> float:
    return env_float(env, name, default, lo, hi, error=SettingsError)


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    return env_bool(env, name, default, error=SettingsError)


def _allow_list(env: Mapping[str, str], name: str) -> tuple[HostEntry, ...]:
    try:
        return parse_allow_list(env.get(name))
    except ValueError as exc:
        raise SettingsError(f"{name}: {exc} (comma-separated host names, *.domain, IP addresses or CIDR networks, "
                            "optionally with :port)") from None


def _root(env: Mapping[str, str], name: str) -> str | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    path = os.path.abspath(raw)
    if path == os.path.abspath(os.sep):
        raise SettingsError(f"{name} must not be the file system root")
    return path


def _secret(env: Mapping[str, str], name: str) -> str | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    if not re.fullmatch(r"[A-Za-z0-9_-]{16,128}", raw):
        raise SettingsError(f"{name} must be 16 to 128 letters, digits, '-' or '_' (it becomes a URL path segment)")
    return raw


def _labels(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    raw = env.get(name, "")
    labels = tuple(dict.fromkeys(s.strip() for s in raw.split(",") if s.strip()))
    return labels


def _templates(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return DEFAULT_TEMPLATES
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = [s for s in raw.split("|") if s.strip()]
    if not isinstance(value, list) or not value or not all(isinstance(t, str) and "{}" in t for t in value):
        raise SettingsError(f"{name} must be a JSON list (or '|'-separated list) of templates containing '{{}}', "
                            f"got {raw!r}")
    try:
        return check_templates(value)
    except PayloadError as exc:
        raise SettingsError(f"{name}: {exc}") from None


@dataclass(frozen=True)
class Settings:
    """Everything the backend reads from the environment."""

    # HTTP server
    host: str = "0.0.0.0"
    port: int = 9090
    web_workers: int = 1
    web_threads: int = 4
    log_level: str = "INFO"
    basic_auth_user: str | None = None
    basic_auth_pass: str | None = None
    model_version: str | None = None
    # Label Studio (images)
    label_studio_url: str | None = None
    label_studio_api_key: str | None = None
    fetch_timeout_s: float = 30.0
    max_image_bytes: int = 64 * 1024 * 1024
    max_image_pixels: int = 50_000_000
    image_cache_bytes: int = 256 * 1024 * 1024
    mask_max_side: int = 1024
    max_mask_pixels: int = 512 * 1024 * 1024
    allowed_hosts: tuple[HostEntry, ...] = ()
    local_files_root: str | None = None
    media_root: str | None = None
    # Request limits (hostile or accidental overload)
    max_body_bytes: int = 32 * 1024 * 1024
    max_tasks: int = 100
    max_regions: int = 100
    max_labels: int = 1000
    max_templates: int = 50
    max_steps: int = DEFAULT_MAX_STEPS
    max_size: int = DEFAULT_MAX_SIZE
    # Queue (REDIS_URL unset: embedded mode)
    redis_url: str | None = None
    queue: str = "maskinv"
    redis_prefix: str = "maskinv"
    timeout_s: float = 60.0
    batch_timeout_s: float = 90.0
    job_timeout_s: int = 600
    result_ttl_s: int = 7 * 24 * 3600
    memory_cache_entries: int = 20000
    warmup: bool = True
    # Inversion defaults (overridable per request)
    params: InversionParams = field(default_factory=InversionParams)
    extra_labels: tuple[str, ...] = ()
    # Text and cache limits (docs/security.md)
    max_label_chars: int = DEFAULT_MAX_LABEL_CHARS
    max_vocab_bytes: int = DEFAULT_MAX_VOCAB_BYTES
    max_template_chars: int = DEFAULT_MAX_TEMPLATE_CHARS
    image_cache_ttl_s: float = 300.0
    # /setup: have the worker build the project's label prototypes in the background
    prepare_labels: bool = True
    # Project runs (backend.runs.background): the rest of a Retrieve predictions that overruns MASKINV_BATCH_TIMEOUT
    background_runs: bool = True
    run_workers: int = 0  # tasks in flight per background run (0: twice the live queue workers, 2 embedded)
    # Learning from annotations (examples, LET cache)
    learn: bool = True
    example_views: int = 2  # views (InversionParams.views) of examples and of predictions that use examples
    data_dir: str = "./maskinv-data"
    # region search (backend.search): "off", "embedded" (FAISS + SQLite under MASKINV_DATA_DIR) or a postgresql:// URL
    search_store: str = "embedded"
    let_ttl_s: int = 7 * 24 * 3600
    max_examples: int = 20000
    trust_precision: float = 0.95  # precision a verified suggestion must reach (backend.trust)
    # regions submitted untouched from a prediction: projects whose ones are examples ("*": every project)
    learn_predicted: tuple[str, ...] = ()
    # webhook events waiting for their examples in this process (embedded mode; 0: handled before answering)
    webhook_queue: int = 100
    # make the backend's model version the project's prediction source in Label Studio (needs the API key)
    select_version: bool = True
    # Proposals (batch mode): "auto" = tasks without any region get proposed regions; "off" = never
    proposals: str = "auto"
    max_proposals: int = 5
    # Budgets of what a request or an event can start (docs/security.md, "Limits")
    url_secret: str | None = None  # secret path prefix every route must carry (MASKINV_URL_SECRET)
    max_run_tasks: int = 10000  # tasks one background run may take
    max_runs: int = 4  # background runs at once in this backend process
    max_run_records: int = 200  # run records kept (oldest finished ones dropped first)
    max_projects: int = 1000  # projects the example store keeps examples for
    proposal_max_size: int = 448  # proposals are computed at most at this inversion size
    orphan_grace_s: float = 30.0  # a queued job no worker holds is re-enqueued after this many seconds

    @property
    def redis_url_redacted(self) -> str | None:
        """``redis_url`` with any password replaced by ``***`` (for logs and error messages)."""
        return redact_url(self.redis_url)

    @property
    def embedded(self) -> bool:
        return not self.redis_url

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env
        redis_url = env.get("REDIS_URL", "").strip() or None
        return cls(**_server(env, redis_url), **_inversion_defaults(env), **_label_studio(env),
                   **_request_limits(env), **_queue(env, redis_url), **_learning(env), **_proposals(env),
                   **_budgets(env))


# The readers of Settings.from_env, one per concern: each returns its fields by name.
def _server(env: Mapping[str, str], redis_url: str | None) -> dict[str, Any]:
    """The HTTP server: bind address, web processes and threads, log level, basic auth, model version."""
    user = env.get("BASIC_AUTH_USER", "").strip() or None
    password = env.get("BASIC_AUTH_PASS", "") or None
    if (user is None) != (password is None):
        raise SettingsError("BASIC_AUTH_USER and BASIC_AUTH_PASS must be set together")
    log_level = _str(env, "MASKINV_LOG_LEVEL", "INFO").upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise SettingsError(f"MASKINV_LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got {log_level!r}")
    return dict(
        host=_str(env, "MASKINV_HOST", "0.0.0.0"),
        port=_int(env, "MASKINV_PORT", 9090, 1, 65535),
        web_workers=_int(env, "MASKINV_WEB_WORKERS", 1 if redis_url is None else 2, 1, 64),
        web_threads=_int(env, "MASKINV_WEB_THREADS", 4, 1, 256),
        log_level=log_level,
        basic_auth_user=user,
        basic_auth_pass=password,
        model_version=env.get("MASKINV_MODEL_VERSION", "").strip() or None,
    )


def _inversion_defaults(env: Mapping[str, str]) -> dict[str, Any]:
    """The inversion defaults (overridable per request), the service's bounds on K and S, the extra labels and
    the text caps they are checked against."""
    try:
        params = InversionParams(
            steps=_int(env, "MASKINV_STEPS", 10),
            lr=_float(env, "MASKINV_LR", 0.1),
            alpha=_float(env, "MASKINV_ALPHA", 0.0),
            size=_int(env, "MASKINV_SIZE", 448),
            top_k=_int(env, "MASKINV_TOP_K", 3),
            templates=_templates(env, "MASKINV_TEMPLATES"),
            caption=_bool(env, "MASKINV_CAPTION", True),
            crop_weight=_float(env, "MASKINV_CROP_WEIGHT", DEFAULT_CROP_WEIGHT, 0.0, MAX_CROP_WEIGHT),
        )
        params.validate()
        max_steps = _int(env, "MASKINV_MAX_STEPS", DEFAULT_MAX_STEPS, 0, 1000)
        max_size = _int(env, "MASKINV_MAX_SIZE", DEFAULT_MAX_SIZE, 32, 2048)
        if params.steps > max_steps or params.size > max_size:
            raise PayloadError(f"MASKINV_STEPS={params.steps} / MASKINV_SIZE={params.size} exceed "
                               f"MASKINV_MAX_STEPS={max_steps} / MASKINV_MAX_SIZE={max_size}")
    except PayloadError as exc:
        raise SettingsError(f"bad inversion default ({exc}); "
                            "see MASKINV_STEPS/LR/ALPHA/SIZE/TOP_K/CROP_WEIGHT") from None
    max_label_chars = _int(env, "MASKINV_MAX_LABEL_CHARS", DEFAULT_MAX_LABEL_CHARS, 1)
    max_vocab_bytes = _int(env, "MASKINV_MAX_VOCAB_BYTES", DEFAULT_MAX_VOCAB_BYTES, 1)
    max_template_chars = _int(env, "MASKINV_MAX_TEMPLATE_CHARS", DEFAULT_MAX_TEMPLATE_CHARS, 1, 1000)
    extra_labels = _labels(env, "MASKINV_LABELS")
    try:
        check_label_caps(extra_labels, max_label_chars, max_vocab_bytes, "MASKINV_LABELS label")
        check_templates(params.templates, max_template_chars)
    except PayloadError as exc:
        raise SettingsError(str(exc)) from None
    return dict(params=params, max_steps=max_steps, max_size=max_size, extra_labels=extra_labels,
                max_label_chars=max_label_chars, max_vocab_bytes=max_vocab_bytes,
                max_template_chars=max_template_chars)


def _label_studio(env: Mapping[str, str]) -> dict[str, Any]:
    """Label Studio and the images: its URL and API key, fetch limits, the image cache, allowed hosts, roots."""
    ls_url = env.get("LABEL_STUDIO_URL", "").strip().rstrip("/") or None
    if ls_url and not ls_url.startswith(("http://", "https://")):
        raise SettingsError(f"LABEL_STUDIO_URL must start with http:// or https://, got {ls_url!r}")
    if ls_url:
        try:
            parse_http_url(ls_url)  # a URL two parsers read differently would misroute the API key
        except UnsafeURL as exc:
            raise SettingsError(f"LABEL_STUDIO_URL: {exc}") from None
    return dict(
        label_studio_url=ls_url,
        label_studio_api_key=env.get("LABEL_STUDIO_API_KEY", "").strip() or None,
        fetch_timeout_s=_float(env, "MASKINV_FETCH_TIMEOUT", 30.0, 0.1),
        max_image_bytes=_int(env, "MASKINV_MAX_IMAGE_MB", 64, 1) * 1024 * 1024,
        max_image_pixels=_int(env, "MASKINV_MAX_IMAGE_PIXELS", 50_000_000, 1),
        image_cache_bytes=_int(env, "MASKINV_IMAGE_CACHE_MB", 256, 0) * 1024 * 1024,
        mask_max_side=_int(env, "MASKINV_MASK_MAX_SIDE", 1024, 32),
        max_mask_pixels=_int(env, "MASKINV_MAX_MASK_MPIX", 512, 1) * 1024 * 1024,
        allowed_hosts=_allow_list(env, "MASKINV_ALLOWED_HOSTS"),
        local_files_root=_root(env, "LOCAL_FILES_DOCUMENT_ROOT"),
        media_root=_root(env, "MASKINV_MEDIA_ROOT"),
        image_cache_ttl_s=_float(env, "MASKINV_IMAGE_CACHE_TTL", 300.0, 0.0),
    )


def _request_limits(env: Mapping[str, str]) -> dict[str, Any]:
    """What one request may ask for: body size, tasks, regions, labels, templates."""
    return dict(
        max_body_bytes=_int(env, "MASKINV_MAX_BODY_MB", 32, 1) * 1024 * 1024,
        max_tasks=_int(env, "MASKINV_MAX_TASKS", 100, 1),
        max_regions=_int(env, "MASKINV_MAX_REGIONS", 100, 1),
        max_labels=_int(env, "MASKINV_MAX_LABELS", 1000, 1),
        max_templates=_int(env, "MASKINV_MAX_TEMPLATES", 50, 1),
    )


def _queue(env: Mapping[str, str], redis_url: str | None) -> dict[str, Any]:
    """The queue (REDIS_URL unset: embedded mode), its time limits and caches, warm-up, /setup's label preparation
    and the background runs."""
    return dict(
        redis_url=redis_url,
        queue=_str(env, "MASKINV_QUEUE", "maskinv"),
        redis_prefix=_str(env, "MASKINV_REDIS_PREFIX", "maskinv"),
        timeout_s=_float(env, "MASKINV_TIMEOUT", 60.0, 0.1),
        batch_timeout_s=_float(env, "MASKINV_BATCH_TIMEOUT", 90.0, 0.1),
        job_timeout_s=_int(env, "MASKINV_JOB_TIMEOUT", 600, 1),
        result_ttl_s=_int(env, "MASKINV_RESULT_TTL", 7 * 24 * 3600, 1),
        memory_cache_entries=_int(env, "MASKINV_MEMORY_CACHE_ENTRIES", 20000, 0),
        warmup=_bool(env, "MASKINV_WARMUP", True),
        prepare_labels=_bool(env, "MASKINV_PREPARE_LABELS", True),
        background_runs=_bool(env, "MASKINV_BACKGROUND_RUNS", True),
        run_workers=_int(env, "MASKINV_RUN_WORKERS", 0, 0, 256),
    )


def _search_store(env: Mapping[str, str], name: str) -> str:
    """``off``, ``embedded`` or a ``postgresql://`` URL."""
    raw = _str(env, name, "embedded").strip()
    if raw.lower() in ("off", "embedded"):
        return raw.lower()
    if not raw.startswith(("postgresql://", "postgres://")):
        raise SettingsError(f"{name} must be 'off', 'embedded' or a postgresql:// URL, got {redact_url(raw)!r}")
    return raw


def _learning(env: Mapping[str, str]) -> dict[str, Any]:
    """Learning from annotations: on or off, the views of examples, where examples live and how many."""
    return dict(
        learn=_bool(env, "MASKINV_LEARN", True),
        example_views=_int(env, "MASKINV_EXAMPLE_VIEWS", 2, 1, 2),
        data_dir=_str(env, "MASKINV_DATA_DIR", "./maskinv-data"),
        search_store=_search_store(env, "MASKINV_SEARCH_STORE"),
        let_ttl_s=_int(env, "MASKINV_LET_TTL", 7 * 24 * 3600, 0),
        max_examples=_int(env, "MASKINV_MAX_EXAMPLES", 20000, 1),
        trust_precision=_float(env, "MASKINV_TRUST_PRECISION", 0.95, 0.5, 0.999),
        learn_predicted=_project_ids(env, "MASKINV_LEARN_PREDICTED"),
        webhook_queue=_int(env, "MASKINV_WEBHOOK_QUEUE", 100, 0, 100000),
        select_version=_bool(env, "MASKINV_SELECT_VERSION", True),
    )


def _project_ids(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """``0``/``off``/empty: none; ``1``/``on``/``all``: every project (``("*",)``); else comma-separated
    Label Studio project ids."""
    raw = env.get(name, "").strip().lower()
    if raw in ("", "0", "off", "false", "no", "none"):
        return ()
    if raw in ("1", "on", "true", "yes", "all"):
        return ("*",)
    ids = tuple(x.strip() for x in raw.split(",") if x.strip())
    if not ids or not all(x.isascii() and x.isdigit() and len(x) <= 18 for x in ids):
        raise SettingsError(f"{name}={env.get(name, '')[:60]!r}: expected on, off or comma-separated project ids")
    return ids


def _proposals(env: Mapping[str, str]) -> dict[str, Any]:
    """Region proposals in batch mode: when, how many, at what inversion size."""
    return dict(
        proposals=env_choice(env, "MASKINV_PROPOSALS", "auto", ("auto", "off"), error=SettingsError),
        max_proposals=_int(env, "MASKINV_MAX_PROPOSALS", 5, 1, 1000),
        proposal_max_size=_int(env, "MASKINV_PROPOSAL_MAX_SIZE", 448, 32, 2048),
    )


def _budgets(env: Mapping[str, str]) -> dict[str, Any]:
    """What a request or an event can start: the URL secret, background runs, records, projects, re-enqueues."""
    return dict(
        url_secret=_secret(env, "MASKINV_URL_SECRET"),
        max_run_tasks=_int(env, "MASKINV_MAX_RUN_TASKS", 10000, 1),
        max_runs=_int(env, "MASKINV_MAX_RUNS", 4, 1, 256),
        max_run_records=_int(env, "MASKINV_MAX_RUN_RECORDS", 200, 1, 100000),
        max_projects=_int(env, "MASKINV_MAX_PROJECTS", 1000, 1),
        orphan_grace_s=_float(env, "MASKINV_ORPHAN_GRACE", 30.0, 1.0),
    )
