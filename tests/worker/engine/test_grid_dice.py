"""The grid Dice loss equals the Dice loss of the upsampled, min-max normalised map, value and gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from worker.engine.grid_dice import GridDice, bilinear_matrix
from worker.engine.inversion import soft_dice_loss
from worker.engine.legrad import relevance_to_map


@pytest.mark.parametrize("grid,patch", [(7, 16), (14, 16), (28, 16), (5, 3), (1, 4)])
def test_equals_the_dice_of_the_upsampled_map_value_and_gradient(grid, patch):
    gen = torch.Generator().manual_seed(grid * 100 + patch)
    size = grid * patch
    rel = torch.rand(5, grid * grid, dtype=torch.float64, generator=gen).requires_grad_(True)
    masks = (torch.rand(5, size, size, dtype=torch.float64, generator=gen) > 0.6).double()
    masks[0] = 0.0  # an empty target
    ref = soft_dice_loss(relevance_to_map(rel, grid, patch), masks)
    got = GridDice(masks, grid, patch)(rel)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    if grid == 1:  # a constant map: no gradient worth comparing (the reference divides by 1e-12)
        return
    g_ref, = torch.autograd.grad(ref.sum(), rel)
    rel2 = rel.detach().clone().requires_grad_(True)
    g_got, = torch.autograd.grad(GridDice(masks, grid, patch)(rel2).sum(), rel2)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-10, atol=1e-12)


def test_bilinear_matrix_and_its_extreme_rows():
    grid, patch = 6, 16
    u, ext = bilinear_matrix(grid, patch, torch.float64)
    e = torch.rand(3, grid, grid, dtype=torch.float64)
    up = F.interpolate(e[:, None], scale_factor=patch, mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(u @ e @ u.T, up, rtol=1e-12, atol=1e-12)
    assert len(ext) <= 2 * grid
    sub = u[ext] @ e @ u[ext].T
    torch.testing.assert_close(sub.amax(dim=(1, 2)), up.amax(dim=(1, 2)), rtol=0, atol=1e-12)
    torch.testing.assert_close(sub.amin(dim=(1, 2)), up.amin(dim=(1, 2)), rtol=0, atol=1e-12)


def test_a_masks_loss_does_not_depend_on_its_batch():
    grid, patch = 4, 16
    gen = torch.Generator().manual_seed(0)
    rel = torch.rand(7, grid * grid, generator=gen)
    masks = (torch.rand(7, grid * patch, grid * patch, generator=gen) > 0.5).float()
    batch = GridDice(masks, grid, patch)(rel)
    alone = torch.cat([GridDice(masks[i:i + 1], grid, patch)(rel[i:i + 1]) for i in range(7)])
    assert torch.equal(batch, alone)


def test_targets_must_match_the_grid():
    with pytest.raises(ValueError, match=r"targets must be \[N, 64, 64\]"):
        GridDice(torch.zeros(2, 60, 60), 4, 16)
