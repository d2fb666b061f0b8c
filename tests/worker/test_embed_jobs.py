"""The embed_regions job and re-scoring cached LETs (tiny model)."""

from __future__ import annotations

import numpy as np

from worker.payload import InversionParams, build_job, encode_image, encode_mask
from backend.prototype_fit import class_means, fit_prototypes
from worker.protocol import decode_vectors, encode_vectors
from worker.protocol import JOB_KINDS, JobResult, allowed_functions

from backend_support import png_bytes


def masks():
    a = np.zeros((60, 80), bool)
    a[10:40, 5:30] = True
    b = np.zeros((60, 80), bool)
    b[20:50, 40:75] = True
    return a, b


def embed_payload(image: bytes, labels=(), dtype="float32", extra_regions=()):
    a, b = masks()
    regions = [{"id": "a", "mask": encode_mask(a)}, {"id": "b", "mask": encode_mask(b)}, *extra_regions]
    return {"v": 1, "image": encode_image(image), "regions": regions, "labels": list(labels), "dtype": dtype,
            "params": InversionParams(size=64, steps=2).to_dict()}


def test_embed_job_kind_is_registered():
    assert JOB_KINDS["embed_regions"].function == "worker.embed_jobs.embed_regions"
    assert "worker.embed_jobs.embed_regions" in allowed_functions()


def test_embed_returns_lets_and_text_prototypes(tiny_runtime):
    from worker import embed_jobs, jobs

    img = png_bytes(80, 60, seed=4)
    bad = {"id": "empty", "mask": encode_mask(np.zeros((60, 80), bool))}
    res = JobResult.from_dict(embed_jobs.embed_regions(embed_payload(img, ("cat", "dog"), extra_regions=[bad])))
    assert res.error is None and res.kind == "embed_regions"
    lets = [decode_vectors(r.meta["let"]) for r in res.regions[:2]]
    dim = jobs.get_runtime().clip.embed_dim
    assert all(x.shape == (1, dim) for x in lets) and not np.allclose(lets[0], lets[1])
    assert res.regions[2].error and "let" not in res.regions[2].meta
    text = decode_vectors(res.meta["text"])
    assert text.shape == (2, dim) and np.allclose(np.linalg.norm(text, axis=1), 1, atol=1e-5)
    # the same regions again come from the LET cache, bit for bit; float16 halves the bytes
    again = JobResult.from_dict(embed_jobs.embed_regions(embed_payload(img, dtype="float16")))
    assert again.cache["let_hits"] == 2
    np.testing.assert_allclose(decode_vectors(again.regions[0].meta["let"]), lets[0], rtol=1e-3, atol=1e-3)


def test_embed_rejects_bad_payload(tiny_runtime):
    from worker import embed_jobs

    res = embed_jobs.embed_regions({"v": 1, "regions": [{"id": "a"}], "dtype": "int8", "params": {}})
    assert res["error"] and "dtype" in res["error"] and res["regions"][0]["error"]


def test_changed_labels_rescore_without_inverting(tiny_runtime):
    from worker import jobs

    img = png_bytes(80, 60, seed=5)
    a, b = masks()
    job = build_job(img, [("a", a), ("b", b)], ["cat", "dog"], InversionParams(size=64, steps=2, caption=False))
    first = jobs.label_regions(job)
    forwards = first["cache"]["vit_forwards"]
    job2 = build_job(img, [("a", a), ("b", b)], ["bird", "tree", "car"],
                     InversionParams(size=64, steps=2, caption=False))
    second = jobs.label_regions(job2)
    assert second["cache"]["let_hits"] == 2 and second["cache"]["vit_forwards"] == forwards
    assert [s["label"] for s in second["regions"][0]["labels"]] and second["regions"][0]["labels"][0]["label"] in (
        "bird", "tree", "car")
    m = second["regions"][0]["meta"]
    assert 0 <= m["margin"] <= 1 and m["examples"] == 0


def test_label_job_with_prototypes_uses_examples(tiny_runtime):
    from worker import embed_jobs, jobs

    img = png_bytes(80, 60, seed=6)
    a, b = masks()
    res = embed_jobs.embed_regions(embed_payload(img, ("cat", "dog", "cow")))
    lets = np.concatenate([decode_vectors(r["meta"]["let"]) for r in res["regions"]])
    text, scale = decode_vectors(res["meta"]["text"]), res["meta"]["logit_scale"]
    y = np.array([2, 1])  # region a is a "cow", region b a "dog"; "cat" has no example
    w, bias = fit_prototypes(text, lets, y, scale)
    means, counts = class_means(lets, y, 3)
    has = counts > 0
    protos = {"version": "v1", "labels": ["dog", "cow"], "weights": encode_vectors(w[has]),
              "bias": [float(v) for v in bias[has]], "means": encode_vectors(means[has]),
              "counts": [int(c) for c in counts[has]]}
    job = build_job(img, [("a", a), ("b", b)], ["cat", "dog", "cow"], InversionParams(size=64, steps=2, caption=False))
    job["prototypes"] = protos
    out = jobs.label_regions(job)
    meta = [r["meta"] for r in out["regions"]]
    assert all(m["examples_version"] == "v1" for m in meta)
    top = [r["labels"][0]["label"] for r in out["regions"]]
    for t, m in zip(top, meta):
        assert m["examples"] == {"cat": 0, "dog": 1, "cow": 1}[t]
    bad = dict(job, prototypes={**protos, "counts": [1]})
    assert "prototypes.counts" in jobs.label_regions(bad)["error"]
