"""The embed_regions job and re-scoring cached LETs (tiny model)."""

from __future__ import annotations

import numpy as np

from worker.protocol import InversionParams, LabelRegionsJob, encode_image, encode_mask
from backend.learning.fit import class_means, fit_prototypes
from worker.engine.embedding import combine_views, mix_crop
from worker.protocol import decode_vectors, encode_vectors
from worker.protocol import JOB_KINDS, JobResult, allowed_functions

from backend_support import png_bytes, two_masks


def masks():
    return two_masks()


def embed_payload(image: bytes, labels=(), dtype="float32", extra_regions=()):
    a, b = masks()
    regions = [{"id": "a", "mask": encode_mask(a)}, {"id": "b", "mask": encode_mask(b)}, *extra_regions]
    return {"v": 1, "image": encode_image(image), "regions": regions, "labels": list(labels), "dtype": dtype,
            "params": InversionParams(size=64, steps=2).to_dict()}


def test_embed_job_kind_is_registered():
    assert JOB_KINDS["embed_regions"].function == "worker.jobs.embed.embed_regions"
    assert "worker.jobs.embed.embed_regions" in allowed_functions()


def test_embed_returns_lets_and_text_prototypes(tiny_runtime):
    from worker.jobs import embed as embed_jobs
    from worker.jobs import regions as jobs

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
    from worker.jobs import embed as embed_jobs

    res = embed_jobs.embed_regions({"v": 1, "regions": [{"id": "a"}], "dtype": "int8", "params": {}})
    assert res["error"] and "dtype" in res["error"] and res["regions"][0]["error"]


def test_changed_labels_rescore_without_inverting(tiny_runtime):
    from worker.jobs import regions as jobs

    img = png_bytes(80, 60, seed=5)
    a, b = masks()
    job = LabelRegionsJob.build(
        img, [("a", a), ("b", b)], ["cat", "dog"], InversionParams(size=64, steps=2, caption=False)).to_dict()
    first = jobs.label_regions(job)
    forwards = first["cache"]["vit_forwards"]
    job2 = LabelRegionsJob.build(img, [("a", a), ("b", b)], ["bird", "tree", "car"],
                     InversionParams(size=64, steps=2, caption=False)).to_dict()
    second = jobs.label_regions(job2)
    assert second["cache"]["let_hits"] == 2 and second["cache"]["vit_forwards"] == forwards
    assert [s["label"] for s in second["regions"][0]["labels"]] and second["regions"][0]["labels"][0]["label"] in (
        "bird", "tree", "car")
    m = second["regions"][0]["meta"]
    assert 0 <= m["margin"] <= 1 and m["examples"] == 0


def test_label_job_with_prototypes_uses_examples(tiny_runtime):
    from worker.jobs import embed as embed_jobs
    from worker.jobs import regions as jobs

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
    job = LabelRegionsJob.build(
        img, [("a", a), ("b", b)], ["cat", "dog", "cow"], InversionParams(size=64, steps=2, caption=False)).to_dict()
    job["prototypes"] = protos
    out = jobs.label_regions(job)
    meta = [r["meta"] for r in out["regions"]]
    assert all(m["examples_version"] == "v1" for m in meta)
    top = [r["labels"][0]["label"] for r in out["regions"]]
    for t, m in zip(top, meta):
        assert m["examples"] == {"cat": 0, "dog": 1, "cow": 1}[t]
    bad = dict(job, prototypes={**protos, "counts": [1]})
    assert "prototypes.counts" in jobs.label_regions(bad)["error"]


