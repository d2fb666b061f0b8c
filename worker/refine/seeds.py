"""Key-affinity seed regions on a prompt: the patches whose last-block keys resemble a seed patch's, as the
proposals compute them (:func:`worker.proposals.maskcut.seed_regions`, keys by
:func:`worker.proposals.pipeline.image_keys`), with the seeds taken inside the box or under the clicks.

For a box, every ``(seed, tau)`` region is scored by how well it fills the box and how little of it lies outside
(:func:`box_fit`); the best one, cut to the box, is the mask. For clicks, each click's region at the first
``tau`` whose region is not the background (covers fewer than 2 image corners and at most half the image), their
union. Masks are on the model's patch grid, resized to the image (nearest).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

from worker.engine.preprocess import ImageLike, open_image
from worker.proposals import maskcut
from worker.proposals.pipeline import image_keys
from worker.protocol.prompts import RegionPrompt, box_mask

#: cosine thresholds the seed regions are grown at, loosest first
TAUS = (0.3, 0.5, 0.7)


def grid_to_image(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Grid mask ``[g, g]`` -> bool ``[H, W]`` (nearest: the model sees the image resized to a square)."""
    h, w = shape
    img = Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.Resampling.NEAREST)
    return np.asarray(img) > 127


def cell_of(x: float, y: float, shape: tuple[int, int], g: int) -> int:
    """Row-major index of the grid cell holding image pixel ``(x, y)`` (clipped to the grid)."""
    h, w = shape
    return int(np.clip(int(y * g / h), 0, g - 1)) * g + int(np.clip(int(x * g / w), 0, g - 1))


def box_cells(box: Sequence[float], shape: tuple[int, int], g: int) -> list[int]:
    """Cells whose centres lie in ``box``; the cell of the box's centre when none does."""
    h, w = shape
    x0, y0, x1, y1 = box
    cx = (np.arange(g) + 0.5) * w / g
    cy = (np.arange(g) + 0.5) * h / g
    cells = [iy * g + ix for iy in range(g) for ix in range(g) if x0 <= cx[ix] < x1 and y0 <= cy[iy] < y1]
    return cells or [cell_of((x0 + x1) / 2, (y0 + y1) / 2, shape, g)]


def box_fit(region: np.ndarray, box: np.ndarray) -> float:
    """How well a region ``[H, W]`` stands for the object of a box mask ``[H, W]``: the IoU of the bounding box of
    its part in the box with the box, times the share of the region inside the box (0 for an empty region)."""
    inside = region & box
    if not inside.any():
        return 0.0
    ys, xs = np.nonzero(inside)
    bys, bxs = np.nonzero(box)
    bb = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    full = (bys.max() - bys.min() + 1) * (bxs.max() - bxs.min() + 1)
    return float(bb / full) * float(inside.sum() / region.sum())


def is_background(region: np.ndarray) -> bool:
    """A grid region covering 2+ corners or more than half the grid."""
    return maskcut.corners_covered(region) >= maskcut.CORNER_LIMIT or region.mean() > 0.5


@torch.no_grad()
def seed_mask(engine, image: ImageLike, prompt: RegionPrompt, size: int, taus: Sequence[float] = TAUS,
              keys: tuple[torch.Tensor, int] | None = None) -> np.ndarray:
    """Bool mask ``[H, W]`` of the object the prompt points at, from key-affinity seed regions at input ``size``;
    empty when no region fits. ``keys``: the image's ``(patch keys [g², d], g)`` at ``size`` when known
    (:func:`worker.proposals.pipeline.image_keys`, one extra trunk forward, otherwise made here)."""
    img, _ = open_image(image)
    shape = (img.height, img.width)
    k, g = keys if keys is not None else image_keys(engine, img, size)
    if prompt.box is not None:
        bmask = box_mask(prompt.box, shape)
        if not bmask.any():
            return bmask
        best, best_fit = np.zeros(shape, bool), 0.0
        for _, region in maskcut.seed_regions(k, (g, g), taus, box_cells(prompt.box, shape, g)):
            if is_background(region):
                continue
            pix = grid_to_image(region, shape)
            fit = box_fit(pix, bmask)
            if fit > best_fit:
                best, best_fit = pix & bmask, fit
        return best
    out = np.zeros(shape, bool)
    seeds = [cell_of(x, y, shape, g) for x, y in prompt.points]
    by_seed: dict[int, np.ndarray] = {}
    for seed, region in maskcut.seed_regions(k, (g, g), taus, seeds):
        if seed not in by_seed and not is_background(region):
            by_seed[seed] = region
    for region in by_seed.values():
        out |= grid_to_image(region, shape)
    return out
