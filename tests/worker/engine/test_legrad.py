"""Gradient tests of worker.engine.legrad (timm style): float64 gradcheck of the hand-written backwards, and the
decomposed map against autograd through the whole ViT."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from worker.engine import legrad

from worker.engine import vit
from worker.engine.engine import MaskInversionEngine
from worker.engine.models import load_clip

MODELS = ["maskinv-test-tiny", "maskinv-test-tiny-ls"]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("with_weight", [True, False])
def test_ln_backward_matches_autograd_and_gradcheck(with_weight):
    x = torch.randn(3, 5, 7, dtype=torch.float64, generator=gen(0))
    weight = torch.randn(7, dtype=torch.float64, generator=gen(1)) if with_weight else None
    xhat, rstd = legrad._ln_stats(x, 1e-5)
    grad_out = torch.randn(3, 5, 7, dtype=torch.float64, generator=gen(2))
    xr = x.clone().requires_grad_(True)
    ref, = torch.autograd.grad(F.layer_norm(xr, (7,), weight, None, 1e-5), xr, grad_out)
    torch.testing.assert_close(legrad.ln_backward(grad_out, weight, xhat, rstd), ref)
    # ln_backward is linear in grad_out: its own gradient (used by autograd upstream of the map) is exact
    g = grad_out.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: legrad.ln_backward(t, weight, xhat, rstd), (g,))


def synthetic_state(n_grid: int = 2, heads: int = 2, dh: int = 3, m: int = 5, seed: int = 0) -> legrad.ImageState:
    """A float64 ImageState with random contents (shapes only matter for the map's algebra)."""
    g = gen(seed)
    n, d = n_grid * n_grid + 1, heads * dh

    def r(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=g)

    return legrad.ImageState(global_embedding=r(4), z_unit=F.normalize(r(4), dim=0), z_norm=r(()).abs() + 1,
                             post_xhat=r(d), post_rstd=r(()).abs() + 1, act_r=r(n, m), act_xhat_r=r(n, m),
                             xhat_out=r(n, d), values_t=r(heads, dh, n - 1), grid=n_grid, size=n_grid * 4)


@pytest.mark.parametrize("n_masks", [1, 3])
def test_relevance_function_forward_and_gradcheck(n_masks):
    state, heads = synthetic_state(), 2
    m, d = state.act_r.shape[1], state.xhat_out.shape[1]
    fc_out = torch.randn(m, d, dtype=torch.float64, generator=gen(5))
    w = torch.randn(n_masks, m, dtype=torch.float64, generator=gen(6), requires_grad=True)
    b = torch.randn(n_masks, d, dtype=torch.float64, generator=gen(7), requires_grad=True)
    ref = legrad.relevance_from_cotangents(w, b, state, fc_out, heads)
    out = legrad._Relevance.apply(w, b, state, fc_out, heads, True)
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(out, (w, b), grad), torch.autograd.grad(ref, (w, b), grad))
    assert torch.autograd.gradcheck(lambda w_, b_: legrad._Relevance.apply(w_, b_, state, fc_out, heads, True),
                                    (w, b))


def test_relevance_without_grad_keeps_no_mask():
    state = synthetic_state()
    m, d = state.act_r.shape[1], state.xhat_out.shape[1]
    fc_out = torch.randn(m, d, dtype=torch.float64, generator=gen(5))
    w, b = torch.randn(2, m, dtype=torch.float64), torch.randn(2, d, dtype=torch.float64)
    out = legrad._Relevance.apply(w, b, state, fc_out, 2, False)
    assert out.shape == (2, state.values_t.shape[-1]) and not out.requires_grad


@pytest.fixture(scope="module", params=MODELS)
def double_model(request):
    clip = load_clip(request.param, "none", "cpu")
    clip.model.double()
    engine = MaskInversionEngine(clip)
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 60, 3), dtype=np.uint8))
    size = 2 * int(clip.visual.image_size[0])
    pixels = engine._pixels(img, size).double()
    pos = engine.pos.get(size)
    state = legrad.build_image_state(clip.visual, pixels, pos)
    return clip.visual, state, pixels, pos


def test_whole_decomposed_map_matches_autograd_in_float64(double_model):
    visual, state, pixels, pos = double_model
    emb = (state.global_embedding + 0.5 * torch.randn(3, state.global_embedding.shape[0], dtype=torch.float64,
                                                       generator=gen(3))).requires_grad_(True)
    dec = legrad.decomposed_relevance(visual, state, emb)
    ref = legrad.autograd_relevance(visual, pixels, pos, emb)
    torch.testing.assert_close(dec, ref, atol=1e-12, rtol=1e-9)
    jac_dec = torch.autograd.functional.jacobian(lambda e: legrad.decomposed_relevance(visual, state, e), emb)
    jac_ref = torch.autograd.functional.jacobian(lambda e: legrad.autograd_relevance(visual, pixels, pos, e), emb)
    torch.testing.assert_close(jac_dec, jac_ref, atol=1e-12, rtol=1e-8)


