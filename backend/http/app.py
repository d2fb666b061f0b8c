"""The WSGI app: label-studio-ml's Flask app (``init_app``) with the MaskInversion model and hardened routes.

label-studio-ml 1.0.9 keeps one model per process, created by ``/setup`` — which Label Studio sends to only
one of several web workers — and answers errors with a 500 and a Python traceback. So ``/predict`` and
``/setup`` are replaced by views that build the model from the request's own label config and answer every
error with JSON and a meaningful status (400 bad request, 401 auth, 422 bad regions, 502/503/504 worker,
image or queue trouble); ``/webhook`` and ``/train`` learn from annotations (backend.learning.learner).

Authentication, as Label Studio 1.23 can carry it:

* ``MASKINV_URL_SECRET``: every route is served only under ``/<secret>/`` (Label Studio's model URL is
  ``http://backend:9090/<secret>``: it appends ``/predict``, ``/setup``, ... to it, and the webhook it registers
  for the backend is ``<model URL>/webhook``); bare routes answer 404, except ``GET /health`` and ``GET /``
  (up/ready only, for container health checks). Compared in constant time.
* HTTP basic auth (BASIC_AUTH_USER/BASIC_AUTH_PASS, the ML backend's *Basic Auth* settings): Label Studio sends
  it on every call of its ML API (``/health``, ``/setup``, ``/predict``, ``/versions``, ``/train`` and
  Start training's ``/webhook``), but not on the annotation webhooks (a webhook has no credentials): under a valid
  secret prefix ``/webhook`` needs no basic auth, without a secret it answers 401 (and the log says why).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import sys
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from backend.dispatch import DispatchError
from backend.labelstudio.label_config import LabelConfigError
from backend.search import api as search_api
from backend.search import page as search_page
from backend.service import PredictError, Service
from backend.settings import Settings
from backend.http.torchless import import_label_studio_ml
from backend.trust.verified import with_verified

log = logging.getLogger(__name__)

OPEN_ENDPOINTS = {"health"}
#: routes the bare path (no secret prefix) still serves when MASKINV_URL_SECRET is set (GET/HEAD only)
BARE_PATHS = {"/health", "/"}
#: WSGI environ key: the request came in under the valid secret prefix
SECRET_OK = "maskinv.url_secret_ok"


def _error(status: int, message: str, details: list[Any] | None = None):
    body: dict[str, Any] = {"status": status, "error": message}
    if details:
        body["errors"] = details
    return jsonify(body), status


def _read_body(limit: int) -> bytes:
    """The raw request body; 413 beyond ``limit`` bytes (declared or actually sent, chunked bodies included)."""
    too_big = f"the request body is larger than MASKINV_MAX_BODY_MB allows ({limit} bytes)"
    if request.content_length is not None and request.content_length > limit:
        raise PredictError(413, too_big)
    stream = request.stream
    chunks, size = [], 0
    while True:
        chunk = stream.read(min(1 << 20, limit + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise PredictError(413, too_big)
    return b"".join(chunks)


def _json_body() -> dict[str, Any]:
    """The request's JSON object; 400 for malformed JSON (deep nesting included), 413 for an oversized body."""
    raw = _read_body(_service().settings.max_body_bytes)
    try:
        data = json.loads(raw) if raw.strip() else None
    except (ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
        raise PredictError(400, f"the request body is not valid JSON: {reason}") from None
    if not isinstance(data, dict):
        raise PredictError(400, "the request body must be a JSON object (Content-Type: application/json)")
    return data


def _service() -> Service:
    from flask import current_app

    return current_app.config["MASKINV_SERVICE"]


def _guarded(view):
    """Run a view; PredictError -> its status, anything else -> 500 JSON (traceback only in the log)."""
    def wrapper(*args: Any, **kwargs: Any):
        try:
            return view(*args, **kwargs)
        except PredictError as exc:
            log.warning("%s %s -> %d: %s", request.method, request.path, exc.status, exc.message)
            return _error(exc.status, exc.message, exc.details)
        except DispatchError as exc:
            log.error("%s %s -> 503: %s", request.method, request.path, exc)
            return _error(503, str(exc))
        except Exception as exc:  # noqa: BLE001 - never a traceback in a response
            log.exception("%s %s failed", request.method, request.path)
            return _error(500, f"internal error: {exc.__class__.__name__}: {exc}")
    wrapper.__name__ = view.__name__
    return wrapper


def predict_view():
    from backend.http.model import MaskInversionModel

    data = _json_body()
    params = data.get("params")
    params = {} if params is None else params
    if not isinstance(params, dict):
        raise PredictError(400, "'params' must be an object")
    if "tasks" not in data:
        raise PredictError(400, "the request has no 'tasks'")
    model = MaskInversionModel(label_config=data.get("label_config"))
    model.maskinv_project = data.get("project")  # "<id>.<timestamp>" from Label Studio; its examples are used
    extra = {k: v for k, v in params.items() if k != "context"}
    context = params.get("context")
    if not (isinstance(context, dict) and isinstance(context.get("result"), list) and context["result"]):
        # batch (Retrieve predictions): what overruns MASKINV_BATCH_TIMEOUT continues in a background run
        from backend.runs.background import predict_batch

        results = predict_batch(_service(), model.config, data["tasks"], extra.get("maskinv"), data.get("project"))
    else:
        results = model.predict(data["tasks"], context=context, **extra)
    service = _service()
    from backend.predict.propose import split_override

    params, labels = service.params(split_override(extra.get("maskinv"))[0])
    version = service.project_version(model.config, params, labels, data.get("project"))
    # the example set the predictions were scored with: in the regions' meta, where Label Studio compares nothing
    service.stamp_examples(results, service.examples_state(data.get("project"), params))
    if not (isinstance(context, dict) and context.get("result")):  # batch: Label Studio stores these predictions
        _select_prediction_source(service, data.get("project"), version)
    if not (isinstance(context, dict) and isinstance(context.get("result"), list) and context["result"]):
        results = with_verified(results)  # batch: verified regions also as a prediction of their own
    return jsonify({"results": results, "model_version": version})


def setup_view():
    data = _json_body()
    service = _service()
    schema = data.get("schema") or data.get("label_config")
    try:
        cfg = service.config(schema)
    except LabelConfigError as exc:
        raise PredictError(400, f"label config: {exc}") from None
    hostname, token = data.get("hostname"), data.get("access_token")
    service.remember_setup(hostname if isinstance(hostname, str) else None, token if isinstance(token, str) else None)
    log.info("setup for project %s: controls %s", str(data.get("project"))[:100],
             {n: len(c.labels) for n, c in cfg.region_controls.items()})
    service.prepare_labels(cfg)  # text prototypes built in the background, before the first /predict
    version = service.project_version(cfg, project=data.get("project"))
    failed = service.health().get("model_error")
    if failed and not service.health().get("ready"):
        raise PredictError(503, str(failed))  # Label Studio shows this when the model is connected
    _select_prediction_source(service, data.get("project"), version)
    # Label Studio asks /setup for the version before every Retrieve predictions and skips the tasks that hold a
    # prediction of it: the version /predict answers (the same whatever the project's examples)
    return jsonify({"model_version": version})


def _select_prediction_source(service: Service, project: Any, version: str) -> None:
    """Make ``version`` the project's prediction source in Label Studio, in the background
    (backend.runs.prediction_source; MASKINV_SELECT_VERSION, only with LABEL_STUDIO_URL + LABEL_STUDIO_API_KEY)."""
    from backend.labelstudio.api import LabelStudioAPI
    from backend.learning.learner import LearningError, project_id
    from backend.runs.prediction_source import select_later

    settings = service.settings
    if not (settings.select_version and settings.label_studio_url and settings.label_studio_api_key):
        return
    try:
        pid = int(project_id(project))
    except LearningError:
        return
    url, token = settings.label_studio_url, settings.label_studio_api_key
    select_later(lambda: LabelStudioAPI(url, token, timeout_s=settings.fetch_timeout_s), url, pid, version)


def health_view():
    """``GET /health`` and ``GET /``: open (container health checks), but without valid credentials, when basic
    auth is on, it says only whether the backend is up and ready; model, device, caches need credentials. DOWN
    (503) while Redis is unreachable in queue mode or the model failed to load in embedded mode; with
    ``?ready=1`` (the container health check) also while the backend is not ready: no live worker in queue mode,
    the model still loading in embedded mode."""
    info = _service().health()
    down = (info.get("mode") == "queue" and info.get("redis") != "ok") or \
        bool(info.get("model_error") and not info.get("ready")) or \
        (request.args.get("ready") not in (None, "", "0") and not info.get("ready"))
    status = 503 if down else 200
    settings = _service().settings
    if (settings.basic_auth_user and not _authorized()) or (settings.url_secret and not request.environ.get(SECRET_OK)):
        return jsonify({"status": "DOWN" if down else "UP", "ready": bool(info.get("ready"))}), status
    body = {"status": "DOWN" if down else "UP", "model_class": "MaskInversionModel", **info}
    return jsonify(body), status


def webhook_view():
    """Label Studio's project events: annotations become the project's examples, *Start training* rebuilds them
    (backend.learning.learner); acknowledged without effect when MASKINV_LEARN is off. Answered at once: the
    event is queued and handled after the answer (backend.learning.events; MASKINV_WEBHOOK_QUEUE=0 handles it
    before answering), a full queue answers 503."""
    try:
        data = _json_body()
    except PredictError as exc:
        if exc.status == 413:
            raise
        data = {}
    action = data.get("action") if isinstance(data.get("action"), str) else None
    service = _service()
    if not service.settings.learn:
        log.info("ignoring webhook %s: MASKINV_LEARN is off", action)
        return jsonify({"status": "ignored", "action": action, "reason": "MASKINV_LEARN=false"}), 200
    if service.settings.webhook_queue == 0:
        return _learning_call(lambda: service.learner.handle_event(data))
    return _queue_event(service, data, action)


def _queue_event(service: Service, data: dict[str, Any], action: str | None):
    """Queue a learning event for after the answer (others are acknowledged as ignored); a bad project id is 400,
    a full queue 503, Redis trouble 503."""
    from backend.learning.events import EventsFull
    from backend.learning.learner import (ANNOTATION_EVENTS, DELETE_EVENTS, TASK_DELETE_EVENTS, TRAIN_EVENTS,
                                          LearningError, project_id)

    if action not in ANNOTATION_EVENTS + DELETE_EVENTS + TRAIN_EVENTS + TASK_DELETE_EVENTS:
        return jsonify({"status": "ignored", "action": action, "reason": "not an annotation or training event"}), 200
    try:
        project = project_id(data.get("project"))
    except LearningError as exc:
        raise PredictError(exc.status, str(exc)) from None
    try:
        service.events.put(data)
    except EventsFull:
        raise PredictError(503, f"{service.settings.webhook_queue} webhook events are waiting, the most "
                                "MASKINV_WEBHOOK_QUEUE allows; this one is not learnt from (Start training "
                                "re-reads every annotation)") from None
    return jsonify({"status": "queued", "action": action, "project": project}), 200


def train_view():
    """Label Studio's *Start training* without the webhook feature flag: rebuild the project's examples."""
    from backend.learning.learner import project_id

    data = _json_body()
    service = _service()
    if not service.settings.learn:
        return jsonify({"status": "ignored", "reason": "MASKINV_LEARN=false"}), 200
    return _learning_call(lambda: service.learner.rebuild(project_id(data.get("project"))))


def _learning_call(fn):
    """Run a learning action; bad events -> 400/422 JSON, store trouble -> 503, worker trouble -> 503."""
    from backend.learning.examples import ExampleStoreError
    from backend.images.fetch import ImageError
    from backend.learning.learner import LearningError

    from backend.learning.examples import ExampleBudgetError

    try:
        outcome = fn()
    except LearningError as exc:
        raise PredictError(exc.status, str(exc)) from None
    except ImageError as exc:
        raise PredictError(502 if exc.upstream else 422, f"annotation image: {exc}") from None
    except ExampleBudgetError as exc:
        raise PredictError(507, str(exc)) from None
    except ExampleStoreError as exc:
        raise PredictError(503, str(exc)) from None
    return jsonify(outcome.to_dict()), 200


def is_training_view():
    return jsonify({"is_training": False, "model_version": _service().model_version()})


def versions_view():
    return jsonify({"versions": _service().versions(), "model_dir": None, "v2": True})


def runs_view():
    """Project runs (maskinv-annotate, background runs of Retrieve predictions) with their task counts."""
    from backend.runs.background import runs_for

    return jsonify({"runs": runs_for(_service()).runs()})


def examples_view():
    """GET /examples?project=N: the project's example set (version, count per label)."""
    from backend.learning.learner import project_id

    service = _service()
    try:
        pid = project_id(request.args.get("project"))
    except ValueError as exc:
        raise PredictError(400, str(exc)) from None
    store = service.learner.store
    counts: dict[str, int] = {}
    for e in store.examples(pid):
        counts[e.label] = counts.get(e.label, 0) + 1
    return jsonify({"project": pid, "version": store.version(pid), "count": sum(counts.values()), "labels": counts,
                    "annotations": len(store.annotation_ids(pid))})


#: what a search route answers for each error of backend.search (the first matching class wins)
SEARCH_STATUS: tuple[tuple[type[Exception], int], ...] = (
    (search_api.SearchInputError, 400), (search_api.SearchUnavailable, 404),
    (search_api.LabelStudioAPIError, 502), (search_api.ModelNotReady, 503))
SEARCH_ERRORS = tuple(cls for cls, _ in SEARCH_STATUS)


def _search_status(exc: Exception) -> int:
    return next(status for cls, status in SEARCH_STATUS if isinstance(exc, cls))


def search_view():
    """POST /search: regions of projects by text, example regions, a label's examples or coverage
    (backend.search.api; caps in docs/security.md, "Region search")."""
    try:
        return jsonify(search_api.answer(_service(), _json_body()))
    except SEARCH_ERRORS as exc:
        raise PredictError(_search_status(exc), str(exc)) from None


def search_page_view():
    """GET /search: the search page (backend.search.page)."""
    return Response(search_page.PAGE_HTML, mimetype="text/html")


def search_crop_view():
    """GET /search/crop?project=&task=&region=&annotation=: one indexed region's crop as PNG."""
    try:
        return Response(search_page.crop_png(_service(), request.args), mimetype="image/png")
    except SEARCH_ERRORS as exc:
        raise PredictError(_search_status(exc), str(exc)) from None


VIEWS = {"_predict": predict_view, "_setup": setup_view, "health": health_view, "webhook": webhook_view,
         "_train": train_view, "_is_training": is_training_view, "get_version": versions_view}


def _authorized() -> bool:
    """Does the request carry the configured basic-auth credentials (constant-time comparison)?"""
    settings = _service().settings
    auth = request.authorization
    return bool(auth is not None and auth.type == "basic" and settings.basic_auth_user
                and hmac.compare_digest((auth.username or "").encode(), settings.basic_auth_user.encode())
                and hmac.compare_digest((auth.password or "").encode(), (settings.basic_auth_pass or "").encode()))


def _check_auth():
    settings = _service().settings
    if not settings.basic_auth_user or request.endpoint in OPEN_ENDPOINTS:
        return None
    if _authorized():
        return None
    if request.endpoint == "webhook":
        if request.environ.get(SECRET_OK):
            return None  # Label Studio's webhooks carry no credentials: the secret prefix authenticates them
        log.warning("POST /webhook without basic auth refused: Label Studio's annotation webhooks carry no "
                    "credentials; set MASKINV_URL_SECRET and use http://<backend>/<secret> as the model URL")
    resp, status = _error(401, "authentication required (HTTP basic auth, see BASIC_AUTH_USER/BASIC_AUTH_PASS)")
    resp.headers["WWW-Authenticate"] = 'Basic realm="maskinversion"'
    return resp, status


def _http_error(exc: HTTPException):
    return _error(exc.code or 500, exc.description or exc.name)


def _secret_matches(segment: str, secret: str) -> bool:
    """Constant-time comparison of a path segment with the secret (digests: the length is not leaked either)."""
    return hmac.compare_digest(hashlib.sha256(segment.encode("utf-8", "surrogateescape")).digest(),
                               hashlib.sha256(secret.encode()).digest())


class SecretPrefix:
    """WSGI middleware for MASKINV_URL_SECRET (read per request from the app's service): ``/<secret>/<route>`` is
    served as ``/<route>`` (marked ``SECRET_OK``), ``GET /health`` and ``GET /`` as they are (up/ready only), any
    other path is 404 before the app sees it (the answer does not repeat the path)."""

    def __init__(self, app: Flask, inner: Any):
        self.app, self.inner = app, inner

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        secret = self.app.config["MASKINV_SERVICE"].settings.url_secret
        if not secret:
            return self.inner(environ, start_response)
        path = environ.get("PATH_INFO") or "/"
        _, segment, rest = (path + "/").split("/", 2) if path.startswith("/") else ("", "", "")
        if _secret_matches(segment, secret):
            environ = {**environ, SECRET_OK: True, "SCRIPT_NAME": environ.get("SCRIPT_NAME", "") + "/" + segment,
                       "PATH_INFO": "/" + rest[:-1] if rest else "/"}
            return self.inner(environ, start_response)
        if path in BARE_PATHS and environ.get("REQUEST_METHOD") in ("GET", "HEAD"):
            return self.inner(environ, start_response)
        body = json.dumps({"status": 404, "error": "not found"}).encode()
        start_response("404 NOT FOUND", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]


def _drop_body_logging(app: Flask, api: Any) -> None:
    """Remove label-studio-ml's request/response body logging hooks: they read every request body in full
    (``request.get_data()`` is evaluated whatever the log level) before any size check could refuse it."""
    for funcs, hook in ((app.before_request_funcs, "log_request_info"), (app.after_request_funcs, "log_response_info")):
        target = getattr(api, hook, None)
        if target is not None and target in funcs.get(None, []):
            funcs[None].remove(target)


def configure_logging(level: str) -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s")
    root.setLevel(level)


def _warn_about_auth(settings: Settings) -> None:
    """Say at start what the configured authentication means for learning from annotations."""
    if settings.url_secret:
        log.info("routes served under the MASKINV_URL_SECRET prefix only (bare /health and / answer up/ready)")
    elif settings.basic_auth_user and settings.learn:
        log.warning("basic auth without MASKINV_URL_SECRET: Label Studio's annotation webhooks carry no credentials "
                    "and get 401, so annotations are not learnt from; set MASKINV_URL_SECRET")
    elif settings.learn:
        log.warning("no MASKINV_URL_SECRET and no basic auth: anyone who reaches this backend can write or delete "
                    "any project's examples (/webhook) and make it read projects from Label Studio (/train)")


def create_app(settings: Settings | None = None, service: Service | None = None) -> Flask:
    """Build (or re-configure) the backend's Flask app. One app per process: label-studio-ml's is a singleton."""
    settings = settings or (service.settings if service else Settings.from_env())
    configure_logging(settings.log_level)
    api, _ = import_label_studio_ml()
    from backend.http.model import MaskInversionModel

    service = service or Service(settings)
    MaskInversionModel.service = service
    app: Flask = api.init_app(MaskInversionModel)
    app.config["MASKINV_SERVICE"] = service
    if not app.config.get("MASKINV_INSTALLED"):
        _drop_body_logging(app, api)
        for endpoint, view in VIEWS.items():
            app.view_functions[endpoint] = _guarded(view)
        app.add_url_rule("/versions", "get_version", methods=["GET"])  # LS 1.23 asks with GET; 1.0.9 has POST
        app.add_url_rule("/runs", "runs", _guarded(runs_view), methods=["GET"])
        app.add_url_rule("/examples", "examples", _guarded(examples_view), methods=["GET"])
        app.add_url_rule("/search", "search", _guarded(search_view), methods=["POST"])
        app.add_url_rule("/search", "search_page", _guarded(search_page_view), methods=["GET"])
        app.add_url_rule("/search/crop", "search_crop", _guarded(search_crop_view), methods=["GET"])
        app.before_request(_check_auth)
        app.register_error_handler(HTTPException, _http_error)
        app.wsgi_app = SecretPrefix(app, app.wsgi_app)
        app.config["MASKINV_INSTALLED"] = True
    _warn_about_auth(settings)
    if settings.embedded and settings.warmup and hasattr(service.dispatcher, "warm_up"):
        service.dispatcher.warm_up()
    from backend.runs.background import resume_in_background

    resume_in_background(service)  # queue mode: background runs whose backend died are resumed
    if not settings.embedded and settings.learn and settings.webhook_queue:
        _ = service.events  # queue mode: webhook events left by a stopped backend are handled now
    log.info("MaskInversion backend ready: %s mode%s", service.dispatcher.mode,
             f", queue {settings.queue!r} on {settings.redis_url_redacted}" if not settings.embedded else "")
    return app
