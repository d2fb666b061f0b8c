"""Label Studio prediction JSON for labelled regions.

Every labelled region is returned with the id, geometry and type it came with:

* the region result (``brushlabels`` / ``polygonlabels`` / ``rectanglelabels``, or the merged
  ``<tool>labels`` result of a generic ``<Labels>`` control) with the predicted label, ``score`` = its
  probability, and ``meta.text`` = the top-k alternatives, e.g. ``["MaskInversion top-3: cat 0.81 · dog 0.12 ·
  fox 0.04"]`` (shown in the region's details panel);
* if the config has a per-region ``<TextArea>`` on that image and a caption was made: a ``textarea`` result
  with the same id whose text is the caption.

A plain tool without any labels control (vocabulary from MASKINV_LABELS) keeps its type and gets the label
only in ``meta.text`` (and the caption).

A box or clicks drawn with a prompt control (a ``smartOnly`` Rectangle / KeyPoint in a polygon or brush project)
are answered as a region of that polygon/brush control, with the same id (accepting the suggestion replaces the
box): its geometry outlines the object mask the worker refined from the prompt (``meta["mask"]``), or, from a
worker that sent none, the box itself (a 4-point polygon) or the clicks' discs. ``meta.refined_by`` says which.

The task-level ``score`` is the task score of
:mod:`backend.trust.score` (uncertainty + coverage; low = label first), so Label Studio's ordering by prediction
score puts first the tasks to label next. A region's ``meta`` also says ``calibrated`` and ``verified``
(:mod:`backend.trust.verified`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from worker.protocol import LabelScore, RegionResult, decode_mask

from backend.labelstudio.label_config import ProjectConfig, RegionControl
from backend.trust.score import prediction_score
from backend.labelstudio.region_output import OutputError, box_polygon_value, geometry_value
from backend.labelstudio.regions import Region, RegionError, rectangle_corners, region_geometry, region_mask

#: value keys that hold labels rather than geometry
LABEL_VALUE_KEYS = frozenset({"brushlabels", "polygonlabels", "rectanglelabels", "labels", "text", "choices"})
FRAME_KEYS = ("original_width", "original_height", "image_rotation")


def alternatives_text(labels: Sequence[LabelScore]) -> str:
    """One line with the top-k labels and their scores."""
    parts = " · ".join(f"{lab.label} {float(lab.score):.2f}" for lab in labels)
    return f"MaskInversion top-{len(labels)}: {parts}"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def uncertainty_meta(region_meta: Mapping[str, Any]) -> dict[str, Any]:
    """``margin`` (top-1 minus top-2 probability) and ``examples`` (annotated examples behind the top-1 label)
    from a worker result's region meta, for the region's ``meta`` in Label Studio."""
    out: dict[str, Any] = {}
    if _number(region_meta.get("margin")):
        out["margin"] = round(float(region_meta["margin"]), 4)
    if isinstance(region_meta.get("examples"), int) and not isinstance(region_meta.get("examples"), bool):
        out["examples"] = int(region_meta["examples"])
    return out


def _labelled_items(control: RegionControl, cfg: ProjectConfig, res: RegionResult, key: str,
                    geometry: dict[str, Any], score: float, meta: dict[str, Any], extra: dict[str, Any]
                    ) -> list[dict[str, Any]]:
    """The region item (its best label in the labels control, else the tool's own type with the label in
    ``meta.text`` only) and, when the config has a per-region TextArea and a caption was made, the caption item."""
    best = res.labels[0]
    if control.labels_control is not None and best.label in control.labels:
        rtype = control.labelled_type
        out = [{"id": key, "from_name": control.labels_control, "to_name": control.to_name, "type": rtype,
                "value": {**geometry, rtype: [best.label]}, "score": score, "meta": meta, **extra}]
    else:
        out = [{"id": key, "from_name": control.name, "to_name": control.to_name, "type": control.tag,
                "value": geometry, "score": score, "meta": meta, **extra}]
    caption_control = cfg.captions.get(control.to_name)
    if caption_control is not None and res.caption:
        out.append({"id": key, "from_name": caption_control.name, "to_name": control.to_name, "type": "textarea",
                    "value": {**geometry, "text": [str(res.caption)]}, **extra})
    return out


def region_results(region: Region, res: RegionResult, cfg: ProjectConfig) -> list[dict[str, Any]]:
    """Result items for one successfully labelled region (``res``: labels best-first, caption)."""
    item = region.item
    frame = {k: item[k] for k in FRAME_KEYS if k in item}
    meta: dict[str, Any] = {"text": [alternatives_text(res.labels)]}
    meta.update(uncertainty_meta(res.meta))
    if region.control.answers_as is not None:
        geometry, refined_by = outlined_geometry(region, res)
        meta["refined_by"] = refined_by
        meta["text"] = [f"{meta['text'][0]} · outlined from the {region.kind} ({refined_by})"]
    else:
        geometry = {k: v for k, v in item["value"].items() if k not in LABEL_VALUE_KEYS}
    return _labelled_items(region.control.output, cfg, res, region.id, geometry, float(res.labels[0].score), meta,
                           frame)


def outlined_geometry(region: Region, res: RegionResult) -> tuple[dict[str, Any], str]:
    """The polygon/brush value (geometry only) answering a prompt control's box or clicks, and how it was made:
    the worker's refined mask (``meta["mask"]``, ``meta["refined_by"]``), else ``"box"`` (the box's corners as a
    polygon, the box's or the clicks' mask as a brush). Raises RegionError when neither can be written."""
    kind = region.control.output.kind
    mask = res.meta.get("mask")
    if isinstance(mask, Mapping):
        try:
            full = decode_mask(dict(mask))
            width, height = region_geometry(region, (full.shape[1], full.shape[0]))
            refined_by = str(res.meta.get("refined_by") or "?")
            return geometry_value(kind, full, width, height), refined_by
        except (ValueError, KeyError, TypeError, OutputError):  # malformed or empty: the prompt itself
            pass
    width, height = region_geometry(region, None)
    if kind == "polygon" and region.kind == "rectangle":
        return box_polygon_value(rectangle_corners(region.value, 100, 100)), "box"
    try:
        return geometry_value(kind, region_mask(region, None, max(width, height)), width, height), "box"
    except OutputError as exc:
        raise RegionError(f"cannot outline the {region.kind}: {exc}") from None


def proposal_score(res: RegionResult) -> float:
    """A proposal's score in Label Studio: the worker's ranking score (best-label probability × objectness,
    ``meta.score``), else the best label's probability (older workers)."""
    ranked = res.meta.get("score")
    if isinstance(ranked, (int, float)) and not isinstance(ranked, bool) and 0.0 <= ranked <= 1.0:
        return float(ranked)
    return float(res.labels[0].score)


