"""The process-wide runtime of the job functions: model, engine, label scorer, captioner and LET cache.

Built once from ``WorkerSettings.from_env()`` on the first job (or by :func:`warm_up` when a worker starts), so
every job after the first reuses the loaded model and its caches. The model, engine, scorer and captioner modules
load torch, so they are imported when the runtime is built, not when a job module is imported.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from worker.jobs.let_cache import MemoryLetCache
from worker.protocol import InversionParams, check_label_caps, check_templates
from worker.settings import WorkerSettings

if TYPE_CHECKING:
    from worker.engine.engine import MaskInversionEngine
    from worker.engine.models import ClipModel
    from worker.refine.chooser import Refiner
    from worker.text.captions import RetrievalCaptioner
    from worker.text.clipcap import ClipCapCaptioner
    from worker.text.labels import LabelScorer

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """What every job of this process shares; ``lock`` serialises the jobs' use of the model."""

    clip: ClipModel
    engine: MaskInversionEngine
    scorer: LabelScorer
    captioner: RetrievalCaptioner | ClipCapCaptioner
    lock: threading.Lock
    settings: WorkerSettings = WorkerSettings()
    #: embedded mode's LET cache (queue jobs use Redis when the backend names it, worker.jobs.embed.job_let_cache)
    let_cache: MemoryLetCache | None = None
    #: prompts to masks (worker.refine); None: regions sent with ``refine`` fail
    refiner: Refiner | None = None

    def model_info(self) -> dict[str, str]:
        """The model's identity as results report it: name, weights, id, device, caption mode and refinement
        (``worker.refine.chooser.Refiner.signature``, part of the result-cache keys)."""
        info = {"name": self.clip.name, "pretrained": getattr(self.clip, "weights", "") or self.clip.pretrained,
                "id": self.clip.id, "device": str(self.clip.device), "captions": self.captioner.mode}
        if self.refiner is not None:
            info["refine"] = self.refiner.signature()
        return info


_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def build_engine(clip: ClipModel, settings: WorkerSettings) -> MaskInversionEngine:
    """The engine for ``clip`` with the settings' cache and chunk budgets, GPU dtype and CPU GEMM backend."""
    from worker.engine.engine import MaskInversionEngine

    return MaskInversionEngine(clip, cache_bytes=settings.cache_bytes, chunk_memory_bytes=settings.chunk_memory_bytes,
                               gpu_dtype=settings.gpu_dtype, cpu_gemm=settings.cpu_gemm)


def build_runtime(settings: WorkerSettings) -> Runtime:
    """Load the model, engine, label scorer and captioner that ``settings`` describe."""
    import torch

    from worker.engine import preprocess
    from worker.engine.models import load_clip
    from worker.refine.chooser import Refiner
    from worker.text.captions import RetrievalCaptioner
    from worker.text.clipcap import load_captioner
    from worker.text.labels import LabelScorer

    t0 = time.perf_counter()
    preprocess.set_default_max_pixels(settings.max_image_pixels)
    clip = load_clip(settings.model, settings.pretrained, settings.device, settings.seed)
    scorer = LabelScorer(clip, max_entries=settings.prototype_cache_entries,
                         max_bytes=settings.prototype_cache_bytes)
    captioner = load_captioner(scorer, settings.captioner) or RetrievalCaptioner(scorer)
    let_cache = MemoryLetCache(settings.let_cache_entries, settings.let_cache_bytes, settings.let_ttl_s)
    engine = build_engine(clip, settings)
    rt = Runtime(clip=clip, engine=engine, scorer=scorer, captioner=captioner, lock=threading.Lock(),
                 settings=settings, let_cache=let_cache,
                 refiner=Refiner.from_settings(settings.refine, engine, clip.device))
    gemm = ""
    if str(clip.device).startswith("cpu"):
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


def check_text_limits(params: InversionParams, labels: list[str], settings: WorkerSettings) -> None:
    """Re-apply ``MASKINV_MAX_LABEL_CHARS`` / ``MASKINV_MAX_VOCAB_BYTES`` / ``MASKINV_MAX_TEMPLATE_CHARS`` to a job
    (a hand-enqueued job is checked like a request). Raises PayloadError naming the label or template."""
    check_label_caps(labels, settings.max_label_chars, settings.max_vocab_bytes)
    check_templates(params.templates, settings.max_template_chars)
