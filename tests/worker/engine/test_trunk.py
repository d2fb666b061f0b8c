"""worker.engine.trunk: the trunk's blocks with oneDNN-packed linear layers equal the blocks' own forward, leave the
model
unchanged, and fall back where they do not apply."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from worker.engine import cpu_gemm

from worker.engine import trunk

from worker.engine import vit
from worker.engine.models import load_clip

needs_onednn = pytest.mark.skipif(not cpu_gemm.onednn_available(), reason="torch built without oneDNN")


class _Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.mlp = nn.Identity(), nn.Identity()

    def forward(self, x):
        return x


def _own_forward(visual: nn.Module, pixels: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vit.trunk_forward(visual, pixels, pos, gemm="blas")


@needs_onednn
@pytest.mark.parametrize("model", ["maskinv-test-tiny", "maskinv-test-tiny-ls", "maskinv-scene-tiny"])
def test_packed_blocks_equal_the_blocks_own_forward(model):
    """QuickGELU (tiny), LayerScale (tiny-ls) and the scene model's GELU; two images, an upsampled grid."""
    clip = load_clip(model, "none", "cpu")
    visual = clip.visual
    size = 2 * int(vit.patch_size_of(visual) * visual.grid_size[0])
    pos = vit.PosEmbedCache(visual).get(size)
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in visual.state_dict().items()}
    with torch.no_grad():
        fast = vit.trunk_forward(visual, pixels, pos)
    torch.testing.assert_close(fast, _own_forward(visual, pixels, pos), rtol=1e-4, atol=1e-5)
    assert all(trunk.packed_block(b, vit.onednn_parts) is not None for b in visual.transformer.resblocks[:-1])
    after = visual.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the model is not changed


@needs_onednn
def test_packing_happens_once_per_block_and_only_where_it_applies(monkeypatch):
    clip = load_clip("maskinv-test-tiny", "none", "cpu")
    blocks = list(clip.visual.transformer.resblocks[:-1])
    first = [trunk.packed_block(b, vit.onednn_parts) for b in blocks]
    assert [trunk.packed_block(b, vit.onednn_parts) for b in blocks] == first and all(p is not None for p in first)
    x = torch.randn(1, 5, blocks[0].ln_1.normalized_shape[0])
    with torch.no_grad():
        assert trunk.uses_onednn("onednn", x)
        assert not trunk.uses_onednn("blas", x) and not trunk.uses_onednn("onednn", x.double())
    assert not trunk.uses_onednn("onednn", x)  # gradients wanted: the block's own forward
    odd = _Odd()  # no MultiheadAttention: not supported, run as it is
    assert vit.onednn_parts(odd) is None and trunk.packed_block(odd, vit.onednn_parts) is None
    calls = []
    monkeypatch.setattr(trunk, "block_forward", lambda *a: calls.append(1) or a[1])
    with torch.no_grad():
        trunk.run_blocks([odd], x, "onednn", vit.onednn_parts)
    assert calls == []  # an unsupported block never reaches the packed path
