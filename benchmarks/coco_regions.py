"""COCO-style instance annotations as (image, region masks, category names) for region classification.

Reads any dataset in the COCO instance format: an image folder and a JSON with ``images``, ``categories`` and
``annotations`` whose ``segmentation`` is a polygon list, an uncompressed RLE (``counts`` a list) or a
compressed RLE (``counts`` a string). That covers COCO itself, the COCO-format exports of PascalVOC and
OpenImages subsets, and the scene world's own export (:func:`training.scene_world.export_coco`).
Masks are decoded with pycocotools.

    ds = CocoRegions("coco/annotations/instances_val2017.json", "coco/val2017", min_area=32 * 32)
    ds.categories                      # ["person", "bicycle", ...]
    for item in ds.images(limit=500):  # ImageRegions: .path, .regions (category, mask [H, W] bool)
        ...
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from pycocotools import mask as mask_utils


class AnnotationError(ValueError):
    """The annotation file or one of its records is malformed."""


@dataclass(frozen=True)
class Region:
    """One annotated instance: its category name and its mask ``[H, W]`` (bool, image pixels)."""

    ann_id: int
    category: str
    mask: np.ndarray


@dataclass(frozen=True)
class ImageRegions:
    """An image file and its evaluated regions (after the loader's filters)."""

    image_id: int
    path: Path
    width: int
    height: int
    regions: tuple[Region, ...]
    annotated: int  # instances annotated in the image before filtering (crowd regions included)


def decode_segmentation(seg: Any, height: int, width: int) -> np.ndarray:
    """Mask ``[H, W]`` (bool) from a COCO ``segmentation``: polygons, uncompressed or compressed RLE."""
    try:
        if isinstance(seg, list):  # polygons [[x1, y1, x2, y2, ...], ...]
            polys = [p for p in seg if len(p) >= 6]
            if not polys:
                raise AnnotationError("polygon segmentation has no polygon with 3 or more points")
            rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
        elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(seg, *seg["size"])
        elif isinstance(seg, dict) and isinstance(seg.get("counts"), (str, bytes)):  # compressed RLE
            counts = seg["counts"].encode("ascii") if isinstance(seg["counts"], str) else seg["counts"]
            rle = {"size": list(seg["size"]), "counts": counts}
        else:
            raise AnnotationError(f"unsupported segmentation of type {type(seg).__name__}")
        with warnings.catch_warnings():  # pycocotools' numpy-2 copy-keyword DeprecationWarning
            warnings.simplefilter("ignore", DeprecationWarning)
            mask = mask_utils.decode(rle)
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, AnnotationError):
            raise
        raise AnnotationError(f"cannot decode segmentation: {exc}") from exc
    if mask.ndim == 3:
        mask = mask.any(axis=2)
    if mask.shape != (height, width):
        raise AnnotationError(f"segmentation is {mask.shape[0]}x{mask.shape[1]}, image is {height}x{width}")
    return mask.astype(bool)


class CocoRegions:
    """Regions of a COCO-style instance dataset.

    Args:
        annotations: the instances JSON.
        images: folder of the image files [``<annotations folder>/images``].
        min_area: skip regions whose decoded mask has fewer pixels [0].
        skip_crowd: skip ``iscrowd`` regions, as the region-classification protocol does [True].
    """

    def __init__(self, annotations: str | Path, images: str | Path | None = None, min_area: int = 0,
                 skip_crowd: bool = True):
        self.annotation_path = Path(annotations)
        self.image_dir = Path(images) if images is not None else self.annotation_path.parent / "images"
        if not self.annotation_path.is_file():
            raise FileNotFoundError(f"annotation file not found: {self.annotation_path}")
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.image_dir}")
        doc = json.loads(self.annotation_path.read_text())
        for key in ("images", "annotations", "categories"):
            if not isinstance(doc.get(key), list):
                raise AnnotationError(f"{self.annotation_path}: missing list {key!r}")
        self.min_area, self.skip_crowd = int(min_area), bool(skip_crowd)
        cats = sorted(doc["categories"], key=lambda c: c["id"])
        self._cat_name = {int(c["id"]): str(c["name"]) for c in cats}
        self.categories: list[str] = [str(c["name"]) for c in cats]
        self._images = sorted(doc["images"], key=lambda im: im["id"])
        self._anns: dict[int, list[dict]] = {}
        for a in doc["annotations"]:
            if int(a["category_id"]) not in self._cat_name:
                raise AnnotationError(f"annotation {a.get('id')} has unknown category_id {a['category_id']}")
            self._anns.setdefault(int(a["image_id"]), []).append(a)

    def __len__(self) -> int:
        return len(self._images)

    def images(self, limit: int | None = None, min_regions: int = 1) -> Iterator[ImageRegions]:
        """Images in id order with at least ``min_regions`` kept regions; at most ``limit`` of them."""
        given = 0
        for im in self._images:
            if limit is not None and given >= limit:
                return
            h, w = int(im["height"]), int(im["width"])
            anns = sorted(self._anns.get(int(im["id"]), []), key=lambda a: a["id"])
            regions = []
            for a in anns:
                if self.skip_crowd and a.get("iscrowd", 0):
                    continue
                mask = decode_segmentation(a["segmentation"], h, w)
                if int(mask.sum()) < max(1, self.min_area):
                    continue
                regions.append(Region(ann_id=int(a["id"]), category=self._cat_name[int(a["category_id"])],
                                      mask=mask))
            if len(regions) < min_regions:
                continue
            given += 1
            yield ImageRegions(image_id=int(im["id"]), path=self.image_dir / im["file_name"], width=w, height=h,
                               regions=tuple(regions), annotated=len(anns))
