"""Queries over the region index: by text, by example regions, by a label's accepted examples, and coverage.

* **text**: the prompt-ensembled text embedding of the query (the project's templates, an ``embed_regions`` job
  with the text as its one label), against the regions' embeddings;
* **examples**: the mean direction of up to :data:`~backend.search.records.MAX_EXAMPLES` indexed regions;
* **label**: the prototype of a label, the mean direction of its ``human`` regions (accepted examples);
* **coverage** ("least like anything labelled"): regions whose similarity to the nearest label prototype is
  lowest, over at most :data:`COVERAGE_SCAN` regions, lowest first.

Every query is restricted to one model key (the one the backend embeds with now), one or more projects and the
filters of :class:`~backend.search.records.SearchFilter`. Caps: docs/security.md, "Region search".
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from worker.protocol import EmbedRegionsJob, InversionParams, decode_vectors

from backend.search.records import (MAX_EXAMPLES, MAX_QUERY_CHARS, SOURCES, SearchFilter, SearchHit,
                                    SearchInputError, check_k, unit_rows)
from backend.search.store import RegionStore

#: regions a coverage query reads (per query, over all its projects), and human regions it fits prototypes on
COVERAGE_SCAN = 100_000
PROTOTYPE_SCAN = 20_000
#: seconds the text embedding may take
TEXT_TIMEOUT_S = 60.0
KINDS = ("text", "examples", "label", "coverage")


@dataclass(frozen=True)
class Query:
    """One parsed request: its kind and argument, the filter, k."""

    kind: str
    flt: SearchFilter
    k: int
    text: str = ""
    label: str = ""
    examples: tuple[tuple[str, int, str, str], ...] = ()  # (project, task, annotation, region)
    raw: Mapping[str, Any] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        """A short digest of what was asked (kind, argument, filter, k): the prediction set's version."""
        doc = {"kind": self.kind, "text": self.text, "label": self.label, "examples": self.examples,
               "flt": [self.flt.model, self.flt.projects, self.flt.labels, self.flt.sources, self.flt.min_score,
                       self.flt.max_score], "k": self.k}
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=list).encode()).hexdigest()[:12]


def _str_list(body: Mapping[str, Any], key: str, cap: int) -> tuple[str, ...]:
    value = body.get(key)
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > cap:
        raise SearchInputError(f"{key} must be a list of at most {cap} items")
    if not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
        raise SearchInputError(f"{key} must hold strings or integers")
    return tuple(str(v) for v in value)


