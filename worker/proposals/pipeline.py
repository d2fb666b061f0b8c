"""Regions nobody drew: propose masks from the loaded CLIP, label them with MaskInversion, merge, threshold.

Sources of candidate masks (all ``[S, S]`` bool at the model input size S, the whole image stretched to S×S):

* ``maskcut`` — MaskCut on the last block's key features (:mod:`worker.proposals.maskcut`): every connected component of
  each round's foreground, at the patch grid;
* ``keyseeds`` — key-affinity seed regions (:func:`worker.proposals.maskcut.affinity_seeds`): per seed patch, the
connected
  patches whose last-block keys have cosine > tau with the seed's, most-agreed-on regions first;
* ``text``    — the LeGrad map of each label's text prototype (the decomposed path with ``emb`` = the
  prototype), for the labels the image's global embedding ranks highest, thresholded and split into connected
  components ("where is each label?");
* ``window``  — grid cells (2×2, 3×3) and the whole image (the sliding-window baseline, off by default);
* ``sam``     — masks from a SAM automatic mask generator (:mod:`worker.proposals.sam_source`) when one is configured.

Every candidate is then inverted like a drawn region (one LET per mask, one image forward) and labelled by the
LET's best label. Each gets a class-agnostic *objectness* in [0, 1] (:mod:`worker.proposals.objectness`: a
logistic regression over the inversion's Dice losses, the LET's cosine to the image, the mask's shape, its
key-affinity stability and its overlaps with the other candidates, fitted on the scene world's val split; the
fallback without a fit is ``(1 - d)²`` of the final Dice loss ``d``). Candidates are ranked by
``probability ** prob_power × objectness`` (the fit's ``prob_power``), de-duplicated by mask-IoU NMS in that
order, dropped when the probability is below ``min_score`` or the objectness below the fit's threshold (chosen
on val for a target precision; the fit's ``min_keep`` best-ranked ones are kept whatever their objectness); at
most ``max_proposals`` survive. With ``refine`` the masks are
snapped to SLIC superpixels of the image before inversion (:func:`snap_to_superpixels`).

What bounds one image's cost: the ``propose_regions`` job runs at most at :data:`MAX_PROPOSAL_SIZE`
(:func:`proposal_size`, whatever the job asks), at most :data:`MAX_RAW_CANDIDATES` candidates reach
de-duplication (:func:`cap_candidates`, the sources taken in turn) and at most :data:`MAX_CANDIDATES` are inverted;
within :func:`time_limit` (embedded mode: MASKINV_JOB_TIMEOUT) the pipeline checks the deadline between its steps
(before each source, each MaskCut round, de-duplication, the inversion, the crop mixing and the scoring) and stops
with :class:`JobTimeout` at the first check past it.

The engine and the scorer are arguments (a ``worker.engine.engine.MaskInversionEngine`` and a
``worker.text.labels.LabelScorer``); nothing here holds state but the calling thread's time limit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from worker.proposals import maskcut
from worker.proposals import objectness as obj
from worker.protocol.deadline import check_time

from worker.engine.embedding import mixed_with_crops
from worker.engine.preprocess import ImageLike, open_image
from worker.settings import DEFAULT_PROPOSAL_SOURCES as DEFAULT_SOURCES
from worker.settings import PROPOSAL_SOURCES as SOURCES
#: default probability a proposal's best label needs to be kept (MASKINV_PROPOSAL_MIN_SCORE)
DEFAULT_MIN_SCORE = 0.2
#: default cap on proposals returned per image (MASKINV_MAX_PROPOSALS)
DEFAULT_MAX_PROPOSALS = 5
#: candidates inverted per image at most (after de-duplication), whatever the sources produce
MAX_CANDIDATES = 64
#: candidates that reach de-duplication at most (its pairwise IoU holds [N, S²] floats per side: 205 MB at 256 x
#: 448²), taken from the sources in turn (:func:`cap_candidates`)
MAX_RAW_CANDIDATES = 256
#: largest model input S a proposal job runs at, whatever its ``params.size`` (the backend already sends at most
#: MASKINV_PROPOSAL_MAX_SIZE, default the same): the candidates' grid and their inversion grow with S² to S⁴
#: (one regionless task at 1024 took 136 s on the tiny scene CLIP)
MAX_PROPOSAL_SIZE = 448
NMS_IOU = 0.5
DEDUPE_IOU = 0.9

#: an external mask source: (PIL image, size) -> bool masks [N, S, S]
MaskSource = Callable[[object, int], np.ndarray]


@dataclass(frozen=True)
class Candidate:
    """A mask to label: ``mask`` bool ``[S, S]``, where it came from, and the label that produced it (text)."""

    mask: np.ndarray
    source: str
    hint: str | None = None


@dataclass
class Proposal:
    """A labelled proposal: mask ``[S, S]`` bool, top-k ``(label, probability)`` best first, its LET ``[D]``,
    its objectness in [0, 1] (set by :func:`score_objectness` among the image's other candidates), its
    intrinsic objectness features ``[len(objectness.INTRINSIC)]`` and the ranking's probability exponent."""

    mask: np.ndarray
    source: str
    labels: list[tuple[str, float]]
    let: torch.Tensor
    hint: str | None = None
    objectness: float = 1.0
    features: np.ndarray | None = None
    prob_power: float = 1.0

    @property
    def score(self) -> float:
        """The best label's probability (what MASKINV_PROPOSAL_MIN_SCORE thresholds)."""
        return self.labels[0][1] if self.labels else 0.0

    @property
    def rank(self) -> float:
        """The ranking score: best-label probability ** prob_power × objectness (NMS order, output order,
        detection score)."""
        return float(self.score ** self.prob_power * self.objectness)

    @property
    def label(self) -> str | None:
        return self.labels[0][0] if self.labels else None


@dataclass
class ProposalResult:
    proposals: list[Proposal]
    size: int
    image_sha256: str
    candidates: dict[str, int] = field(default_factory=dict)  # per source, before de-duplication
    timings: dict[str, float] = field(default_factory=dict)



def proposal_size(size: int, patch: int, cap: int = MAX_PROPOSAL_SIZE) -> int:
    """The model input side proposals run at: ``size``, or when larger than ``cap`` the largest multiple of the
    model's ``patch`` within it (at least one patch)."""
    if size <= cap:
        return size
    return max(patch, cap - cap % patch)


def cap_candidates(cands: list[Candidate], limit: int = MAX_RAW_CANDIDATES) -> list[Candidate]:
    """At most ``limit`` candidates, taken from the sources in turn (each source's own order kept), returned in
    their original order; all of them when there are no more than ``limit``."""
    if len(cands) <= limit:
        return cands
    queues: dict[str, list[int]] = {}
    for i, c in enumerate(cands):
        queues.setdefault(c.source, []).append(i)
    chosen: list[int] = []
    depth = 0
    while len(chosen) < limit:
        chosen += [q[depth] for q in queues.values() if depth < len(q)][:limit - len(chosen)]
        depth += 1
    return [cands[i] for i in sorted(chosen)]


# ---------------------------------------------------------------------------------------------- geometry
def upsample_grid(mask: np.ndarray, size: int) -> np.ndarray:
    """Patch-grid mask ``[g, g]`` -> pixel mask ``[size, size]`` (each patch a block; size % g == 0)."""
    g = mask.shape[0]
    if size % g:
        raise ValueError(f"size {size} is not a multiple of the grid {g}")
    k = size // g
    return np.kron(mask.astype(np.uint8), np.ones((k, k), np.uint8)).astype(bool)


def mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU ``[N, M]`` of bool masks ``a`` ``[N, H, W]`` and ``b`` ``[M, H, W]``."""
    fa = a.reshape(len(a), -1).astype(np.float32)
    fb = fa if b is a else b.reshape(len(b), -1).astype(np.float32)  # one copy when a mask set meets itself
    inter = fa @ fb.T
    union = fa.sum(1)[:, None] + fb.sum(1)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-9), 0.0)


def nms(masks: np.ndarray, scores: Sequence[float], iou: float = NMS_IOU) -> list[int]:
    """Indices kept by greedy mask NMS, best score first: a mask overlapping a kept one by IoU > ``iou`` goes."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    if len(order) == 0:
        return []
    ious = mask_iou(masks, masks)
    keep: list[int] = []
    for i in order:
        if all(ious[i, j] <= iou for j in keep):
            keep.append(int(i))
    return keep


def dedupe(cands: list[Candidate], iou: float = DEDUPE_IOU) -> list[Candidate]:
    """Drop empty candidates and near-duplicates (IoU > ``iou`` with an earlier one), keeping the first."""
    cands = [c for c in cands if c.mask.any()]
    if not cands:
        return []
    masks = np.stack([c.mask for c in cands])
    ious = mask_iou(masks, masks)
    keep: list[int] = []
    for i in range(len(cands)):
        if all(ious[i, j] <= iou for j in keep):
            keep.append(i)
    return [cands[i] for i in keep]


#: SLIC superpixels per image and the share of a superpixel a mask must cover to take it (chosen on 40 scenes,
#: see benchmarks/results/proposals.md)
SLIC_SEGMENTS = 150
SNAP_COVER = 0.7


def superpixels(image, size: int, n_segments: int = SLIC_SEGMENTS, compactness: float = 10.0) -> np.ndarray:
    """SLIC superpixel labels ``[size, size]`` int of the image resized to size×size (scikit-image)."""
    from PIL import Image
    from skimage.segmentation import slic

    img = open_image(image)[0] if not hasattr(image, "resize") else image
    arr = np.asarray(img.convert("RGB").resize((size, size), Image.Resampling.BICUBIC))
    return slic(arr, n_segments=n_segments, compactness=compactness, start_label=0)


def snap_to_superpixels(mask: np.ndarray, segments: np.ndarray, min_cover: float = SNAP_COVER) -> np.ndarray:
    """The union of the superpixels that ``mask`` covers by at least ``min_cover`` ``[S, S]`` bool (the mask
    itself when none is covered that much)."""
    seg = segments.reshape(-1)
    n = int(seg.max()) + 1
    total = np.bincount(seg, minlength=n)
    inside = np.bincount(seg, weights=mask.reshape(-1).astype(np.float64), minlength=n)
    chosen = inside >= min_cover * np.maximum(total, 1)
    out = chosen[segments]
    return out if out.any() else mask.astype(bool)


# ---------------------------------------------------------------------------------------------- sources
@torch.no_grad()
def image_keys(engine, image: ImageLike, size: int) -> tuple[torch.Tensor, int]:
    """Last-block patch keys ``[g², d]`` of one image and the grid side g, for either tower kind
    (``MaskInversionEngine.patch_keys``: one extra trunk forward, the cached ImageState does not keep them)."""
    return engine.patch_keys(image, size)


def maskcut_candidates(keys: torch.Tensor, grid: int, size: int, n_cuts: int = maskcut.N_CUTS,
                       tau: float = maskcut.TAU) -> list[Candidate]:
    """Every connected component of each MaskCut round's foreground (the kept one first), as ``[S, S]`` masks."""
    out = []
    for cut in maskcut.maskcut(keys, (grid, grid), n_cuts=n_cuts, tau=tau,
                               check=lambda: check_time("a MaskCut round")):
        comps = [cut.mask] + [c for c in cut.components if not np.array_equal(c, cut.mask)]
        out += [Candidate(upsample_grid(c, size), "maskcut") for c in comps]
    return out


def keyseed_candidates(keys: torch.Tensor, grid: int, size: int, max_regions: int = 40) -> list[Candidate]:
    """The ``max_regions`` key-affinity seed regions most seeds agree on, as ``[S, S]`` masks (regions covering
    2+ corners, the background, are left out)."""
    out = []
    for m, _ in maskcut.affinity_seeds(keys, (grid, grid)):
        if maskcut.corners_covered(m) >= maskcut.CORNER_LIMIT:
            continue
        out.append(Candidate(upsample_grid(m, size), "keyseeds"))
        if len(out) >= max_regions:
            break
    return out


@torch.no_grad()
def text_candidates(engine, scorer, image: ImageLike, labels: Sequence[str], templates: Sequence[str], size: int,
                    top_labels: int = 5, thresholds: Sequence[float] = (0.5,), min_area: float = 0.005
                    ) -> list[Candidate]:
    """Connected components of the thresholded LeGrad maps of the ``top_labels`` labels that the image's global
    embedding ranks highest (components smaller than ``min_area`` of the image are dropped)."""
    from worker.proposals.maskcut import components

    state, *_ = engine.image_state(image, size)
    protos = scorer.prototypes(labels, templates)
    probs = scorer.probabilities(state.global_embedding[None], labels, templates)[0]
    top = probs.topk(min(top_labels, len(labels))).indices.tolist()
    maps = engine.explain(image, protos[top], size=size).cpu().numpy()  # [k, S, S] in [0, 1]
    out = []
    for j, e in zip(top, maps):
        for t in thresholds:
            for c in components(e >= t, min_size=max(1, int(min_area * size * size))):
                out.append(Candidate(c, "text", hint=labels[j]))
    return out


def window_candidates(size: int, grids: Sequence[int] = (2, 3)) -> list[Candidate]:
    """The whole image and every cell of each ``k × k`` grid, as ``[S, S]`` masks."""
    out = [Candidate(np.ones((size, size), bool), "window")]
    for k in grids:
        edges = np.linspace(0, size, k + 1).round().astype(int)
        for i in range(k):
            for j in range(k):
                m = np.zeros((size, size), bool)
                m[edges[i]:edges[i + 1], edges[j]:edges[j + 1]] = True
                out.append(Candidate(m, "window"))
    return out


def gather_candidates(engine, scorer, image: ImageLike, labels: Sequence[str], templates: Sequence[str], size: int,
                      sources: Sequence[str] = DEFAULT_SOURCES, n_cuts: int = maskcut.N_CUTS,
                      sam: MaskSource | None = None, keys: tuple[torch.Tensor, int] | None = None
                      ) -> list[Candidate]:
    """Candidates of every requested source (``SOURCES``), not yet de-duplicated; ``keys``: the image's
    :func:`image_keys` when already computed."""
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise ValueError(f"unknown proposal source(s) {unknown}; known: {list(SOURCES)}")
    if "sam" in sources and sam is None:
        raise ValueError("proposal source 'sam' needs a SAM checkpoint (MASKINV_SAM_CHECKPOINT)")
    out: list[Candidate] = []
    if "maskcut" in sources or "keyseeds" in sources:
        check_time("the image's keys")
        k, grid = keys if keys is not None else image_keys(engine, image, size)
        if "maskcut" in sources:
            out += maskcut_candidates(k, grid, size, n_cuts=n_cuts)
        if "keyseeds" in sources:
            check_time("the key-seed candidates")
            out += keyseed_candidates(k, grid, size)
    if "text" in sources:
        check_time("the text candidates")
        out += text_candidates(engine, scorer, image, labels, templates, size)
    if "window" in sources:
        out += window_candidates(size)
    if sam is not None and "sam" in sources:
        check_time("the SAM candidates")
        out += [Candidate(np.asarray(m, bool), "sam") for m in sam(open_image(image)[0], size)]
    return out


# ---------------------------------------------------------------------------------------------- pipeline
#: exponent of (1 - final Dice loss) in the fallback objectness (1 and 2..3 tried on 40 val scenes: 2 best)
OBJECTNESS_POWER = obj.FALLBACK_POWER


def objectness(final_loss: torch.Tensor | np.ndarray, power: float = OBJECTNESS_POWER) -> np.ndarray:
    """The fallback objectness ``(1 - d) ** power`` per mask for the inversion's final Dice losses ``d`` ``[N]``
    (clipped to [0, 1])."""
    d = np.clip(np.asarray(final_loss.detach().cpu() if isinstance(final_loss, torch.Tensor) else final_loss,
                           dtype=np.float64), 0.0, 1.0)
    return (1.0 - d) ** power


#: top-k ``(label, probability)`` per LET ``[N, D]`` (e.g. text and a project's example prototypes)
#: how candidates are labelled: (embeddings ``[N, D]``, masked crops ``[N, D]`` or None) -> top-k per candidate
ScoreFn = Callable[[torch.Tensor, "np.ndarray | None"], list[list[tuple[str, float]]]]


def label_candidates(engine, scorer, image: ImageLike, cands: list[Candidate], labels: Sequence[str],
                     templates: Sequence[str], size: int, steps: int = 10, lr: float = 0.1,
                     top_k: int = 3, score_fn: ScoreFn | None = None, crop_weight: float = 0.0,
                     keys: tuple[torch.Tensor, int] | None = None) -> list[Proposal]:
    """Invert every candidate like a drawn region and attach its top-k labels (``score_fn``, default: text
    prototypes), its intrinsic objectness features (:func:`worker.proposals.objectness.intrinsic_features`;
    ``keys``: the image's :func:`image_keys` when already computed) and the fallback objectness (the final set's
    comes from :func:`score_objectness`); failed inversions are dropped. ``crop_weight > 0``: the candidate's
    embedding is mixed with its masked crop like a drawn region's (``worker.engine.embedding.mix_crop``)."""
    if not cands:
        return []
    check_time(f"inverting {len(cands)} candidates")
    res = engine.invert(image, np.stack([c.mask for c in cands]), size=size, steps=steps, lr=lr)
    ok = [i for i, e in enumerate(res.errors) if e is None]
    if not ok:
        return []
    check_time("the candidates' masked crops")
    lets, crops = mixed_with_crops(engine, image, [cands[i].mask for i in ok], res.lets[ok], crop_weight)
    check_time("scoring the candidates")
    scored = score_fn(lets, crops) if score_fn is not None else scorer.score(lets, labels, templates, top_k=top_k)
    check_time("the candidates' objectness features")
    k, grid = keys if keys is not None else image_keys(engine, image, size)
    masks = np.stack([cands[i].mask for i in ok])
    feats = obj.intrinsic_features(masks, res.losses[-1, ok].cpu().numpy(), res.losses[0, ok].cpu().numpy(),
                                   obj.let_cosines(res.lets[ok], res.global_embedding),
                                   np.array([s[0][1] if s else 0.0 for s in scored]), obj.stability(k, grid, masks))
    fallback = objectness(res.losses[-1, ok])
    return [Proposal(cands[i].mask, cands[i].source, s, lets[j], cands[i].hint, float(o), feats[j])
            for j, (i, s, o) in enumerate(zip(ok, scored, fallback))]


def score_objectness(proposals: list[Proposal], model: obj.ObjectnessModel | None = None) -> list[Proposal]:
    """Set every proposal's objectness (and the ranking's probability exponent) from ``model`` (default: the
    committed fit, :func:`worker.proposals.objectness.default_model`) among the image's other candidates, in
    place; proposals without features keep theirs. Returns ``proposals``."""
    model = model if model is not None else obj.default_model()
    have = [p for p in proposals if p.features is not None]
    if have:
        masks = np.stack([p.mask for p in have])
        x = obj.features(np.stack([p.features for p in have if p.features is not None]), masks,
                         [p.source for p in have])
        for p, o in zip(have, model.predict(x)):
            p.objectness = float(o)
    for p in proposals:
        p.prob_power = model.prob_power
    return proposals


def select(proposals: list[Proposal], min_score: float = DEFAULT_MIN_SCORE, max_proposals: int = DEFAULT_MAX_PROPOSALS,
           nms_iou: float = NMS_IOU, model: obj.ObjectnessModel | None = None,
           min_objectness: float | None = None, target_precision: float | None = None) -> list[Proposal]:
    """Objectness among the image's candidates (:func:`score_objectness` with ``model``), NMS in ranking order
    (:attr:`Proposal.rank`), then the thresholds (probability >= ``min_score``; objectness >=
    ``min_objectness``, default the model's threshold for ``target_precision``,
    :meth:`~worker.proposals.objectness.ObjectnessModel.threshold_for`, except for the model's ``min_keep``
    best-ranked ones), then the cap; best first."""
    if not proposals:
        return []
    model = model if model is not None else obj.default_model()
    score_objectness(proposals, model)
    floor = model.threshold_for(target_precision) if min_objectness is None else min_objectness
    keep = nms(np.stack([p.mask for p in proposals]), [p.rank for p in proposals], nms_iou)
    probable = [proposals[i] for i in keep if proposals[i].score >= min_score]
    return [p for k, p in enumerate(probable) if k < model.min_keep or p.objectness >= floor][:max_proposals]


def propose(engine, scorer, image: ImageLike, labels: Sequence[str], templates: Sequence[str], size: int = 448,
            sources: Sequence[str] = DEFAULT_SOURCES, steps: int = 10, lr: float = 0.1, top_k: int = 3,
            min_score: float = DEFAULT_MIN_SCORE, max_proposals: int = DEFAULT_MAX_PROPOSALS,
            refine: bool = False, n_cuts: int = maskcut.N_CUTS, nms_iou: float = NMS_IOU,
            sam: MaskSource | None = None, max_candidates: int = MAX_CANDIDATES,
            score_fn: ScoreFn | None = None, crop_weight: float = 0.0,
            model: obj.ObjectnessModel | None = None, target_precision: float | None = None) -> ProposalResult:
    """Propose, label, merge and threshold regions of one image (see module docstring). ``score_fn``: how a
    candidate's LET is labelled (default: the text prototypes of ``labels``; the propose job passes the project's
    example prototypes when it has them); ``crop_weight``: see :func:`label_candidates` (the job passes the
    request's ``params.crop_weight``); ``model``: the objectness (default: the committed fit);
    ``target_precision``: picks its keep threshold (MASKINV_PROPOSAL_PRECISION; None: the fit's own).

    Returns at most ``max_proposals`` proposals, best rank first, masks ``[size, size]``, each with its
    objectness in [0, 1].
    """
    if not labels:
        raise ValueError("proposals need at least one label")
    if max_proposals < 1:
        raise ValueError(f"max_proposals must be >= 1, got {max_proposals}")
    t0 = time.perf_counter()
    img, digest = open_image(image)
    check_time("the image's keys")
    keys = image_keys(engine, img, size)
    cands = gather_candidates(engine, scorer, img, labels, templates, size, sources, n_cuts, sam, keys)
    per_source: dict[str, int] = {}
    for c in cands:
        per_source[c.source] = per_source.get(c.source, 0) + 1
    t1 = time.perf_counter()
    cands = cap_candidates(cands)
    if refine and cands:
        check_time("the superpixel refinement")
        seg = superpixels(img, size)
        cands = [Candidate(snap_to_superpixels(c.mask, seg), c.source, c.hint) for c in cands]
    check_time(f"de-duplicating {len(cands)} candidates")
    cands = dedupe(cands)[:max_candidates]
    t2 = time.perf_counter()
    labelled = label_candidates(engine, scorer, img, cands, labels, templates, size, steps, lr, top_k, score_fn,
                                crop_weight, keys)
    t3 = time.perf_counter()
    kept = select(labelled, min_score, max_proposals, nms_iou, model, target_precision=target_precision)
    return ProposalResult(kept, size, digest, per_source,
                          {"candidates_s": t1 - t0, "refine_s": t2 - t1, "inversion_s": t3 - t2,
                           "total_s": time.perf_counter() - t0, "inverted": float(len(cands))})
