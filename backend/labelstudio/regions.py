"""Label Studio region results -> boolean masks ``[H, W]`` in original image pixels.

Conventions (Label Studio image results):

* coordinates are percentages of ``original_width`` / ``original_height`` (the image's natural size);
* rectangles: ``x, y`` is the top-left corner, ``width, height`` the size, ``rotation`` degrees clockwise
  around the top-left corner (on screen, y pointing down);
* polygons: ``points`` = ``[[x, y], ...]`` (closed, at least 3 points);
* brush: ``format: "rle"``, ``rle`` = Label Studio's RLE of the RGBA image ``[H, W, 4]`` (the mask is the alpha
  channel), decoded with label-studio-sdk's brush helpers;
* keypoints (only of a prompt control, backend.labelstudio.label_config): ``x, y`` percentages; Label Studio's
  smart keypoint tool sends every keypoint drawn with it since the last accept/reject (``is_positive`` false for
  an Alt-click), so the positive keypoints of one control form one region whose id is the first keypoint's, and
  whose mask is a disc of ``KEYPOINT_RADIUS`` around each click.

A region of a prompt control also has a prompt (:func:`region_prompt`): the box (``{"box": [x0, y0, x1, y1]}``)
or the clicks (``{"points": [[x, y], ...]}``) in pixels of the image, from which the worker outlines the object.

Polygons and rectangles are rasterised with Pillow. Masks larger than ``max_side`` on their long side are
rasterised (or, for brush masks, downscaled) to ``max_side``: the worker resizes every mask to the model
input size anyway, so only the aspect ratio matters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from worker.protocol import MAX_PROMPT_POINTS

from backend.labelstudio.label_config import PROMPT_TAGS, REGION_TAGS, ProjectConfig, RegionControl

#: accepted range of positions (polygon points, rectangle x/y), percent of the frame: Label Studio keeps them in
#: [0, 100]; a little slack absorbs round-off
POS_RANGE = (-1.0, 101.0)
#: accepted range of rectangle width/height, percent of the frame (a rotated box may be longer than the image
#: is wide, e.g. a tall image's box turned by 90 degrees)
SIZE_RANGE = (0.0, 10000.0)
MAX_POLYGON_POINTS = 100_000
#: longest brush RLE accepted (Label Studio's greyscale masks compress to far less; the SDK decodes ~10 s/MiB of
#: worst-case literal data)
MAX_RLE_BYTES = 4 * 1024 * 1024
#: default cap on a region frame's pixels (= the image pixel cap, MASKINV_MAX_IMAGE_PIXELS)
DEFAULT_MAX_PIXELS = 50_000_000
#: radius of a click's disc in the mask sent with a keypoint prompt, share of the frame's long side
KEYPOINT_RADIUS = 0.02
#: result type (lower case) -> geometry kind, prompt controls' types included
CONTROL_KINDS = {**REGION_TAGS, **PROMPT_TAGS}

#: result types that carry no geometry of their own (per-region attributes, classification, relations)
ATTRIBUTE_TYPES = frozenset({"textarea", "choices", "rating", "number", "datetime", "taxonomy", "labels",
                             "relation", "pairwise", "ranker", "list"})


class RegionError(ValueError):
    """A region cannot be turned into a mask; the message says why."""


@dataclass(frozen=True)
class Region:
    """One region: its geometry result item, and the control it belongs to."""

    id: str
    control: RegionControl
    item: dict[str, Any]  # the geometry result item, as received
    members: tuple[dict[str, Any], ...] = ()  # keypoint prompts: the further keypoints of the same object

    @property
    def kind(self) -> str:
        return self.control.kind

    @property
    def value(self) -> dict[str, Any]:
        return self.item["value"]


@dataclass(frozen=True)
class RegionProblem:
    """A result item that could not be used (reported per region, never fatal for the others)."""

    id: str | None
    error: str


def collect_regions(results: Any, cfg: ProjectConfig) -> tuple[list[Region], list[RegionProblem]]:
    """Group result items by region id and pick each region's geometry item.

    Attribute items (TextArea, Choices, ...) are ignored; geometry of an unknown type or of a control that is
    not in the config is reported as a problem.
    """
    if not isinstance(results, list):
        return [], [RegionProblem(None, f"regions must be a list of result items, got {type(results).__name__}")]
    regions: dict[str, Region] = {}
    problems: list[RegionProblem] = []
    for k, item in enumerate(results):
        if not isinstance(item, dict):
            problems.append(RegionProblem(None, f"result item {k} is not an object"))
            continue
        rtype = str(item.get("type") or "").lower()
        if rtype in ATTRIBUTE_TYPES:
            continue
        rid = item.get("id")
        rid = str(rid) if rid not in (None, "") else None
        if rid is None:
            problems.append(RegionProblem(None, f"result item {k} ({rtype or 'no type'}) has no region id"))
            continue
        if rtype not in CONTROL_KINDS:
            problems.append(RegionProblem(rid, f"unsupported region type {rtype or '(missing)'!r}: supported are "
                                               "brushlabels, polygonlabels, rectanglelabels, brush, polygon, "
                                               "rectangle (and keypoints of a smartOnly KeyPoint control)"))
            continue
        control = _control_for(item, rtype, cfg)
        if control is None and CONTROL_KINDS[rtype] == "keypoint":
            problems.append(RegionProblem(rid, f"unsupported region type {rtype!r} from {item.get('from_name')!r}: "
                                               "keypoints are labelled only as prompts, from a KeyPoint(Labels) "
                                               'control with smartOnly="true" on an image that has a PolygonLabels '
                                               "or BrushLabels control"))
            continue
        if control is None:
            problems.append(RegionProblem(rid, f"region control {item.get('from_name')!r} of type {rtype!r} is not in "
                                               "the label config"))
            continue
        if not isinstance(item.get("value"), dict):
            problems.append(RegionProblem(rid, "region has no 'value' object"))
            continue
        if control.kind == "keypoint":
            _add_keypoint(regions, problems, rid, control, item)
            continue
        regions.setdefault(rid, Region(rid, control, item))
    return list(regions.values()), problems


def _positive(item: dict[str, Any]) -> bool:
    """Whether a keypoint is a positive click (Label Studio marks an Alt-click ``is_positive: false``)."""
    return item.get("is_positive") is not False


def _add_keypoint(regions: dict[str, Region], problems: list[RegionProblem], rid: str, control: RegionControl,
                  item: dict[str, Any]) -> None:
    """Add a keypoint to its control's region (the first positive keypoint of that control opens it); negative
    clicks are left out (the prompt holds positive clicks only)."""
    key = f"keypoints of {control.name}"
    if not _positive(item):
        return
    first = regions.get(key)
    if first is None:
        regions[key] = Region(rid, control, item)
    elif len(first.members) + 1 >= MAX_PROMPT_POINTS:
        problems.append(RegionProblem(rid, f"more than {MAX_PROMPT_POINTS} keypoints mark one object; "
                                           "this one is left out"))
    else:
        regions[key] = Region(first.id, control, first.item, (*first.members, item))


def _control_for(item: dict, rtype: str, cfg: ProjectConfig) -> RegionControl | None:
    from_name = item.get("from_name")
    control = cfg.control(from_name) if isinstance(from_name, str) else None
    kind = CONTROL_KINDS[rtype]
    if control is not None:
        return control if control.kind == kind else None
    # merged result of a generic <Labels> control + plain tool: from_name is the Labels control
    for c in cfg.region_controls.values():
        if c.kind == kind and c.labels_control == from_name and c.labels_control != c.name:
            return c
    return None


def _num(value: Any, name: str, lo: float | None = None, hi: float | None = None) -> float:
    """``value`` as a float; RegionError unless it is a finite number in ``[lo, hi]``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RegionError(f"{name} must be a finite number, got {str(value)[:50]!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise RegionError(f"{name} = {value:g} is out of range [{lo:g}, {hi:g}] (percent of the image)")
    return float(value)


def region_geometry(region: Region, image_size: tuple[int, int] | None,
                    max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """``(W, H)`` of the region's coordinate frame: original_width/height, else the image's size.

    Raises RegionError for a frame that is not a positive finite size or has more than ``max_pixels`` pixels
    (the image pixel cap: a frame is the image's natural size).
    """
    w, h = region.item.get("original_width"), region.item.get("original_height")
    if w is None and h is None:
        if image_size is None:
            raise RegionError("region has no original_width/original_height and the image size is unknown")
        return image_size
    if not (isinstance(w, (int, float)) and isinstance(h, (int, float)) and all(
            not isinstance(v, bool) and math.isfinite(v) and v >= 1 for v in (w, h))):
        raise RegionError(f"original_width/original_height must be numbers >= 1, got {w!r} x {h!r}")
    width, height = int(round(w)), int(round(h))
    if width * height > max_pixels:
        raise RegionError(f"region frame {width} x {height} has more than {max_pixels} pixels "
                          "(MASKINV_MAX_IMAGE_PIXELS)")
    return width, height


def region_mask(region: Region, image_size: tuple[int, int] | None = None, max_side: int = 2048,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Boolean mask ``[H', W']`` of one region (``H', W'`` = its frame, scaled so the long side <= max_side).

    Raises RegionError (never anything else) for malformed or out-of-range geometry: whatever a parser or
    decoder raises on a region's content (a corrupt brush RLE overflowing ``uint8``, a polygon Pillow cannot
    draw, a geometry type added later) becomes that region's error, so the request's other regions are still
    labelled. (MemoryError and KeyboardInterrupt are not caught.)
    """
    try:
        return _region_mask(region, image_size, max_side, max_pixels)
    except RegionError:
        raise
    except (ArithmeticError, ValueError, TypeError, IndexError, KeyError, AttributeError, OSError,
            RuntimeError) as exc:
        raise RegionError(f"malformed {region.kind} region: {exc.__class__.__name__}: {str(exc)[:200]}") from None


def _region_mask(region: Region, image_size: tuple[int, int] | None, max_side: int,
                 max_pixels: int) -> np.ndarray:
    width, height = region_geometry(region, image_size, max_pixels)
    if region.kind == "brush":
        mask = _downscale(brush_mask(region.value, width, height), max_side)
    else:
        scale = min(1.0, max_side / max(width, height))
        w, h = max(1, round(width * scale)), max(1, round(height * scale))
        if region.kind == "keypoint":
            return _discs([(x * w / width, y * h / height) for x, y in keypoints(region, width, height)], w, h)
        if region.kind == "polygon":
            pts = polygon_points(region.value, width, height)
        else:
            pts = rectangle_corners(region.value, width, height)
        mask = rasterize([(x * w / width, y * h / height) for x, y in pts], w, h)
    if not mask.any():
        raise RegionError(f"the {region.kind} covers no pixel of the {width} x {height} image")
    return mask


def polygon_points(value: dict, width: int, height: int) -> list[tuple[float, float]]:
    """Polygon vertices in pixels of a ``width`` x ``height`` frame."""
    points = value.get("points")
    if not isinstance(points, list):
        raise RegionError("polygon needs 'points': a list of [x, y] percentages")
    if len(points) > MAX_POLYGON_POINTS:
        raise RegionError(f"polygon has {len(points)} points, more than {MAX_POLYGON_POINTS}")
    out = []
    for k, p in enumerate(points):
        if not isinstance(p, (list, tuple)) or len(p) < 2:
            raise RegionError(f"polygon point {k} must be [x, y], got {p!r}")
        out.append((_num(p[0], f"polygon point {k} x", *POS_RANGE) * width / 100.0,
                    _num(p[1], f"polygon point {k} y", *POS_RANGE) * height / 100.0))
    if len(out) < 3:
        raise RegionError(f"polygon needs at least 3 points, got {len(out)}")
    return out


def keypoints(region: Region, width: int, height: int) -> list[tuple[float, float]]:
    """The clicks of a keypoint region (its first keypoint and its members) in pixels of a ``width`` x ``height``
    frame."""
    out = []
    for k, item in enumerate((region.item, *region.members)):
        value = item.get("value")
        if not isinstance(value, dict):
            raise RegionError(f"keypoint {k} has no 'value' object")
        out.append((_num(value.get("x"), f"keypoint {k} x", 0.0, 100.0) * width / 100.0,
                    _num(value.get("y"), f"keypoint {k} y", 0.0, 100.0) * height / 100.0))
    return out


def _discs(points: list[tuple[float, float]], width: int, height: int) -> np.ndarray:
    """Bool ``[height, width]``: a disc of ``KEYPOINT_RADIUS`` of the long side (at least 2 px) around each point."""
    r = max(2.0, KEYPOINT_RADIUS * max(width, height))
    canvas = Image.new("1", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for x, y in points:
        draw.ellipse([x - r, y - r, x + r, y + r], fill=1)
    return np.asarray(canvas, dtype=bool)


def region_prompt(region: Region, image_size: tuple[int, int] | None = None,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, Any] | None:
    """The prompt a region gives the worker, in pixels of the image (``image_size`` = (W, H); default: the
    region's frame): ``{"box": [x0, y0, x1, y1]}`` for a rectangle (the bounding box of a rotated one, clipped
    to the image), ``{"points": [[x, y], ...]}`` for keypoints, None for polygons and brush strokes.
    Raises RegionError for malformed geometry."""
    if region.kind not in ("rectangle", "keypoint"):
        return None
    width, height = region_geometry(region, image_size, max_pixels)
    sx, sy = (image_size[0] / width, image_size[1] / height) if image_size and min(image_size) > 0 else (1.0, 1.0)
    bound_w, bound_h = width * sx, height * sy
    if region.kind == "keypoint":
        return {"points": [[round(min(bound_w, x * sx), 3), round(min(bound_h, y * sy), 3)]
                           for x, y in keypoints(region, width, height)]}
    corners = rectangle_corners(region.value, width, height)
    xs = [min(bound_w, max(0.0, x * sx)) for x, _ in corners]
    ys = [min(bound_h, max(0.0, y * sy)) for _, y in corners]
    box = [round(min(xs), 3), round(min(ys), 3), round(max(xs), 3), round(max(ys), 3)]
    if box[2] <= box[0] or box[3] <= box[1]:
        raise RegionError(f"the rectangle covers no pixel of the {width} x {height} image")
    return {"box": box}


def rectangle_corners(value: dict, width: int, height: int) -> list[tuple[float, float]]:
    """Corners (pixels) of a possibly rotated rectangle; Label Studio rotates around the top-left corner."""
    x = _num(value.get("x"), "rectangle x", *POS_RANGE) * width / 100.0
    y = _num(value.get("y"), "rectangle y", *POS_RANGE) * height / 100.0
    w = _num(value.get("width"), "rectangle width", *SIZE_RANGE) * width / 100.0
    h = _num(value.get("height"), "rectangle height", *SIZE_RANGE) * height / 100.0
    if w <= 0 or h <= 0:
        raise RegionError(f"rectangle width and height must be > 0, "
                          f"got {value.get('width')!r} x {value.get('height')!r}")
    theta = math.radians(_num(value.get("rotation", 0) or 0, "rectangle rotation", -3600.0, 3600.0))
    c, s = math.cos(theta), math.sin(theta)
    return [(x + dx * c - dy * s, y + dx * s + dy * c) for dx, dy in ((0, 0), (w, 0), (w, h), (0, h))]


def rasterize(points: list[tuple[float, float]], width: int, height: int) -> np.ndarray:
    """Fill a polygon (pixel coordinates) with Pillow -> bool ``[height, width]`` (outline pixels included).

    Coordinates are rounded to 1e-6 px first so that percent round-off (19.999999... for 20) does not move
    an edge by a whole pixel.
    """
    canvas = Image.new("1", (width, height), 0)
    ImageDraw.Draw(canvas).polygon([(round(x, 6), round(y, 6)) for x, y in points], fill=1, outline=1)
    return np.asarray(canvas, dtype=bool)


def brush_mask(value: dict, width: int, height: int) -> np.ndarray:
    """Decode a Label Studio brush RLE (alpha channel of RGBA ``[H, W, 4]``) -> bool ``[H, W]``."""
    from label_studio_sdk.converter.brush import decode_rle

    if value.get("format", "rle") != "rle":
        raise RegionError(f"brush format {value.get('format')!r} is not supported (only 'rle')")
    rle = value.get("rle")
    if not isinstance(rle, list) or len(rle) < 6:
        raise RegionError("brush region needs 'rle': a list of byte values")
    if len(rle) > MAX_RLE_BYTES:
        raise RegionError(f"brush rle has {len(rle)} bytes, more than {MAX_RLE_BYTES} (decoding it would take "
                          "minutes)")
    if not all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b <= 255 for b in rle):
        raise RegionError("brush rle must contain integers in [0, 255]")
    expected = width * height * 4
    declared = int.from_bytes(bytes(rle[:4]), "big")
    if declared != expected:
        raise RegionError(f"brush rle encodes {declared} values, expected {expected} "
                          f"(= {width} x {height} x 4 for original_width x original_height)")
    try:
        flat = decode_rle(rle)
    except (ValueError, IndexError, OverflowError) as exc:  # corrupt content with a correct declared length
        raise RegionError(f"brush rle is truncated or corrupt: {exc}") from None
    if flat.size != expected:
        raise RegionError(f"brush rle decodes to {flat.size} values, expected {expected}")
    return flat.reshape(height, width, 4)[:, :, 3] > 0


def _downscale(mask: np.ndarray, max_side: int) -> np.ndarray:
    h, w = mask.shape
    if max(h, w) <= max_side:
        return mask
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = Image.fromarray(mask.astype(np.uint8) * 255, mode="L").resize(size, Image.Resampling.BOX)
    return np.asarray(small) > 0  # any coverage: a thin stroke on a huge image must not vanish
