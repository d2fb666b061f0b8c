"""The ``propose_regions`` job: propose, label and caption regions nobody drew on one image.

Payload (``worker.protocol.ProposeRegionsJob.to_dict()``, a plain JSON object like ``label_regions``'s)::

    {"v": 1, "image": {"sha256", "data_b64"}, "labels": [str, ...], "params": InversionParams.to_dict(),
     "proposals": {"sources": ["maskcut", "keyseeds", "text"], "max_proposals": int, "min_score": float,
                   "refine": bool}}

Result: :class:`worker.protocol.JobResult` (kind ``"propose_regions"``), one :class:`RegionResult` per kept
proposal, best first, id ``"proposal-<k>"``, with ``meta = {"proposed": True, "source": str, "mask": <packed
bits, worker.payload.encode_mask, [S, S] over the whole image>, "area": share of the image, "objectness": the
class-agnostic objectness in [0, 1] (worker.proposals.objectness), "score": the ranking score (best-label
probability ** prob_power × objectness; worker.proposals.pipeline)}``, and with the payload's ``"embedding":
true`` the vector it was labelled with (``RegionResult.embedding``: its LET mixed with its masked crop, float16).

Bounds (``worker.proposals.pipeline``): the job runs at ``proposals.proposal_size(params.size)``, at most
``MAX_PROPOSAL_SIZE`` (448) whatever the payload asks (a queue job can be forged), and reports that size in its
``params``; candidates are capped before de-duplication (``MAX_RAW_CANDIDATES``) and before inversion
(``MAX_CANDIDATES``). Within a ``worker.protocol.deadline.time_limit`` (the embedded dispatcher's
MASKINV_JOB_TIMEOUT) the job stops at the first check between its steps past the limit with ``JobTimeout``; a
queue worker's job is stopped by RQ at MASKINV_JOB_TIMEOUT.

Worker settings (read once, at the first job; see README):
    MASKINV_MAX_PROPOSALS       proposals returned per image at most [5]; a job may ask for fewer
    MASKINV_PROPOSAL_PRECISION  target precision that picks the objectness keep threshold [0.8]
    MASKINV_PROPOSAL_MIN_SCORE  default best-label probability a proposal needs [0.2]
    MASKINV_PROPOSAL_SOURCES    default sources, comma-separated, of maskcut,keyseeds,text,window,sam
                                [maskcut,keyseeds,text]
    MASKINV_PROPOSAL_REFINE     snap masks to SLIC superpixels by default (1/0) [0]
    MASKINV_SAM_CHECKPOINT      a transformers SAM checkpoint (folder or hub id in the local cache) for the
                                ``sam`` source [unset: no SAM]
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Mapping

from worker.jobs.embed import examples_meta, parse_prototypes, score_regions
from worker.jobs.runtime import check_text_limits, get_runtime
from worker.protocol import (JobResult, LabelScore, PayloadError, ProposeRegionsJob, ProtocolError, RegionResult,
                             check_limits, decode_image, encode_mask)
from worker.protocol.results import embedding_doc
from worker.settings import ProposalSettings

log = logging.getLogger(__name__)

KIND = "propose_regions"


@dataclass(frozen=True)
class ProposalOptions:
    """What one job asks for (validated against :class:`ProposalSettings`)."""

    sources: tuple[str, ...]
    max_proposals: int
    min_score: float
    refine: bool

    @classmethod
    def from_dict(cls, data: Any, settings: ProposalSettings) -> "ProposalOptions":
        from worker.proposals.pipeline import SOURCES

        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise PayloadError(f"proposals must be an object, got {type(data).__name__}")
        unknown = set(data) - {"sources", "max_proposals", "min_score", "refine"}
        if unknown:
            raise PayloadError(f"unknown proposal option(s): {sorted(unknown)}")
        sources = data.get("sources", list(settings.sources))
        if (not isinstance(sources, (list, tuple)) or not sources
                or not all(isinstance(s, str) and s in SOURCES for s in sources)):
            raise PayloadError(f"proposals.sources must be a non-empty list of {list(SOURCES)}, got {sources!r}")
        if "sam" in sources and settings.sam_checkpoint is None:
            raise PayloadError("proposals.sources asks for 'sam' but this worker has no MASKINV_SAM_CHECKPOINT")
        cap = data.get("max_proposals", settings.max_proposals)
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
            raise PayloadError(f"proposals.max_proposals must be an integer >= 1, got {cap!r}")
        score = data.get("min_score", settings.min_score)
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not 0 <= score <= 1:
            raise PayloadError(f"proposals.min_score must be a number in [0, 1], got {score!r}")
        refine = data.get("refine", settings.refine)
        if not isinstance(refine, bool):
            raise PayloadError(f"proposals.refine must be true or false, got {refine!r}")
        return cls(tuple(dict.fromkeys(sources)), min(cap, settings.max_proposals), float(score), refine)


_sam = None
_lock = threading.Lock()


def proposal_settings() -> ProposalSettings:
    """The worker's proposal settings (read once with the rest, ``worker.settings.WorkerSettings``)."""
    return get_runtime().settings.proposals


