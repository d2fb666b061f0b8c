"""GrabCut (OpenCV) on a prompt: the object inside a box, or around a few clicks.

Runs on a crop around the prompt (the box grown by :data:`CONTEXT` of its size on each side, so GrabCut sees
background around it) scaled so its longer side is at most :data:`MAX_SIDE` pixels; the mask comes back at image
resolution, its pixels inside the box only. Cost is bounded by the crop, not by the image.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

#: longest side of the crop GrabCut runs on (pixels); larger crops are scaled down
MAX_SIDE = 256
#: background context around the box, as a share of the box's width / height on each side
CONTEXT = 0.5
#: GrabCut iterations
ITERATIONS = 5
#: radius of the definite-foreground disc around each click, as a share of the working box's shorter side
CLICK_RADIUS = 0.08


def _crop(box: Sequence[float], shape: tuple[int, int], context: float) -> tuple[int, int, int, int]:
    """Integer crop ``(x0, y0, x1, y1)`` of the box grown by ``context`` of its size, clipped to the image."""
    h, w = shape
    x0, y0, x1, y1 = (float(v) for v in box)
    mx, my = context * (x1 - x0), context * (y1 - y0)
    return (max(0, int(np.floor(x0 - mx))), max(0, int(np.floor(y0 - my))),
            min(w, int(np.ceil(x1 + mx))), min(h, int(np.ceil(y1 + my))))


def grabcut(image: np.ndarray, box: Sequence[float], clicks: Sequence[Sequence[float]] = (),
            iterations: int = ITERATIONS, max_side: int = MAX_SIDE, context: float = CONTEXT) -> np.ndarray:
    """Bool mask ``[H, W]`` of the object GrabCut finds in ``box`` (x0, y0, x1, y1, image pixels) of ``image``
    ``[H, W, 3]`` uint8 RGB; ``clicks`` ``[(x, y), ...]`` are marked definite foreground. Empty when the box
    misses the image."""
    h, w = image.shape[:2]
    out = np.zeros((h, w), bool)
    cx0, cy0, cx1, cy1 = _crop(box, (h, w), context)
    if cx1 - cx0 < 2 or cy1 - cy0 < 2:
        return out
    crop = np.ascontiguousarray(image[cy0:cy1, cx0:cx1, :3])
    scale = min(1.0, max_side / max(crop.shape[:2]))
    if scale < 1.0:
        crop = cv2.resize(crop, (max(2, round(crop.shape[1] * scale)), max(2, round(crop.shape[0] * scale))),
                          interpolation=cv2.INTER_AREA)
    ch, cw = crop.shape[:2]
    sx, sy = cw / (cx1 - cx0), ch / (cy1 - cy0)
    x0, y0, x1, y1 = (float(v) for v in box)
    r0 = (int(np.clip(round((x0 - cx0) * sx), 0, cw - 1)), int(np.clip(round((y0 - cy0) * sy), 0, ch - 1)))
    r1 = (int(np.clip(round((x1 - cx0) * sx), r0[0] + 1, cw)), int(np.clip(round((y1 - cy0) * sy), r0[1] + 1, ch)))
    mask = np.full((ch, cw), cv2.GC_BGD, np.uint8)
    mask[r0[1]:r1[1], r0[0]:r1[0]] = cv2.GC_PR_FGD
    radius = max(1, round(CLICK_RADIUS * min(r1[0] - r0[0], r1[1] - r0[1])))
    for x, y in clicks:
        cv2.circle(mask, (round((float(x) - cx0) * sx), round((float(y) - cy0) * sy)), radius, cv2.GC_FGD, -1)
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    bgr = cv2.cvtColor(crop, cv2.COLOR_RGB2BGR)
    try:
        cv2.grabCut(bgr, mask, (0, 0, 0, 0), bgd, fgd, iterations, cv2.GC_INIT_WITH_MASK)
    except cv2.error:  # a model GrabCut cannot fit (e.g. no background pixel at all): nothing found
        return out
    fg = np.isin(mask, (cv2.GC_FGD, cv2.GC_PR_FGD)).astype(np.uint8)
    full = cv2.resize(fg, (cx1 - cx0, cy1 - cy0), interpolation=cv2.INTER_NEAREST) if scale < 1.0 else fg
    out[cy0:cy1, cx0:cx1] = np.asarray(full, dtype=bool)
    inside = np.zeros((h, w), bool)
    inside[max(0, int(np.floor(y0))):int(np.ceil(y1)), max(0, int(np.floor(x0))):int(np.ceil(x1))] = True
    return out & inside
