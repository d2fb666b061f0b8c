"""Attention-pooled towers beyond SigLIP (worker/engine/attn_pool.py): a tiny PE-Core-shaped tower (timm Eva trunk,
class token, rotary position embeddings, a projection after the pool) against the trunk's own forward at its size
and at another, the decomposed map against autograd and its float64 gradcheck, one LET per mask whatever the batch,
the patch keys; every attention-pooled open_clip config (built on the meta device) is accepted; and the real
loading path of PE-Core-T-16-384 with random weights and its own (offline) tokenizer."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from open_clip.model import _build_vision_tower
from PIL import Image

from worker.engine import attn_pool, vit
from worker.engine.engine import MaskInversionEngine
from worker.engine.models import clip_from_model, load_clip

EMBED = 24  # D: the projection after the pool, 32 -> 24


class TinyPeTower(nn.Module):
    """A PE-Core-shaped open_clip timm tower: a 2-block Eva trunk with a class token, absolute and rotary position
    embeddings, an attention pool and a linear head 32 -> 24; open_clip's own head empty."""

    def __init__(self, size: int = 32, patch: int = 8, **extra):
        super().__init__()
        self.trunk = timm.create_model("vit_pe_core_tiny_patch16_384", pretrained=False, img_size=size,
                                       patch_size=patch, embed_dim=32, depth=2, num_heads=4, attn_pool_num_heads=4,
                                       num_classes=EMBED, ref_feat_shape=(size // patch, size // patch), **extra)
        self.head = nn.Sequential()
        self.image_size = (size, size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(pixels))


class TinyPeClip(nn.Module):
    def __init__(self):
        super().__init__()
        self.visual = TinyPeTower()


@pytest.fixture(scope="module")
def tower() -> TinyPeTower:
    torch.manual_seed(0)
    return TinyPeTower().eval().requires_grad_(False)


def _pixels(size: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=dtype)


def _empty() -> torch.Tensor:
    return F.normalize(torch.randn(EMBED, generator=torch.Generator().manual_seed(2)), dim=0)


@pytest.mark.parametrize("size", [32, 48])
def test_embedding_is_the_trunks_own_at_any_size(tower, size):
    """At another size the position embeddings are rebuilt as timm's dynamic-size trunk does."""
    dynamic = TinyPeTower(dynamic_img_size=True).eval()
    dynamic.load_state_dict(tower.state_dict())
    pixels = _pixels(size)
    ours = attn_pool.embed(tower, pixels, attn_pool.PosEmbedCache(tower).get(size), "blas")
    assert ours.shape == (1, EMBED)
    torch.testing.assert_close(ours, dynamic(pixels))
    if size == 32:
        torch.testing.assert_close(ours, tower(pixels))
    vit.check_supported(tower)
    assert attn_pool.n_prefix(tower) == 1 and len(attn_pool.head_linears(tower)) == 1


@pytest.mark.parametrize("size", [32, 48])
def test_decomposed_map_equals_autograd(tower, size):
    pixels, pos = _pixels(size), attn_pool.PosEmbedCache(tower).get(size)
    state = attn_pool.build_image_state(tower, pixels, pos, _empty(), "blas")
    assert state.n_tokens == (size // 8) ** 2 and state.grid == size // 8  # the class token's column is dropped
    emb = torch.randn(5, EMBED, generator=torch.Generator().manual_seed(3))
    ours = attn_pool.decomposed_relevance(tower, state, emb)
    ref = attn_pool.autograd_relevance(tower, pixels, pos, emb, state.keep)
    assert ours.shape == (5, state.n_tokens) and ours.abs().sum() > 0
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)


def test_decomposed_map_gradient_float64(tower):
    tower64 = TinyPeTower().eval().requires_grad_(False)
    tower64.load_state_dict(tower.state_dict())
    tower64 = tower64.double()
    pixels = _pixels(32, torch.float64)
    state = attn_pool.build_image_state(tower64, pixels, attn_pool.PosEmbedCache(tower64).get(32), None, "blas")
    emb = torch.randn(3, EMBED, dtype=torch.float64, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda e: attn_pool.decomposed_relevance(tower64, state, e), (emb,))


def test_unsupported_pools_are_named(tower):
    with_norm = TinyPeTower()
    with_norm.trunk.fc_norm = nn.LayerNorm(32)
    with pytest.raises(NotImplementedError, match="fc_norm"):
        vit.check_supported(with_norm)
    with_mlp_head = TinyPeTower()
    with_mlp_head.head = nn.Sequential(nn.Linear(EMBED, EMBED), nn.GELU())
    with pytest.raises(NotImplementedError, match="must be linear"):
        vit.check_supported(with_mlp_head)


@pytest.fixture(scope="module")
def engine(tower) -> MaskInversionEngine:
    model = TinyPeClip()
    model.visual.load_state_dict(tower.state_dict())
    clip = clip_from_model(model, "tiny-pe", None, "tiny-pe/random-seed0")
    return MaskInversionEngine(clip, empty_prompt_embedding=_empty())


def test_engine_batching_does_not_change_a_masks_let(engine):
    image = Image.fromarray(np.random.default_rng(7).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    rng = np.random.default_rng(6)
    masks = np.zeros((4, 40, 50), bool)
    for i in range(4):
        y, x = rng.integers(0, 20), rng.integers(0, 25)
        masks[i, y:y + 15, x:x + 20] = True
    together = engine.invert(image, masks, size=32, steps=5)
    alone = torch.cat([engine.invert(image, masks[i:i + 1], size=32, steps=5).lets for i in range(4)])
    assert together.lets.shape == (4, EMBED)
    torch.testing.assert_close(together.lets, alone)
    assert F.cosine_similarity(together.lets[0], together.lets[1], dim=0) < 0.9999


def test_patch_keys_drop_the_class_token(engine, tower):
    image = Image.fromarray(np.random.default_rng(8).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    keys, grid = engine.patch_keys(image, 48)
    assert keys.shape == (36, 32) and grid == 6
    pixels = engine._pixels(image, 48)
    x, rope = attn_pool._embed_tokens(tower, pixels, engine.pos.get(48))
    x = tower.trunk.blocks[0](x, rope=rope)
    last = tower.trunk.blocks[1]
    want = last.attn.qkv(last.norm1(x))[0, 1:, 32:64]
    torch.testing.assert_close(keys, want)


def _pooled_configs() -> list[str]:
    return [name for name in open_clip.list_models()
            if open_clip.get_model_config(name).get("vision_cfg", {}).get("timm_pool") == "map"]


def test_every_attention_pooled_open_clip_config_is_accepted():
    """SigLIP, SigLIP 2 (B, L, SO400M, gopt) and PE-Core (T to bigG), built without weights on the meta device."""
    names = _pooled_configs()
    assert any(n.startswith("PE-Core") for n in names) and any("SigLIP2" in n for n in names)
    for name in names:
        cfg = open_clip.get_model_config(name)
        with torch.device("meta"):  # the vision tower alone (some text towers need the hub)
            visual = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"])
        assert attn_pool.is_attention_pooled(visual), name
        assert attn_pool.tower_problem(visual) is None, name


def test_pe_core_loads_and_inverts_with_its_own_tokenizer():
    """The real loading path (open_clip config, random weights, the tokenizer that ships with open_clip)."""
    clip = load_clip("PE-Core-T-16-384", "none", device="cpu")
    assert clip.id == "PE-Core-T-16-384/random-seed0" and clip.embed_dim == 512
    engine = MaskInversionEngine(clip)
    mask = np.zeros((64, 64), bool)
    mask[8:40, 16:56] = True
    res = engine.invert(Image.new("RGB", (64, 64), (90, 140, 30)), mask[None], size=64, steps=2)
    assert res.lets.shape == (1, 512) and res.errors == [None] and torch.isfinite(res.lets).all()
    assert engine.empty_unit().shape == (512,)
