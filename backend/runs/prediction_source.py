"""Make the backend's model version the project's prediction source in Label Studio, so its Data Manager shows
the predictions' scores right after *Retrieve predictions*.

Label Studio 1.23 fills the Data Manager's *Prediction score* column (``annotate_predictions_score``,
``data_manager/managers.py``) only from predictions whose ``model_version`` is the project's ``model_version``;
connecting an ML backend sets that to the backend's **title** (``ml/api.py``, ``perform_create``), which no
prediction carries, so the column stays empty and sorting by it orders nothing. The project's prediction source
(*Settings → Annotation → Use predictions to prelabel tasks*) can name the model version instead, which is what
this module does, through Label Studio's API, after a ``/setup``:

* only with the operator's LABEL_STUDIO_URL + LABEL_STUDIO_API_KEY (never /setup's hostname and token) and
  MASKINV_SELECT_VERSION on (the default);
* only when the project shows predictions (``show_collab_predictions``) and its source is empty, the title of one
  of its ML backends, or an earlier ``maskinversion-`` version: a source a curator chose otherwise (uploaded
  predictions, another model) is left alone;
* a little after a ``/setup`` or a batch ``/predict`` (SELECT_DELAYS_S): connecting sends ``/setup`` before Label
  Studio writes the title, which would overwrite an earlier change, and Label Studio accepts a version as the
  source only once a prediction of it is stored (HTTP 400 before), so a refusal is tried again later.

With the version as the source, a task opened in the labelling stream shows its stored prediction of that version
(Label Studio then asks the backend for none on opening: *Retrieve predictions* or ``maskinv-annotate`` make
them). The version stays the same when annotations are accepted (Service.project_version), so the choice holds.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from backend.labelstudio.api import LabelStudioAPI, LabelStudioAPIError

log = logging.getLogger(__name__)

#: (Label Studio URL, project, version) already selected (or left alone) by this process: not asked again
_DONE: set[tuple[str, int, str]] = set()
#: entries of _DONE at most (cleared when full)
MAX_DONE = 4096
_done_lock = threading.Lock()

#: seconds after the /setup (or batch /predict) at which the project's source is read and, if needed, changed,
#: until one try succeeds or finds nothing to change
SELECT_DELAYS_S = (3.0, 10.0, 30.0, 60.0, 120.0, 300.0)
#: the prefix of every model version this backend answers (Service.model_version)
OWN_PREFIX = "maskinversion"


def should_select(project: Any, ml_titles: set[str], version: str) -> bool:
    """Whether ``project`` (Label Studio's project object or dict) should get ``version`` as its prediction source
    (module docstring)."""
    get = project.get if isinstance(project, dict) else lambda k: getattr(project, k, None)
    current = str(get("model_version") or "")
    if not get("show_collab_predictions") or current == version:
        return False
    return not current or current in ml_titles or current.startswith(OWN_PREFIX)


def select_version(api: LabelStudioAPI, project: int, version: str) -> bool:
    """Make ``version`` ``project``'s prediction source when :func:`should_select` says so; whether it changed.
    Raises LabelStudioAPIError."""
    proj = _call(f"GET project {project}", api.client.projects.get, id=project)
    backends = _call(f"GET ML backends of project {project}", api.client.ml.list, project=project) or []
    titles = {str(getattr(b, "title", "") or "") for b in backends} - {""}
    if not should_select(proj, titles, version):
        return False
    _call(f"PATCH project {project}", api.client.projects.update, id=project, model_version=version)
    log.info("project %s: predictions of model version %s are now its prediction source (was %r)", project,
             version, getattr(proj, "model_version", None))
    return True


def _call(what: str, fn: Any, **kwargs: Any) -> Any:
    try:
        return fn(**kwargs)
    except Exception as exc:  # noqa: BLE001 - the SDK raises ApiError, httpx errors, pydantic errors
        status = getattr(exc, "status_code", None)
        raise LabelStudioAPIError(f"Label Studio {what} failed{f' (HTTP {status})' if status else ''}: "
                                  f"{exc.__class__.__name__}", status if isinstance(status, int) else None) from None


def select_later(api: Callable[[], LabelStudioAPI], url: str, project: int, version: str,
                 delays_s: tuple[float, ...] = SELECT_DELAYS_S) -> threading.Thread | None:
    """:func:`select_version` in a daemon thread, tried at each of ``delays_s`` (seconds from now) until it
    succeeds or finds nothing to change; one thread per Label Studio ``url``, project and version in this process
    at a time. ``api`` makes the client in that thread (the SDK's import takes seconds, which ``/setup`` must not
    wait for). Failures are logged (the backend works without); after the last try a later /setup or batch
    /predict starts again."""
    key = (url.rstrip("/"), project, version)
    with _done_lock:
        if key in _DONE:
            return None
        if len(_DONE) >= MAX_DONE:
            _DONE.clear()
        _DONE.add(key)

    def run() -> None:
        start, client, error = time.monotonic(), None, None
        for delay in delays_s:
            stop.wait(max(0.0, start + delay - time.monotonic()))
            try:
                client = client or api()
                select_version(client, project, version)
                return
            except LabelStudioAPIError as exc:
                error = exc  # e.g. 400 while no prediction of the version is stored yet
        with _done_lock:
            _DONE.discard(key)
        log.warning("project %s: could not make %s its prediction source: %s", project, version, error)

    stop = threading.Event()
    thread = threading.Thread(target=run, name="maskinv-select-version", daemon=True)
    thread.start()
    return thread
