"""worker.engine.inversion: the soft Dice loss, the regularised loss and the AdamW loop, on hand-checkable cases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from worker.engine.inversion import inversion_loss, optimise_lets, soft_dice_loss

S, D = 6, 8


def _masks() -> torch.Tensor:
    m = torch.zeros(2, S, S)
    m[0, :3] = 1.0  # top half: 18 pixels
    m[1, :, :2] = 1.0  # left third: 12 pixels
    return m


def _map_fn(weight: torch.Tensor):
    """A differentiable stand-in for the LeGrad map: ``sigmoid(LET @ W)`` reshaped to ``[N, S, S]``."""
    return lambda lets: torch.sigmoid(lets @ weight).view(-1, S, S)


def test_soft_dice_hand_computed_values():
    masks = _masks()
    assert torch.allclose(soft_dice_loss(masks, masks), torch.zeros(2))  # a perfect map
    disjoint = 1.0 - masks
    # no overlap: 1 - smooth / (|map| + |mask| + smooth)
    expected = torch.tensor([1 - 1 / (18 + 18 + 1), 1 - 1 / (24 + 12 + 1)])
    assert torch.allclose(soft_dice_loss(disjoint, masks), expected)
    half = torch.full((2, S, S), 0.5)
    expected = torch.tensor([1 - (2 * 9 + 1) / (18 + 18 + 1), 1 - (2 * 6 + 1) / (18 + 12 + 1)])
    assert torch.allclose(soft_dice_loss(half, masks), expected)
    assert torch.allclose(soft_dice_loss(half, masks, smooth=0.0), 1 - 2 * torch.tensor([9 / 36, 6 / 30]))


def test_inversion_loss_adds_alpha_times_cosine_distance():
    masks, maps = _masks(), torch.rand(2, S, S, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    lets, glob = torch.randn(2, D, generator=g), torch.randn(D, generator=g)
    dice = soft_dice_loss(maps, masks)
    assert torch.equal(inversion_loss(maps, masks, lets, glob, 0.0), dice)
    cos = F.cosine_similarity(lets, glob[None], dim=-1)
    torch.testing.assert_close(inversion_loss(maps, masks, lets, glob, 2.5), dice + 2.5 * (1 - cos))
    assert torch.allclose(inversion_loss(maps, masks, glob[None].repeat(2, 1), glob, 7.0), dice, atol=1e-6)


def test_zero_steps_return_the_global_embedding_and_its_loss():
    weight = torch.randn(D, S * S, generator=torch.Generator().manual_seed(2))
    glob = torch.randn(D, generator=torch.Generator().manual_seed(3))
    lets, history = optimise_lets(_map_fn(weight), glob, _masks(), steps=0)
    assert torch.equal(lets, glob[None].repeat(2, 1)) and history.shape == (1, 2)
    torch.testing.assert_close(history[0], soft_dice_loss(_map_fn(weight)(lets), _masks()))


def test_first_step_is_adamw_sign_step_and_the_loss_falls():
    """AdamW's first update is lr * g / (|g| + eps) per coordinate: a signed step of size lr."""
    weight = torch.randn(D, S * S, generator=torch.Generator().manual_seed(4))
    glob = torch.randn(D, generator=torch.Generator().manual_seed(5))
    masks = _masks()
    lets0 = glob[None].repeat(2, 1).requires_grad_(True)
    soft_dice_loss(_map_fn(weight)(lets0), masks).sum().backward()
    lets1, history1 = optimise_lets(_map_fn(weight), glob, masks, steps=1, lr=0.05)
    torch.testing.assert_close(lets1 - glob[None], -0.05 * torch.sign(lets0.grad), atol=1e-5, rtol=0)
    lets, history = optimise_lets(_map_fn(weight), glob, masks, steps=30, lr=0.1)
    assert history.shape == (31, 2) and torch.isfinite(history).all()
    assert (history[-1] < history[0]).all()
    torch.testing.assert_close(history[-1], soft_dice_loss(_map_fn(weight)(lets), masks))
    assert not lets.requires_grad


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_each_mask_is_optimised_independently(alpha):
    weight = torch.randn(D, S * S, generator=torch.Generator().manual_seed(6))
    glob = torch.randn(D, generator=torch.Generator().manual_seed(7))
    masks = _masks()
    both, hist = optimise_lets(_map_fn(weight), glob, masks, steps=5, alpha=alpha)
    for k in range(2):
        alone, hist_k = optimise_lets(_map_fn(weight), glob, masks[k:k + 1], steps=5, alpha=alpha)
        torch.testing.assert_close(both[k:k + 1], alone, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(hist[:, k:k + 1], hist_k, atol=1e-6, rtol=1e-5)


def test_alpha_keeps_the_lets_closer_to_the_global_embedding():
    weight = torch.randn(D, S * S, generator=torch.Generator().manual_seed(8))
    glob = torch.randn(D, generator=torch.Generator().manual_seed(9))
    free, _ = optimise_lets(_map_fn(weight), glob, _masks(), steps=20, alpha=0.0)
    held, _ = optimise_lets(_map_fn(weight), glob, _masks(), steps=20, alpha=50.0)
    cos = lambda x: F.cosine_similarity(x, glob[None], dim=-1)  # noqa: E731
    assert (cos(held) > cos(free)).all()


def test_an_inversion_past_its_job_time_limit_stops_between_steps(monkeypatch):
    """Embedded jobs run under MASKINV_JOB_TIMEOUT: the optimisation loop checks the job's limit before each step,
    so a label job past it stops (clock made to jump on purpose, no wall-clock dependence)."""
    from worker.protocol import deadline

    now = [0.0]
    monkeypatch.setattr(deadline, "clock", lambda: now[0])
    calls = []

    def dice(e):
        calls.append(1)
        now[0] += 10.0  # each step "takes" 10 s
        return (e ** 2).sum(dim=1)

    g = torch.nn.functional.normalize(torch.randn(8), dim=0)
    with deadline.time_limit(25.0, "MASKINV_JOB_TIMEOUT"):
        with pytest.raises(deadline.JobTimeout, match="MASKINV_JOB_TIMEOUT=25s"):
            optimise_lets(None, g, torch.zeros(2, 4, 4), steps=10, dice_fn=dice)
    assert len(calls) == 3
