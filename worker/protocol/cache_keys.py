"""Result-cache keys: what a region's answer depends on, digested, and the RQ job-meta keys naming the caches."""

from __future__ import annotations

import json
from typing import Any, Iterable, Mapping

from worker.protocol.codec import sha256_hex
from worker.protocol.params import InversionParams
from worker.protocol.prototypes import ExamplePrototypes
from worker.protocol.registry import RedisKeys

#: Key in an RQ job's ``meta`` telling the worker-side callback where and how long to store results.
JOB_META_KEY = "maskinv_cache"
#: Key in an RQ job's ``meta``: ``{"prefix": str, "ttl_s": int}``, where the worker keeps LETs in Redis
#: (``worker.jobs.let_cache``; keys ``{prefix}:let:{sha256(model | image | mask | size | steps | lr | alpha)}``)
LET_META_KEY = "maskinv_let_cache"
#: The answer format: raised whenever what a cached answer holds for the same inputs changes (2: captions agree
#: with the region's label), so answers written before are not served again
ANSWER_FORMAT = 2


def params_digest(params: Mapping[str, Any], labels: Iterable[str]) -> str:
    """Digest of the inversion parameters (normalised through :class:`InversionParams`) and the label set."""
    canon = InversionParams.from_dict(dict(params)).to_dict()
    blob = json.dumps({"params": canon, "labels": list(labels)}, sort_keys=True, separators=(",", ":"))
    return sha256_hex(blob.encode())


#: a payload's example prototypes, typed or as the document it carries
Prototypes = ExamplePrototypes | Mapping[str, Any] | None


def prototypes_digest(prototypes: Prototypes) -> str:
    """SHA-256 of a payload's example prototypes (their whole content: version, labels, vectors); "" without."""
    doc = prototypes.to_dict() if isinstance(prototypes, ExamplePrototypes) else prototypes
    if not doc:
        return ""
    return sha256_hex(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())


def answer_digest(params: Mapping[str, Any], labels: Iterable[str], prototypes: Prototypes = None,
                  captions: str | None = None, refine: str | None = None, embedding: bool = False) -> str:
    """Digest of what a region's answer depends on besides model, image and region: the inversion parameters
    (templates, views and crop weight included), the label set, the example prototypes' content, the
    worker's caption mode, its refinement method and settings (``model["refine"]``, when it reports one),
    whether the answer carries the region's embedding (a payload's ``embedding`` flag) and the
    :data:`ANSWER_FORMAT`."""
    doc: dict[str, Any] = {"params": params_digest(params, labels), "examples": prototypes_digest(prototypes),
                           "captions": captions, "format": ANSWER_FORMAT}
    if refine:
        doc["refine"] = refine
    if embedding:
        doc["embedding"] = True
    blob = json.dumps(doc, sort_keys=True)
    return sha256_hex(blob.encode())


def region_key(prefix: str, model_id: str, image_sha256: str, mask_sha256: str, digest: str) -> str:
    """Redis key of one region's result: ``{prefix}:result:{sha256(model | image | mask | answer_digest)}``."""
    h = sha256_hex(f"{model_id}\n{image_sha256}\n{mask_sha256}\n{digest}".encode())
    return RedisKeys(prefix=prefix).result(h)


def result_keys(prefix: str, model: Mapping[str, Any], image_sha256: str, mask_sha256s: Iterable[str],
                params: Mapping[str, Any], labels: Iterable[str],
                prototypes: Prototypes = None, embedding: bool = False) -> dict[str, str]:
    """The result-cache key of each region digest: the one key function of the cache, used by the worker that
    writes (:func:`~worker.protocol.result_cache.entries_from_result`) and the backend that reads
    (``backend.dispatch``).

    A region's digest is its mask digest, or :func:`worker.protocol.prompts.region_digest` of mask, prompt and
    ``refine`` when it carries a prompt (the two agree for a region without one). A key covers the model id,
    the image and region digests and :func:`answer_digest` (parameters, labels, example prototypes, the model's
    caption mode and refinement settings), so an answer scored with one project's examples is never served to
    another project, nor to a request without examples, a refined answer never to an unrefined region, and an
    answer without the region's embedding never to a request that asked for it (``embedding``)."""
    digest = answer_digest(params, labels, prototypes, model.get("captions"), model.get("refine"), embedding)
    return {sha: region_key(prefix, str(model.get("id")), image_sha256, sha, digest) for sha in mask_sha256s}