def _sam_source(settings: ProposalSettings, device):
    global _sam
    with _lock:
        if _sam is None and settings.sam_checkpoint:
            from worker.proposals.sam_source import SamSource

            _sam = SamSource.from_pretrained(settings.sam_checkpoint, device=device)
            log.info("SAM proposal source loaded from %s", settings.sam_checkpoint)
        return _sam


def propose_regions(job: dict[str, Any]) -> dict[str, Any]:
    """Propose, label and caption regions of one image (payload: module docstring); returns
    ``JobResult.to_dict()``. A malformed job yields a result with a top-level ``error`` and no regions."""
    from worker.proposals.pipeline import check_time, propose, proposal_size

    rt = get_runtime()
    t0 = time.perf_counter()
    try:
        payload = ProposeRegionsJob.from_dict(job)
        settings = proposal_settings()
        params, labels = payload.params, list(payload.labels)
        check_limits(params, rt.settings.max_steps, rt.settings.max_size)
        check_text_limits(params, labels, rt.settings)
        params = dataclasses.replace(params, size=proposal_size(params.size, int(rt.clip.patch_size)))
        opts = ProposalOptions.from_dict(payload.proposals, settings)
        image_bytes, digest = decode_image(dict(payload.image))
        prototypes = parse_prototypes(payload.prototypes, labels, int(rt.clip.embed_dim))
        sam = _sam_source(settings, rt.clip.device) if "sam" in opts.sources else None
        score_fn = None
        if prototypes is not None:  # labelled like drawn regions of the project: text + its examples
            def score_fn(lets, crops):
                return score_regions(rt, lets.detach().float().cpu().numpy(), labels, params.templates,
                                     params.top_k, prototypes, crops)[0]
        with rt.lock:
            res = propose(rt.engine, rt.scorer, image_bytes, labels, params.templates, size=params.size,
                          sources=opts.sources, steps=params.steps, lr=params.lr, top_k=params.top_k,
                          min_score=opts.min_score, max_proposals=opts.max_proposals, refine=opts.refine,
                          sam=sam, score_fn=score_fn, crop_weight=params.crop_weight,
                          target_precision=settings.target_precision)
            props = res.proposals
            captions: list[str] = []
            if props and params.caption:
                import torch

                check_time(f"captioning {len(props)} proposals")
                lets = torch.stack([p.let for p in props])
                captions = rt.captioner.caption(lets, [p.label or "" for p in props])
    except (PayloadError, ProtocolError, ValueError) as exc:
        log.warning("proposal job rejected: %s", exc)
        return JobResult.rejected(str(exc), [], rt.model_info(), kind=KIND).to_dict()

    regions = []
    example_meta = ([examples_meta(prototypes, labels.index(p.labels[0][0])) for p in props]
                    if prototypes is not None else [{}] * len(props))  # text-only proposals say nothing
    for k, p in enumerate(props):
        regions.append(RegionResult(
            id=f"proposal-{k}", labels=tuple(LabelScore(lab, sc) for lab, sc in p.labels),
            caption=captions[k] if captions else None, caption_mode=rt.captioner.mode if captions else None,
            meta={"proposed": True, "source": p.source, "mask": encode_mask(p.mask),
                  "area": float(p.mask.mean()), "objectness": float(p.objectness), "score": float(p.rank),
                  **example_meta[k]},
            embedding=embedding_doc(p.let.detach().float().cpu().numpy()) if payload.embedding else None))
    total = time.perf_counter() - t0
    timings = {"total_s": total, **{k: float(v) for k, v in res.timings.items()}}
    log.info("proposals: %d kept of %d inverted on image %s in %.2fs (%s)", len(regions),
             int(res.timings.get("inverted", 0)), digest[:12], total, ", ".join(opts.sources))
    return JobResult(regions=tuple(regions), model=rt.model_info(), image_sha256=digest, timings=timings,
                     cache={"candidates": dict(res.candidates), **rt.engine.cache.stats.as_dict()},
                     params={**params.to_dict(), "proposals": {"sources": list(opts.sources),
                                                               "max_proposals": opts.max_proposals,
                                                               "min_score": opts.min_score,
                                                               "refine": opts.refine}},
                     kind=KIND).to_dict()
