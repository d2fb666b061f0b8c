"""The dispatcher interface and what every dispatcher shares: requests, outcomes, errors, job ids and merging.

One :class:`LabelRequest` = all regions of one image that share a vocabulary. For each request a dispatcher

1. encodes the masks (packed bits, worker.protocol) and drops duplicates (same mask digest);
2. looks every region up in the result cache (:mod:`backend.dispatch.result_cache`) and keeps only the misses;
3. runs one ``label_regions`` job (worker.protocol.JOB_KINDS) for the misses, waits up to a deadline, and merges.

Subclasses run the jobs: :class:`~backend.dispatch.queue.QueueDispatcher` (RQ over Redis) and
:class:`~backend.dispatch.embedded.EmbeddedDispatcher` (in this process).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from worker.protocol import (InversionParams, JobResult, LabelRegionsJob, PrepareLabelsJob, ProtocolError,
                             RegionPrompt, RegionResult, ResultCache, allowed_functions, answer_digest, encode_mask,
                             job_function, region_digest, sha256_hex)

from backend.dispatch.result_cache import cached_regions, lookup
from backend.settings import Settings

log = logging.getLogger(__name__)

#: the job that labels and captions regions (its results go to the result cache)
LABEL_FUNCTION = job_function("label_regions")

#: LabelOutcome.kind of a job that Redis' absence left unknown (Redis lost while waiting); in a task's answer the
#: error entry's ``code`` (its ``kind`` stays ``failed``: backend.predict.tasks)
QUEUE_UNAVAILABLE = "queue_unavailable"


class DispatchError(RuntimeError):
    """Jobs cannot be run at all (e.g. Redis unreachable); maps to HTTP 503."""


class QueueUnavailable(DispatchError, ConnectionError):
    """Queue mode: Redis (the queue) cannot be reached, e.g. while it restarts. A ``ConnectionError`` (callers that
    can wait, such as project runs, catch that and retry later) and a :class:`DispatchError` (HTTP 503). Where a
    failure travels as a per-region / per-task entry instead, it is marked :data:`QUEUE_UNAVAILABLE`."""


@dataclass
class LabelRequest:
    """All regions of one image that share a label set. ``masks``: one bool ``[H, W]`` per region; ``prompts``:
    empty, or per mask ``{}`` or ``{"prompt": {"box" | "points": ...}, "refine": bool}`` (worker.protocol.prompts);
    ``embedding``: ask for each region's embedding (set when a region index is configured, backend.predict)."""

    image: bytes
    masks: list[np.ndarray]
    labels: list[str]
    params: InversionParams
    image_sha256: str = ""
    prototypes: dict | None = None  # the project's example prototypes for these labels (backend.learning.learner)
    prompts: list[dict[str, Any]] = field(default_factory=list)
    embedding: bool = False

    def __post_init__(self) -> None:
        if not self.image_sha256:
            self.image_sha256 = sha256_hex(self.image)


@dataclass
class LabelOutcome:
    """Per-region results (same order as the request's masks) or a job-level error.

    ``results[i]`` answers mask ``i``; ``cached[i]`` says whether it came from the result cache."""

    results: list[RegionResult]
    cached: list[bool]
    model: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    kind: str | None = None  # None, or why: "timeout" | "no_worker" | "failed" | "rejected" | "queue_unavailable"
    info: dict[str, Any] = field(default_factory=dict)  # job id/status, worker cache counters, timings

    @property
    def regions(self) -> list[dict[str, Any]]:
        """The results' JSON form (``RegionResult.to_dict``), each with ``cached``."""
        return [{**region.to_dict(), "cached": hit} for region, hit in zip(self.results, self.cached)]


@dataclass
class PreparedJob:
    """One request after encoding and the cache lookup: the job to run for its misses (``payload`` None: none)."""

    request: LabelRequest
    shas: list[str]  # per mask
    encoded: dict[str, dict]  # unique sha -> encoded mask
    pdigest: str
    hits: dict[str, dict] = field(default_factory=dict)  # sha -> cached value
    payload: dict | None = None
    job_id: str | None = None
    function: str = LABEL_FUNCTION  # the worker job that runs the payload (a worker.protocol.JOB_KINDS function)


@dataclass
class RunResult:
    """How one job ended: its result (``job``), or why there is none (``error``, ``kind``: see LabelOutcome.kind)."""

    job: JobResult | None
    error: str | None
    info: dict[str, Any]
    kind: str | None = None

    @classmethod
    def finished(cls, raw: Any, info: dict[str, Any]) -> RunResult:
        """A finished job's wire result, read with ``JobResult.from_dict`` (malformed: a rejected result)."""
        try:
            job = JobResult.from_dict(raw)
        except ProtocolError as exc:
            job = JobResult.rejected(f"worker returned a malformed result: {exc}", [])
        return cls(job, None, info)

    @property
    def result(self) -> dict[str, Any] | None:
        """The result's JSON form (``JobResult.to_dict``), or None."""
        return None if self.job is None else self.job.to_dict()