def test_two_views_embed_the_region_and_its_mirror(tiny_runtime):
    """views=2: the region's embedding is the mean direction of its LET on the image and on the mirrored image
    (image and mask flipped), each view cached under its own key; views=1 keeps the single-view LET exactly."""
    from PIL import Image

    from worker.jobs import embed as embed_jobs

    from worker.jobs import regions as jobs
    from worker.jobs.let_cache import MemoryLetCache

    rt = jobs.get_runtime()
    img = png_bytes(80, 60, seed=6)
    a, b = masks()
    cache = MemoryLetCache(100, 10**7, 3600)
    one = embed_jobs.region_lets(rt, img, "img6", [a, b], InversionParams(size=64, steps=2), cache, "t")
    two = embed_jobs.region_lets(rt, img, "img6", [a, b], InversionParams(size=64, steps=2, views=2), cache, "t")
    assert two.hits == 0 and one.hits == 0 and len(cache) == 4  # view 0 came from the cache: not a full hit
    mirror = Image.open(__import__("io").BytesIO(img)).convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    flipped = rt.engine.invert(mirror, [a[:, ::-1], b[:, ::-1]], size=64, steps=2, final_loss=False)
    expect = combine_views(np.stack([one.lets, flipped.lets.numpy()]))
    np.testing.assert_allclose(two.lets, expect, rtol=1e-5, atol=1e-6)
    u = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    assert np.all((u(two.lets) * u(one.lets)).sum(1) < 1 - 1e-6)  # the mirror view moved it
    again = embed_jobs.region_lets(rt, img, "img6", [a, b], InversionParams(size=64, steps=2, views=2), cache, "t")
    assert again.hits == 2 and again.timings["inversion_s"] == 0.0
    np.testing.assert_array_equal(again.lets, two.lets)
    # a bad mask is an error in every view, never a half-embedded region
    bad = embed_jobs.region_lets(rt, img, "img6", [a, np.zeros((60, 80), bool)],
                                 InversionParams(size=64, steps=2, views=2), cache, "t")
    assert bad.errors[0] is None and bad.errors[1] and not bad.lets[1].any()


def test_crop_weight_mixes_the_masked_crop_into_the_region_embedding(tiny_runtime):
    """crop_weight w > 0: the region's embedding is the direction of unit(LET) + w unit(masked crop), at the LET's
    norm; the crop embedding is the engine's masked crop at the model's native size, cached with the LETs."""
    from worker.jobs import embed as embed_jobs
    from worker.jobs import regions as jobs
    from worker.jobs.let_cache import MemoryLetCache

    rt = jobs.get_runtime()
    img = png_bytes(80, 60, seed=7)
    a, b = masks()
    cache = MemoryLetCache(100, 10**7, 3600)
    plain = embed_jobs.region_lets(rt, img, "img7", [a, b], InversionParams(size=64, steps=2), cache, "t")
    forwards = rt.engine.stats.vit_forwards
    mixed = embed_jobs.region_lets(rt, img, "img7", [a, b], InversionParams(size=64, steps=2, crop_weight=0.5),
                                   cache, "t")
    assert mixed.hits == 2 and rt.engine.stats.vit_forwards == forwards + 2  # LETs cached; two crops embedded
    crops, errors = rt.engine.crop_embeddings(img, [a, b], "masked_crop")
    assert errors == [None, None]
    expect = mix_crop(plain.lets, crops.numpy(), 0.5)
    np.testing.assert_allclose(mixed.lets, expect, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(mixed.lets, axis=1), np.linalg.norm(plain.lets, axis=1), rtol=1e-5)
    again = embed_jobs.region_lets(rt, img, "img7", [a, b], InversionParams(size=64, steps=2, crop_weight=0.5),
                                   cache, "t")
    assert rt.engine.stats.vit_forwards == forwards + 4  # the check above embedded two crops; nothing new here
    np.testing.assert_array_equal(again.lets, mixed.lets)
    # a bad mask keeps its error and a zero row; the good one is still mixed
    bad = embed_jobs.region_lets(rt, img, "img7", [a, np.zeros((60, 80), bool)],
                                 InversionParams(size=64, steps=2, crop_weight=0.5), cache, "t")
    assert bad.errors[1] and not bad.lets[1].any()
    np.testing.assert_allclose(bad.lets[0], mixed.lets[0], rtol=1e-6)


def test_label_job_scores_the_mixed_embedding(tiny_runtime):
    """The label job with crop_weight > 0 ranks labels by the mixed embedding and says so in its params."""
    from worker.jobs import regions as jobs

    img = png_bytes(80, 60, seed=8)
    a, b = masks()
    plain = jobs.label_regions(LabelRegionsJob.build(img, [("a", a), ("b", b)], ["cat", "dog", "cow"],
                                         InversionParams(size=64, steps=2, caption=False)).to_dict())
    mixed = jobs.label_regions(LabelRegionsJob.build(img, [("a", a), ("b", b)], ["cat", "dog", "cow"],
                                         InversionParams(size=64, steps=2, caption=False, crop_weight=1.0)).to_dict())
    assert "crop_weight" not in plain["params"] and mixed["params"]["crop_weight"] == 1.0
    assert mixed["cache"]["let_hits"] == 2 and mixed["timings"]["total_s"] > 0
    p = lambda r: [s["score"] for s in r["regions"][0]["labels"]]  # noqa: E731
    assert p(plain) != p(mixed)
