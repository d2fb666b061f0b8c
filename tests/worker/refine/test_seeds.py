"""worker.refine.seeds: grid geometry, the box-fit score, and seed masks from a tiny model's keys."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from refine_support import disc_scene
from worker.protocol import RegionPrompt, box_mask
from worker.refine.seeds import box_cells, box_fit, cell_of, grid_to_image, is_background, seed_mask


def test_grid_geometry():
    assert cell_of(0, 0, (50, 60), 4) == 0 and cell_of(59, 49, (50, 60), 4) == 15
    assert cell_of(1e6, -5, (50, 60), 4) == 3  # clipped to the grid
    assert box_cells((0, 0, 30, 25), (50, 60), 4) == [0, 1, 4, 5]
    assert box_cells((1, 1, 2, 2), (50, 60), 4) == [0]  # no centre inside: the centre's cell
    g = np.zeros((2, 2), bool)
    g[0, 1] = True
    up = grid_to_image(g, (4, 6))
    assert up.shape == (4, 6) and up[:2, 3:].all() and up.sum() == 6


def test_box_fit_prefers_the_region_filling_the_box_and_staying_in_it():
    box = box_mask((10, 10, 30, 30), (40, 40))
    obj = np.zeros((40, 40), bool)
    obj[10:30, 12:28] = True
    leak = np.zeros((40, 40), bool)
    leak[:, :] = True
    small = np.zeros((40, 40), bool)
    small[15:18, 15:18] = True
    assert box_fit(obj, box) > box_fit(leak, box) and box_fit(obj, box) > box_fit(small, box)
    assert box_fit(np.zeros((40, 40), bool), box) == 0.0
    corners = np.zeros((4, 4), bool)
    corners[0, :] = True
    centre = np.zeros((4, 4), bool)
    centre[1:3, 1:3] = True
    assert is_background(corners) and not is_background(centre) and is_background(~centre)


@pytest.fixture(scope="module")
def engine():
    from worker.engine.engine import MaskInversionEngine
    from worker.engine.models import load_clip

    return MaskInversionEngine(load_clip("maskinv-test-tiny", "none", device="cpu"))


def test_seed_masks_stay_in_the_box_and_cover_clicks(engine):
    img, _ = disc_scene()
    pil = Image.fromarray(img)
    box = (12, 8, 38, 32)
    m = seed_mask(engine, pil, RegionPrompt(box=box), 32)
    assert m.shape == (50, 60) and m.dtype == bool
    assert not (m & ~box_mask(box, (50, 60))).any()
    clicks = seed_mask(engine, pil, RegionPrompt(points=((25.0, 20.0),)), 32)
    assert clicks.shape == (50, 60)
    assert not seed_mask(engine, pil, RegionPrompt(box=(100, 100, 120, 120)), 32).any()