def safe_queue_name(queue: str) -> str:
    """``queue`` with every character a job id may not hold replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", queue)


def job_id(queue: str, *parts: str) -> str:
    """A deterministic job id on ``queue`` for everything its answer depends on (``parts``)."""
    ident = "\n".join([queue, *parts])
    return safe_queue_name(queue) + "-" + sha256_hex(ident.encode())[:40]


class Dispatcher:
    """Common part: cache lookups, payloads and merging. Subclasses run the payloads."""

    mode = "?"

    def __init__(self, settings: Settings, cache: ResultCache):
        self.settings = settings
        self.cache = cache

    # -- to implement ------------------------------------------------------------------------------
    def model_info(self, wait_s: float = 0.0) -> dict[str, Any] | None:
        """The model that will run the jobs, when known (needed for cache keys); embedded mode may wait up to
        ``wait_s`` for the model to load."""
        raise NotImplementedError

    def _run(self, items: list[PreparedJob], timeout_s: float) -> list[RunResult]:
        raise NotImplementedError

    def health(self) -> dict[str, Any]:
        raise NotImplementedError

    def run_embed(self, payload: dict, timeout_s: float) -> dict:
        """Run one ``embed_regions`` job and return its result; DispatchError on failure or timeout."""
        raise NotImplementedError

    def _send_prepare_labels(self, payload: dict) -> None:
        raise NotImplementedError

    def prepare_labels(self, label_sets: list[tuple[str, ...]], params: InversionParams) -> None:
        """Have the worker build the text prototypes of ``label_sets`` in the background (never raises, never
        waits): the first suggestion after ``/setup`` then finds them cached."""
        sets = [tuple(s) for s in dict.fromkeys(tuple(s) for s in label_sets) if s]
        if not sets:
            return
        payload = PrepareLabelsJob(label_sets=tuple(sets), templates=params.templates,
                                   captions=params.caption).to_dict()
        try:
            self._send_prepare_labels(payload)
        except Exception as exc:  # noqa: BLE001 - a warm-up that cannot be sent only costs the first request time
            log.warning("could not ask for the label prototypes to be prepared: %s", exc)

    # -- the pipeline --------------------------------------------------------------------------------
    def label(self, requests: list[LabelRequest], timeout_s: float) -> list[LabelOutcome]:
        """Label every request's regions; never raises for a single job's failure (see LabelOutcome.error)."""
        model = self.model_info()
        prepared = [self._prepare(r, model) for r in requests]
        todo = [p for p in prepared if p.payload is not None]
        runs = dict(zip((id(p) for p in todo), self._run(todo, timeout_s))) if todo else {}
        return [self._merge(p, runs.get(id(p)), model) for p in prepared]

    def run_jobs(self, function: str, requests: list[tuple[bytes, dict]], timeout_s: float) -> list[RunResult]:
        """Run one job of ``function`` (a worker.protocol.JOB_KINDS function) per ``(image, payload)`` and wait up
        to ``timeout_s``; no result cache (used by the proposal jobs, whose results depend on no drawn mask)."""
        if function not in allowed_functions():
            raise DispatchError(f"{function!r} is not a worker job function")
        items = []
        for image, payload in requests:
            req = LabelRequest(image, [], list(payload.get("labels") or []), InversionParams())
            content = sha256_hex(repr(sorted((k, v) for k, v in payload.items() if k != "image")).encode())
            items.append(PreparedJob(req, [], {}, "", payload=payload, function=function,
                                     job_id=job_id(self.settings.queue, function, content, req.image_sha256)))
        return self._run(items, timeout_s) if items else []

    def _prepare(self, req: LabelRequest, model: dict[str, Any] | None) -> PreparedJob:
        shas: list[str] = []  # per mask: its region digest (the mask's digest, with its prompt when it has one)
        encoded: dict[str, dict] = {}
        prompts: dict[str, tuple[RegionPrompt, bool]] = {}
        for k, m in enumerate(req.masks):
            enc = encode_mask(np.asarray(m, dtype=bool))
            extra = req.prompts[k] if k < len(req.prompts) else {}
            key = region_digest(enc["sha256"], extra.get("prompt"), bool(extra.get("refine", False)))
            if extra.get("prompt") is not None:
                prompts[key] = (RegionPrompt.from_dict(extra["prompt"]), bool(extra.get("refine", False)))
            shas.append(key)
            encoded.setdefault(key, enc)
        # the job's identity: everything its answer depends on (the examples' content included) but the model
        pdigest = answer_digest(req.params.to_dict(), req.labels, req.prototypes, embedding=req.embedding)
        p = PreparedJob(req, shas, encoded, pdigest)
        if model and model.get("id") and encoded:
            p.hits = lookup(self.cache, self.settings.redis_prefix, model, req.image_sha256, encoded, req.params,
                            req.labels, req.prototypes, req.embedding)
        missing = [sha for sha in encoded if sha not in p.hits]
        if missing:
            p.payload = LabelRegionsJob.build(req.image, [(sha, encoded[sha]) for sha in missing], req.labels,
                                              req.params, prototypes=req.prototypes or None,
                                              prompts=prompts, embedding=req.embedding).to_dict()
            p.job_id = job_id(self.settings.queue, req.image_sha256, pdigest, *sorted(missing))
        return p

    def _merge(self, p: PreparedJob, run: RunResult | None, model: dict[str, Any] | None) -> LabelOutcome:
        found: dict[str, tuple[RegionResult, bool]] = {
            sha: (region, True) for sha, region in cached_regions(p.hits).items()}
        info: dict[str, Any] = {"result_cache": {"hits": len(p.hits), "misses": len(p.encoded) - len(p.hits)}}
        error, kind = None, None
        out_model = dict(model or {})
        if run is not None:
            info.update(run.info)
            if run.job is not None:
                out_model = dict(run.job.model or out_model)
                info.update({"cache": dict(run.job.cache), "timings": dict(run.job.timings)})
                error = run.job.error
                kind = "rejected" if error else None
                found.update((region.id, (region, False)) for region in run.job.regions)
            else:
                error, kind = run.error, run.kind or "failed"
        if not out_model and p.hits:
            out_model = dict(next(iter(p.hits.values())).get("model") or {})
        answers = [found.get(sha) or (RegionResult.failed(sha, error or "no result for this region"), False)
                   for sha in p.shas]
        return LabelOutcome(results=[r for r, _ in answers], cached=[c for _, c in answers], model=out_model,
                            error=error, kind=kind, info=info)
