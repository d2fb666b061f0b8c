"""MaskCut on synthetic key structures (no model, no gradients)."""

import numpy as np
import pytest
import torch

from worker.proposals import maskcut


def _keys(labels: np.ndarray, dim: int = 16, noise: float = 0.05, seed: int = 0) -> torch.Tensor:
    """One key per patch: the basis direction of its label plus noise -> [g*g, dim]."""
    rng = np.random.default_rng(seed)
    k = np.eye(dim)[labels.reshape(-1)] + noise * rng.standard_normal((labels.size, dim))
    return torch.from_numpy(k)


def test_affinity_is_binary_with_eps_and_masked_rows_keep_eps_only():
    keys = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.0, 0.0]])
    w = maskcut.key_affinity(keys, tau=0.15, eps=1e-5)
    assert w.shape == (4, 4)
    assert w[0, 1] == 1 and w[0, 2] == pytest.approx(1e-5) and w[2, 2] == 1
    assert torch.allclose(w[3], torch.full((4,), 1e-5, dtype=w.dtype))


def test_ncut_vector_solves_the_generalised_problem():
    rng = np.random.default_rng(1)
    a = torch.from_numpy(rng.random((12, 12)))
    w = (a + a.T) / 2 + 0.1
    y = maskcut.ncut_vector(w)
    d = torch.diag(w.sum(1))
    lhs, rhs = (d - w) @ y, d @ y
    lam = float(lhs @ y / (rhs @ y))
    assert torch.allclose(lhs, lam * rhs, atol=1e-8)
    assert abs(float(y @ d @ torch.ones(12, dtype=y.dtype))) < 1e-8  # D-orthogonal to the constant vector


def test_one_object_is_cut_out():
    lab = np.zeros((8, 8), int)
    lab[2:5, 3:6] = 1
    cuts = maskcut.maskcut(_keys(lab), (8, 8), n_cuts=1)
    assert len(cuts) == 1
    assert np.array_equal(cuts[0].mask, lab == 1)


def test_background_side_is_flipped_when_it_holds_corners():
    # the object is larger than the background, so the eigenvector's largest entry may sit on the background;
    # whatever the sign, the kept side must not be the one covering the corners
    lab = np.ones((6, 6), int)
    lab[:, 0] = 0
    lab[0, :] = 0
    lab[:, -1] = 0
    lab[-1, :] = 0
    cuts = maskcut.maskcut(_keys(lab, seed=3), (6, 6), n_cuts=1)
    assert maskcut.corners_covered(cuts[0].mask) < 2
    assert np.array_equal(cuts[0].mask, lab == 1)


def test_three_objects_are_found_in_three_rounds_and_never_twice():
    lab = np.zeros((10, 10), int)
    lab[1:3, 1:3] = 1
    lab[6:9, 2:4] = 2
    lab[3:6, 6:9] = 3
    cuts = maskcut.maskcut(_keys(lab, seed=2), (10, 10), n_cuts=3)
    found = [c.mask for c in cuts]
    assert len(found) == 3
    for obj in (1, 2, 3):
        assert any(np.array_equal(m, lab == obj) for m in found), obj
    total = np.sum(found, axis=0)
    assert total.max() == 1  # masked-out patches are never found again


def test_seed_keeps_its_own_component_and_components_are_listed():
    lab = np.zeros((8, 8), int)
    lab[1:3, 1:3] = 1  # two separate blobs with the same key direction
    lab[5:8, 5:8] = 1
    cut = maskcut.maskcut(_keys(lab), (8, 8), n_cuts=1)[0]
    sy, sx = divmod(cut.seed, 8)
    assert cut.mask[sy, sx]
    assert len(cut.components) == 2
    assert np.array_equal(cut.foreground, lab == 1)
    assert int(cut.components[0].sum()) == 9


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="grid"):
        maskcut.maskcut(torch.zeros(10, 4), (3, 3))
    with pytest.raises(ValueError, match="n, d"):
        maskcut.key_affinity(torch.zeros(2, 3, 4))


def test_last_block_keys_match_the_attention_keys():
    from worker.engine import vit
    from worker.engine.models import load_clip

    clip = load_clip("maskinv-scene-tiny", "random")
    visual = clip.visual
    pix = torch.randn(2, 3, 112, 112)
    pos = vit.PosEmbedCache(visual).get(112)
    x = vit.trunk_forward(visual, pix, pos)
    keys = vit.last_block_keys(visual, x)
    block = visual.transformer.resblocks[-1]
    d = x.shape[-1]
    qkv = torch.nn.functional.linear(block.ln_1(x), block.attn.in_proj_weight, block.attn.in_proj_bias)
    assert keys.shape == (2, 49, d)
    assert torch.allclose(keys, qkv[:, 1:, d:2 * d])


def test_affinity_seeds_recover_every_object_and_rank_stable_regions_first():
    lab = np.zeros((10, 10), int)
    lab[1:3, 1:3] = 1
    lab[6:9, 2:4] = 2
    lab[3:6, 6:9] = 3
    seeds = maskcut.affinity_seeds(_keys(lab, seed=4), (10, 10))
    masks = [m for m, _ in seeds]
    for obj in range(4):
        assert any(np.array_equal(m, lab == obj) for m in masks), obj
    counts = [c for _, c in seeds]
    assert counts == sorted(counts, reverse=True)
    assert np.array_equal(masks[0], lab == 0)  # the background: most seeds land on it
    assert sum(counts) == 100 * len(maskcut.SEED_TAUS)


def test_affinity_seeds_subsample_large_grids():
    lab = np.zeros((28, 28), int)
    lab[5:15, 5:15] = 1
    seeds = maskcut.affinity_seeds(_keys(lab, dim=4), (28, 28), taus=(0.5,))
    assert sum(c for _, c in seeds) == 14 * 14
    assert any(np.array_equal(m, lab == 1) for m, _ in seeds)
