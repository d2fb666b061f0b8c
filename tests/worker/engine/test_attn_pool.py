"""The attention-pooled map (worker/engine/attn_pool.py) on a tiny SigLIP-shaped tower: the decomposition against
plain autograd, its gradient (float64 gradcheck), one map per mask whatever the batch, and the engine's path."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from worker.engine import attn_pool, vit
from worker.engine.engine import MaskInversionEngine
from worker.engine.grid_dice import GridDice
from worker.engine.inversion import soft_dice_loss
from worker.engine.models import clip_from_model


class TinyPooledTower(nn.Module):
    """A SigLIP-shaped open_clip timm tower: a 2-block timm ViT (no class token) with an attention pool, no head."""

    def __init__(self, size: int = 32, patch: int = 8):
        super().__init__()
        self.trunk = timm.create_model("vit_base_patch16_siglip_224", pretrained=False, img_size=size,
                                       patch_size=patch, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0,
                                       num_classes=0)
        self.head = nn.Sequential()
        self.image_size = (size, size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(pixels))


class TinyPooledClip(nn.Module):
    def __init__(self):
        super().__init__()
        self.visual = TinyPooledTower()


@pytest.fixture(scope="module")
def tower() -> TinyPooledTower:
    torch.manual_seed(0)
    return TinyPooledTower().eval().requires_grad_(False)


def _state(tower, dtype=torch.float32, size=32, empty=None):
    tower = tower.to(dtype)
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=dtype)
    pos = attn_pool.PosEmbedCache(tower).get(size)
    return attn_pool.build_image_state(tower, pixels, pos, empty, "blas"), pixels, pos


def test_global_embedding_is_the_models(tower):
    state, pixels, _ = _state(tower)
    torch.testing.assert_close(state.global_embedding, tower(pixels)[0])
    assert vit.check_supported(tower) is None


@pytest.mark.parametrize("size", [32, 48])
def test_decomposed_map_equals_autograd(tower, size):
    empty = torch.randn(32, generator=torch.Generator().manual_seed(2))
    state, pixels, pos = _state(tower, size=size, empty=F.normalize(empty, dim=0))
    assert state.keep.sum() < state.n_tokens  # the correction zeroes some cells
    emb = torch.randn(5, 32, generator=torch.Generator().manual_seed(3))
    ours = attn_pool.decomposed_relevance(tower, state, emb)
    ref = attn_pool.autograd_relevance(tower, pixels, pos, emb, state.keep)
    assert ours.shape == (5, (size // 8) ** 2)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(attn_pool.relevance_to_map(ours, state.grid, 8),
                               attn_pool.relevance_to_map(ref, state.grid, 8), atol=1e-5, rtol=1e-5)


def test_decomposed_map_gradient_float64(tower):
    tower64 = TinyPooledTower().eval().requires_grad_(False)
    tower64.load_state_dict(tower.state_dict())
    state, pixels, pos = _state(tower64, torch.float64)
    emb = torch.randn(3, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda e: attn_pool.decomposed_relevance(tower64, state, e), (emb,))
    # and its gradient is autograd's (first order here, second order through the pool there)
    weights = torch.rand(3, state.n_tokens, dtype=torch.float64)
    g_ours, = torch.autograd.grad((attn_pool.decomposed_relevance(tower64, state, emb) * weights).sum(), emb)
    g_ref, = torch.autograd.grad((attn_pool.autograd_relevance(tower64, pixels, pos, emb) * weights).sum(), emb)
    torch.testing.assert_close(g_ours, g_ref)


def test_one_map_per_mask_whatever_the_batch(tower):
    state, _, _ = _state(tower)
    emb = torch.randn(4, 32, generator=torch.Generator().manual_seed(5))
    together = attn_pool.decomposed_relevance(tower, state, emb)
    alone = torch.cat([attn_pool.decomposed_relevance(tower, state, e[None]) for e in emb])
    torch.testing.assert_close(together, alone)
    assert not torch.allclose(together[0], together[1])


def test_grid_dice_equals_the_dice_of_the_map(tower):
    state, _, _ = _state(tower)
    rel = attn_pool.decomposed_relevance(tower, state, torch.randn(3, 32))
    targets = (torch.rand(3, 32, 32) > 0.5).float()
    want = soft_dice_loss(attn_pool.relevance_to_map(rel, state.grid, 8), targets)
    torch.testing.assert_close(GridDice(targets, state.grid, 8, extremes="grid")(rel), want)


def test_tower_problems_are_named(tower):
    assert attn_pool.tower_problem(tower) is None
    with_qk_norm = TinyPooledTower()
    with_qk_norm.trunk.attn_pool.q_norm = nn.LayerNorm(8)
    with pytest.raises(NotImplementedError, match="qk-norm"):
        vit.check_supported(with_qk_norm)


@pytest.fixture(scope="module")
def engine(tower) -> MaskInversionEngine:
    model = TinyPooledClip()
    model.visual.load_state_dict(tower.state_dict())
    clip = clip_from_model(model, "tiny-pooled", None, "tiny-pooled/random-seed0")
    return MaskInversionEngine(clip, empty_prompt_embedding=torch.randn(32, generator=torch.Generator().manual_seed(2)))


def _masks(n: int) -> np.ndarray:
    rng = np.random.default_rng(6)
    masks = np.zeros((n, 40, 50), bool)
    for i in range(n):
        y, x = rng.integers(0, 20), rng.integers(0, 25)
        masks[i, y:y + 15, x:x + 20] = True
    return masks


def test_engine_batching_does_not_change_a_masks_let(engine):
    image = Image.fromarray(np.random.default_rng(7).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    masks = _masks(4)
    together = engine.invert(image, masks, size=32, steps=5)
    alone = torch.cat([engine.invert(image, masks[i:i + 1], size=32, steps=5).lets for i in range(4)])
    torch.testing.assert_close(together.lets, alone)
    assert F.cosine_similarity(together.lets[0], together.lets[1], dim=0) < 0.9999
    assert (together.losses[-1] < together.losses[0]).all()


def test_engine_autograd_method_agrees(engine):
    image = Image.fromarray(np.random.default_rng(8).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    masks = _masks(2)
    fast = engine.invert(image, masks, size=32, steps=4)
    ref = engine.invert(image, masks, size=32, steps=4, method="autograd")
    assert F.cosine_similarity(fast.lets, ref.lets).min() > 0.9999


def test_engine_explain_and_embed(engine):
    image = Image.fromarray(np.random.default_rng(9).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    maps = engine.explain(image, torch.randn(3, 32), size=32)
    assert maps.shape == (3, 32, 32) and maps.min() >= 0 and maps.max() <= 1
    state, *_ = engine.image_state(image, 32)
    torch.testing.assert_close(engine.embed_images([image], size=32)[0], state.global_embedding)


def test_patch_keys_of_a_pooled_tower(engine, tower):
    """The keys MaskCut and the key-seed proposals cut: the last block's qkv keys on the tokens entering it."""
    image = Image.fromarray(np.random.default_rng(9).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    keys, grid = engine.patch_keys(image, 32)
    assert keys.shape == (16, 32) and grid == 4
    last = tower.trunk.blocks[-1]
    pixels = engine._pixels(image, 32)
    tokens = tower.trunk.patch_embed.proj(pixels).flatten(2).transpose(1, 2) + engine.pos.get(32)
    tokens = tower.trunk.blocks[0](tokens)
    torch.testing.assert_close(keys, last.attn.qkv(last.norm1(tokens))[0, :, 32:64])
