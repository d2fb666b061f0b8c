"""worker.cpu_gemm: oneDNN products with a packed constant matrix equal plain matmuls (fp32, CPU), and the
decomposed map and the inversion give the same results under either backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from worker import cpu_gemm, legrad
from worker.cpu_gemm import PackedMatrix
from worker.engine import MaskInversionEngine
from worker.models import load_clip

needs_onednn = pytest.mark.skipif(not cpu_gemm.onednn_available(), reason="torch built without oneDNN")


@needs_onednn
@pytest.mark.parametrize("rows", [1, 7, 197, 985])
def test_packed_products_equal_matmul_in_both_orientations(rows):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 40, generator=g)
    pm = PackedMatrix(w)
    x, y = torch.randn(rows, 96, generator=g), torch.randn(rows, 40, generator=g)
    assert pm.uses_onednn(x)
    torch.testing.assert_close(pm.mm(x), x @ w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pm.mm(y, transpose=True), y @ w.T, rtol=1e-5, atol=1e-5)
    assert set(pm._packed) == {False, True}  # each orientation packed once, then reused
    packed = dict(pm._packed)
    pm.mm(x)
    assert pm._packed[False] is packed[False]


def test_non_fp32_or_blas_falls_back_to_matmul_exactly():
    w = torch.randn(12, 5, dtype=torch.float64)
    x = torch.randn(3, 12, dtype=torch.float64)
    for pm in (PackedMatrix(w), PackedMatrix(w.float(), "blas")):
        assert not pm.uses_onednn(x.to(pm.matrix.dtype))
        assert torch.equal(pm.mm(x.to(pm.matrix.dtype)), x.to(pm.matrix.dtype) @ pm.matrix)
        assert not pm._packed


def test_bad_backend_and_shape_are_named():
    with pytest.raises(ValueError, match="gemm backend must be one of"):
        PackedMatrix(torch.ones(2, 2), "mkl")
    with pytest.raises(ValueError, match=r"expected a matrix \[k, c\]"):
        PackedMatrix(torch.ones(2, 2, 2))
    clip = load_clip("maskinv-test-tiny", "none", "cpu")
    with pytest.raises(ValueError, match="cpu_gemm must be one of"):
        MaskInversionEngine(clip, cpu_gemm="mkl")


@needs_onednn
def test_relevance_and_its_gradient_agree_across_backends():
    g = torch.Generator().manual_seed(0)
    heads, dh, grid, m = 2, 4, 3, 24
    n, d = grid * grid + 1, heads * dh

    def r(*shape):
        return torch.randn(*shape, generator=g)

    state = legrad.ImageState(global_embedding=r(4), z_unit=F.normalize(r(4), dim=0), z_norm=r(()).abs() + 1,
                              post_xhat=r(d), post_rstd=r(()).abs() + 1, act_r=r(n, m), act_xhat_r=r(n, m),
                              xhat_out=r(n, d), values_t=r(heads, dh, n - 1), grid=grid, size=grid * 4)
    fc_out = r(m, d)
    w, b = r(3, m).requires_grad_(True), r(3, d).requires_grad_(True)
    outs, grads = [], []
    for mat in (fc_out, PackedMatrix(fc_out)):
        out = legrad._Relevance.apply(w, b, state, mat, heads, True)
        outs.append(out)
        grads.append(torch.autograd.grad(out, (w, b), torch.ones_like(out)))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    for g1, g0 in zip(grads[1], grads[0]):
        torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-4)


@needs_onednn
def test_inversion_gives_the_same_lets_under_either_backend():
    clip = load_clip("maskinv-test-tiny-ls", "none", "cpu")
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
    masks = np.zeros((3, 40, 48), bool)
    masks[0, 2:20, 3:30] = masks[1, 15:38, 10:40] = masks[2, 5:35, 30:47] = True
    res = {b: MaskInversionEngine(clip, cpu_gemm=b).invert(image, masks, size=48, steps=5) for b in ("onednn", "blas")}
    assert F.cosine_similarity(res["onednn"].lets, res["blas"].lets).min() > 1 - 1e-5
    torch.testing.assert_close(res["onednn"].losses, res["blas"].losses, rtol=1e-3, atol=1e-3)
