"""worker.refine.sam: box and click prompts through a tiny random SamConfig (plumbing only, no SAM weights)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from worker.protocol import RegionPrompt
from worker.refine.sam import SamRefiner


def test_sam_refiner_answers_a_mask_at_image_resolution(tiny_sam):
    sam = SamRefiner.from_pretrained(tiny_sam)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    for prompt in (RegionPrompt(box=(5, 5, 30, 40)), RegionPrompt(points=((10, 10), (20, 20)))):
        mask, score = sam(img, prompt)
        assert mask.shape == (48, 64) and mask.dtype == bool and isinstance(score, float)
