"""RQ job functions (plain functions, importable by name ``worker.jobs.label_regions``).

The model, the engine with its image-state cache, the label scorer and the captioner live in one
process-wide :class:`Runtime`, built on first use (or by :func:`warm_up` when a worker starts), so every
job after the first reuses them.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from .env import env_int
from .payload import (DEFAULT_MAX_SIZE, DEFAULT_MAX_STEPS, InversionParams, PayloadError, check_limits, decode_image,
                      decode_mask)

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    clip: Any  # worker.models.ClipModel
    engine: Any  # worker.engine.MaskInversionEngine
    scorer: Any  # worker.labels.LabelScorer
    captioner: Any  # worker.captions.RetrievalCaptioner
    lock: threading.Lock
    let_cache: Any = None  # worker.let_cache.MemoryLetCache (embedded mode; queue jobs use Redis, see embed_jobs)

    def model_info(self) -> dict[str, str]:
        return {"name": self.clip.name, "pretrained": self.clip.pretrained, "id": self.clip.id,
                "device": str(self.clip.device), "captions": self.captioner.mode}


_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def get_runtime() -> Runtime:
    """The process-wide runtime, created from the environment on first call (see worker.models, worker.engine)."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            from .captions import RetrievalCaptioner
            from .engine import MaskInversionEngine
            from .labels import LabelScorer
            from .models import load_clip

            from .clipcap import load_captioner_from_env

            t0 = time.perf_counter()
            clip = load_clip()
            scorer = LabelScorer(clip)
            captioner = load_captioner_from_env(scorer) or RetrievalCaptioner(scorer)
            from .embed_jobs import let_cache_from_env

            _runtime = Runtime(clip=clip, engine=MaskInversionEngine(clip), scorer=scorer, captioner=captioner,
                               lock=threading.Lock(), let_cache=let_cache_from_env())
            log.info("runtime ready in %.1fs: model %s, %s captions", time.perf_counter() - t0, clip.id,
                     captioner.mode)
        return _runtime


def warm_up() -> dict[str, str]:
    """Load the model before taking jobs; returns the model's identity."""
    return get_runtime().model_info()


def _error_result(rt: Runtime | None, message: str, job: dict[str, Any]) -> dict[str, Any]:
    regions = job.get("regions") if isinstance(job, dict) else None
    ids = [str(r.get("id")) for r in regions if isinstance(r, dict)] if isinstance(regions, list) else []
    return {"model": rt.model_info() if rt else {}, "image_sha256": None, "error": message,
            "regions": [{"id": i, "labels": [], "caption": None, "caption_mode": None, "error": message}
                        for i in ids],
            "timings": {}, "cache": {}}


def check_worker_limits(params: InversionParams, env: Mapping[str, str] | None = None) -> None:
    """Re-apply the service's ``MASKINV_MAX_STEPS`` / ``MASKINV_MAX_SIZE`` in the worker, so a job written to Redis
    by anything but the backend cannot ask for more. Raises PayloadError."""
    limits = [env_int(name, default, env=env, error=PayloadError, prefix="worker misconfigured: ")
              for name, default in (("MASKINV_MAX_STEPS", DEFAULT_MAX_STEPS), ("MASKINV_MAX_SIZE", DEFAULT_MAX_SIZE))]
    check_limits(params, *limits)


def label_regions(job: dict[str, Any]) -> dict[str, Any]:
    """Label and caption every region of one image (payload format: worker.payload).

    Returns per-region top-k labels, caption and error. A malformed job or an undecodable image yields a
    result with a top-level ``"error"`` (and that error on every region); a bad region (empty mask, ...)
    only sets that region's ``"error"``.
    """
    rt = get_runtime()
    t0 = time.perf_counter()
    try:
        if not isinstance(job, dict):
            raise PayloadError(f"job must be a dict, got {type(job).__name__}")
        params = InversionParams.from_dict(job.get("params"))
        check_worker_limits(params)
        labels = job.get("labels") or []
        if not isinstance(labels, list) or not all(isinstance(x, str) and x.strip() for x in labels):
            raise PayloadError("labels must be a list of non-empty strings")
        if len(set(labels)) != len(labels):
            raise PayloadError("labels must be unique")
        image_bytes, digest = decode_image(job.get("image") or {})
        regions = job.get("regions")
        if not isinstance(regions, list):
            raise PayloadError("regions must be a list")
        ids, masks, region_errors = [], [], {}
        for k, r in enumerate(regions):
            rid = str(r.get("id", k)) if isinstance(r, dict) else str(k)
            ids.append(rid)
            try:
                if not isinstance(r, dict):
                    raise PayloadError("region must be an object")
                masks.append(decode_mask(r.get("mask") or {}))
            except PayloadError as exc:
                region_errors[k] = str(exc)
                masks.append(np.zeros((1, 1), bool))
        from .embed_jobs import job_let_cache, parse_prototypes, region_lets, score_regions

        prototypes = parse_prototypes(job.get("prototypes"), labels, int(rt.clip.embed_dim)) if labels else None
        cache, prefix = job_let_cache(rt.let_cache)
        with rt.lock:
            # LETs come from the LET cache when this region was inverted before (whatever its labels were)
            res = region_lets(rt, image_bytes, digest, masks, params, cache, prefix, region_errors) if masks else None
            errors = list(res.errors) if res else []
            good = [k for k, e in enumerate(errors) if e is None]
            lets_good = torch.from_numpy(res.lets[good]) if good else None
            scored, region_meta = (score_regions(rt, res.lets[good], labels, params.templates, params.top_k, prototypes)
                                   if good and labels else ([], []))
            # retrieval captions need a label to pick a phrase bank; a ClipCap captioner needs only the LET
            can_caption = bool(scored) or (bool(good) and rt.captioner.mode != "retrieval")
            captions = (rt.captioner.caption(lets_good.to(rt.clip.device),
                                             [s[0][0] for s in scored] if scored else [""] * len(good))
                        if can_caption and params.caption else [])
            cache_stats = rt.engine.cache.stats.as_dict()
    except (PayloadError, ValueError) as exc:
        log.warning("job rejected: %s", exc)
        return _error_result(rt, str(exc), job)

    by_region = {k: j for j, k in enumerate(good)}
    out_regions = []
    for k, rid in enumerate(ids):
        j = by_region.get(k)
        out_regions.append({
            "id": rid,
            "labels": [{"label": lab, "score": sc} for lab, sc in scored[j]] if j is not None and scored else [],
            "caption": captions[j] if j is not None and captions else None,
            "caption_mode": rt.captioner.mode if j is not None and captions else None,
            "error": errors[k],
            "meta": region_meta[j] if j is not None and region_meta else {},
        })
    total = time.perf_counter() - t0
    timings = {"total_s": total, "forward_s": res.timings["forward_s"] if res else 0.0,
               "inversion_s": res.timings["inversion_s"] if res else 0.0}
    hit = bool(res and res.image_hit)
    let_hits = res.hits if res else 0
    log.info("job: %d regions on image %s in %.2fs (image cache %s; forward %.2fs, inversion %.2fs)",
             len(ids), digest[:12], total, "hit" if hit else "miss", timings["forward_s"], timings["inversion_s"])
    return {"model": rt.model_info(), "image_sha256": digest, "regions": out_regions, "timings": timings,
            "cache": {"image_hit": hit, **cache_stats, "vit_forwards": rt.engine.stats.vit_forwards,
                      "let_hits": let_hits},
            "params": params.to_dict()}
