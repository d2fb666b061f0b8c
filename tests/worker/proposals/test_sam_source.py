"""The SAM proposal source's plumbing on a tiny random-initialised SamConfig (no SAM weights here)."""

import numpy as np
import pytest
from PIL import Image

from refine_support import save_tiny_sam

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_sam(tmp_path_factory):
    return save_tiny_sam(tmp_path_factory.mktemp("tiny-sam"))


def test_sam_source_gives_masks_in_the_model_frame(tiny_sam):
    from worker.proposals.sam_source import SamSource

    src = SamSource.from_pretrained(tiny_sam, points_per_side=3, min_iou=-1e9)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    masks = src(img, 32)
    assert masks.dtype == bool and masks.shape[1:] == (32, 32) and masks.shape[0] <= 9
    assert src.grid_points(64, 48)[0] == [64 / 6, 8.0]
    strict = SamSource.from_pretrained(tiny_sam, points_per_side=2, min_iou=1e9)
    assert strict(img, 32).shape == (0, 32, 32)


def test_sam_source_feeds_the_proposal_pipeline(tiny_sam):
    from worker.proposals import pipeline as P
    from worker.engine.engine import MaskInversionEngine
    from worker.text.labels import LabelScorer
    from worker.engine.models import load_clip
    from worker.proposals.sam_source import SamSource

    clip = load_clip("maskinv-test-tiny", "none", device="cpu")
    src = SamSource.from_pretrained(tiny_sam, points_per_side=2, min_iou=-1e9)
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    res = P.propose(MaskInversionEngine(clip), LabelScorer(clip), img, ["a", "b"], ("a {}",), size=32,
                    sources=("sam",), steps=1, min_score=0.0, sam=src)
    assert all(p.source == "sam" for p in res.proposals)
    assert res.candidates.get("sam", 0) >= len(res.proposals)
