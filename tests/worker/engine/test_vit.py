"""worker.engine.vit: the LastBlock adapter over both shapes of open_clip last block (tiny random models, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from open_clip.transformer import CustomResidualAttentionBlock

from worker.engine import legrad

from worker.engine import vit
from worker.engine.engine import MaskInversionEngine
from worker.engine.models import load_clip

MODELS = ["maskinv-test-tiny", "maskinv-test-tiny-ls"]


class QkvLinearAttention(nn.Module):
    """Stand-in for open_clip's newer ``Attention`` layout: one fused ``qkv`` Linear, a ``proj`` Linear,
    ``num_heads``, batch-first tokens and no ``batch_first`` attribute."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(o.transpose(1, 2).reshape(b, n, d))


def _block_args(block: nn.Module) -> dict:
    d = block.ln_1.normalized_shape[0]
    ls = getattr(block.ls_1, "gamma", None)
    return dict(d_model=d, n_head=block.attn.num_heads, mlp_ratio=block.mlp.c_fc.out_features / d,
                ls_init_value=0.5 if ls is not None else None, act_layer=type(block.mlp.gelu),
                norm_layer=type(block.ln_1))


def with_attention_class(name: str, kind: str):
    """A tiny model whose last block is rebuilt around open_clip's ``Attention`` class (``kind="open_clip"``,
    ``in_proj_weight`` parameters) or the qkv-Linear stand-in (``kind="qkv"``), weights copied: same function."""
    clip = load_clip(name, "none", "cpu")
    blocks = clip.model.visual.transformer.resblocks
    old = blocks[-1]
    new = CustomResidualAttentionBlock(**_block_args(old))
    missing, unexpected = new.load_state_dict(old.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(("ln_attn", "mlp.ln")) for k in missing)
    if kind == "qkv":
        attn = QkvLinearAttention(old.attn.embed_dim, old.attn.num_heads)
        with torch.no_grad():
            attn.qkv.weight.copy_(old.attn.in_proj_weight)
            attn.qkv.bias.copy_(old.attn.in_proj_bias)
            attn.proj.load_state_dict(old.attn.out_proj.state_dict())
        new.attn = attn
    blocks[-1] = new.eval()
    return clip


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    from PIL import Image
    return Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 60, 3), dtype=np.uint8))


@pytest.mark.parametrize("name", MODELS)
def test_last_block_view_of_multihead_attention(name):
    clip = load_clip(name, "none", "cpu")
    view = vit.last_block(clip.visual)
    block = clip.visual.transformer.resblocks[-1]
    assert vit.last_block(clip.visual) is view  # built once per model
    assert (view.heads, view.width, view.mlp_width) == (block.attn.num_heads, block.attn.embed_dim,
                                                       block.mlp.c_fc.out_features)
    assert view.qkv_weight is block.attn.in_proj_weight and view.out_proj is block.attn.out_proj
    assert view.c_fc is block.mlp.c_fc and view.c_proj is block.mlp.c_proj and view.act is block.mlp.gelu
    expected_ls = block.ls_1.gamma if hasattr(block.ls_1, "gamma") else torch.ones(view.width)
    torch.testing.assert_close(view.ls1_gamma(), expected_ls)


@pytest.mark.parametrize("kind", ["open_clip", "qkv"])
@pytest.mark.parametrize("name", MODELS)
def test_other_attention_class_gives_the_same_model_and_maps(name, kind, image):
    ref_clip = load_clip(name, "none", "cpu")
    clip = with_attention_class(name, kind)
    view = vit.last_block(clip.visual)
    assert view.heads == ref_clip.visual.transformer.resblocks[-1].attn.num_heads
    ref, eng = MaskInversionEngine(ref_clip), MaskInversionEngine(clip)
    size = 2 * int(clip.visual.image_size[0])
    pixels = eng._pixels(image, size)
    pos = eng.pos.get(size)
    with torch.no_grad():  # the rebuilt block computes the same function as open_clip's own forward
        torch.testing.assert_close(vit.tokens_forward(clip.visual, pixels, pos),
                                   clip.visual.transformer.resblocks[-1](vit.trunk_forward(clip.visual, pixels, pos)),
                                   atol=1e-5, rtol=1e-5)
        native = int(clip.visual.image_size[0])
        torch.testing.assert_close(eng.image_state(image, native)[0].global_embedding,
                                   clip.visual(eng._pixels(image, native))[0], atol=1e-5, rtol=1e-5)
    emb = torch.randn(3, clip.embed_dim, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(eng.explain(image, emb, size), ref.explain(image, emb, size), atol=1e-5, rtol=0)
    state, *_ = eng.image_state(image, size)
    torch.testing.assert_close(legrad.decomposed_relevance(clip.visual, state, emb),
                               legrad.autograd_relevance(clip.visual, pixels, pos, emb), atol=1e-6, rtol=1e-4)


def test_rejects_what_it_cannot_decompose():
    def broken(mutate) -> nn.Module:
        clip = with_attention_class(MODELS[0], "open_clip")
        mutate(clip.visual)
        return clip.visual

    cases = [
        (lambda v: setattr(v.transformer.resblocks[-1].attn, "ln_q", nn.LayerNorm(8)), "ln_q"),
        (lambda v: setattr(v.transformer.resblocks[-1].attn, "logit_scale", nn.Parameter(torch.zeros(1))),
         "logit_scale"),
        (lambda v: setattr(v.transformer.resblocks[-1].attn, "head_scale", nn.Parameter(torch.ones(1))), "head_scale"),
        (lambda v: setattr(v.transformer.resblocks[-1], "ln_attn", nn.LayerNorm(8)), "ln_attn"),
        (lambda v: setattr(v.transformer.resblocks[-1].mlp, "ln", nn.LayerNorm(8)), "MLP"),
        (lambda v: delattr(v.transformer.resblocks[-1].attn, "in_proj_weight"), "fused qkv"),
        (lambda v: setattr(v.transformer, "batch_first", False), "batch_first"),
    ]
    for mutate, message in cases:
        with pytest.raises(NotImplementedError, match=message):
            vit.check_supported(broken(mutate))


def test_separate_qkv_projections_are_rejected():
    clip = load_clip(MODELS[0], "none", "cpu")
    block = clip.visual.transformer.resblocks[-1]
    d = block.attn.embed_dim
    block.attn = nn.MultiheadAttention(d, block.attn.num_heads, kdim=d // 2, vdim=d // 2, batch_first=True)
    with pytest.raises(NotImplementedError, match="fused qkv"):
        vit.check_supported(clip.visual)
