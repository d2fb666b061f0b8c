"""``label_regions`` and ``propose_regions`` return each region's embedding when the payload asks (tiny model): the
vector the labels were scored on, the one ``embed_regions`` gives the same region."""

from __future__ import annotations

import numpy as np
import pytest

from worker.protocol import (EmbedRegionsJob, InversionParams, JobResult, LabelRegionsJob, ProposeRegionsJob,
                             decode_vectors)

from backend_support import TINY_MODEL_ENV, png_bytes

PARAMS = InversionParams(size=64, steps=2, crop_weight=0.3)
LABELS = ["cat", "dog", "car"]


@pytest.fixture(scope="module")
def runtime():
    """The tiny model, with proposal settings that keep every MaskCut proposal of a random model."""
    from worker.jobs import runtime as jobs

    mp = pytest.MonkeyPatch()
    for k, v in {**TINY_MODEL_ENV, "MASKINV_PROPOSAL_MIN_SCORE": "0", "MASKINV_PROPOSAL_SOURCES": "maskcut",
                 "MASKINV_MAX_PROPOSALS": "2", "MASKINV_PROPOSAL_PRECISION": "0"}.items():
        mp.setenv(k, v)
    mp.setattr(jobs, "_runtime", None)
    yield jobs
    mp.undo()


def masks() -> list[tuple[str, np.ndarray]]:
    a = np.zeros((60, 80), bool)
    a[10:40, 5:30] = True
    b = np.zeros((60, 80), bool)
    b[20:50, 40:75] = True
    return [("a", a), ("b", b), ("empty", np.zeros((60, 80), bool))]


def test_label_regions_returns_the_vector_it_scored_only_when_asked(runtime):
    from worker.jobs.embed import embed_regions, score_regions
    from worker.jobs.regions import label_regions

    img = png_bytes(80, 60, seed=7)
    asked = JobResult.from_dict(label_regions(LabelRegionsJob.build(img, masks(), LABELS, PARAMS,
                                                                    embedding=True).to_dict()))
    assert asked.error is None
    a, b, empty = asked.regions
    assert empty.error and empty.embedding is None  # a failed region has none
    dim = runtime.get_runtime().clip.embed_dim
    vecs = np.stack([a.vector(), b.vector()])
    assert vecs.shape == (2, dim)
    # the labels are the scores of exactly this vector (float16 on the wire)
    scored, _ = score_regions(runtime.get_runtime(), vecs, LABELS, PARAMS.templates, PARAMS.top_k)
    for res, top in zip((a, b), scored):
        assert [s.label for s in res.labels] == [lab for lab, _ in top]
        np.testing.assert_allclose([s.score for s in res.labels], [p for _, p in top], atol=2e-3)
    # ... and the embedding embed_regions gives the same regions (LET, crop mix) for the region index
    embedded = JobResult.from_dict(embed_regions(EmbedRegionsJob.build(img, masks()[:2], PARAMS,
                                                                       dtype="float32").to_dict()))
    lets = np.concatenate([decode_vectors(r.meta["let"]) for r in embedded.regions])
    np.testing.assert_allclose(vecs, lets, rtol=2e-3, atol=2e-3)
    plain = JobResult.from_dict(label_regions(LabelRegionsJob.build(img, masks()[:2], LABELS, PARAMS).to_dict()))
    assert all(r.embedding is None for r in plain.regions)
    assert [r.labels for r in plain.regions] == [r.labels for r in asked.regions[:2]]


def test_propose_regions_returns_each_proposal_s_embedding(runtime):
    from worker.jobs.propose import propose_regions

    img = png_bytes(80, 60, seed=3)
    res = JobResult.from_dict(propose_regions(ProposeRegionsJob.build(img, LABELS, PARAMS,
                                                                      embedding=True).to_dict()))
    assert res.error is None and res.regions, res
    dim = runtime.get_runtime().clip.embed_dim
    assert all(r.vector() is not None and r.vector().shape == (dim,) for r in res.regions)
    plain = JobResult.from_dict(propose_regions(ProposeRegionsJob.build(img, LABELS, PARAMS).to_dict()))
    assert plain.regions and all(r.embedding is None for r in plain.regions)
