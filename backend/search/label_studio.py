"""Search hits back into Label Studio: one prediction set per query, ``model_version = "search:<digest>"``.

Each task with hits gets one prediction of that version holding its matching regions, copied from the annotation
or prediction they were indexed from (same geometry and labels, so every region type of the project works), with
the similarity in the region's ``meta.text``; the prediction's ``score`` is its best hit's similarity. In the Data
Manager a person filters by that model version, sorts by prediction score and reviews with *Label tasks as
displayed*. Nothing is ever written as an annotation. The same query twice writes nothing new (tasks that hold the
version already are skipped).
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

from backend.labelstudio.api import LabelStudioAPI
from backend.search.records import SearchHit

VERSION_PREFIX = "search:"


def _source_items(task: dict[str, Any], hit: SearchHit) -> list[dict[str, Any]]:
    """The result items of the hit's region in the annotation or prediction it was indexed from."""
    rec = hit.record
    if rec.annotation:
        holders = [a for a in task.get("annotations") or [] if str(a.get("id")) == rec.annotation]
        region = rec.region
    else:
        pred_id, _, region = rec.region.partition(":")
        holders = [p for p in task.get("predictions") or [] if f"p{p.get('id')}" == pred_id]
        if not region:  # a region indexed without its prediction's id
            region, holders = rec.region, list(task.get("annotations") or []) + list(task.get("predictions") or [])
    for holder in holders:
        items = [it for it in holder.get("result") or [] if isinstance(it, dict) and str(it.get("id")) == region]
        if items:
            return items
    return []


def write_prediction_set(api: LabelStudioAPI, project: str, hits: Sequence[SearchHit], digest: str
                         ) -> dict[str, Any]:
    """Write the hits of ``project`` as prediction set ``search:<digest>`` (see the module docstring)."""
    version = f"{VERSION_PREFIX}{digest}"
    by_task: dict[int, list[SearchHit]] = {}
    for h in hits:
        if h.record.project == project:
            by_task.setdefault(h.record.task, []).append(h)
    out: dict[str, Any] = {"project": project, "model_version": version, "tasks": 0, "regions": 0,
                           "already": 0, "missing": []}
    for task_id, task_hits in by_task.items():
        if version in api.prediction_versions(task_id):
            out["already"] += 1
            continue
        task = api.get_task(task_id)
        if str(task.get("project")) != project:
            out["missing"].append({"task": task_id, "why": "not a task of the project"})
            continue
        result: list[dict[str, Any]] = []
        used: set[str] = set()
        for h in task_hits:
            items = _source_items(task, h)
            if not items:
                out["missing"].append({"task": task_id, "region": h.record.region, "why": "region no longer there"})
                continue
            rid = str(items[0].get("id"))
            new_id = rid if rid not in used else f"{rid}-{len(used)}"
            used.add(new_id)
            for it in items:
                item = copy.deepcopy(it)
                for key in ("origin", "readonly"):
                    item.pop(key, None)
                item["id"] = new_id
                item["score"] = round(float(h.similarity), 4)
                item["meta"] = {"text": [f"search {digest}: similarity {h.similarity:.3f} · {h.record.source}"]}
                result.append(item)
            out["regions"] += 1
        if result:
            api.create_prediction(task_id, result, round(max(h.similarity for h in task_hits), 4), version)
            out["tasks"] += 1
    return out