def test_whole_decomposed_map_gradcheck(double_model):
    visual, state, _, _ = double_model
    emb = (state.global_embedding + 0.5 * torch.randn(2, state.global_embedding.shape[0], dtype=torch.float64,
                                                       generator=gen(4))).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda e: legrad.relevance_to_map(legrad.decomposed_relevance(visual, state, e), state.grid,
                                          vit.patch_size_of(visual)), (emb,))


def _relevance_inputs(n_masks: int, same_rows: bool):
    state, heads = synthetic_state(), 2
    m, d = state.act_r.shape[1], state.xhat_out.shape[1]
    fc_out = torch.randn(m, d, dtype=torch.float64, generator=gen(5))
    w = torch.randn(1 if same_rows else n_masks, m, dtype=torch.float64, generator=gen(6))
    b = torch.randn(1 if same_rows else n_masks, d, dtype=torch.float64, generator=gen(7))
    if same_rows:
        w, b = w.repeat(n_masks, 1), b.repeat(n_masks, 1)
    return state, heads, fc_out, w.requires_grad_(True), b.requires_grad_(True)


def test_identical_rows_are_computed_once_with_the_same_result_and_gradient():
    """The first inversion step (every LET = the global embedding) shares one map and one sign pattern."""
    state, heads, fc_out, w, b = _relevance_inputs(4, same_rows=True)
    ref = legrad.relevance_from_cotangents(w, b, state, fc_out, heads)
    out = legrad._Relevance.apply(w, b, state, fc_out, heads, True, legrad.Workspace())
    torch.testing.assert_close(out, ref)
    grad = torch.randn(ref.shape, dtype=ref.dtype, generator=gen(8))
    torch.testing.assert_close(torch.autograd.grad(out, (w, b), grad), torch.autograd.grad(ref, (w, b), grad))


def test_workspace_is_reused_across_steps_and_refuses_a_stale_backward():
    state, heads, fc_out, w, b = _relevance_inputs(3, same_rows=False)
    ws = legrad.Workspace()
    first = legrad._Relevance.apply(w, b, state, fc_out, heads, True, ws)
    assert ws.lent
    # a second forward while the first still holds the buffer gets its own tensor
    second = legrad._Relevance.apply(w * 2, b, state, fc_out, heads, True, ws)
    g1, = torch.autograd.grad(first.sum(), w, retain_graph=True)
    assert not ws.lent  # the first backward returned the buffer
    ref = legrad.relevance_from_cotangents(w, b, state, fc_out, heads)
    torch.testing.assert_close(g1, torch.autograd.grad(ref.sum(), w)[0])
    torch.autograd.grad(second.sum(), w)  # its own tensor: unaffected
    third = legrad._Relevance.apply(w, b * 3, state, fc_out, heads, True, ws)  # takes the buffer again
    with pytest.raises(RuntimeError, match="inplace"):
        torch.autograd.grad(first.sum(), w)
    torch.autograd.grad(third.sum(), w)


def test_basis_path_equals_the_direct_map_and_gradient_in_float64(double_model):
    """G is linear in u = normalize(LET): the map from the precomputed basis G(e_j) is the same function."""
    visual, state, _, _ = double_model
    emb = (state.global_embedding + 0.5 * torch.randn(3, state.global_embedding.shape[0], dtype=torch.float64,
                                                       generator=gen(9))).requires_grad_(True)
    basis = legrad.relevance_basis(visual, state)
    assert basis.shape == (state.z_unit.shape[0], state.n_tokens, state.xhat_out.shape[1])
    assert legrad.basis_bytes(state) == basis.nbytes
    direct = legrad.decomposed_relevance(visual, state, emb)
    via_basis = legrad.decomposed_relevance(visual, state, emb, basis=basis)
    torch.testing.assert_close(via_basis, direct, atol=1e-12, rtol=1e-9)
    grad = torch.randn(direct.shape, dtype=torch.float64, generator=gen(10))
    torch.testing.assert_close(torch.autograd.grad(via_basis, emb, grad)[0], torch.autograd.grad(direct, emb, grad)[0],
                               atol=1e-10, rtol=1e-8)
    assert torch.autograd.gradcheck(lambda e: legrad.decomposed_relevance(visual, state, e, basis=basis), (emb,))


def test_basis_pays_only_for_many_mask_steps():
    state = synthetic_state(m=40)  # D = 4 < m
    m, dim = state.act_r.shape[1], state.z_unit.shape[0]
    even = dim * m / (2 * (m - dim))  # break-even number of mask-steps
    assert not legrad.basis_pays(state, int(even * 1.5) - 1)
    assert legrad.basis_pays(state, int(even * 1.5) + 1)
    assert not legrad.basis_pays(synthetic_state(m=3), 10**6)  # m <= D: never
