"""Class-agnostic objectness of proposal candidates: "does this mask cover one whole object?", in [0, 1].

Features per candidate (:data:`FEATURES`), all from what the pipeline already has:

* the inversion: final and first-step Dice loss of the LET's LeGrad map against the mask (``d_final``,
  ``d_start``, their difference ``gain``), the LET's cosine to the image's global embedding (``cos_global``);
* the best label's probability (``p_best``);
* the mask: log of its share of the image (``log_area``), its share of its bounding box (``fill``), its share of
  the image border (``border``);
* the key-affinity graph: ``stability``, the share of the seed regions seeded inside the mask that reproduce it
  at IoU >= 0.5 (every patch a seed, each tau of :data:`worker.proposals.maskcut.SEED_TAUS`);
* the other candidates of the image: best IoU with another (``max_iou``), how many overlap it at IoU > 0.5
  (``log_support``), the largest share of it inside a larger one (``inside``), how many smaller ones lie
  mostly inside it (``log_contains``);
* its source (``src_maskcut``, ``src_keyseeds``, ``src_text``: one-hot).

:class:`ObjectnessModel` is a logistic regression over the standardised features, fitted on the scene world's
val split by ``benchmarks/proposal_ranking.py --fit`` and committed as ``objectness.json`` next to this module
(features, means, scales, weights, the keep threshold chosen on val for a target precision). Without that file
(or with one naming other features) the fallback needs no fit: ``(1 - d_final)²``, kept from
:data:`FALLBACK_THRESHOLD`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from worker.proposals import maskcut

log = logging.getLogger(__name__)

#: the committed fit (benchmarks/proposal_ranking.py --fit)
MODEL_PATH = Path(__file__).with_name("objectness.json")
SOURCES = ("maskcut", "keyseeds", "text")
INTRINSIC = ("d_final", "d_start", "gain", "cos_global", "p_best", "log_area", "fill", "border", "stability")
CONTEXT = ("max_iou", "log_support", "inside", "log_contains")
FEATURES = INTRINSIC + CONTEXT + tuple(f"src_{s}" for s in SOURCES)
#: the fallback's exponent of (1 - d_final) and its keep threshold (no fit needed)
FALLBACK_POWER = 2.0
FALLBACK_THRESHOLD = 0.0
#: a mask this much inside another counts as inside it (``inside`` / ``log_contains``)
INSIDE_SHARE = 0.8


def stability(keys: torch.Tensor, grid: int, masks: np.ndarray) -> np.ndarray:
    """Per mask ``[N, S, S]`` (S a multiple of ``grid``): the share of the key-affinity seed regions seeded
    inside it (keys ``[grid², d]``, every patch a seed) whose region has IoU >= 0.5 with it on the patch grid;
    0 when no seed lies inside. Returns ``[N]``."""
    if len(masks) == 0:
        return np.zeros(0)
    found = maskcut.seed_regions(keys, (grid, grid), maskcut.SEED_TAUS, range(grid * grid))
    seeds = np.array([i for i, _ in found])
    reg = np.stack([r.reshape(-1) for _, r in found]).astype(np.float32)  # [R, g²]
    size = masks.shape[1]
    cell = size // grid
    cover = masks[:, :grid * cell, :grid * cell].reshape(len(masks), grid, cell, grid, cell).mean(axis=(2, 4))
    on = (cover >= 0.5).reshape(len(masks), -1).astype(np.float32)  # [N, g²]
    inter = on @ reg.T
    iou = inter / np.maximum(on.sum(1)[:, None] + reg.sum(1)[None] - inter, 1.0)
    inside = on[:, seeds] > 0  # [N, R]: region r was seeded inside mask n
    hits = ((iou >= 0.5) & inside).sum(1)
    n_in = inside.sum(1)
    return np.where(n_in > 0, hits / np.maximum(n_in, 1), 0.0)


def mask_shape_features(masks: np.ndarray) -> np.ndarray:
    """``[N, 3]``: log share of the image, share of the bounding box, share of the image border, of bool masks
    ``[N, H, W]``."""
    n, h, w = masks.shape
    out = np.zeros((n, 3))
    border_len = 2 * (h + w) - 4
    for i, m in enumerate(masks):
        area = float(m.sum())
        if area == 0:
            out[i] = (np.log(1.0 / (h * w)), 0.0, 0.0)
            continue
        ys = np.flatnonzero(m.any(axis=1))
        xs = np.flatnonzero(m.any(axis=0))
        box = float((ys[-1] - ys[0] + 1) * (xs[-1] - xs[0] + 1))
        edge = float(m[0].sum() + m[-1].sum() + m[1:-1, 0].sum() + m[1:-1, -1].sum())
        out[i] = (np.log(area / (h * w)), area / box, edge / border_len)
    return out


def context_features(masks: np.ndarray) -> np.ndarray:
    """``[N, 4]`` of :data:`CONTEXT` for the candidate set ``[N, H, W]`` of one image (how each mask sits among
    the others)."""
    n = len(masks)
    if n == 0:
        return np.zeros((0, len(CONTEXT)))
    flat = masks.reshape(n, -1).astype(np.float32)
    inter = flat @ flat.T
    area = flat.sum(1)
    union = area[:, None] + area[None, :] - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1e-9), 0.0)
    np.fill_diagonal(iou, 0.0)
    share = inter / np.maximum(area[:, None], 1.0)  # [i, j]: share of i inside j
    np.fill_diagonal(share, 0.0)
    larger = area[None, :] > area[:, None]
    inside = np.where(larger, share, 0.0).max(axis=1)
    contains = ((share.T >= INSIDE_SHARE) & larger.T).sum(axis=1)  # smaller j mostly inside i
    return np.stack([iou.max(axis=1), np.log1p((iou > 0.5).sum(axis=1)), inside, np.log1p(contains)], axis=1)


def intrinsic_features(masks: np.ndarray, d_final: np.ndarray, d_start: np.ndarray, cos_global: np.ndarray,
                       p_best: np.ndarray, stab: np.ndarray) -> np.ndarray:
    """``[N, 9]`` of :data:`INTRINSIC` for masks ``[N, H, W]`` and per-mask terms ``[N]``."""
    d1 = np.clip(np.asarray(d_final, dtype=np.float64), 0.0, 1.0)
    d0 = np.clip(np.asarray(d_start, dtype=np.float64), 0.0, 1.0)
    shape = mask_shape_features(masks)
    return np.column_stack([d1, d0, d0 - d1, np.asarray(cos_global, np.float64), np.asarray(p_best, np.float64),
                            shape, np.asarray(stab, np.float64)])


def source_features(sources: Sequence[str]) -> np.ndarray:
    """``[N, 3]`` one-hot of :data:`SOURCES` (zeros for any other source)."""
    return np.array([[float(s == k) for k in SOURCES] for s in sources]).reshape(len(sources), len(SOURCES))


def features(intrinsic: np.ndarray, masks: np.ndarray, sources: Sequence[str]) -> np.ndarray:
    """The full ``[N, len(FEATURES)]`` matrix: intrinsic ``[N, 9]``, the set's context and the sources."""
    return np.concatenate([intrinsic.reshape(len(masks), len(INTRINSIC)), context_features(masks),
                           source_features(sources)], axis=1)


