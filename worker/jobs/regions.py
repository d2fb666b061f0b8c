"""The ``label_regions`` and ``prepare_labels`` jobs (RQ job functions named in ``worker.protocol.JOB_KINDS``).

Both run on the process-wide :class:`worker.jobs.runtime.Runtime` (model, engine, label scorer, captioner).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from worker.jobs.embed import job_let_cache, parse_prototypes, region_lets, score_regions
from worker.jobs.runtime import Runtime, check_text_limits, get_runtime
from worker.engine.preprocess import open_image
from worker.refine.apply import refine_regions
from worker.protocol import (JobResult, LabelRegionsJob, LabelScore, PayloadError, PrepareLabelsJob, RegionResult,
                             check_label_caps, check_limits, check_templates, decode_image, decode_region_masks,
                             payload_region_ids)
from worker.protocol.results import embedding_doc

log = logging.getLogger(__name__)


def _error_result(rt: Runtime | None, message: str, job: Any) -> dict[str, Any]:
    return JobResult.rejected(message, payload_region_ids(job), rt.model_info() if rt else {}).to_dict()


def label_regions(job: dict[str, Any]) -> dict[str, Any]:
    """Label and caption every region of one image (payload: protocol.LabelRegionsJob; result: JobResult).

    Returns per-region top-k labels, caption and error. A malformed job or an undecodable image yields a
    result with a top-level ``"error"`` (and that error on every region); a bad region (empty mask, bad
    prompt, ...) only sets that region's ``"error"``. A region whose prompt is refined (``worker.refine``) is
    inverted on the refined mask, and its ``meta`` says so (``"refined_by"``, and ``"mask"`` when it was sent with
    ``refine``). With the payload's ``embedding`` flag each labelled region carries the vector its labels were
    scored on (``RegionResult.embedding``: the LET, views combined, mixed with the masked crop; float16).
    """
    rt = get_runtime()
    t0 = time.perf_counter()
    try:
        payload = LabelRegionsJob.from_dict(job)
        params, labels = payload.params, list(payload.labels)
        check_limits(params, rt.settings.max_steps, rt.settings.max_size)
        check_text_limits(params, labels, rt.settings)
        image_bytes, digest = decode_image(dict(payload.image))
        regions = list(payload.regions)
        ids = payload.region_ids()
        masks, region_errors = decode_region_masks(regions)
        prototypes = parse_prototypes(payload.prototypes, labels, int(rt.clip.embed_dim)) if labels else None
        cache, prefix = job_let_cache(rt.let_cache)
        with rt.lock:
            refined = (refine_regions(rt.refiner, open_image(image_bytes)[0], regions, masks, region_errors,
                                      params.size)
                       if any(isinstance(r, dict) and ("prompt" in r or "refine" in r) for r in regions) else {})
            # LETs come from the LET cache when this region was inverted before (whatever its labels were)
            res = region_lets(rt, image_bytes, digest, masks, params, cache, prefix, region_errors) if masks else None
            errors = list(res.errors) if res else []
            good = [k for k, e in enumerate(errors) if e is None]
            lets_good = res.lets[good] if res is not None and good else None  # [G, D]
            crops_good = res.crops[good] if res is not None and good and res.crops is not None else None
            scored, region_meta = (score_regions(rt, lets_good, labels, params.templates, params.top_k, prototypes,
                                                 crops_good)
                                   if lets_good is not None and labels else ([], []))
            # retrieval captions need a label to pick a phrase bank; a ClipCap captioner needs only the LET
            can_caption = bool(scored) or (bool(good) and rt.captioner.mode != "retrieval")
            captions = (rt.captioner.caption(torch.from_numpy(lets_good).to(rt.clip.device),
                                             [s[0][0] for s in scored] if scored else [""] * len(good))
                        if lets_good is not None and can_caption and params.caption else [])
            cache_stats = rt.engine.cache.stats.as_dict()
    except (PayloadError, ValueError) as exc:
        log.warning("job rejected: %s", exc)
        return _error_result(rt, str(exc), job)

    by_region = {k: j for j, k in enumerate(good)}
    out_regions = []
    for k, rid in enumerate(ids):
        j = by_region.get(k)
        top = scored[j] if j is not None and scored else []
        caption = captions[j] if j is not None and captions else None
        out_regions.append(RegionResult(
            id=rid,
            labels=tuple(LabelScore(lab, sc) for lab, sc in top),
            caption=caption,
            caption_mode=rt.captioner.mode if caption is not None else None,
            error=errors[k],
            meta={**(region_meta[j] if j is not None and region_meta else {}), **refined.get(k, {})},
            embedding=(embedding_doc(lets_good[j]) if payload.embedding and j is not None and top
                       and lets_good is not None else None)))
    total = time.perf_counter() - t0
    timings = {"total_s": total, "forward_s": res.timings["forward_s"] if res else 0.0,
               "inversion_s": res.timings["inversion_s"] if res else 0.0}
    hit = bool(res and res.image_hit)
    let_hits = res.hits if res else 0
    log.info("job: %d regions on image %s in %.2fs (image cache %s; forward %.2fs, inversion %.2fs)",
             len(ids), digest[:12], total, "hit" if hit else "miss", timings["forward_s"], timings["inversion_s"])
    return JobResult(regions=tuple(out_regions), model=rt.model_info(), image_sha256=digest, timings=timings,
                     cache={"image_hit": hit, **cache_stats, "vit_forwards": rt.engine.stats.vit_forwards,
                            "let_hits": let_hits},
                     params=params.to_dict()).to_dict()


def prepare_labels(job: dict[str, Any]) -> dict[str, Any]:
    """Build and cache the text prototypes of a project's label sets (and, with retrieval captions, their phrase
    banks), so that the first suggestion after ``/setup`` does not wait for the text encoder
    (payload: protocol.PrepareLabelsJob; result: a JobResult without regions, counts in ``cache``)."""
    rt = get_runtime()
    t0 = time.perf_counter()
    try:
        payload = PrepareLabelsJob.from_dict(job)
        for labels in payload.label_sets:
            check_label_caps(labels, rt.settings.max_label_chars, rt.settings.max_vocab_bytes)
        check_templates(payload.templates, rt.settings.max_template_chars)
        prompts = rt.scorer.prepare(payload.label_sets, payload.templates)
        phrases = 0
        if payload.captions and hasattr(rt.captioner, "prepare"):
            phrases = rt.captioner.prepare([lab for labels in payload.label_sets for lab in labels])
    except (PayloadError, ValueError) as exc:
        log.warning("prepare_labels job rejected: %s", exc)
        return JobResult.rejected(str(exc), [], rt.model_info(), kind="prepare_labels").to_dict()
    total = time.perf_counter() - t0
    log.info("prepared %d label set(s): %d prompt(s) and %d caption phrase(s) encoded in %.2fs",
             len(payload.label_sets), prompts, phrases, total)
    return JobResult(regions=(), model=rt.model_info(), kind="prepare_labels", timings={"total_s": total},
                     cache={"prompts_encoded": prompts, "phrases_encoded": phrases}).to_dict()
