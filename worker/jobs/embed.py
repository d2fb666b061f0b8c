"""LETs through the LET cache, scoring with text + example prototypes, and the ``embed_regions`` job.

``embed_regions`` (job kind in :data:`worker.protocol.JOB_KINDS`) turns annotated regions into examples: it
returns each region's LET, and optionally the text prototypes of a label set, compactly::

    payload = worker.protocol.EmbedRegionsJob.to_dict()
            = {"v": 1, "image": {"sha256", "data_b64"}, "regions": [{"id": str, "mask": EncodedMask}, ...],
               "params": InversionParams, "labels": [str, ...] (optional), "dtype": "float16" | "float32"}
    result  = JobResult(kind="embed_regions", regions=[RegionResult(id, meta={"let": Vectors [1, D],
                                                                               "crop": Vectors [1, D]}), ...],
                        meta={"text": Vectors [L, D] (when labels were given), "logit_scale": float,
                              "embed_dim": int})

    Vectors = {"dtype": "float32" | "float16", "shape": [N, D], "data": base64 of the little-endian array}
    (worker.text.prototypes.encode_vectors / decode_vectors; float16 by default: 2 bytes per dimension)

``crop`` (when the params mix in the masked crop) is the region's masked-crop embedding, which the backend keeps
beside the embedding for learning (:mod:`worker.protocol.features`). LETs are the raw (unnormalised) LETs of
:meth:`worker.engine.engine.MaskInversionEngine.invert`. Both this job and
``label_regions`` look LETs up in the LET cache (:mod:`worker.jobs.let_cache`) before inverting.

Prototypes for ``label_regions`` (optional ``"prototypes"`` in its payload; built by the backend from the
project's examples, :mod:`backend.learning.learner`)::

    {"version": str, "labels": [str, ...], "weights": Vectors [P, D or 2D], "bias": [float] * P,
     "means": Vectors [P, D or 2D], "counts": [int] * P}

(2D: over learning features, the embedding beside the masked crop, :mod:`worker.protocol.features`)

one row per label *with examples* (labels of the job not listed fall back to text); scored by
:func:`worker.text.prototypes.combined_logits`. Each region's ``meta`` then carries ``margin`` (top-1 minus top-2
probability), ``examples`` (the number of examples behind its top-1 label) and ``examples_version``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from worker.engine.embedding import combine_views, mix_crop
from worker.jobs.let_cache import JOB_META_KEY, LetCache, MemoryLetCache, RedisLetCache, let_key
from worker.jobs.runtime import Runtime, check_text_limits, get_runtime
from worker.protocol import (MAX_EMBED_LABELS, EmbedRegionsJob, InversionParams, JobResult, PayloadError,
                             ProtocolError, RegionResult, check_limits, decode_image, decode_region_masks, encode_mask,
                             region_ids)
from worker.protocol.features import learning_features, text_features, uses_crops
from worker.text.prototypes import combined_logits, decode_vectors, encode_vectors

log = logging.getLogger(__name__)

#: most labels an embed job computes text prototypes for, and most prototype rows a label job accepts
MAX_LABELS = MAX_EMBED_LABELS
DEFAULT_PREFIX = "maskinv"


def job_let_cache(memory: LetCache | None) -> tuple[LetCache, str]:
    """The LET cache for the running job: Redis (shared by all workers) when the backend named one in the RQ
    job's meta, else the process's in-memory cache (none: one that keeps nothing); and the key prefix."""
    try:
        from rq import get_current_job

        job = get_current_job()
    except Exception:  # noqa: BLE001 - not inside an RQ worker
        job = None
    conf = (job.meta or {}).get(JOB_META_KEY) if job is not None else None
    if job is not None and conf and isinstance(conf, dict):
        return RedisLetCache(job.connection, int(conf.get("ttl_s", 0))), str(conf.get("prefix") or DEFAULT_PREFIX)
    return (memory if memory is not None else MemoryLetCache(0, 0, 0)), DEFAULT_PREFIX


#: the views of ``InversionParams.views``, in order: the image as sent, then its horizontal mirror
VIEW_TAGS = ("", "hflip")


@dataclass
class LetBatch:
    """LETs of N regions of one image."""

    lets: np.ndarray  # [N, D] float32, unnormalised (zeros where errors[i] is set)
    errors: list[str | None]
    hits: int = 0  # regions served from the LET cache (every view of them)
    image_hit: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    cached: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # [N] bool: the LET came from the cache
    crops: np.ndarray | None = None  # [N, D] masked-crop embeddings (with params.crop_weight > 0), zeros at errors


def region_lets(rt: Runtime, image_bytes: bytes, image_sha256: str, masks: Sequence[np.ndarray],
                params: InversionParams, cache: LetCache, prefix: str,
                mask_errors: dict[int, str] | None = None) -> LetBatch:
    """Region embeddings ``[N, D]`` of ``masks`` on the image: LETs from ``cache`` or inverted (and stored).

    With ``params.views == 2`` every region is also inverted on the horizontal mirror of the image (image and
    mask flipped; cached under its own key) and its embedding is :func:`combine_views` of the two LETs: the
    average over the two views halves the LET's dependence on where the inversion happened to stop (scene world,
    8 examples per class: 48.1 -> 52.0 Acc@1, ``benchmarks/few_shot.py``), at twice the inversions.
    With ``params.crop_weight > 0`` the embedding is then :func:`mix_crop` with the region's masked-crop
    embedding (:func:`region_crops`): the crop sees the region's outline, which the LET renders worst (scene
    world, zero-shot: 41.2 -> 49.8 Acc@1 at weight 0.3, ``benchmarks/region_classification.py``).
    ``mask_errors``: regions already known to be bad (their error is kept, nothing is inverted for them).
    """
    views = [_view_lets(rt, image_bytes, image_sha256, masks, params, cache, prefix, mask_errors, tag)
             for tag in VIEW_TAGS[:params.views]]
    if len(views) == 1:
        batch = views[0]
    else:
        errors = [next((v.errors[i] for v in views if v.errors[i] is not None), None) for i in range(len(masks))]
        lets = combine_views(np.stack([v.lets for v in views]))
        lets[[i for i, e in enumerate(errors) if e is not None]] = 0.0
        cached = np.logical_and.reduce([v.cached for v in views])
        timings = {k: sum(v.timings.get(k, 0.0) for v in views) for k in views[0].timings}
        batch = LetBatch(lets=lets, errors=errors, hits=int(sum(c and e is None for c, e in zip(cached, errors))),
                         image_hit=all(v.image_hit for v in views), timings=timings, cached=cached)
    if params.crop_weight:
        t0 = time.perf_counter()
        crops = region_crops(rt, image_bytes, image_sha256, masks, batch.errors, cache, prefix)
        good = [i for i, e in enumerate(batch.errors) if e is None]
        batch.lets[good] = mix_crop(batch.lets[good], crops[good], params.crop_weight)
        batch.crops = crops
        batch.timings["crop_s"] = time.perf_counter() - t0
    return batch


def _mask_keys(rt: Runtime, image_sha256: str, masks: Sequence[np.ndarray], errors: Sequence[str | None],
               prefix: str, size: int, steps: int, lr: float, alpha: float, view: str) -> dict[int, str]:
    """LET-cache keys of the masks without an error, by position."""
    return {i: let_key(prefix, rt.clip.id, image_sha256, encode_mask(np.asarray(masks[i], bool))["sha256"],
                       size, steps, lr, alpha, view)
            for i in range(len(masks)) if errors[i] is None}


def _cached_rows(cache: LetCache, keys: dict[int, str], dim: int) -> dict[int, np.ndarray]:
    """The ``[dim]`` vectors ``cache`` holds for ``keys``, by position (a read failure only costs recomputing)."""
    try:
        found = dict(zip(keys, cache.get_many(list(keys.values())))) if keys else {}
    except Exception as exc:  # noqa: BLE001 - a cache read failure only costs an inversion or a forward pass
        log.warning("LET cache read failed: %s", exc)
        return {}
    return {i: v for i, v in found.items() if v is not None and v.shape == (dim,)}


def _store_rows(cache: LetCache, store: dict[str, np.ndarray]) -> None:
    try:
        cache.put_many(store)
    except Exception as exc:  # noqa: BLE001 - see _cached_rows
        log.warning("LET cache write failed: %s", exc)


def region_crops(rt: Runtime, image_bytes: bytes, image_sha256: str, masks: Sequence[np.ndarray],
                 errors: Sequence[str | None], cache: LetCache, prefix: str) -> np.ndarray:
    """Masked-crop embeddings ``[N, D]`` (``engine.crop_embeddings`` at the model's native size) of the masks
    without an error, through the LET cache (key view ``"masked_crop"``); zeros elsewhere."""
    n, dim = len(masks), int(rt.clip.embed_dim)
    out = np.zeros((n, dim), np.float32)
    size = int(rt.engine.native_size)
    keys = _mask_keys(rt, image_sha256, masks, errors, prefix, size, 0, 0.0, 0.0, "masked_crop")
    found = _cached_rows(cache, keys, dim)
    for i, emb in found.items():
        out[i] = emb
    todo = [i for i in keys if i not in found]
    if todo:
        crops, errs = rt.engine.crop_embeddings(image_bytes, [masks[i] for i in todo], "masked_crop", size)
        emb = crops.detach().float().cpu().numpy()
        store = {}
        for j, i in enumerate(todo):
            if errs[j] is None:  # a mask the inversion took but a crop cannot (none known) keeps the LET alone
                out[i] = emb[j]
                store[keys[i]] = emb[j]
        _store_rows(cache, store)
    return out


def _view_lets(rt: Runtime, image_bytes: bytes, image_sha256: str, masks: Sequence[np.ndarray],
               params: InversionParams, cache: LetCache, prefix: str, mask_errors: dict[int, str] | None,
               view: str) -> LetBatch:
    """:func:`region_lets` for one view (``view``: a tag of :data:`VIEW_TAGS`)."""
    mask_errors = dict(mask_errors or {})
    n = len(masks)
    dim = int(rt.clip.embed_dim)
    lets = np.zeros((n, dim), np.float32)
    cached = np.zeros(n, bool)
    errors: list[str | None] = [mask_errors.get(i) for i in range(n)]
    keys = _mask_keys(rt, image_sha256, masks, errors, prefix, params.size, params.steps, params.lr, params.alpha,
                      view)
    for i, let in _cached_rows(cache, keys, dim).items():
        lets[i] = let
        cached[i] = True
    todo = [i for i in keys if not cached[i]]
    timings = {"forward_s": 0.0, "inversion_s": 0.0}
    image_hit = False
    if todo:
        image: Any = image_bytes
        view_masks = [masks[i] for i in todo]
        if view == "hflip":
            from PIL import Image

            from worker.engine.preprocess import open_image

            image = open_image(image_bytes)[0].transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            view_masks = [np.ascontiguousarray(np.asarray(m)[:, ::-1]) for m in view_masks]
        res = rt.engine.invert(image, view_masks, size=params.size, steps=params.steps,
                               lr=params.lr, alpha=params.alpha, final_loss=False)
        image_hit = bool(res.image_hit)
        timings = {"forward_s": res.timings["forward_s"], "inversion_s": res.timings["inversion_s"]}
        out = res.lets.detach().float().cpu().numpy()
        store = {}
        for j, i in enumerate(todo):
            if res.errors[j] is None:
                lets[i] = out[j]
                store[keys[i]] = out[j]
            else:
                errors[i] = res.errors[j]
        _store_rows(cache, store)
    return LetBatch(lets=lets, errors=errors, hits=int(cached.sum()), image_hit=image_hit, timings=timings,
                    cached=cached)


def text_prototypes(rt: Runtime, labels: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """Normalised text prototypes ``[L, D]`` (the runtime's label scorer, cached there)."""
    return rt.scorer.prototypes(list(labels), list(templates)).detach().float().cpu().numpy()


def logit_scale(rt: Runtime) -> float:
    return float(rt.clip.model.logit_scale.exp())


def parse_prototypes(doc: Any, labels: Sequence[str], dim: int) -> dict[str, Any] | None:
    """The ``prototypes`` of a label job aligned to the job's ``labels`` (rows of unlisted labels: no examples);
    None when absent. PayloadError for a malformed document."""
    if doc is None:
        return None
    doc = doc.to_dict() if hasattr(doc, "to_dict") else doc  # payloads carry worker.protocol.ExamplePrototypes
    if not isinstance(doc, dict):
        raise PayloadError("prototypes must be an object")
    names = doc.get("labels")
    if not isinstance(names, list) or not all(isinstance(x, str) for x in names) or len(names) > MAX_LABELS:
        raise PayloadError(f"prototypes.labels must be a list of at most {MAX_LABELS} strings")
    try:
        weights_doc: Any = doc.get("weights")  # decode_vectors rejects anything but a vectors object
        means_doc: Any = doc.get("means")
        weights, means = decode_vectors(weights_doc), decode_vectors(means_doc)
    except ValueError as exc:
        raise PayloadError(f"prototypes: {exc}") from None
    bias, counts = doc.get("bias"), doc.get("counts")
    p = len(names)
    width = int(weights.shape[1]) if weights.ndim == 2 else -1
    if width not in (dim, 2 * dim) or weights.shape != (p, width) or means.shape != (p, width):
        raise PayloadError(f"prototypes.weights and .means must be [{p}, {dim}] (embeddings) or [{p}, {2 * dim}] "
                           f"(embeddings and crops), got {list(weights.shape)} and {list(means.shape)}")
    if (not isinstance(bias, list) or len(bias) != p
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and np.isfinite(b) for b in bias)):
        raise PayloadError(f"prototypes.bias must be {p} finite numbers")
    if not isinstance(counts, list) or len(counts) != p or not all(
            isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
        raise PayloadError(f"prototypes.counts must be {p} non-negative integers")
    index = {name: j for j, name in enumerate(names)}
    n = len(labels)
    out: dict[str, Any] = {"weights": np.zeros((n, width), np.float32), "bias": np.zeros(n, np.float32),
           "means": np.zeros((n, width), np.float32), "counts": np.zeros(n, np.int64),
           "version": str(doc.get("version") or "")[:100]}
    for i, label in enumerate(labels):
        j = index.get(label)
        if j is not None and counts[j] > 0:
            out["weights"][i], out["bias"][i] = weights[j], bias[j]
            out["means"][i], out["counts"][i] = means[j], counts[j]
    return out


def score_regions(rt: Runtime, lets: np.ndarray, labels: Sequence[str], templates: Sequence[str], top_k: int,
                  prototypes: dict[str, Any] | None = None, crops: np.ndarray | None = None
                  ) -> tuple[list[list[tuple[str, float]]], list[dict[str, Any]]]:
    """Top-k ``(label, probability)`` per region embedding ``lets`` ``[N, D]`` and per-region meta (margin,
    examples behind top-1). Prototypes over learning features (``[L, 2D]``, ``worker.protocol.features``) need the
    regions' masked crops ``crops`` ``[N, D]``; without them such prototypes are left out (text alone)."""
    text = text_prototypes(rt, labels, templates)
    scale = logit_scale(rt)
    if prototypes is not None and uses_crops(prototypes["weights"].shape[1], text.shape[1]):
        if crops is None:
            log.warning("example prototypes over crops, but no crops for these regions: scored by text alone")
            prototypes = None
        else:
            lets, text = learning_features(lets, crops), text_features(text)
    if prototypes is None:
        logits = combined_logits(lets, text, scale)
    else:
        # labels with examples: the probe's weights; without: their text prototype (see worker.text.prototypes)
        weights = np.where(prototypes["counts"][:, None] > 0, prototypes["weights"], text)
        logits = combined_logits(lets, text, scale, weights, prototypes["bias"], prototypes["means"],
                                 prototypes["counts"])
    z = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    k = min(int(top_k), len(labels))
    order = np.argsort(-probs, axis=1, kind="stable")
    scored, meta = [], []
    for row, idx in zip(probs, order):
        scored.append([(labels[j], float(row[j])) for j in idx[:k]])
        second = float(row[idx[1]]) if len(idx) > 1 else 0.0
        meta.append({"margin": float(row[idx[0]]) - second, **examples_meta(prototypes, int(idx[0]))})
    return scored, meta


def examples_meta(prototypes: dict[str, Any] | None, label: int) -> dict[str, Any]:
    """A region's ``examples`` (behind its top-1 label, index ``label`` of the job's labels) and
    ``examples_version``; ``{"examples": 0}`` without prototypes."""
    if prototypes is None:
        return {"examples": 0}
    return {"examples": int(prototypes["counts"][label]), "examples_version": prototypes["version"]}


def embed_regions(job: dict[str, Any]) -> dict[str, Any]:
    """The LETs of a job's regions (and text prototypes of its labels), see the module docstring."""
    rt = get_runtime()
    t0 = time.perf_counter()
    ids: list[str] = []
    try:
        if isinstance(job, dict) and isinstance(job.get("regions"), list):  # ids first: a bad job fails each
            ids = region_ids(job["regions"])
        payload = EmbedRegionsJob.from_dict(job)
        regions, params, labels, dtype = list(payload.regions), payload.params, list(payload.labels), payload.dtype
        check_limits(params, rt.settings.max_steps, rt.settings.max_size)
        check_text_limits(params, labels, rt.settings)
        masks, mask_errors = decode_region_masks(regions)
        image_bytes, digest = decode_image(dict(payload.image or {})) if regions else (b"", None)
        cache, prefix = job_let_cache(rt.let_cache)
        with rt.lock:
            batch = (region_lets(rt, image_bytes, digest or "", masks, params, cache, prefix, mask_errors) if regions
                     else LetBatch(np.zeros((0, rt.clip.embed_dim), np.float32), []))
            meta: dict[str, Any] = {"embed_dim": int(rt.clip.embed_dim), "logit_scale": logit_scale(rt)}
            if labels:
                meta["text"] = encode_vectors(text_prototypes(rt, labels, params.templates), dtype)
    except (PayloadError, ProtocolError, ValueError) as exc:
        log.warning("embed job rejected: %s", exc)
        return JobResult.rejected(str(exc), ids, rt.model_info(), kind="embed_regions").to_dict()
    out = [RegionResult.failed(rid, err) if err else
           RegionResult(id=rid, meta={"let": encode_vectors(batch.lets[k:k + 1], dtype),
                                      **({"crop": encode_vectors(batch.crops[k:k + 1], dtype)}
                                         if batch.crops is not None else {})})
           for k, (rid, err) in enumerate(zip(ids, batch.errors))]
    total = time.perf_counter() - t0
    log.info("embed job: %d region(s) (%d from the LET cache) in %.2fs", len(ids), batch.hits, total)
    return JobResult(regions=tuple(out), model=rt.model_info(), image_sha256=digest,
                     timings={"total_s": total, **batch.timings},
                     cache={"let_hits": batch.hits, "image_hit": batch.image_hit}, params=params.to_dict(),
                     kind="embed_regions", meta=meta).to_dict()