@torch.no_grad()
def let_cosines(lets: torch.Tensor, global_embedding: torch.Tensor) -> np.ndarray:
    """Cosine of each LET ``[N, D]`` to the global embedding ``[D]``: ``[N]``."""
    return (F.normalize(lets.float(), dim=-1) @ F.normalize(global_embedding.float(), dim=-1)).cpu().numpy()


@dataclass(frozen=True)
class ObjectnessModel:
    """Logistic regression over standardised :data:`FEATURES`: ``sigmoid(((x - mean) / scale) @ coef + bias)``.

    ``fitted`` False: the fallback ``(1 - d_final)**FALLBACK_POWER``. ``threshold``: proposals with a lower
    objectness are not kept (chosen on val for ``target_precision``). ``prob_power``: proposals are ranked by
    ``probability ** prob_power × objectness`` (chosen on val). ``min_keep``: the best-ranked proposals kept
    whatever their objectness (chosen on val: every image gets its best candidate). ``curve``:
    ``(threshold, val precision)`` of the kept proposals at each threshold tried on val (:meth:`threshold_for`
    reads it)."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    bias: float
    threshold: float
    target_precision: float | None = None
    prob_power: float = 1.0
    fitted: bool = True
    meta: Mapping[str, Any] | None = None
    curve: tuple[tuple[float, float], ...] = ()
    min_keep: int = 0

    def threshold_for(self, precision: float | None) -> float:
        """The keep threshold for a target ``precision`` in [0, 1]: the lowest threshold whose kept proposals
        reached it on val (the most precise one when none did); ``threshold`` when ``precision`` is None or
        the model has no curve."""
        if precision is None or not self.curve:
            return self.threshold
        reached = [t for t, p in self.curve if p >= precision]
        return min(reached) if reached else max(self.curve, key=lambda tp: (tp[1], -tp[0]))[0]

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Objectness ``[N]`` in [0, 1] for a feature matrix ``[N, len(FEATURES)]``."""
        x = np.asarray(x, dtype=np.float64).reshape(-1, len(FEATURES))
        if not self.fitted:
            return (1.0 - np.clip(x[:, FEATURES.index("d_final")], 0.0, 1.0)) ** FALLBACK_POWER
        z = ((x - self.mean) / self.scale) @ self.coef + self.bias
        return 1.0 / (1.0 + np.exp(-np.clip(z, -50.0, 50.0)))

    def to_dict(self) -> dict[str, Any]:
        return {"features": list(FEATURES), "mean": self.mean.tolist(), "scale": self.scale.tolist(),
                "coef": self.coef.tolist(), "bias": self.bias, "threshold": self.threshold,
                "target_precision": self.target_precision, "prob_power": self.prob_power,
                "min_keep": self.min_keep, "curve": [list(c) for c in self.curve], "meta": dict(self.meta or {})}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ObjectnessModel":
        """Raises ValueError for a model of other features or malformed numbers."""
        if list(data.get("features", [])) != list(FEATURES):
            raise ValueError(f"objectness model features {data.get('features')} are not {list(FEATURES)}")
        arrays = [np.asarray(data[k], dtype=np.float64) for k in ("mean", "scale", "coef")]
        if any(a.shape != (len(FEATURES),) or not np.isfinite(a).all() for a in arrays) or (arrays[1] <= 0).any():
            raise ValueError("objectness model: mean, scale and coef must be finite, one per feature, scale > 0")
        threshold = float(data["threshold"])
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"objectness model: threshold {threshold} is not in [0, 1]")
        target = data.get("target_precision")
        power = float(data.get("prob_power", 1.0))
        if not 0.0 <= power <= 4.0:
            raise ValueError(f"objectness model: prob_power {power} is not in [0, 4]")
        curve = tuple((float(t), float(p)) for t, p in data.get("curve", []))
        if any(not (0.0 <= t <= 1.0 and 0.0 <= p <= 1.0) for t, p in curve):
            raise ValueError("objectness model: curve thresholds and precisions must be in [0, 1]")
        min_keep = int(data.get("min_keep", 0))
        if not 0 <= min_keep <= 10:
            raise ValueError(f"objectness model: min_keep {min_keep} is not in 0..10")
        return cls(arrays[0], arrays[1], arrays[2], float(data["bias"]), threshold,
                   None if target is None else float(target), power, True, data.get("meta"), curve, min_keep)

    @classmethod
    def fallback(cls) -> "ObjectnessModel":
        """The model that needs no fit: ``(1 - d_final)²``, kept from :data:`FALLBACK_THRESHOLD`."""
        zero = np.zeros(len(FEATURES))
        return cls(zero, np.ones(len(FEATURES)), zero, 0.0, FALLBACK_THRESHOLD, None, 1.0, False)