def proposal_items(control: RegionControl, cfg: ProjectConfig, res: RegionResult, width: int, height: int,
                   key: str) -> list[dict[str, Any]]:
    """Result items (region + optional caption) for one proposed region ``res`` (its mask in ``meta.mask``), in
    ``control``'s region type. Raises OutputError / KeyError / ValueError for a mask that cannot be written."""
    mask = decode_mask(res.meta["mask"])
    geometry = geometry_value(control.kind, mask, width, height)
    source = str(res.meta.get("source") or "?")
    obj = res.meta.get("objectness")
    obj_text = f" · objectness {float(obj):.2f}" if isinstance(obj, (int, float)) and not isinstance(obj, bool) else ""
    meta: dict[str, Any] = {"text": [f"proposed by MaskInversion ({source}){obj_text} · "
                                     f"{alternatives_text(res.labels)}"], "proposed": True, "source": source}
    if isinstance(res.meta.get("examples"), int):  # scored with the project's examples (backend.learning)
        meta["examples"] = res.meta["examples"]
    extra = {"origin": "prediction", "original_width": width, "original_height": height, "image_rotation": 0}
    return _labelled_items(control, cfg, res, key, geometry, proposal_score(res), meta, extra)


def task_prediction(results: list[dict[str, Any]], scores: list[float], model_version: str,
                    diagnostics: dict[str, Any]) -> dict[str, Any]:
    """One task's prediction; ``diagnostics`` go under ``"maskinv"`` (ignored by Label Studio). Its ``score`` is
    the task score of :func:`backend.trust.score.prediction_score` (uncertainty + coverage of its regions; low =
    label first), else the lowest of ``scores``."""
    score = prediction_score(results)
    return {"result": results, "score": score if score is not None else min(scores) if scores else None,
            "model_version": model_version, "maskinv": diagnostics}
