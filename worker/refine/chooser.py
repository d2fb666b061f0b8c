"""The refinement of a region's prompt: which method runs (the settings, the prompt, whether SAM is loaded), the
fallbacks, and the signature of the choice that the result cache keys on.

* ``refine: true`` regions: ``MASKINV_REFINE_METHOD`` (``auto``: SAM when a checkpoint is loaded, else
  :data:`DEFAULT_METHOD`, chosen by ``benchmarks/box_to_mask.py``);
* rectangles sent with ``refine: false``: SAM before inversion when ``MASKINV_REFINE_BOXES=sam``;
* a method that fails or finds nothing usable (:func:`usable`) falls back to the next of :data:`FALLBACKS`, and in the
  end to the prompt's own mask (``refined_by: "box"``).

Clicks have no box: GrabCut runs in the box of the clicks' seed region grown by :data:`CLICK_BOX_GROW` (a square
of :data:`CLICK_BOX_SHARE` of the image around the clicks when there is none).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import cv2
import numpy as np
import torch
from PIL import Image

from worker.proposals.pipeline import image_keys as pipeline_image_keys

from worker.protocol.deadline import JobTimeout
from worker.protocol.prompts import RegionPrompt, box_mask, prompt_mask
from worker.refine.grabcut import grabcut
from worker.refine.sam import SamRefiner
from worker.refine.seeds import seed_mask
from worker.settings import RefineSettings

log = logging.getLogger(__name__)

#: the method ``auto`` picks without SAM (benchmarks/results/box_to_mask.md)
DEFAULT_METHOD = "grabcut"
#: what each method falls back to when it finds nothing usable
FALLBACKS = {"sam": ("grabcut", "seeds"), "grabcut": ("seeds",), "seeds": ()}
#: a refined mask must cover at least this share of a box's pixels to be used
MIN_BOX_SHARE = 0.05
#: clicks: the seed region's box grown by this share of its size on each side
CLICK_BOX_GROW = 0.15
#: clicks without a seed region: a square of this share of the image's shorter side around them
CLICK_BOX_SHARE = 0.5


@dataclass(frozen=True)
class Refined:
    """A refined mask ``[H, W]`` and what made it (one of ``worker.protocol.prompts.REFINED_BY``)."""

    mask: np.ndarray
    refined_by: str


def usable(mask: np.ndarray, prompt: RegionPrompt, shape: tuple[int, int]) -> bool:
    """Whether a refined mask can stand for the object: not empty, and for a box at least
    :data:`MIN_BOX_SHARE` of it."""
    if not mask.any():
        return False
    if prompt.box is None:
        return True
    return mask.sum() >= MIN_BOX_SHARE * max(1, int(box_mask(prompt.box, shape).sum()))


def keep_clicked_parts(mask: np.ndarray, points: Sequence[Sequence[float]]) -> np.ndarray:
    """The connected parts (8-connected) of a bool mask ``[H, W]`` that hold a click ``(x, y)``; the mask itself
    when no click falls on it. A click means "this object": a neighbour the method also found is not it, and the
    outline a polygon project gets is the largest part of the mask."""
    if not len(points) or not mask.any():
        return mask
    _, parts = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    h, w = mask.shape
    hit = {int(parts[int(np.clip(y, 0, h - 1)), int(np.clip(x, 0, w - 1))]) for x, y in points} - {0}
    return np.isin(parts, sorted(hit)) if hit else mask


def bounding_box(mask: np.ndarray, grow: float = 0.0) -> tuple[float, float, float, float] | None:
    """``(x0, y0, x1, y1)`` of a mask's pixels, grown by ``grow`` of its size on each side; None when empty."""
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return None
    x0, x1, y0, y1 = float(xs.min()), float(xs.max() + 1), float(ys.min()), float(ys.max() + 1)
    gx, gy = grow * (x1 - x0), grow * (y1 - y0)
    return (x0 - gx, y0 - gy, x1 + gx, y1 + gy)


def clicks_box(points: Sequence[Sequence[float]], shape: tuple[int, int],
               share: float = CLICK_BOX_SHARE) -> tuple[float, float, float, float]:
    """A square of ``share`` of the image's shorter side around the clicks' bounding box."""
    half = share * min(shape) / 2
    xs, ys = [float(p[0]) for p in points], [float(p[1]) for p in points]
    return (min(xs) - half, min(ys) - half, max(xs) + half, max(ys) + half)


