"""What bounds a proposal job's cost: the grid it runs on (whatever the job asks), the candidates that reach
de-duplication, and its time limit (a deadline checked between its steps)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from worker.proposals import maskcut
from worker.proposals import pipeline as P
from worker.protocol import deadline
from worker.protocol import InversionParams, encode_image

LABELS = ["red block", "blue block", "grey wall"]
TEMPLATES = ("a photo of a {}.",)


def _png(w: int = 64, h: int = 48) -> bytes:
    """A grey image ``[h, w, 3]`` with a red and a blue block."""
    arr = np.full((h, w, 3), 120, np.uint8)
    arr[10:30, 8:30] = (230, 20, 20)
    arr[20:44, 40:60] = (20, 20, 230)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny():
    from worker.engine.engine import MaskInversionEngine
    from worker.text.labels import LabelScorer
    from worker.engine.models import load_clip

    clip = load_clip("maskinv-test-tiny", "none", device="cpu")
    return MaskInversionEngine(clip), LabelScorer(clip)


class FakeClock:
    """A clock that moves only when told to (``advance``), so that a slow step is slow on purpose."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# ---------------------------------------------------------------------------------------------- grid size
@pytest.mark.parametrize("asked, ran", [(512, 448), (128, 128)])
def test_a_job_asking_for_a_large_input_runs_on_the_bounded_grid(tiny_runtime, monkeypatch, asked, ran):
    """A queue job's payload can be forged: the worker computes proposals at most at MAX_PROPOSAL_SIZE whatever
    ``params.size`` says (smaller sizes are kept), and says which size it used."""
    from worker.jobs import propose as proposal_jobs

    seen = []

    def fake_propose(engine, scorer, image, labels, templates, size=448, **kw):
        seen.append(size)
        return P.ProposalResult([], size, "0" * 64)

    monkeypatch.setattr(P, "propose", fake_propose)
    job = {"v": 1, "image": encode_image(_png()), "labels": LABELS,
           "params": InversionParams(size=asked, steps=1, caption=False).to_dict()}
    out = proposal_jobs.propose_regions(job)
    assert out.get("error") is None, out
    assert seen == [ran] and out["params"]["size"] == ran


def test_proposal_size_is_a_multiple_of_the_patch_when_capped():
    assert P.proposal_size(1024, 16) == 448
    assert P.proposal_size(1024, 14, cap=100) == 98
    assert P.proposal_size(1024, 16, cap=8) == 16  # never below one patch
    assert P.proposal_size(96, 16) == 96  # within the cap: as asked (a bad size is the engine's error, as always)


# ---------------------------------------------------------------------------------------------- candidates
def test_candidates_are_capped_before_de_duplication_keeping_every_source(tiny, monkeypatch):
    """A source that yields thousands of masks (here a SAM-like one) cannot make de-duplication's pairwise IoU
    ([N, S²] per side) unbounded; the cap takes the sources in turn, so the small sources keep their candidates."""
    engine, scorer = tiny
    many = P.MAX_RAW_CANDIDATES + 40
    rng = np.random.default_rng(0)

    def flood(img, size):
        return rng.random((many, size, size)) < 0.5

    seen: list[list[str]] = []
    real_dedupe = P.dedupe
    monkeypatch.setattr(P, "dedupe", lambda cands, *a, **k: seen.append([c.source for c in cands])
                        or real_dedupe(cands, *a, **k))
    monkeypatch.setattr(P, "label_candidates", lambda *a, **k: [])
    res = P.propose(engine, scorer, _png(), LABELS, TEMPLATES, size=64, sources=("maskcut", "sam"), steps=1,
                    sam=flood)
    (sources,) = seen
    assert len(sources) == P.MAX_RAW_CANDIDATES
    assert sources.count("maskcut") == res.candidates["maskcut"] >= 1  # all of the small source's candidates
    assert res.candidates["sam"] == many  # counted before the cap


def test_capping_keeps_the_sources_order_and_everything_under_the_cap():
    def cand(src: str, k: int) -> P.Candidate:
        m = np.zeros((4, 4), bool)
        m.flat[k] = True
        return P.Candidate(m, src)

    cands = [cand("a", 0), cand("a", 1), cand("a", 2), cand("b", 3), cand("c", 4), cand("c", 5)]
    assert P.cap_candidates(cands, 10) == cands
    kept = P.cap_candidates(cands, 4)
    assert kept == [cands[0], cands[1], cands[3], cands[4]]  # a, b, c, then a again; in their original order


# ---------------------------------------------------------------------------------------------- time limit
def test_a_job_over_its_time_limit_stops_at_the_next_step(tiny, monkeypatch):
    """Within ``time_limit``, a step that runs past the limit (made slow on purpose with a fake clock) stops the
    pipeline at the next check: nothing is inverted, and the error names the limit."""
    engine, scorer = tiny
    clock = FakeClock()
    monkeypatch.setattr(deadline, "clock", clock)
    real = P.maskcut_candidates

    def slow_maskcut(*a, **k):
        clock.advance(5.0)
        return real(*a, **k)

    inverted = []
    monkeypatch.setattr(P, "maskcut_candidates", slow_maskcut)
    monkeypatch.setattr(P, "label_candidates", lambda *a, **k: inverted.append(1) or [])
    with deadline.time_limit(2.0, "MASKINV_JOB_TIMEOUT"):
        with pytest.raises(deadline.JobTimeout, match=r"MASKINV_JOB_TIMEOUT=2s") as err:
            P.propose(engine, scorer, _png(), LABELS, TEMPLATES, size=64, sources=("maskcut", "text"), steps=1)
    assert inverted == [] and err.value.time_limit_s == 2.0
    deadline.check_time("anything")  # outside the block: no limit
    monkeypatch.setattr(P, "maskcut_candidates", real)
    with deadline.time_limit(2.0):  # within the limit, the same pipeline runs to its end
        res = P.propose(engine, scorer, _png(), LABELS, TEMPLATES, size=64, sources=("maskcut",), steps=1)
    assert inverted == [1] and res.candidates["maskcut"] >= 1


def test_maskcut_checks_between_its_rounds():
    rng = np.random.default_rng(0)
    import torch

    keys = torch.from_numpy(rng.normal(size=(36, 8)))
    calls = []
    cuts = maskcut.maskcut(keys, (6, 6), n_cuts=3, check=lambda: calls.append(1))
    assert len(calls) == len(cuts) >= 1

    def stop():
        raise deadline.JobTimeout("stop", 1.0)

    with pytest.raises(deadline.JobTimeout):
        maskcut.maskcut(keys, (6, 6), n_cuts=3, check=stop)
