"""Label Studio prediction JSON for labelled regions.

Every labelled region is returned with the id, geometry and type it came with:

* the region result (``brushlabels`` / ``polygonlabels`` / ``rectanglelabels``, or the merged
  ``<tool>labels`` result of a generic ``<Labels>`` control) with the predicted label, ``score`` = its
  probability, and ``meta.text`` = the top-k alternatives, e.g. ``["MaskInversion top-3: cat 0.81 · dog 0.12 ·
  fox 0.04"]`` (shown in the region's details panel);
* if the config has a per-region ``<TextArea>`` on that image and a caption was made: a ``textarea`` result
  with the same id whose text is the caption.

A plain tool without any labels control (vocabulary from MASKINV_LABELS) keeps its type and gets the label
only in ``meta.text`` (and the caption). The task-level ``score`` is the lowest region score, so Label
Studio's active-learning ordering puts uncertain tasks first.
"""

from __future__ import annotations

from typing import Any

from backend.labelstudio.label_config import ProjectConfig
from backend.labelstudio.regions import Region

#: value keys that hold labels rather than geometry
LABEL_VALUE_KEYS = frozenset({"brushlabels", "polygonlabels", "rectanglelabels", "labels", "text", "choices"})
FRAME_KEYS = ("original_width", "original_height", "image_rotation")


def alternatives_text(labels: list[dict[str, Any]]) -> str:
    """One line with the top-k labels and their scores."""
    parts = " · ".join(f"{lab['label']} {float(lab['score']):.2f}" for lab in labels)
    return f"MaskInversion top-{len(labels)}: {parts}"


def uncertainty_meta(region_meta: dict[str, Any]) -> dict[str, Any]:
    """``margin`` (top-1 minus top-2 probability) and ``examples`` (annotated examples behind the top-1 label)
    from a worker result's region meta, for the region's ``meta`` in Label Studio."""
    out: dict[str, Any] = {}
    if isinstance(region_meta.get("margin"), (int, float)) and not isinstance(region_meta.get("margin"), bool):
        out["margin"] = round(float(region_meta["margin"]), 4)
    if isinstance(region_meta.get("examples"), int) and not isinstance(region_meta.get("examples"), bool):
        out["examples"] = int(region_meta["examples"])
    return out


def region_results(region: Region, res: dict[str, Any], cfg: ProjectConfig) -> list[dict[str, Any]]:
    """Result items for one successfully labelled region (``res``: labels best-first, caption)."""
    control = region.control
    item = region.item
    frame = {k: item[k] for k in FRAME_KEYS if k in item}
    geometry = {k: v for k, v in item["value"].items() if k not in LABEL_VALUE_KEYS}
    best = res["labels"][0]
    score = float(best["score"])
    meta = {"text": [alternatives_text(res["labels"])]}
    meta.update(uncertainty_meta(res.get("meta") or {}))
    if control.labels_control is not None and best["label"] in control.labels:
        rtype = control.labelled_type
        out = [{"id": region.id, "from_name": control.labels_control, "to_name": control.to_name, "type": rtype,
                "value": {**geometry, rtype: [best["label"]]}, "score": score, "meta": meta, **frame}]
    else:
        out = [{"id": region.id, "from_name": control.name, "to_name": control.to_name, "type": control.tag,
                "value": geometry, "score": score, "meta": meta, **frame}]
    caption_control = cfg.captions.get(control.to_name)
    if caption_control is not None and res.get("caption"):
        out.append({"id": region.id, "from_name": caption_control.name, "to_name": control.to_name,
                    "type": "textarea", "value": {**geometry, "text": [str(res["caption"])]}, **frame})
    return out


def task_prediction(results: list[dict[str, Any]], scores: list[float], model_version: str,
                    diagnostics: dict[str, Any]) -> dict[str, Any]:
    """One task's prediction; ``diagnostics`` go under ``"maskinv"`` (ignored by Label Studio)."""
    return {"result": results, "score": min(scores) if scores else None, "model_version": model_version,
            "maskinv": diagnostics}
