"""Proposed masks -> Label Studio geometry in the project's own region type (torch-free).

* ``brush``     — Label Studio's RLE of the mask at the image's natural size (label-studio-sdk's
  ``mask2rle``, the inverse of the decoder :func:`backend.labelstudio.regions.brush_mask` uses);
* ``polygon``   — the outer contour of the mask's largest connected part (OpenCV ``findContours``), simplified
  with ``approxPolyDP`` (tolerance ``POLYGON_TOLERANCE`` of the frame's diagonal) in percent coordinates;
* ``rectangle`` — the mask's bounding box in percent coordinates.

A proposal's mask may come at any resolution (the worker's S×S input frame): it covers the whole image, so
percent coordinates are read directly from it; brush masks are resized to the natural size first.

A box drawn with a prompt control (a smart rectangle in a polygon/brush project) is answered with the object's
mask the worker refined from it (:func:`geometry_value`); a worker that sent none leaves the box itself, as a
4-point polygon (:func:`box_polygon_value`) or a brush mask of the box.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

#: approxPolyDP tolerance as a share of the mask frame's diagonal
POLYGON_TOLERANCE = 0.004
#: polygons keep at most this many points (the tolerance doubles until they fit)
MAX_POLYGON_POINTS = 200


class OutputError(ValueError):
    """A mask cannot be written as the requested geometry (empty mask, unknown kind)."""


def _check(mask: np.ndarray) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim != 2 or m.shape[0] < 1 or m.shape[1] < 1:
        raise OutputError(f"mask must be a 2-D [H, W] array, got shape {m.shape}")
    m = m.astype(bool)
    if not m.any():
        raise OutputError("mask is empty")
    return m


def resize_mask(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    """Nearest-neighbour resize of a bool mask to ``[height, width]``."""
    m = _check(mask)
    if m.shape == (height, width):
        return m
    return np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((width, height), Image.Resampling.NEAREST)) > 0


def brush_value(mask: np.ndarray, width: int, height: int) -> dict[str, Any]:
    """``{"format": "rle", "rle": [...]}`` for a mask, at the image's natural ``width`` x ``height``."""
    from label_studio_sdk.converter.brush import mask2rle

    full = resize_mask(mask, width, height)
    if not full.any():
        raise OutputError(f"mask vanishes at {width} x {height}")
    return {"format": "rle", "rle": [int(v) for v in mask2rle(full.astype(np.uint8) * 255)]}


def polygon_value(mask: np.ndarray) -> dict[str, Any]:
    """``{"points": [[x%, y%], ...]}`` of the outer contour of the mask's largest connected part."""
    import cv2

    m = _check(mask)
    h, w = m.shape
    contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        raise OutputError("mask has no contour")
    contour = max(contours, key=cv2.contourArea)
    tol = POLYGON_TOLERANCE * float(np.hypot(h, w))
    pts = cv2.approxPolyDP(contour, tol, True)[:, 0, :]
    while len(pts) > MAX_POLYGON_POINTS:
        tol *= 2
        pts = cv2.approxPolyDP(contour, tol, True)[:, 0, :]
    if len(pts) < 3:  # a one- or two-pixel-wide part: use its box
        x0, y0 = contour[:, 0, :].min(0)
        x1, y1 = contour[:, 0, :].max(0) + 1
        corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
        return {"points": [[_pct(x, w), _pct(y, h)] for x, y in corners]}
    # contour points are pixel indices; a pixel's centre is at +0.5 of its cell
    return {"points": [[_pct(x + 0.5, w), _pct(y + 0.5, h)] for x, y in pts.tolist()]}


def rectangle_value(mask: np.ndarray) -> dict[str, Any]:
    """``{"x", "y", "width", "height", "rotation": 0}`` (percent) of the mask's bounding box."""
    m = _check(mask)
    h, w = m.shape
    ys, xs = np.nonzero(m)
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
    return {"x": _pct(x0, w), "y": _pct(y0, h), "width": _pct(x1 - x0, w), "height": _pct(y1 - y0, h),
            "rotation": 0}


def geometry_value(kind: str, mask: np.ndarray, width: int, height: int) -> dict[str, Any]:
    """The value (geometry only) of a ``kind`` region ("brush" | "polygon" | "rectangle") for ``mask``."""
    if kind == "brush":
        return brush_value(mask, width, height)
    if kind == "polygon":
        return polygon_value(mask)
    if kind == "rectangle":
        return rectangle_value(mask)
    raise OutputError(f"unknown region kind {kind!r}; known: brush, polygon, rectangle")


def box_polygon_value(corners: list[tuple[float, float]]) -> dict[str, Any]:
    """``{"points": [[x%, y%], ...]}``: a (possibly rotated) box's corners, given in percent, clipped to the image."""
    if len(corners) != 4:
        raise OutputError(f"a box has 4 corners, got {len(corners)}")
    return {"points": [[round(min(100.0, max(0.0, float(x))), 4), round(min(100.0, max(0.0, float(y))), 4)]
                       for x, y in corners]}


def _pct(v: float, total: int) -> float:
    return round(min(100.0, max(0.0, 100.0 * float(v) / total)), 4)