class Refiner:
    """Prompts to masks with the configured method (``engine``: the MaskInversion engine whose tower gives the
    seed regions' keys; ``sam``: a loaded :class:`SamRefiner` or None)."""

    def __init__(self, method: str = "auto", boxes: str = "off", sam: SamRefiner | None = None, engine: Any = None,
                 sam_name: str = ""):
        if method == "sam" or boxes == "sam":
            if sam is None:
                raise ValueError("SAM refinement needs a SAM model (MASKINV_SAM_CHECKPOINT)")
        self.method = method
        self.boxes = boxes
        self.sam = sam
        self.engine = engine
        self.sam_name = sam_name
        #: the patch keys of the last image and size the seeds were computed on (a job's regions share an image)
        self._keys: tuple[Image.Image, int, tuple[torch.Tensor, int]] | None = None

    @classmethod
    def from_settings(cls, settings: RefineSettings, engine: Any, device: Any = "cpu") -> "Refiner":
        """The refiner the settings describe; SAM is loaded when a checkpoint is set."""
        sam = SamRefiner.from_pretrained(settings.sam_checkpoint, device) if settings.sam_checkpoint else None
        return cls(settings.method, settings.boxes, sam, engine, settings.sam_checkpoint or "")

    def refine_method(self) -> str:
        """The method ``refine: true`` regions get."""
        if self.method == "auto":
            return "sam" if self.sam is not None else DEFAULT_METHOD
        return self.method

    def method_for(self, prompt: RegionPrompt | None, refine: bool) -> str | None:
        """The method a region's prompt is refined with, None when it is not refined."""
        if prompt is None:
            return None
        if refine:
            return self.refine_method()
        if prompt.box is not None and self.boxes == "sam":
            return "sam"
        return None

    def signature(self) -> str:
        """What refined answers depend on, for the result cache: the method of ``refine`` regions, the SAM
        checkpoint when one is loaded, and the rectangle refinement."""
        sig = self.refine_method()
        if self.sam is not None:
            sig += f";sam={self.sam_name}"
        return sig + (";boxes=sam" if self.boxes == "sam" else "")

    def image_keys(self, image: Image.Image, size: int) -> tuple[torch.Tensor, int]:
        """The image's last-block patch keys and grid side at ``size``, computed once per image object."""
        if self._keys is None or self._keys[0] is not image or self._keys[1] != size:
            self._keys = (image, size, pipeline_image_keys(self.engine, image, size))
        return self._keys[2]

    def forget_image(self) -> None:
        """Drop the last image's keys (at the end of a job)."""
        self._keys = None

    def run(self, method: str, image: Image.Image, prompt: RegionPrompt, size: int) -> np.ndarray:
        """One method's mask ``[H, W]`` for the prompt (no fallback)."""
        shape = (image.height, image.width)
        if method == "sam":
            if self.sam is None:
                raise ValueError("SAM refinement needs a SAM model (MASKINV_SAM_CHECKPOINT)")
            return self.sam(image, prompt)[0]
        if method == "seeds":
            if self.engine is None:
                return np.zeros(shape, bool)
            return seed_mask(self.engine, image, prompt, size, keys=self.image_keys(image, size))
        if method == "grabcut":
            rgb = np.asarray(image.convert("RGB"))
            if prompt.box is not None:
                return grabcut(rgb, prompt.box)
            seeds = self.run("seeds", image, prompt, size)
            box = bounding_box(seeds, CLICK_BOX_GROW) or clicks_box(prompt.points, shape)
            return grabcut(rgb, box, clicks=prompt.points)
        raise ValueError(f"unknown refinement method {method!r}")

    def refine(self, image: Image.Image, prompt: RegionPrompt, method: str, size: int) -> Refined:
        """The prompt's object mask by ``method``, else by its fallbacks, else the prompt's own mask."""
        shape = (image.height, image.width)
        for m in (method, *FALLBACKS.get(method, ())):
            try:
                mask = self.run(m, image, prompt, size)
            except JobTimeout:
                raise
            except Exception as exc:  # noqa: BLE001 - a method that fails (e.g. SAM out of memory) is skipped
                log.warning("refinement by %s failed, trying the next method: %s", m, exc)
                continue
            if prompt.points:
                mask = keep_clicked_parts(mask.astype(bool), prompt.points)
            if usable(mask, prompt, shape):
                return Refined(mask.astype(bool), m)
        return Refined(prompt_mask(prompt, shape), "box")
