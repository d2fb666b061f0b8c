"""Region prompts: a box or a few clicks that a ``label_regions`` region may carry, to be turned into an object
mask (``refine``) before inversion.

Wire format, on a region of :class:`~worker.protocol.payloads.LabelRegionsJob` besides ``id`` and ``mask``::

    "prompt": {"box": [x0, y0, x1, y1]}          # pixels of the task image, floats allowed, x1 > x0, y1 > y0
            | {"points": [[x, y], ...]}           # 1..MAX_PROMPT_POINTS positive clicks, pixels of the image
    "refine": true | false                        # default false: turn the prompt into an object mask first

``mask`` stays required (a box's mask from :func:`box_mask`, a click's small disc from :func:`points_mask`), so a
worker that does not refine still answers on something sane. Caps: :data:`MAX_PROMPT_POINTS` clicks, every
coordinate finite and within ``±MAX_PROMPT_COORD``; the worker further clips a prompt to its image.

The result cache keys a region by :func:`region_digest` (its mask digest, alone when the region has neither a
prompt nor ``refine``, so keys of plain regions are unchanged).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from worker.protocol.codec import sha256_hex
from worker.protocol.errors import PayloadError

#: most clicks one point prompt may carry
MAX_PROMPT_POINTS = 16
#: largest absolute value of a prompt coordinate (pixels)
MAX_PROMPT_COORD = 1_000_000.0
#: radius (pixels) of the disc :func:`points_mask` draws around each click
POINT_DISC_RADIUS = 3
#: values of a region result's ``meta["refined_by"]``
REFINED_BY = ("grabcut", "seeds", "sam", "box")


def _coord(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PayloadError(f"{what} must be a finite number, got {value!r}")
    if abs(value) > MAX_PROMPT_COORD:
        raise PayloadError(f"{what} must be within ±{MAX_PROMPT_COORD:g}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class RegionPrompt:
    """A box ``(x0, y0, x1, y1)`` or clicks ``((x, y), ...)`` in image pixels (exactly one of the two)."""

    box: tuple[float, float, float, float] | None = None
    points: tuple[tuple[float, float], ...] = ()

    @property
    def kind(self) -> str:
        return "box" if self.box is not None else "points"

    def to_dict(self) -> dict[str, Any]:
        if self.box is not None:
            return {"box": list(self.box)}
        return {"points": [list(p) for p in self.points]}

    @classmethod
    def from_dict(cls, data: Any, what: str = "prompt") -> "RegionPrompt":
        """Validate ``{"box": [x0, y0, x1, y1]}`` or ``{"points": [[x, y], ...]}``; PayloadError names the field."""
        if not isinstance(data, Mapping):
            raise PayloadError(f"{what} must be an object, got {type(data).__name__}")
        keys = set(data) & {"box", "points"}
        if len(keys) != 1 or set(data) - keys:
            raise PayloadError(f"{what} must have exactly one key, box or points, got {sorted(data)}")
        if "box" in data:
            box = data["box"]
            if not isinstance(box, (list, tuple)) or len(box) != 4:
                raise PayloadError(f"{what}.box must be [x0, y0, x1, y1]")
            x0, y0, x1, y1 = (_coord(v, f"{what}.box[{i}]") for i, v in enumerate(box))
            if not (x1 > x0 and y1 > y0):
                raise PayloadError(f"{what}.box must have x1 > x0 and y1 > y0, got {[x0, y0, x1, y1]}")
            return cls(box=(x0, y0, x1, y1))
        points = data["points"]
        if not isinstance(points, (list, tuple)) or not 1 <= len(points) <= MAX_PROMPT_POINTS:
            raise PayloadError(f"{what}.points must be a list of 1 to {MAX_PROMPT_POINTS} [x, y] clicks")
        out = []
        for k, p in enumerate(points):
            if not isinstance(p, (list, tuple)) or len(p) != 2:
                raise PayloadError(f"{what}.points[{k}] must be [x, y]")
            out.append((_coord(p[0], f"{what}.points[{k}][0]"), _coord(p[1], f"{what}.points[{k}][1]")))
        return cls(points=tuple(out))


def region_prompt(region: Mapping[str, Any], what: str = "region") -> tuple[RegionPrompt | None, bool]:
    """A payload region's ``(prompt or None, refine)``; PayloadError names the field (``refine`` without a prompt
    is an error: there is nothing to refine from)."""
    raw, refine = region.get("prompt"), region.get("refine", False)
    if not isinstance(refine, bool):
        raise PayloadError(f"{what}.refine must be true or false, got {refine!r}")
    prompt = RegionPrompt.from_dict(raw, f"{what}.prompt") if raw is not None else None
    if refine and prompt is None:
        raise PayloadError(f"{what}.refine is true but the region has no prompt")
    return prompt, refine


def prompt_region(region_id: str, mask: Mapping[str, Any], prompt: RegionPrompt | None = None,
                  refine: bool = False) -> dict[str, Any]:
    """A payload region ``{"id", "mask", "prompt"?, "refine"?}`` (``mask`` encoded by ``codec.encode_mask``)."""
    out: dict[str, Any] = {"id": str(region_id), "mask": dict(mask)}
    if prompt is not None:
        out["prompt"] = prompt.to_dict()
    if refine:
        out["refine"] = True
    return out


def region_digest(mask_sha256: str, prompt: RegionPrompt | Mapping[str, Any] | None = None,
                  refine: bool = False) -> str:
    """What a region's answer depends on of the region itself: its mask digest, and (when it has them) its prompt
    and ``refine`` flag. A region without either keeps its mask digest, so its cache key is unchanged."""
    if prompt is None and not refine:
        return mask_sha256
    doc = prompt.to_dict() if isinstance(prompt, RegionPrompt) else (dict(prompt) if prompt is not None else None)
    blob = json.dumps({"mask": mask_sha256, "prompt": doc, "refine": bool(refine)}, sort_keys=True,
                      separators=(",", ":"))
    return sha256_hex(blob.encode())


def payload_region_digest(region: Mapping[str, Any]) -> str | None:
    """:func:`region_digest` of a payload region as sent (None when it has no mask digest)."""
    mask = region.get("mask")
    sha = mask.get("sha256") if isinstance(mask, Mapping) else None
    if not sha:
        return None
    return region_digest(str(sha), region.get("prompt"), bool(region.get("refine", False)))


def box_mask(box: Sequence[float], shape: tuple[int, int]) -> np.ndarray:
    """Bool mask ``[H, W]`` of the pixels whose centres lie in ``box`` (x0, y0, x1, y1), clipped to the image;
    at least one pixel when the box touches the image."""
    h, w = shape
    x0, y0, x1, y1 = (float(v) for v in box)
    c0, c1 = int(np.clip(math.floor(x0 + 0.5), 0, w)), int(np.clip(math.ceil(x1 - 0.5), 0, w))
    r0, r1 = int(np.clip(math.floor(y0 + 0.5), 0, h)), int(np.clip(math.ceil(y1 - 0.5), 0, h))
    if c1 <= c0 and 0 <= x0 < w:
        c1 = c0 + 1 if c0 < w else c0
    if r1 <= r0 and 0 <= y0 < h:
        r1 = r0 + 1 if r0 < h else r0
    m = np.zeros((h, w), bool)
    m[r0:r1, c0:c1] = True
    return m


def points_mask(points: Sequence[Sequence[float]], shape: tuple[int, int],
                radius: float = POINT_DISC_RADIUS) -> np.ndarray:
    """Bool mask ``[H, W]``: a disc of ``radius`` pixels around each click (clicks outside the image draw
    nothing)."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    m = np.zeros((h, w), bool)
    for x, y in points:
        m |= (xx + 0.5 - float(x)) ** 2 + (yy + 0.5 - float(y)) ** 2 <= float(radius) ** 2
    return m


def prompt_mask(prompt: RegionPrompt, shape: tuple[int, int]) -> np.ndarray:
    """The mask a prompt stands for before refinement (:func:`box_mask` or :func:`points_mask`)."""
    return box_mask(prompt.box, shape) if prompt.box is not None else points_mask(prompt.points, shape)