def _score(body: Mapping[str, Any], key: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SearchInputError(f"{key} must be a finite number")
    return float(value)


def parse_query(body: Any, model: str, max_projects: int = 20) -> Query:
    """A request body -> :class:`Query`; SearchInputError names the field. Body::

        {"projects": [id, ...], "k": 20, one of "text": str | "examples": [{"project", "task", "region",
         "annotation"?}, ...] | "label": str | "coverage": true, "labels": [...], "sources": [...],
         "min_score": x, "max_score": x}
    """
    if not isinstance(body, Mapping):
        raise SearchInputError("the request body must be a JSON object")
    kinds = [k for k in KINDS if body.get(k) not in (None, False, "", [])]
    if len(kinds) != 1:
        raise SearchInputError("give exactly one of text, examples, label, coverage")
    projects = _str_list(body, "projects", max_projects)
    flt = SearchFilter(model=model, projects=projects, labels=_str_list(body, "labels", 50),
                       sources=_str_list(body, "sources", len(SOURCES)), min_score=_score(body, "min_score"),
                       max_score=_score(body, "max_score"))
    k = check_k(body.get("k", 20))
    kind = kinds[0]
    if kind == "text":
        text = body["text"]
        if not isinstance(text, str) or not text.strip() or len(text) > MAX_QUERY_CHARS:
            raise SearchInputError(f"text must be a non-empty string of at most {MAX_QUERY_CHARS} characters")
        return Query(kind, flt, k, text=text.strip(), raw=body)
    if kind == "label":
        label = body["label"]
        if not isinstance(label, str) or len(label) > MAX_QUERY_CHARS:
            raise SearchInputError(f"label must be a string of at most {MAX_QUERY_CHARS} characters")
        return Query(kind, flt, k, label=label, raw=body)
    if kind == "examples":
        ex = body["examples"]
        if not isinstance(ex, list) or not 1 <= len(ex) <= MAX_EXAMPLES:
            raise SearchInputError(f"examples must be a list of 1 to {MAX_EXAMPLES} regions")
        refs = []
        for i, e in enumerate(ex):
            if not isinstance(e, Mapping) or "task" not in e or "region" not in e:
                raise SearchInputError(f"examples[{i}] must be an object with project, task and region")
            task = e["task"]
            if isinstance(task, bool) or not isinstance(task, int):
                raise SearchInputError(f"examples[{i}].task must be an integer")
            refs.append((str(e.get("project", projects[0] if projects else "")), task,
                         str(e.get("annotation") or ""), str(e["region"])[:200]))
        return Query(kind, flt, k, examples=tuple(refs), raw=body)
    if body["coverage"] is not True:
        raise SearchInputError("coverage must be true")
    return Query(kind, flt, k, raw=body)


def text_vector(run_embed: Callable[[dict, float], dict], text: str, params: InversionParams) -> np.ndarray:
    """The prompt-ensembled text embedding ``[D]`` of ``text`` (an ``embed_regions`` job without regions)."""
    payload = EmbedRegionsJob.build(None, [], params, labels=[text], dtype="float32")
    result = run_embed(payload.to_dict(), TEXT_TIMEOUT_S)
    if result.get("error"):
        raise SearchInputError(f"text: {result['error']}")
    doc = (result.get("meta") or {}).get("text")
    if not doc:
        raise SearchInputError("text: the worker returned no text embedding")
    return decode_vectors(doc)[0]


def _mean_direction(vectors: np.ndarray) -> np.ndarray:
    return unit_rows(unit_rows(vectors).mean(axis=0))[0]


def example_vector(store: RegionStore, q: Query) -> np.ndarray:
    """The mean direction of the query's example regions (each must be indexed under the query's model)."""
    want = {(p, t, a, r) for p, t, a, r in q.examples}
    found: dict[tuple[str, int, str, str], np.ndarray] = {}
    for project in dict.fromkeys(p for p, _, _, _ in q.examples):
        tasks = sorted({t for p, t, _, _ in q.examples if p == project})
        recs, vecs = store.fetch(SearchFilter(model=q.flt.model, projects=(project,)), MAX_EXAMPLES * 1000, tasks)
        for rec, vec in zip(recs, vecs):
            for key in ((rec.project, rec.task, rec.annotation, rec.region), (rec.project, rec.task, "", rec.region)):
                if key in want:
                    found.setdefault(key, vec)
    missing = [f"{p}/{t}/{r}" for p, t, a, r in q.examples if (p, t, a, r) not in found]
    if missing:
        raise SearchInputError(f"examples not in the index (model {q.flt.model}): {', '.join(missing[:5])}")
    return _mean_direction(np.stack(list(found.values())))


def label_prototypes(store: RegionStore, flt: SearchFilter, labels: Sequence[str] = ()
                     ) -> tuple[list[str], np.ndarray]:
    """Per label, the mean direction of its human regions in the filter's projects: (labels, ``[L, D]``)."""
    recs, vecs = store.fetch(SearchFilter(model=flt.model, projects=flt.projects, labels=tuple(labels),
                                          sources=("human",)), PROTOTYPE_SCAN)
    by_label: dict[str, list[np.ndarray]] = {}
    for rec, vec in zip(recs, vecs):
        for lab in rec.label.split(", "):
            by_label.setdefault(lab, []).append(vec)
    names = sorted(by_label)
    if not names:
        return [], np.zeros((0, 0), np.float32)
    return names, np.stack([_mean_direction(np.stack(by_label[n])) for n in names])


def coverage(store: RegionStore, flt: SearchFilter, k: int) -> list[SearchHit]:
    """The ``k`` regions (not human ones, unless the filter asks for them) least like any label prototype."""
    names, protos = label_prototypes(store, flt)
    if not names:
        raise SearchInputError("coverage needs labelled (human) regions in the projects")
    scan = flt if flt.sources else SearchFilter(model=flt.model, projects=flt.projects, labels=flt.labels,
                                                sources=("suggested", "proposed"), min_score=flt.min_score,
                                                max_score=flt.max_score)
    recs, vecs = store.fetch(scan, COVERAGE_SCAN)
    if not recs:
        return []
    sims = unit_rows(vecs) @ protos.T  # [N, L]
    best = sims.max(axis=1)
    nearest = sims.argmax(axis=1)
    order = np.argsort(best)[:k]
    return [SearchHit(recs[i], float(best[i]), {"nearest_label": names[int(nearest[i])]}) for i in order]


def run_query(store: RegionStore, q: Query, text_embed: Callable[[str], np.ndarray]) -> list[SearchHit]:
    """Answer ``q``; ``text_embed`` turns a text into its embedding ``[D]`` (the worker's text tower)."""
    if q.kind == "coverage":
        return coverage(store, q.flt, q.k)
    if q.kind == "text":
        vec = text_embed(q.text)
    elif q.kind == "examples":
        vec = example_vector(store, q)
    else:
        names, protos = label_prototypes(store, q.flt, (q.label,))
        if q.label not in names:
            raise SearchInputError(f"label {q.label!r} has no accepted examples in the index")
        vec = protos[names.index(q.label)]
    return store.search(vec, q.flt, q.k)
