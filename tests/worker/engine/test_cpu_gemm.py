"""worker.engine.cpu_gemm: oneDNN products with a packed constant matrix equal plain matmuls (fp32, CPU), and the
decomposed map and the inversion give the same results under either backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from worker.engine import cpu_gemm

from worker.engine import legrad
from worker.engine.cpu_gemm import PackedMatrix
from worker.engine.engine import MaskInversionEngine
from worker.engine.models import load_clip

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


def _random_state(g: torch.Generator, heads: int, dh: int, grid: int, m: int) -> legrad.ImageState:
    n, d = grid * grid + 1, heads * dh

    def r(*shape):
        return torch.randn(*shape, generator=g)

    return legrad.ImageState(global_embedding=r(4), z_unit=F.normalize(r(4), dim=0), z_norm=r(()).abs() + 1,
                             post_xhat=r(d), post_rstd=r(()).abs() + 1, act_r=r(n, m), act_xhat_r=r(n, m),
                             xhat_out=r(n, d), values_t=r(heads, dh, n - 1), grid=grid, size=grid * 4)


def test_head_products_use_onednn_only_from_the_crossover_on():
    x = torch.ones(2, 2)
    if cpu_gemm.onednn_available():
        assert cpu_gemm.heads_use_onednn("onednn", x, cpu_gemm.ONEDNN_MIN_COLUMNS)
    assert not cpu_gemm.heads_use_onednn("onednn", x, cpu_gemm.ONEDNN_MIN_COLUMNS - 1)
    assert not cpu_gemm.heads_use_onednn("blas", x, 10_000)
    assert not cpu_gemm.heads_use_onednn("onednn", x.double(), 10_000)


@needs_onednn
@pytest.mark.parametrize("identical_rows", [False, True])
@pytest.mark.parametrize("micro_batch_bytes", [legrad.MICRO_BATCH_BYTES, 1])
def test_per_head_onednn_products_equal_the_batched_matmul(monkeypatch, identical_rows, micro_batch_bytes):
    """Above the crossover (19 x 19 patches: 361 columns) the attention products go through one oneDNN linear
    per head (and per mask backward); map and gradient equal the batched-matmul path, for distinct masks and for
    the first step's identical rows (one shared sign pattern), in one micro-batch and in micro-batches of one."""
    monkeypatch.setattr(legrad, "MICRO_BATCH_BYTES", micro_batch_bytes)
    calls = []
    real_linear = cpu_gemm.linear
    monkeypatch.setattr(cpu_gemm, "linear", lambda x, w: calls.append(x.shape) or real_linear(x, w))
    g = torch.Generator().manual_seed(5)
    heads, dh, grid, m, masks = 2, 8, 19, 24, 3
    state = _random_state(g, heads, dh, grid, m)
    fc_out = torch.randn(m, heads * dh, generator=g)
    w, b = torch.randn(masks, m, generator=g), torch.randn(masks, heads * dh, generator=g)
    if identical_rows:
        w, b = w[:1].expand(masks, -1).clone(), b[:1].expand(masks, -1).clone()
    w.requires_grad_(True)
    b.requires_grad_(True)
    cot = torch.rand(masks, grid * grid, generator=g)  # a different cotangent per mask
    outs, grads = [], []
    for backend in ("blas", "onednn"):
        calls.clear()
        out = legrad._Relevance.apply(w, b, state, PackedMatrix(fc_out, backend), heads, True, legrad.Workspace())
        outs.append(out)
        grads.append(torch.autograd.grad(out, (w, b), cot))
        assert bool(calls) == (backend == "onednn")
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    for g1, g0 in zip(grads[1], grads[0]):
        torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # no pattern kept (maps without an optimisation): the same values
        plain = [legrad._Relevance.apply(w, b, state, PackedMatrix(fc_out, backend), heads, False)
                 for backend in ("blas", "onednn")]
    torch.testing.assert_close(plain[1], plain[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(plain[1], outs[1], rtol=1e-5, atol=1e-6)


@needs_onednn
def test_basis_path_uses_the_per_head_products_and_agrees():
    g = torch.Generator().manual_seed(6)
    heads, dh, grid, m, dim = 2, 8, 19, 24, 6
    n, d = grid * grid + 1, heads * dh
    state = _random_state(g, heads, dh, grid, m)
    basis = torch.randn(dim, n, d, generator=g)
    u = F.normalize(torch.randn(3, dim, generator=g), dim=-1).requires_grad_(True)
    outs, grads = [], []
    for backend in ("blas", "onednn"):
        out = legrad._RelevanceFromBasis.apply(u, basis, state, heads, True, None, backend)
        outs.append(out)
        grads.append(torch.autograd.grad(out, u, torch.ones_like(out))[0])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5)


def test_auto_picks_onednn_only_on_avx512_cpus(monkeypatch):
    assert cpu_gemm.resolve("blas") == "blas" and cpu_gemm.resolve("onednn") == "onednn"
    assert cpu_gemm.resolve("auto", "AVX2") == "blas" and cpu_gemm.resolve("auto", "NO AVX") == "blas"
    assert cpu_gemm.resolve("auto", "AVX512") == ("onednn" if cpu_gemm.onednn_available() else "blas")
    monkeypatch.setattr(cpu_gemm, "onednn_available", lambda: False)
    assert cpu_gemm.resolve("auto", "AVX512") == "blas"  # a torch without the operators
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(cpu_gemm, "onednn_available", lambda: True)
    assert cpu_gemm.resolve("auto") == "onednn"  # torch's reading of this CPU by default
    with pytest.raises(ValueError, match="cpu_gemm must be one of"):
        cpu_gemm.resolve("mkl")


def test_the_engine_keeps_the_backend_that_auto_resolved_to(monkeypatch):
    clip = load_clip("maskinv-test-tiny", "none", "cpu", seed=0)
    for capability, expected in (("AVX2", "blas"), ("AVX512", "onednn" if cpu_gemm.onednn_available() else "blas")):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert MaskInversionEngine(clip).cpu_gemm == expected
    with pytest.raises(ValueError, match="cpu_gemm must be one of"):
        MaskInversionEngine(clip, cpu_gemm="fast")
