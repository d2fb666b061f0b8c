"""Queries over the region index: by text, by example regions, by a label's accepted examples, and coverage.

* **text**: the prompt-ensembled text embedding of the query (the project's templates, an ``embed_regions`` job
  with the text as its one label); the :data:`TEXT_CANDIDATES` regions closest to it by cosine (and the other
  regions of their tasks) are ranked by the probability that the query, rather than any label those regions
  carry, describes them (:mod:`backend.search.contrast`);
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

from backend.search.contrast import contrast_labels, rank_vectors
from backend.search.records import (MAX_EXAMPLES, MAX_QUERY_CHARS, SOURCES, SearchFilter, SearchHit,
                                    SearchInputError, check_k, unit_rows)
from backend.search.store import RegionStore

#: regions a coverage query reads (per query, over all its projects), and human regions it fits prototypes on
COVERAGE_SCAN = 100_000
PROTOTYPE_SCAN = 20_000
#: regions a text query ranks by probability: the closest by cosine (with the other regions of their tasks)
TEXT_CANDIDATES = 5_000
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


#: a text embedder: texts -> (their prompt-ensembled embeddings ``[T, D]``, the model's logit scale)
TextEmbed = Callable[[Sequence[str]], tuple[np.ndarray, float]]


def text_vectors(run_embed: Callable[[dict, float], dict], texts: Sequence[str], params: InversionParams
                 ) -> tuple[np.ndarray, float]:
    """The prompt-ensembled text embeddings ``[T, D]`` of ``texts`` and the model's logit scale (an
    ``embed_regions`` job without regions; the worker caches the prototypes of a label set)."""
    payload = EmbedRegionsJob.build(None, [], params, labels=list(texts), dtype="float32")
    result = run_embed(payload.to_dict(), TEXT_TIMEOUT_S)
    if result.get("error"):
        raise SearchInputError(f"text: {result['error']}")
    meta = result.get("meta") or {}
    doc = meta.get("text")
    if not doc:
        raise SearchInputError("text: the worker returned no text embedding")
    scale = meta.get("logit_scale")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise SearchInputError("text: the worker returned no logit scale")
    return decode_vectors(doc), float(scale)


def text_hits(store: RegionStore, q: Query, text_embed: TextEmbed) -> list[SearchHit]:
    """A text query's hits (module docstring): best first by ``p(query | region)`` (the hit's similarity; its
    cosine in ``extra``), among the :data:`TEXT_CANDIDATES` closest regions and the other regions of their tasks."""
    (query,), scale = text_embed((q.text,))
    near = store.search(query, q.flt, TEXT_CANDIDATES)
    if not near:
        return []
    tasks = sorted({h.record.task for h in near})
    recs, vecs = store.fetch(q.flt, 4 * TEXT_CANDIDATES, tasks)
    if not recs:
        return []
    names = contrast_labels(q.text, (r.label for r in recs))
    labels = text_embed(tuple(names))[0] if names else np.zeros((0, vecs.shape[1]), np.float32)
    order, prob, cos = rank_vectors(unit_rows(vecs), query, labels, scale)
    return [SearchHit(recs[i], float(prob[i]), {"cosine": round(float(cos[i]), 6)}) for i in order[:q.k]]


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


def run_query(store: RegionStore, q: Query, text_embed: TextEmbed) -> list[SearchHit]:
    """Answer ``q``; ``text_embed`` turns texts into embeddings (the worker's text tower, :data:`TextEmbed`)."""
    if q.kind == "coverage":
        return coverage(store, q.flt, q.k)
    if q.kind == "text":
        return text_hits(store, q, text_embed)
    if q.kind == "examples":
        vec = example_vector(store, q)
    else:
        names, protos = label_prototypes(store, q.flt, (q.label,))
        if q.label not in names:
            raise SearchInputError(f"label {q.label!r} has no accepted examples in the index")
        vec = protos[names.index(q.label)]
    return store.search(vec, q.flt, q.k)
