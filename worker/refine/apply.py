"""Refinement inside a ``label_regions`` job: each region's prompt is read (a bad one fails its region alone) and,
when the :class:`~worker.refine.chooser.Refiner` refines it, its mask is replaced by the refined one before
inversion, with ``meta`` telling what was done."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from worker.protocol.codec import encode_mask
from worker.protocol.deadline import check_time
from worker.protocol.errors import PayloadError
from worker.protocol.prompts import region_prompt
from worker.refine.chooser import Refiner


def refine_regions(refiner: Refiner | None, image: Image.Image, regions: Sequence[Any], masks: list[np.ndarray],
                   errors: dict[int, str], size: int) -> dict[int, dict[str, Any]]:
    """Refine the regions that ask for it (or whose rectangles the worker refines), in place: ``masks[k]``
    becomes the refined mask ``[H, W]`` of the image, ``errors[k]`` a bad prompt's error. Returns each refined
    region's meta by position: ``{"mask": EncodedMask, "refined_by": str}`` for a region sent with ``refine``,
    ``{"refined_by": "sam"}`` for a rectangle refined by the worker's own setting (its geometry is the
    annotator's and is not sent back)."""
    try:
        return _refine_each(refiner, image, regions, masks, errors, size)
    finally:
        if refiner is not None:
            refiner.forget_image()


def _refine_each(refiner: Refiner | None, image: Image.Image, regions: Sequence[Any], masks: list[np.ndarray],
                 errors: dict[int, str], size: int) -> dict[int, dict[str, Any]]:
    meta: dict[int, dict[str, Any]] = {}
    for k, region in enumerate(regions):
        if k in errors or not isinstance(region, Mapping):
            continue
        try:
            prompt, refine = region_prompt(region, f"regions[{k}]")
        except PayloadError as exc:
            errors[k] = str(exc)
            continue
        method = refiner.method_for(prompt, refine) if refiner is not None and prompt is not None else None
        if method is None or prompt is None or refiner is None:
            if refine:
                errors[k] = f"regions[{k}].refine: this worker has no refinement"
            continue
        check_time("refining the regions' prompts")
        done = refiner.refine(image, prompt, method, size)
        masks[k] = done.mask
        meta[k] = {"mask": encode_mask(done.mask), "refined_by": done.refined_by} if refine else {
            "refined_by": done.refined_by}
    return meta
