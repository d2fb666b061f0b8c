"""Proposal geometry (pure), the propose pipeline and the propose_regions job on the tiny random test model."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from worker.proposals import pipeline as P
from worker.protocol import InversionParams, decode_mask, encode_image
from worker.protocol import JobResult, allowed_functions, job_function


def _png(seed=0, w=64, h=48) -> bytes:
    rng = np.random.default_rng(seed)
    arr = np.full((h, w, 3), 120, np.uint8) + rng.integers(0, 20, (h, w, 3), dtype=np.uint8)
    arr[10:30, 8:30] = (230, 20, 20)  # a red block
    arr[20:44, 40:60] = (20, 20, 230)  # a blue block
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _box(size, y0, y1, x0, x1):
    m = np.zeros((size, size), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_mask_iou_and_nms_keep_the_best_of_overlapping_masks():
    a, b, c = _box(10, 0, 5, 0, 5), _box(10, 0, 5, 0, 4), _box(10, 5, 10, 5, 10)
    iou = P.mask_iou(np.stack([a, b, c]), np.stack([a, c]))
    assert iou[0, 0] == 1 and iou[1, 0] == pytest.approx(20 / 25) and iou[0, 1] == 0
    assert P.nms(np.stack([a, b, c]), [0.5, 0.9, 0.1], iou=0.5) == [1, 2]
    assert P.nms(np.stack([a, b, c]), [0.5, 0.9, 0.1], iou=0.9) == [1, 0, 2]
    assert P.nms(np.zeros((0, 3, 3), bool), []) == []


def test_dedupe_drops_empty_and_near_duplicate_candidates_keeping_the_first():
    a = _box(20, 0, 10, 0, 10)
    b = a.copy()
    b[9, 9] = False
    cands = [P.Candidate(np.zeros((20, 20), bool), "x"), P.Candidate(a, "maskcut"), P.Candidate(b, "text"),
             P.Candidate(~a, "text")]
    out = P.dedupe(cands, iou=0.9)
    assert [c.source for c in out] == ["maskcut", "text"] and out[1].mask is cands[3].mask


def test_upsample_grid_and_windows():
    g = np.zeros((2, 2), bool)
    g[0, 1] = True
    up = P.upsample_grid(g, 8)
    assert up.shape == (8, 8) and up[:4, 4:].all() and up.sum() == 16
    with pytest.raises(ValueError, match="multiple"):
        P.upsample_grid(g, 7)
    wins = P.window_candidates(12)
    assert len(wins) == 1 + 4 + 9 and wins[0].mask.all()
    assert sum(int(w.mask.sum()) for w in wins[5:]) == 144  # 3x3 cells tile the image


def test_snap_to_superpixels_takes_covered_segments_only():
    seg = np.zeros((6, 6), int)
    seg[:, 3:] = 1
    seg[4:, :] = 2
    mask = np.zeros((6, 6), bool)
    mask[:4, :3] = True  # all of segment 0
    mask[0, 3] = True  # a sliver of segment 1
    out = P.snap_to_superpixels(mask, seg, min_cover=0.5)
    assert np.array_equal(out, seg == 0)
    assert np.array_equal(P.snap_to_superpixels(np.zeros((6, 6), bool) | (seg == 5), seg), seg == 5)


def test_superpixels_follow_colour_edges():
    img = Image.open(io.BytesIO(_png()))
    seg = P.superpixels(img, 64, n_segments=40)
    assert seg.shape == (64, 64)
    red = np.zeros((64, 64), bool)
    red[13:40, 8:30] = True  # the red block in the 64x64 frame (48 -> 64 rows)
    snapped = P.snap_to_superpixels(red & ~_box(64, 13, 18, 8, 30), seg, min_cover=0.5)
    assert (snapped & red).sum() / (snapped | red).sum() > 0.7


@pytest.fixture(scope="module")
def tiny():
    from worker.engine.engine import MaskInversionEngine
    from worker.text.labels import LabelScorer
    from worker.engine.models import load_clip

    clip = load_clip("maskinv-test-tiny", "none", device="cpu")
    return MaskInversionEngine(clip), LabelScorer(clip)


LABELS = ["red block", "blue block", "grey wall"]
TEMPLATES = ("a photo of a {}.",)


def test_gather_candidates_per_source_and_unknown_source(tiny):
    engine, scorer = tiny
    img = _png()
    keys, grid = P.image_keys(engine, img, 64)
    assert keys.shape[0] == grid * grid
    for src in ("maskcut", "keyseeds", "text", "window"):
        cands = P.gather_candidates(engine, scorer, img, LABELS, TEMPLATES, 64, (src,))
        assert cands and all(c.source == src and c.mask.shape == (64, 64) for c in cands)
    text = P.gather_candidates(engine, scorer, img, LABELS, TEMPLATES, 64, ("text",))
    assert all(c.hint in LABELS for c in text)
    with pytest.raises(ValueError, match="unknown proposal source"):
        P.gather_candidates(engine, scorer, img, LABELS, TEMPLATES, 64, ("dino",))
    with pytest.raises(ValueError, match="SAM checkpoint"):
        P.gather_candidates(engine, scorer, img, LABELS, TEMPLATES, 64, ("sam",))


def test_propose_returns_capped_thresholded_non_overlapping_proposals(tiny):
    engine, scorer = tiny
    res = P.propose(engine, scorer, _png(), LABELS, TEMPLATES, size=64, sources=("maskcut", "text", "window"),
                    steps=2, min_score=0.0, max_proposals=3, target_precision=0.0)  # a random model: keep any
    props = res.proposals
    assert 1 <= len(props) <= 3
    assert [p.rank for p in props] == sorted((p.rank for p in props), reverse=True)
    assert all(0.0 <= p.objectness <= 1.0 and 0.0 <= p.rank <= 1.0 for p in props)
    assert all(p.features is not None and p.features.shape == (len(P.obj.INTRINSIC),) for p in props)
    assert all(p.mask.shape == (64, 64) and p.label in LABELS and len(p.labels) == 3 for p in props)
    ious = P.mask_iou(np.stack([p.mask for p in props]), np.stack([p.mask for p in props]))
    assert (ious[~np.eye(len(props), dtype=bool)] <= P.NMS_IOU).all()
    assert set(res.candidates) == {"maskcut", "text", "window"} and res.timings["inverted"] >= len(props)
    high = P.propose(engine, scorer, _png(), LABELS, TEMPLATES, size=64, steps=2, min_score=0.99)
    assert all(p.score >= 0.99 for p in high.proposals)
    refined = P.propose(engine, scorer, _png(), LABELS, TEMPLATES, size=64, steps=2, min_score=0.0, refine=True,
                        target_precision=0.0)
    assert refined.proposals and refined.timings["refine_s"] > 0
    with pytest.raises(ValueError, match="max_proposals"):
        P.propose(engine, scorer, _png(), LABELS, TEMPLATES, size=64, max_proposals=0)


def test_sam_like_external_source_is_used(tiny):
    engine, scorer = tiny

    def fake_sam(img, size):
        return np.stack([_box(size, 0, 16, 0, 16), _box(size, 30, 60, 30, 60)])

    cands = P.gather_candidates(engine, scorer, _png(), LABELS, TEMPLATES, 64, ("sam",), sam=fake_sam)
    assert [c.source for c in cands] == ["sam", "sam"]


# ---------------------------------------------------------------------------------------------- the job
@pytest.fixture(scope="module")
def jobs():
    from worker.jobs import runtime
    from worker.jobs import propose as proposal_jobs

    mp = pytest.MonkeyPatch()
    for k, v in {"MASKINV_MODEL": "maskinv-test-tiny", "MASKINV_PRETRAINED": "none", "MASKINV_DEVICE": "cpu",
                 "MASKINV_MAX_PROPOSALS": "4", "MASKINV_PROPOSAL_PRECISION": "0"}.items():
        mp.setenv(k, v)
    mp.setattr("worker.jobs.runtime._runtime", None)
    yield proposal_jobs
    mp.undo()
    runtime._runtime = None


def _job(**proposals):
    return {"v": 1, "image": encode_image(_png()), "labels": LABELS,
            "params": InversionParams(size=64, steps=2, top_k=2).to_dict(), "proposals": proposals}


def test_propose_regions_job_returns_marked_proposals_within_the_cap(jobs):
    assert job_function("propose_regions") == "worker.jobs.propose.propose_regions"
    assert "worker.jobs.propose.propose_regions" in allowed_functions()
    out = jobs.propose_regions(_job(min_score=0.0, max_proposals=50, sources=["maskcut", "text", "window"]))
    res = JobResult.from_dict(out)
    assert res.kind == "propose_regions" and res.error is None
    assert 1 <= len(res.regions) <= 4  # MASKINV_MAX_PROPOSALS caps what a job asks for
    assert res.params["proposals"]["max_proposals"] == 4
    for k, r in enumerate(res.regions):
        assert r.id == f"proposal-{k}" and r.ok and len(r.labels) == 2
        assert r.meta["proposed"] is True and r.meta["source"] in ("maskcut", "text", "window")
        assert 0.0 <= r.meta["objectness"] <= 1.0 and 0.0 <= r.meta["score"] <= 1.0
        m = decode_mask(r.meta["mask"])
        assert m.shape == (64, 64) and m.any() and 0 < r.meta["area"] <= 1
        assert r.caption and r.caption_mode == "retrieval"


@pytest.mark.parametrize("bad, msg", [
    ({"sources": ["dino"]}, "proposals.sources"), ({"max_proposals": 0}, "max_proposals"),
    ({"min_score": 2}, "min_score"), ({"refine": "yes"}, "refine"), ({"foo": 1}, "unknown proposal option"),
    ({"sources": ["sam"]}, "MASKINV_SAM_CHECKPOINT"),
])
def test_propose_regions_job_rejects_bad_options_by_name(jobs, bad, msg):
    out = jobs.propose_regions(_job(**bad))
    assert msg in out["error"] and out["regions"] == [] and out["kind"] == "propose_regions"


def test_propose_regions_job_rejects_bad_labels_and_newer_protocol(jobs):
    assert "labels" in jobs.propose_regions({**_job(), "labels": []})["error"]
    assert "protocol version" in jobs.propose_regions({**_job(), "v": 99})["error"]


def test_proposal_settings_from_env_name_the_variable():
    from worker.settings import ProposalSettings

    s = ProposalSettings.from_env({"MASKINV_MAX_PROPOSALS": "7", "MASKINV_PROPOSAL_SOURCES": "maskcut",
                                   "MASKINV_PROPOSAL_REFINE": "1", "MASKINV_PROPOSAL_MIN_SCORE": "0.5",
                                   "MASKINV_PROPOSAL_PRECISION": "0.9"})
    assert (s.max_proposals, s.sources, s.refine, s.min_score, s.target_precision) == (
        7, ("maskcut",), True, 0.5, 0.9)
    assert ProposalSettings.from_env({}) == ProposalSettings()
    assert (ProposalSettings().max_proposals, ProposalSettings().target_precision) == (5, 0.8)
    for env, name in [({"MASKINV_MAX_PROPOSALS": "0"}, "MASKINV_MAX_PROPOSALS"),
                      ({"MASKINV_PROPOSAL_MIN_SCORE": "x"}, "MASKINV_PROPOSAL_MIN_SCORE"),
                      ({"MASKINV_PROPOSAL_PRECISION": "1.5"}, "MASKINV_PROPOSAL_PRECISION"),
                      ({"MASKINV_PROPOSAL_SOURCES": "maskcut,dino"}, "MASKINV_PROPOSAL_SOURCES"),
                      ({"MASKINV_PROPOSAL_REFINE": "maybe"}, "MASKINV_PROPOSAL_REFINE"),
                      ({"MASKINV_PROPOSAL_SOURCES": "sam"}, "MASKINV_SAM_CHECKPOINT")]:
        with pytest.raises(ValueError, match=name):
            ProposalSettings.from_env(env)


def test_objectness_and_ranking():
    obj = P.objectness(torch.tensor([0.0, 0.5, 1.0, 1.2]))
    assert np.allclose(obj, [1.0, 0.25, 0.0, 0.0])
    m = np.zeros((8, 8), bool)
    m[:4] = True
    a = P.Proposal(m, "maskcut", [("cat", 0.9)], torch.zeros(4), objectness=0.1)  # confident, poorly explained
    b = P.Proposal(m.copy(), "keyseeds", [("dog", 0.5)], torch.zeros(4), objectness=0.9)
    assert [p.label for p in P.select([a, b], min_score=0.2)] == ["dog"]  # NMS keeps the better-ranked one
    assert P.select([a, b], min_score=0.6) == []  # the threshold is on the probability: dog is below, cat lost NMS


def test_label_candidates_mix_the_masked_crop_like_drawn_regions(tiny):
    """crop_weight > 0: a candidate's embedding (and so its labels) is its LET mixed with its masked crop, exactly
    as ``worker.engine.embedding.mix_crop`` does for a drawn region."""
    from worker.engine.embedding import mix_crop

    engine, scorer = tiny
    img = _png()
    cands = [P.Candidate(_box(64, 0, 30, 0, 30), "window"), P.Candidate(_box(64, 20, 60, 10, 50), "window")]
    plain = P.label_candidates(engine, scorer, img, cands, LABELS, TEMPLATES, 64, steps=2)
    mixed = P.label_candidates(engine, scorer, img, cands, LABELS, TEMPLATES, 64, steps=2, crop_weight=0.5)
    crops = engine.crop_embeddings(img, [c.mask for c in cands], "masked_crop")[0].numpy()
    expect = mix_crop(np.stack([p.let.numpy() for p in plain]), crops, 0.5)
    np.testing.assert_allclose(np.stack([p.let.numpy() for p in mixed]), expect, rtol=1e-5, atol=1e-6)
    want = scorer.score(torch.from_numpy(expect), LABELS, TEMPLATES, top_k=3)
    for p, w in zip(mixed, want):
        assert [lab for lab, _ in p.labels] == [lab for lab, _ in w]
        np.testing.assert_allclose([s for _, s in p.labels], [s for _, s in w], rtol=1e-5)


def _props_on(size=16):
    """An object-like block, a near duplicate and a speck, with features saying which is which."""
    from worker.proposals import objectness as obj

    blocks = [_box(size, 0, 8, 0, 8), _box(size, 0, 8, 0, 7), _box(size, 14, 15, 14, 15)]
    props = []
    for k, (m, p, good) in enumerate(zip(blocks, (0.5, 0.9, 0.8), (1.0, 0.3, 0.0))):
        feats = np.zeros(len(obj.INTRINSIC))
        feats[obj.INTRINSIC.index("stability")] = good
        props.append(P.Proposal(m, "keyseeds", [(f"l{k}", p)], torch.zeros(4), features=feats))
    return props


def _stability_model(threshold=0.5, min_keep=0, prob_power=1.0):
    """Objectness = sigmoid(10 * (stability - 0.5)): a fitted model that reads one feature."""
    from worker.proposals import objectness as obj

    n = len(obj.FEATURES)
    coef = np.zeros(n)
    coef[obj.FEATURES.index("stability")] = 10.0
    return obj.ObjectnessModel(np.zeros(n), np.ones(n), coef, -5.0, threshold, 0.8, prob_power, min_keep=min_keep,
                               curve=((0.0, 0.3), (0.4, 0.8), (0.9, 0.95)))


def test_select_ranks_by_objectness_and_keeps_above_its_threshold():
    model = _stability_model()
    kept = P.select(_props_on(), min_score=0.0, model=model)
    assert [p.label for p in kept] == ["l0"]  # the duplicate loses NMS, the speck the threshold
    assert kept[0].objectness == pytest.approx(1 / (1 + np.exp(-5)))
    assert kept[0].rank == pytest.approx(0.5 * kept[0].objectness)
    assert [p.label for p in P.select(_props_on(), min_score=0.0, model=model, min_objectness=0.0)] == ["l0", "l2"]
    assert P.select(_props_on(), min_score=0.6, model=model) == []  # l0 is below the probability threshold
    # the target precision picks the threshold from the model's val curve
    assert [p.label for p in P.select(_props_on(), min_score=0.0, model=model, target_precision=0.3)] == ["l0", "l2"]
    assert [p.label for p in P.select(_props_on(), min_score=0.0, model=model, target_precision=0.95)] == ["l0"]
    # min_keep: the best-ranked proposal is kept whatever its objectness
    floor = _stability_model(threshold=0.999, min_keep=1)
    assert [p.label for p in P.select(_props_on(), min_score=0.0, model=floor)] == ["l0"]
    assert P.select(_props_on(), min_score=0.0, model=_stability_model(threshold=0.999)) == []

