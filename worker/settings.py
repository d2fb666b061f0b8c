"""Worker settings, read once from environment variables where the runtime is built (torch-free).

Mirrors ``backend.settings``: one frozen dataclass, :meth:`WorkerSettings.from_env`, the project's one family of
parsers (``worker.protocol.env``), and a bad value raises :class:`WorkerSettingsError` naming the variable. Nothing
else in ``worker`` reads the environment (:func:`process_env`): the loader (``worker.engine.models``), the engine,
preprocessing, the job functions and the captioner take these values explicitly.

Variables (defaults in brackets; README's configuration tables and docker-compose.yml mirror them):

    MASKINV_MODEL                   open_clip model name ["ViT-B-16"]
    MASKINV_PRETRAINED              pretrained tag, local checkpoint path, or "none" (random init) ["openai"]
    MASKINV_DEVICE                  "cuda", "cpu", "cuda:1", ... [cuda when available, else cpu]
    MASKINV_SEED                    seed of random init, so that every process builds the same weights [0]
    MASKINV_GPU_DTYPE               dtype of the inversion step on CUDA: fp32, bf16 or fp16 [fp32]
    MASKINV_CPU_GEMM                the large GEMMs on the CPU: auto, onednn (packed weights) or blas [auto: onednn
                                    on AVX-512 CPUs, blas elsewhere]
    MASKINV_CACHE_MB                bound of the engine's image-state cache in MiB [2048]
    MASKINV_CHUNK_MEMORY_MB         working-memory budget of one chunk of masks in MiB [4096]
    MASKINV_MAX_IMAGE_PIXELS        largest image accepted, checked from the header before decoding [50000000]
    MASKINV_MAX_STEPS / _MAX_SIZE   the service's bounds on K and S, re-applied to every job [200 / 1024]
    MASKINV_MAX_LABEL_CHARS         longest label, re-applied to every job [200]
    MASKINV_MAX_VOCAB_BYTES         UTF-8 bytes of one job's vocabulary [65536]
    MASKINV_MAX_TEMPLATE_CHARS      longest prompt template [300]
    MASKINV_PROTOTYPE_CACHE_ENTRIES label sets whose text prototypes are cached [256]
    MASKINV_PROTOTYPE_CACHE_MB      byte bound of that cache in MiB [64]
    MASKINV_LET_CACHE_ENTRIES       LETs kept in the in-process LET cache (embedded mode) [50000]
    MASKINV_LET_CACHE_MB            byte bound of that cache in MiB [256]
    MASKINV_LET_TTL                 seconds a cached LET is reused (both modes) [604800]
    MASKINV_CAPTIONER               ClipCap captioner directory ("" / none / retrieval: retrieval captions) [""]
    MASKINV_CAPTION_DECODING        beam or greedy (checked by the captioner) [beam]
    MASKINV_CAPTION_BEAM            beam width [3]
    MASKINV_CAPTION_MAX_TOKENS      longest caption in tokens [20]
    MASKINV_CAPTION_LENGTH_PENALTY  beam-search length penalty [1.0]
    MASKINV_MAX_PROPOSALS           region proposals per image at most [5]
    MASKINV_PROPOSAL_MIN_SCORE      best-label probability a proposal needs [0.2]
    MASKINV_PROPOSAL_PRECISION      target precision that picks the objectness keep threshold [0.8]
    MASKINV_PROPOSAL_SOURCES        default proposal sources [maskcut,keyseeds,text]
    MASKINV_PROPOSAL_REFINE         snap proposals to SLIC superpixels [0]
    MASKINV_SAM_CHECKPOINT          local SAM checkpoint for the "sam" source and refinement [unset]
    MASKINV_REFINE_METHOD           prompt -> mask for regions sent with refine: auto, grabcut, seeds or sam [auto:
                                    sam with a checkpoint, else grabcut]
    MASKINV_REFINE_BOXES            refine annotators' rectangles before inversion: off or sam [off]
    REDIS_URL                       Redis of the queue [redis://127.0.0.1:6379/0]
    MASKINV_QUEUE                   RQ queue served [maskinv]
    MASKINV_REDIS_PREFIX            key prefix of the registry and result cache [maskinv]
    MASKINV_WORKER_NAME             worker name [host-pid-random]
    MASKINV_WORKER_HEARTBEAT        heartbeat period in seconds; dead after 4 missed beats [5]
    MASKINV_LOG_LEVEL               DEBUG, INFO, WARNING or ERROR [INFO]
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from worker.protocol.env import SettingError, env_bool, env_choice, env_float, env_int, env_str
from worker.protocol.params import DEFAULT_MAX_SIZE, DEFAULT_MAX_STEPS
from worker.protocol.vocabulary import DEFAULT_MAX_LABEL_CHARS, DEFAULT_MAX_TEMPLATE_CHARS, DEFAULT_MAX_VOCAB_BYTES

#: default bounds of the label scorer's prototype cache (entries, MiB)
DEFAULT_PROTOTYPE_CACHE_ENTRIES = 256
DEFAULT_PROTOTYPE_CACHE_MB = 64

GPU_DTYPES = ("fp32", "bf16", "fp16")
CPU_GEMMS = ("auto", "onednn", "blas")  # worker.engine.cpu_gemm.CHOICES (kept torch-free here)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


class WorkerSettingsError(SettingError):
    """An environment variable has a value the worker cannot use."""


def process_env() -> Mapping[str, str]:
    """The process environment: the one place the worker reads ``os.environ`` (``from_env`` defaults to it)."""
    return os.environ


@dataclass(frozen=True)
class CaptionerSettings:
    """Which captioner the worker loads and how it decodes (``source`` None: retrieval captions).

    ``decoding`` is checked by the captioner (``worker.text.clipcap.ClipCapCaptioner``), which knows its decodings.
    """

    source: str | None = None
    decoding: str = "beam"
    beam_size: int = 3
    max_tokens: int = 20
    length_penalty: float = 1.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None,
                 error: type[Exception] = WorkerSettingsError) -> "CaptionerSettings":
        env = process_env() if env is None else env
        source = env_str(env, "MASKINV_CAPTIONER", "")
        return cls(source=None if source.lower() in ("", "none", "retrieval") else source,
                   decoding=env_str(env, "MASKINV_CAPTION_DECODING", "beam").lower(),
                   beam_size=env_int(env, "MASKINV_CAPTION_BEAM", 3, 1, error=error),
                   max_tokens=env_int(env, "MASKINV_CAPTION_MAX_TOKENS", 20, 1, error=error),
                   length_penalty=env_float(env, "MASKINV_CAPTION_LENGTH_PENALTY", 1.0, error=error))


#: region-proposal sources (worker.proposals.pipeline), and the default ones
PROPOSAL_SOURCES = ("maskcut", "keyseeds", "text", "window", "sam")
DEFAULT_PROPOSAL_SOURCES = ("maskcut", "keyseeds", "text")


@dataclass(frozen=True)
class ProposalSettings:
    """Region proposals (``worker.jobs.propose``): cap, score threshold, default sources, SLIC refinement, SAM."""

    max_proposals: int = 5
    min_score: float = 0.2
    sources: tuple[str, ...] = DEFAULT_PROPOSAL_SOURCES
    refine: bool = False
    sam_checkpoint: str | None = None
    target_precision: float = 0.8

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None,
                 error: type[Exception] = WorkerSettingsError) -> "ProposalSettings":
        env = process_env() if env is None else env
        raw = env_str(env, "MASKINV_PROPOSAL_SOURCES", "")
        sources = tuple(s.strip() for s in raw.split(",") if s.strip()) if raw else cls.sources
        if not sources or any(s not in PROPOSAL_SOURCES for s in sources):
            raise error(f"MASKINV_PROPOSAL_SOURCES must list some of {','.join(PROPOSAL_SOURCES)}, got {raw!r}")
        sam = env_str(env, "MASKINV_SAM_CHECKPOINT", "") or None
        if "sam" in sources and sam is None:
            raise error("MASKINV_PROPOSAL_SOURCES lists 'sam' but MASKINV_SAM_CHECKPOINT is not set")
        return cls(max_proposals=env_int(env, "MASKINV_MAX_PROPOSALS", cls.max_proposals, 1, 1000, error=error),
                   min_score=env_float(env, "MASKINV_PROPOSAL_MIN_SCORE", cls.min_score, 0.0, 1.0, error=error),
                   sources=sources, refine=env_bool(env, "MASKINV_PROPOSAL_REFINE", cls.refine, error=error),
                   sam_checkpoint=sam,
                   target_precision=env_float(env, "MASKINV_PROPOSAL_PRECISION", cls.target_precision, 0.0, 1.0,
                                              error=error))


#: prompt -> mask methods (worker.refine.chooser) and the rectangle refinements
REFINE_METHODS = ("auto", "grabcut", "seeds", "sam")
REFINE_BOXES = ("off", "sam")


@dataclass(frozen=True)
class RefineSettings:
    """Prompts to masks (``worker.refine``): the method for regions sent with ``refine``, whether rectangles are
    refined by SAM before inversion, and the SAM checkpoint (shared with the proposals)."""

    method: str = "auto"
    boxes: str = "off"
    sam_checkpoint: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None,
                 error: type[Exception] = WorkerSettingsError) -> "RefineSettings":
        env = process_env() if env is None else env
        method = env_choice(env, "MASKINV_REFINE_METHOD", cls.method, REFINE_METHODS, error=error)
        boxes = env_choice(env, "MASKINV_REFINE_BOXES", cls.boxes, REFINE_BOXES, error=error)
        sam = env_str(env, "MASKINV_SAM_CHECKPOINT", "") or None
        for var, value in (("MASKINV_REFINE_METHOD", method), ("MASKINV_REFINE_BOXES", boxes)):
            if value == "sam" and sam is None:
                raise error(f"{var} is 'sam' but MASKINV_SAM_CHECKPOINT is not set")
        return cls(method=method, boxes=boxes, sam_checkpoint=sam)


@dataclass(frozen=True)
class WorkerSettings:
    """Everything the worker reads from the environment."""

    # model
    model: str = "ViT-B-16"
    pretrained: str = "openai"
    device: str | None = None  # None: cuda when available, else cpu
    seed: int = 0
    gpu_dtype: str = "fp32"
    cpu_gemm: str = "auto"
    # engine and preprocessing
    cache_bytes: int = 2048 * 2**20
    chunk_memory_bytes: int = 4096 * 2**20
    max_image_pixels: int = 50_000_000
    max_steps: int = DEFAULT_MAX_STEPS
    max_size: int = DEFAULT_MAX_SIZE
    # text caps and the prototype cache (docs/security.md)
    max_label_chars: int = DEFAULT_MAX_LABEL_CHARS
    max_vocab_bytes: int = DEFAULT_MAX_VOCAB_BYTES
    max_template_chars: int = DEFAULT_MAX_TEMPLATE_CHARS
    prototype_cache_entries: int = DEFAULT_PROTOTYPE_CACHE_ENTRIES
    prototype_cache_bytes: int = DEFAULT_PROTOTYPE_CACHE_MB << 20
    # the LET cache apart from labels (embedded mode; queue mode keeps LETs in Redis with the backend's TTL)
    let_cache_entries: int = 50_000
    let_cache_bytes: int = 256 << 20
    let_ttl_s: int = 7 * 24 * 3600
    # captions and region proposals
    captioner: CaptionerSettings = CaptionerSettings()
    proposals: ProposalSettings = ProposalSettings()
    refine: RefineSettings = RefineSettings()
    # queue process
    redis_url: str = DEFAULT_REDIS_URL
    queue: str = "maskinv"
    redis_prefix: str = "maskinv"
    worker_name: str | None = None
    heartbeat_s: float = 5.0
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "WorkerSettings":
        env = process_env() if env is None else env
        err = WorkerSettingsError
        captioner = CaptionerSettings.from_env(env)
        log_level = env_str(env, "MASKINV_LOG_LEVEL", "INFO").upper()
        if log_level not in LOG_LEVELS:
            raise WorkerSettingsError(f"MASKINV_LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got {log_level!r}")
        heartbeat = env_float(env, "MASKINV_WORKER_HEARTBEAT", 5.0, error=err)
        if not heartbeat > 0:
            raise WorkerSettingsError(f"MASKINV_WORKER_HEARTBEAT must be > 0 seconds, got {heartbeat}")
        return cls(
            model=env_str(env, "MASKINV_MODEL", "ViT-B-16"),
            pretrained=env.get("MASKINV_PRETRAINED", "openai").strip(),
            device=env_str(env, "MASKINV_DEVICE", "") or None,
            seed=env_int(env, "MASKINV_SEED", 0, 0, error=err),
            gpu_dtype=env_choice(env, "MASKINV_GPU_DTYPE", "fp32", GPU_DTYPES, error=err),
            cpu_gemm=env_choice(env, "MASKINV_CPU_GEMM", "auto", CPU_GEMMS, error=err),
            cache_bytes=env_int(env, "MASKINV_CACHE_MB", 2048, 0, error=err) * 2**20,
            chunk_memory_bytes=env_int(env, "MASKINV_CHUNK_MEMORY_MB", 4096, 0, error=err) * 2**20,
            max_image_pixels=env_int(env, "MASKINV_MAX_IMAGE_PIXELS", 50_000_000, 1, error=err),
            max_steps=env_int(env, "MASKINV_MAX_STEPS", DEFAULT_MAX_STEPS, 0, 1000, error=err),
            max_size=env_int(env, "MASKINV_MAX_SIZE", DEFAULT_MAX_SIZE, 32, 2048, error=err),
            max_label_chars=env_int(env, "MASKINV_MAX_LABEL_CHARS", DEFAULT_MAX_LABEL_CHARS, 1, error=err),
            max_vocab_bytes=env_int(env, "MASKINV_MAX_VOCAB_BYTES", DEFAULT_MAX_VOCAB_BYTES, 1, error=err),
            max_template_chars=env_int(env, "MASKINV_MAX_TEMPLATE_CHARS", DEFAULT_MAX_TEMPLATE_CHARS, 1, error=err),
            prototype_cache_entries=env_int(env, "MASKINV_PROTOTYPE_CACHE_ENTRIES", DEFAULT_PROTOTYPE_CACHE_ENTRIES, 0,
                                            error=err),
            prototype_cache_bytes=env_int(env, "MASKINV_PROTOTYPE_CACHE_MB", DEFAULT_PROTOTYPE_CACHE_MB, 0,
                                          error=err) << 20,
            let_cache_entries=env_int(env, "MASKINV_LET_CACHE_ENTRIES", 50_000, 0, error=err),
            let_cache_bytes=env_int(env, "MASKINV_LET_CACHE_MB", 256, 0, error=err) << 20,
            let_ttl_s=env_int(env, "MASKINV_LET_TTL", 7 * 24 * 3600, 0, error=err),
            captioner=captioner,
            proposals=ProposalSettings.from_env(env),
            refine=RefineSettings.from_env(env),
            redis_url=env_str(env, "REDIS_URL", DEFAULT_REDIS_URL),
            queue=env_str(env, "MASKINV_QUEUE", "maskinv"),
            redis_prefix=env_str(env, "MASKINV_REDIS_PREFIX", "maskinv"),
            worker_name=env_str(env, "MASKINV_WORKER_NAME", "") or None,
            heartbeat_s=heartbeat,
            log_level=log_level,
        )
