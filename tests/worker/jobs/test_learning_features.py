"""Examples are learned on the region embedding beside its masked crop: the embed job returns the crop, and a
label job scores prototypes over those features (tiny model)."""

from __future__ import annotations

import numpy as np

from backend.learning.examples import Example
from backend.learning.fit import FEATURE_ANCHOR, example_features, fit_prototypes, vision_prototypes
from worker.protocol import InversionParams, LabelRegionsJob, decode_vectors, encode_image, encode_mask, encode_vectors
from worker.protocol.features import learning_features, text_features

from backend_support import png_bytes, two_masks

MIXED = InversionParams(size=64, steps=2, caption=False, crop_weight=0.3)


def masks():
    return two_masks()


def embed(img: bytes, params: InversionParams, labels=("cat", "dog", "cow")) -> dict:
    from worker.jobs import embed as embed_jobs

    a, b = masks()
    return embed_jobs.embed_regions({"v": 1, "image": encode_image(img), "labels": list(labels), "dtype": "float32",
                                     "regions": [{"id": "a", "mask": encode_mask(a)},
                                                 {"id": "b", "mask": encode_mask(b)}],
                                     "params": params.to_dict()})


def test_the_embed_job_returns_the_masked_crop_when_the_embedding_mixes_one_in(tiny_runtime):
    from worker.jobs import regions as jobs

    img = png_bytes(80, 60, seed=11)
    res = embed(img, MIXED)
    crops = np.concatenate([decode_vectors(r["meta"]["crop"]) for r in res["regions"]])
    want = jobs.get_runtime().engine.crop_embeddings(img, list(masks()), "masked_crop")[0].numpy()
    np.testing.assert_allclose(crops, want, rtol=1e-4, atol=1e-5)
    plain = embed(img, InversionParams(size=64, steps=2, caption=False))
    assert all("crop" not in r["meta"] for r in plain["regions"])


def _prototypes(img: bytes, y: np.ndarray, labels=("cat", "dog", "cow")) -> tuple[dict, np.ndarray, np.ndarray]:
    res = embed(img, MIXED, labels)
    lets = np.concatenate([decode_vectors(r["meta"]["let"]) for r in res["regions"]])
    crops = np.concatenate([decode_vectors(r["meta"]["crop"]) for r in res["regions"]])
    text, scale = decode_vectors(res["meta"]["text"]), res["meta"]["logit_scale"]
    x, tf = learning_features(lets, crops), text_features(text)
    w, bias = fit_prototypes(tf, x, y, scale, anchor=FEATURE_ANCHOR)
    means, counts = vision_prototypes(tf, x, y)
    has = counts > 0
    return ({"version": "f1", "labels": [lab for lab, h in zip(labels, has) if h],
             "weights": encode_vectors(w[has]), "bias": [float(v) for v in bias[has]],
             "means": encode_vectors(means[has]), "counts": [int(c) for c in counts[has]]}, lets, crops)


def test_a_label_job_scores_prototypes_over_embedding_and_crop(tiny_runtime):
    from worker.jobs import regions as jobs

    img = png_bytes(80, 60, seed=12)
    a, b = masks()
    y = np.array([2, 1])  # region a is a "cow", region b a "dog" (every label of the job has an example)
    protos, _, _ = _prototypes(img, y, ("cat", "dog", "cow"))
    job = LabelRegionsJob.build(img, [("a", a), ("b", b)], ["dog", "cow"], MIXED).to_dict()
    job["prototypes"] = protos
    out = jobs.label_regions(job)
    assert not out.get("error"), out.get("error")
    assert [r["labels"][0]["label"] for r in out["regions"]] == ["cow", "dog"]
    assert all(r["meta"]["examples_version"] == "f1" for r in out["regions"])


def test_prototypes_over_crops_without_crops_fall_back_to_text(tiny_runtime):
    """A job whose embedding mixes no crop in cannot use prototypes over crops: it is scored by text alone."""
    from worker.jobs import regions as jobs

    img = png_bytes(80, 60, seed=13)
    a, b = masks()
    protos, _, _ = _prototypes(img, np.array([2, 1]))
    plain = InversionParams(size=64, steps=2, caption=False)
    with_protos = LabelRegionsJob.build(img, [("a", a), ("b", b)], ["cat", "dog", "cow"], plain).to_dict()
    with_protos["prototypes"] = protos
    text_only = LabelRegionsJob.build(img, [("a", a), ("b", b)], ["cat", "dog", "cow"], plain).to_dict()
    got, want = jobs.label_regions(with_protos), jobs.label_regions(text_only)
    assert [r["labels"] for r in got["regions"]] == [r["labels"] for r in want["regions"]]


def test_prototypes_of_another_width_are_refused(tiny_runtime):
    from worker.jobs import regions as jobs

    img = png_bytes(80, 60, seed=14)
    a, b = masks()
    protos, _, _ = _prototypes(img, np.array([2, 1]))
    wide = decode_vectors(protos["weights"])
    job = LabelRegionsJob.build(img, [("a", a), ("b", b)], ["cat", "dog", "cow"], MIXED).to_dict()
    job["prototypes"] = {**protos, "weights": encode_vectors(np.hstack([wide, wide]))}
    assert "prototypes.weights" in jobs.label_regions(job)["error"]


def test_example_features_need_every_example_s_crop():
    text = np.eye(3, 4, dtype=np.float32)
    rng = np.random.default_rng(0)
    with_crops = [Example(f"r{i}", "a", "m", rng.normal(size=4).astype(np.float32),
                          rng.normal(size=4).astype(np.float32)) for i in range(3)]
    x, t, anchor = example_features(with_crops, text)
    assert x.shape == (3, 8) and t.shape == (3, 8) and anchor == FEATURE_ANCHOR
    assert not t[:, 4:].any() and np.allclose(np.linalg.norm(x[:, :4], axis=1), 1.0)
    older = with_crops[:2] + [Example("r9", "a", "m", rng.normal(size=4).astype(np.float32))]
    x, t, anchor = example_features(older, text)
    assert x.shape == (3, 4) and t.shape == (3, 4) and anchor != FEATURE_ANCHOR
