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
* a little after the ``/setup`` (SELECT_DELAY_S): connecting sends ``/setup`` before Label Studio writes the
  title, which would overwrite an earlier change.

With the version as the source, a task opened in the labelling stream shows its stored prediction of that version
(Label Studio then asks the backend for none on opening: *Retrieve predictions* or ``maskinv-annotate`` make
them). The version stays the same when annotations are accepted (Service.project_version), so the choice holds.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from backend.labelstudio.api import LabelStudioAPI, LabelStudioAPIError

log = logging.getLogger(__name__)

#: (Label Studio URL, project, version) already selected (or left alone) by this process: not asked again
_DONE: set[tuple[str, int, str]] = set()
#: entries of _DONE at most (cleared when full)
MAX_DONE = 4096
_done_lock = threading.Lock()

#: seconds after a /setup before the project's source is read and, if needed, changed
SELECT_DELAY_S = 3.0
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


def select_later(api: LabelStudioAPI, project: int, version: str, delay_s: float = SELECT_DELAY_S
                 ) -> threading.Thread | None:
    """:func:`select_version` in a daemon thread after ``delay_s``, once per project and version in this process;
    failures are logged (the backend works without) and tried again at the next /setup."""
    key = (api.url, project, version)
    with _done_lock:
        if key in _DONE:
            return None
        if len(_DONE) >= MAX_DONE:
            _DONE.clear()
        _DONE.add(key)

    def run() -> None:
        stop.wait(delay_s)
        try:
            select_version(api, project, version)
        except LabelStudioAPIError as exc:
            with _done_lock:
                _DONE.discard(key)
            log.warning("project %s: could not make %s its prediction source: %s", project, version, exc)

    stop = threading.Event()
    thread = threading.Thread(target=run, name="maskinv-select-version", daemon=True)
    thread.start()
    return thread