def load(path: Path | str = MODEL_PATH) -> ObjectnessModel:
    """The committed fit, or the fallback (logged) when the file is missing or does not fit :data:`FEATURES`."""
    try:
        return ObjectnessModel.from_dict(json.loads(Path(path).read_text()))
    except FileNotFoundError:
        log.info("no objectness fit at %s: ranking by the fallback (1 - d)^2", path)
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("objectness fit at %s not used (%s): ranking by the fallback (1 - d)^2", path, exc)
    return ObjectnessModel.fallback()


_default: ObjectnessModel | None = None


def default_model() -> ObjectnessModel:
    """:func:`load` of :data:`MODEL_PATH`, once per process."""
    global _default
    if _default is None:
        _default = load()
    return _default


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1.0, iters: int = 50
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """L2-regularised logistic regression by Newton's method on standardised features ``[N, F]``, labels ``[N]``
    in {0, 1}. Returns ``(mean, scale, coef, bias)``."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale = np.where(scale > 1e-9, scale, 1.0)
    z = np.column_stack([(x - mean) / scale, np.ones(len(x))])
    w = np.zeros(z.shape[1])
    reg = np.full(z.shape[1], l2)
    reg[-1] = 0.0  # the bias is not shrunk
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-np.clip(z @ w, -50, 50)))
        grad = z.T @ (p - y) + reg * w
        hess = (z * (p * (1 - p))[:, None]).T @ z + np.diag(reg) + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return mean, scale, w[:-1], float(w[-1])
