"""Batch mode for tasks nobody drew on: propose regions with the worker's ``propose_regions`` job and answer them
as predictions in the project's own region type.

When (documented in docs/proposals.md; the variables in docs/configuration.md):

* only in batch mode (no interactive ``context``), only for tasks that have no region at all (no annotation and
  no prediction with a result): tasks with regions are labelled as before, never given proposals;
* whether such tasks get proposals is decided, first match wins (:func:`decide`):

  1. the request or run: ``params.maskinv.proposals`` (``false``, ``true``, or an object with the job's options
     ``sources``, ``min_score``, ``max_proposals``, ``refine``; see worker.jobs.propose), or ``maskinv-annotate
     --proposals on|off`` / ``ProjectRun(proposals=...)``;
  2. the project's label config: the attribute ``maskinvProposals="true"|"false"`` on the region control the
     proposals are written as, else on the root ``<View>`` (Label Studio keeps unknown attributes in the saved
     config and its editor ignores them);
  3. ``MASKINV_PROPOSALS``: ``auto`` (default) proposes, ``off`` does not.

What: the first region control of the config that has a vocabulary (and can carry a label) decides the output
type — BrushLabels (RLE), PolygonLabels (contour, percent points) or RectangleLabels (box); see
:mod:`backend.labelstudio.region_output`. Each proposal is a result item with its label, ``score``, ``meta.text``
("proposed by MaskInversion (maskcut) · top-3 ..."), ``meta.proposed = true`` and ``meta.objectness`` (the
worker's class-agnostic objectness in [0, 1]: how likely the region covers one whole object, whatever its label;
:func:`objectness_of`), plus a caption in the per-region TextArea if the config has one. At most
``MASKINV_MAX_PROPOSALS`` proposals per image (the worker caps too).

Cost: proposals run at ``min(params.size, MASKINV_PROPOSAL_MAX_SIZE)`` (:func:`proposal_params`; the worker caps
again at ``worker.proposals.pipeline.MAX_PROPOSAL_SIZE``), and a proposal job stops at MASKINV_JOB_TIMEOUT in both
modes.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Mapping

from worker.protocol import InversionParams, JobResult, ProposeRegionsJob, ProtocolError, RegionResult

from backend.dispatch import DispatchError
from backend.labelstudio.label_config import ProjectConfig, RegionControl
from backend.labelstudio.predictions import proposal_items, proposal_score, task_prediction
from backend.labelstudio.region_output import OutputError
from backend.predict.fetch import ImageFetch, fetch_all
from backend.predict.live import LiveRegions
from backend.predict.plan import TaskPlan, example_project, task_data
from backend.service import PredictError, Service

log = logging.getLogger(__name__)

PROPOSE_FUNCTION = "worker.jobs.propose.propose_regions"
OPTION_KEYS = frozenset({"sources", "min_score", "max_proposals", "refine"})


def split_override(overrides: Any) -> tuple[Any, bool | dict[str, Any] | None]:
    """``params.maskinv`` without its ``proposals`` key, and that key (None when absent).

    Raises PredictError(400) for a ``proposals`` value that is neither a boolean nor an object of known options.
    """
    if not isinstance(overrides, dict) or "proposals" not in overrides:
        return overrides, None
    rest = {k: v for k, v in overrides.items() if k != "proposals"}
    value = overrides["proposals"]
    if isinstance(value, dict):
        unknown = set(value) - OPTION_KEYS
        if unknown:
            raise PredictError(400, f"unknown key(s) in params.maskinv.proposals: {sorted(unknown)}; allowed: "
                                    f"{sorted(OPTION_KEYS)}")
    elif not isinstance(value, bool):
        raise PredictError(400, f"params.maskinv.proposals must be true, false or an object, got {value!r}")
    return (rest or None), value


def wanted(mode: str, override: bool | dict[str, Any] | None, config_switch: bool | None = None) -> bool:
    """Whether tasks without regions get proposals: ``override`` (request/run) wins over ``config_switch`` (the
    label config's ``maskinvProposals``), which wins over ``mode`` (MASKINV_PROPOSALS)."""
    if override is not None:
        return override is not False
    if config_switch is not None:
        return config_switch
    return mode == "auto"


#: the label-config attribute that turns proposals on or off for a project (region control or root <View>)
CONFIG_ATTRIBUTE = "maskinvProposals"
_TRUE, _FALSE = frozenset({"true", "on", "yes", "1"}), frozenset({"false", "off", "no", "0"})


def config_switch(cfg: ProjectConfig) -> bool | None:
    """The project's own switch: ``maskinvProposals`` on the target region control, else on the root ``<View>``
    (None when neither has it). Raises PredictError(422) for a value that is not true/false/on/off/yes/no/1/0."""
    control = target_control(cfg)
    raw = None
    if control is not None:
        tag = cfg.interface.get_control(control.name)  # type: ignore[attr-defined]
        raw = (getattr(tag, "attr", None) or {}).get(CONFIG_ATTRIBUTE)
    if raw is None:
        root = getattr(cfg.interface, "_tree", None)  # the SDK's parsed root element (lxml)
        if root is None:
            from lxml import etree

            root = etree.fromstring(cfg.xml.encode(), etree.XMLParser(resolve_entities=False, no_network=True))
        raw = root.attrib.get(CONFIG_ATTRIBUTE)
    if raw is None:
        return None
    value = str(raw).strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise PredictError(422, f'label config: {CONFIG_ATTRIBUTE}="{raw}" must be "true" or "false"')


def decide(mode: str, cfg: ProjectConfig, override: bool | dict[str, Any] | None) -> bool:
    """:func:`wanted` with the label config's switch read from ``cfg`` (only when no override decides)."""
    return wanted(mode, override, None if override is not None else config_switch(cfg))


def untouched(task: dict[str, Any]) -> bool:
    """True when no annotator has submitted anything on the task (no annotation that was not cancelled)."""
    anns = task.get("annotations")
    return not any(isinstance(a, dict) and not a.get("was_cancelled") for a in (anns if isinstance(anns, list) else []))


def target_control(cfg: ProjectConfig) -> RegionControl | None:
    """The region control proposals are written as: the first with a vocabulary that can carry a label, else the
    first with a vocabulary (the label then goes into ``meta.text`` only)."""
    with_labels = [c for c in cfg.region_controls.values() if c.labels]
    return next((c for c in with_labels if c.labels_control is not None), with_labels[0] if with_labels else None)


def proposal_params(params: InversionParams, max_size: int) -> InversionParams:
    """``params`` with ``size`` at most ``max_size`` (MASKINV_PROPOSAL_MAX_SIZE): a proposal's cost grows with the
    size to the 2nd-4th power, and the request's size is meant for the regions it draws."""
    return params if params.size <= max_size else dataclasses.replace(params, size=max_size)


def proposal_prototypes(service: Service, project: str | None, vocab: tuple[str, ...], params: InversionParams
                        ) -> dict | None:
    """The project's example prototypes for a proposal job's labels (None: text only). Proposals keep one view
    (``params`` as sent): prototypes of two-view examples still score one-view LETs (scene world, 8 examples per
    class: 48.1 vs 41.2 Acc@1 for text alone, ``benchmarks/results/few_shot.md``) without doubling the inversion
    of every candidate. Never fails a prediction: on trouble, text alone (logged)."""
    if project is None:
        return None
    try:
        return service.learner.prototypes(project, vocab, params)
    except Exception as exc:  # noqa: BLE001 - text-only is always a valid answer
        log.warning("project %s: proposals scored without examples (%s: %s)", project, exc.__class__.__name__, exc)
        return None


def propose_answers(service: Service, cfg: ProjectConfig, tasks: list[dict[str, Any]], params: InversionParams,
                    label_override: list[str] | None, override: bool | dict[str, Any] | None, deadline: float,
                    project: Any = None, live: LiveRegions | None = None) -> list[Any]:
    """One answer per task (a prediction, ``[]`` when nothing was proposed, or ``{"error", "maskinv"}``).

    ``params``: the request's; the jobs run with :func:`proposal_params`. The ``model_version`` is the one drawn
    regions get (Service.project_version), naming the project's example set when its examples scored them.
    ``live`` (backend.predict.live): the jobs return the proposals' embeddings, each proposal gets its
    ``labelled_similarity`` and is taken for the region index."""
    control = target_control(cfg)
    if control is None:
        return [[] for _ in tasks]
    pid = example_project(service.settings, project, tasks)
    job_params = proposal_params(params, service.settings.proposal_max_size)
    vocab = tuple(label_override or control.labels)
    data_key = cfg.images[control.to_name].data_key
    fetches = [ImageFetch(TaskPlan(t.get("id"), "proposals"), task_data(t).get(data_key), t.get("id"), vocab, [])
               for t in tasks]
    fetch_all(service.fetcher, fetches, deadline, service.settings.max_image_pixels, service.setup_fallbacks())
    answers: list[Any] = [None] * len(tasks)
    options = {"max_proposals": service.settings.max_proposals, **(override if isinstance(override, dict) else {})}
    jobs: list[tuple[int, ImageFetch]] = []
    requests = []
    used_examples = False
    for i, f in enumerate(fetches):
        if f.error is not None:
            answers[i] = {"error": f.error, "maskinv": {"source": "proposals", "errors": [
                {"region": None, "error": f.error, "kind": f.error_kind}]}}
            continue
        prototypes = proposal_prototypes(service, pid, f.vocab, job_params)
        used_examples = used_examples or prototypes is not None
        jobs.append((i, f))
        requests.append((f.blob, ProposeRegionsJob.build(f.blob, f.vocab, job_params, options, prototypes,
                                                          embedding=live is not None).to_dict()))
    try:
        runs = service.dispatcher.run_jobs(PROPOSE_FUNCTION, requests, max(0.0, deadline - time.monotonic()))
    except DispatchError as exc:
        raise PredictError(503, str(exc)) from None
    version = service.project_version(cfg, params, label_override, pid if used_examples else None)
    for (i, f), run in zip(jobs, runs):
        answers[i] = _proposal_answer(control, cfg, f, run.result, run.error, run.kind, run.info, version, live,
                                      job_params)
    return answers


def ran_with(params: InversionParams, reported: Mapping[str, Any]) -> InversionParams:
    """``params`` at the size a proposal job reports it ran at (the worker caps it again)."""
    size = reported.get("size")
    if isinstance(size, int) and not isinstance(size, bool) and size > 0 and size != params.size:
        return dataclasses.replace(params, size=size)
    return params


def objectness_of(region: RegionResult) -> float | None:
    """The worker's objectness of a proposed region (``meta.objectness``), None when absent or not in [0, 1]."""
    value = region.meta.get("objectness")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        return None
    return float(value)


def with_objectness(items: list[dict[str, Any]], objectness: float | None) -> list[dict[str, Any]]:
    """``items`` (one proposal's result items) with ``meta.objectness`` on those that carry a ``meta``."""
    if objectness is None:
        return items
    for item in items:
        if isinstance(item.get("meta"), dict):
            item["meta"]["objectness"] = round(objectness, 4)
    return items


def _proposal_answer(control: RegionControl, cfg: ProjectConfig, f: ImageFetch, raw: dict | None,
                     run_error: str | None, run_kind: str | None, info: dict[str, Any], version: str,
                     live: LiveRegions | None = None, params: InversionParams | None = None) -> Any:
    """One task's answer from its proposal job: ``raw`` the job's result (None when it did not finish);
    ``params``: the job's (for the proposals' model key in the region index)."""
    try:
        result = JobResult.from_dict(raw) if raw is not None else None
    except ProtocolError as exc:
        result, run_error = None, f"malformed proposal result: {exc}"
    error = run_error if result is None else result.error
    diagnostics: dict[str, Any] = {"source": "proposals", "job": info,
                                   "model": dict(result.model) if result else {},
                                   "timings": dict(result.timings) if result else {}, "errors": []}
    if error or result is None:
        error = error or "no result"
        log.warning("task %s: proposals failed: %s", f.task_id, error)
        # the kind lets project runs retry transient failures and background runs continue timed-out jobs
        kind = "rejected" if raw is not None else (run_kind or "failed")
        diagnostics["errors"].append({"region": None, "error": f"proposals: {error}", "kind": kind})
        return {"error": f"proposals: {error}", "maskinv": diagnostics}
    width, height = f.size
    results: list[dict[str, Any]] = []
    scores: list[float] = []
    answered: list[tuple[str, list[dict[str, Any]], RegionResult]] = []
    for k, region in enumerate(result.regions):
        if region.error or not region.labels:
            continue
        key = f"prop{k}_{(result.image_sha256 or '')[:6]}"
        try:
            items = with_objectness(proposal_items(control, cfg, region, width, height, key), objectness_of(region))
        except (OutputError, KeyError, ValueError) as exc:
            diagnostics["errors"].append({"region": key, "error": str(exc), "kind": "region"})
            continue
        results += items
        answered.append((key, items, region))
        scores.append(proposal_score(region))
    if live is not None and answered and result.model.get("id"):
        live.proposals(dict(result.model), ran_with(params or InversionParams(), result.params),
                       result.image_sha256 or "", f.task_id, answered)
    diagnostics.update({"proposed": len(scores), "regions": 0})
    log.info("task %s: %d proposed region(s) as %s", f.task_id, len(scores), control.tag)
    return task_prediction(results, scores, version, diagnostics) if results else []
