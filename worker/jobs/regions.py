"""RQ job functions (plain functions named in ``worker.protocol.JOB_KINDS``: ``worker.jobs.regions.label_regions``,
``worker.jobs.regions.prepare_labels``).

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

import torch

from worker.protocol import (DEFAULT_MAX_SIZE, DEFAULT_MAX_STEPS, InversionParams, JobResult, LabelRegionsJob,
                             LabelScore,
                       PayloadError, PrepareLabelsJob, RegionResult, check_label_caps, check_limits, check_templates,
                       decode_image, decode_region_masks, env_int, payload_region_ids, process_env)
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    clip: Any  # worker.engine.models.ClipModel
    engine: Any  # worker.engine.engine.MaskInversionEngine
    scorer: Any  # worker.text.labels.LabelScorer
    captioner: Any  # worker.text.captions.RetrievalCaptioner
    lock: threading.Lock
    settings: WorkerSettings = WorkerSettings()
    let_cache: Any = None  # worker.jobs.let_cache.MemoryLetCache (embedded mode; queue jobs use Redis, see embed_jobs)

    def model_info(self) -> dict[str, str]:
        return {"name": self.clip.name, "pretrained": getattr(self.clip, "weights", "") or self.clip.pretrained,
                "id": self.clip.id,
                "device": str(self.clip.device), "captions": self.captioner.mode}


_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def build_engine(clip: Any, settings: WorkerSettings) -> Any:
    """The engine for ``clip`` with the settings' cache and chunk budgets, GPU dtype and CPU GEMM backend."""
    from worker.engine.engine import MaskInversionEngine

    return MaskInversionEngine(clip, cache_bytes=settings.cache_bytes, chunk_memory_bytes=settings.chunk_memory_bytes,
                               gpu_dtype=settings.gpu_dtype, cpu_gemm=settings.cpu_gemm)


def build_runtime(settings: WorkerSettings) -> Runtime:
    """Load the model, engine, label scorer and captioner that ``settings`` describe."""
    from worker.engine import preprocess
    from worker.text.captions import RetrievalCaptioner
    from worker.text.clipcap import load_captioner
    from worker.text.labels import LabelScorer
    from worker.jobs.let_cache import MemoryLetCache
    from worker.engine.models import load_clip

    t0 = time.perf_counter()
    preprocess.set_default_max_pixels(settings.max_image_pixels)
    clip = load_clip(settings.model, settings.pretrained, settings.device, settings.seed)
    scorer = LabelScorer(clip, max_entries=settings.prototype_cache_entries,
                         max_bytes=settings.prototype_cache_bytes)
    captioner = load_captioner(scorer, settings.captioner) or RetrievalCaptioner(scorer)
    let_cache = MemoryLetCache(settings.let_cache_entries, settings.let_cache_bytes, settings.let_ttl_s)
    rt = Runtime(clip=clip, engine=build_engine(clip, settings), scorer=scorer, captioner=captioner,
                 lock=threading.Lock(), settings=settings, let_cache=let_cache)
    gemm = ""
    if str(clip.device).startswith("cpu"):
        import torch

        gemm = (f", CPU GEMMs through {rt.engine.cpu_gemm} (MASKINV_CPU_GEMM={settings.cpu_gemm}, CPU "
                f"{torch.backends.cpu.get_cpu_capability()})")
    log.info("runtime ready in %.1fs: model %s, %s captions%s", time.perf_counter() - t0, clip.id, captioner.mode,
             gemm)
    return rt


def get_runtime() -> Runtime:
    """The process-wide runtime, built on first call from ``WorkerSettings.from_env()`` (the one place the worker
    reads its environment)."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = build_runtime(WorkerSettings.from_env())
        return _runtime


def warm_up() -> dict[str, str]:
    """Load the model before taking jobs; returns the model's identity."""
    return get_runtime().model_info()


def _error_result(rt: Runtime | None, message: str, job: Any) -> dict[str, Any]:
    return JobResult.rejected(message, payload_region_ids(job), rt.model_info() if rt else {}).to_dict()


def check_worker_limits(params: InversionParams, env: Mapping[str, str] | None = None) -> None:
    """Re-apply the service's ``MASKINV_MAX_STEPS`` / ``MASKINV_MAX_SIZE`` (read from ``env``, default the process
    environment) so that a job written to Redis by anything but the backend cannot ask for more. Raises PayloadError.

    Jobs use the runtime's settings instead (read once); this is the standalone form."""
    env = process_env() if env is None else env
    limits = [env_int(env, name, default, error=PayloadError, prefix="worker misconfigured: ")
              for name, default in (("MASKINV_MAX_STEPS", DEFAULT_MAX_STEPS), ("MASKINV_MAX_SIZE", DEFAULT_MAX_SIZE))]
    check_limits(params, *limits)


def check_text_limits(params: InversionParams, labels: list[str], settings: WorkerSettings) -> None:
    """Re-apply ``MASKINV_MAX_LABEL_CHARS`` / ``MASKINV_MAX_VOCAB_BYTES`` / ``MASKINV_MAX_TEMPLATE_CHARS`` to a job
    (a hand-enqueued job is checked like a request). Raises PayloadError naming the label or template."""
    check_label_caps(labels, settings.max_label_chars, settings.max_vocab_bytes)
    check_templates(params.templates, settings.max_template_chars)


def label_regions(job: dict[str, Any]) -> dict[str, Any]:
    """Label and caption every region of one image (payload: protocol.LabelRegionsJob; result: JobResult).

    Returns per-region top-k labels, caption and error. A malformed job or an undecodable image yields a
    result with a top-level ``"error"`` (and that error on every region); a bad region (empty mask, ...)
    only sets that region's ``"error"``.
    """
    rt = get_runtime()
    t0 = time.perf_counter()
    try:
        payload = LabelRegionsJob.from_dict(job)
        params, labels = payload.params, list(payload.labels)
        check_limits(params, rt.settings.max_steps, rt.settings.max_size)
        check_text_limits(params, labels, rt.settings)
        image_bytes, digest = decode_image(payload.image)
        regions = list(payload.regions)
        ids = payload.region_ids()
        masks, region_errors = decode_region_masks(regions)
        from worker.jobs.embed import job_let_cache, parse_prototypes, region_lets, score_regions

        prototypes = parse_prototypes(payload.prototypes, labels, int(rt.clip.embed_dim)) if labels else None
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
        has_caption = j is not None and bool(captions)
        out_regions.append(RegionResult(
            id=rid,
            labels=tuple(LabelScore(lab, sc) for lab, sc in scored[j]) if j is not None and scored else (),
            caption=captions[j] if has_caption else None,
            caption_mode=rt.captioner.mode if has_caption else None,
            error=errors[k],
            meta=region_meta[j] if j is not None and region_meta else {}))
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
