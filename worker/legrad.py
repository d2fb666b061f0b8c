"""LeGrad explainability of the last ViT block, for a batch of N embeddings against one image.

For an embedding ``e`` the score is ``s = <normalize(e), z>`` with ``z = normalize(proj(ln_post(mean_i Y_i)))``
(mean over all tokens of the last block's output Y). The map is ``∂s/∂A`` (A: the last block's attention
probabilities ``[H, n, n]``), clamped at 0, averaged over heads and query rows, patch columns only,
reshaped to the grid, bilinearly upsampled by the patch size and min-max normalised.

Two implementations of ``∂s/∂A``:

* :func:`decomposed_relevance` — A does not depend on ``e``, so ``∂s/∂A`` is linear in ``u = normalize(e)``.
  The image's forward pass is frozen into an :class:`ImageState`; the map for N embeddings is then a chain
  of batched vector-Jacobian products through the last block's post-attention part (ln_post, the MLP
  branch, the output projection), with no autograd through the network and no dependence on depth.
* :func:`autograd_relevance` — the original method: the image repeated once per embedding, the whole
  ViT run, and ``torch.autograd.grad(s, A, create_graph=True)`` (second order when optimised). Kept as the
  reference for tests and benchmarks.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from . import vit


@dataclass
class ImageState:
    """What the decomposed path needs from one forward pass of one image at one input size.

    Shapes: n tokens (1 + g²), width d, MLP width m, heads H, head width dh, embedding dim D.
    """

    global_embedding: torch.Tensor  # [D] class token after ln_post and proj (unnormalised)
    z_unit: torch.Tensor  # [D] normalised explainability feature z
    z_norm: torch.Tensor  # [] ||proj(ln_post(mean Y))||
    post_xhat: torch.Tensor  # [d] ln_post's normalised input (mean token)
    post_rstd: torch.Tensor  # [] ln_post's 1/std
    ln2_rstd: torch.Tensor  # [n, 1] ln_2's 1/std per token
    act_grad: torch.Tensor  # [n, m] derivative of the MLP activation at its pre-activation
    xhat_fc: torch.Tensor  # [n, m] c_fc.weight @ (ln_2.weight * xhat_i) per token (xhat: ln_2's normalised input)
    xhat_out: torch.Tensor  # [n, d] (ls_1 * xhat_i) @ out_proj.weight per token
    values: torch.Tensor  # [H, n-1, dh] attention values of the patch tokens (columns of A)
    grid: int  # g, patches per side
    size: int  # input size S

    @property
    def n_tokens(self) -> int:
        return self.ln2_rstd.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, f.name).nbytes for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor))


def _ln_stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised input and 1/std of a LayerNorm over the last dim."""
    mu = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    return (x - mu) * rstd, rstd


def ln_backward(grad_out: torch.Tensor, weight: torch.Tensor | None, xhat: torch.Tensor,
                rstd: torch.Tensor) -> torch.Tensor:
    """Vector-Jacobian product of a LayerNorm at a fixed input (``xhat``, ``rstd``), batched over leading dims."""
    g = grad_out * weight if weight is not None else grad_out
    return rstd * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))


@torch.no_grad()
def build_image_state(visual: torch.nn.Module, pixels: torch.Tensor, pos: torch.Tensor) -> ImageState:
    """Run the ViT once on ``pixels`` ``[1, 3, S, S]`` and freeze what the decomposed maps need."""
    block = visual.transformer.resblocks[-1]
    x = vit.trunk_forward(visual, pixels, pos)
    attn, values = vit.last_block_attention(block, x)
    act = vit.last_block_after_attention(block, x, attn, values)
    tokens = act.out
    with torch.enable_grad():  # elementwise activation derivative, whatever the activation is
        pre = act.pre_act[0].detach().requires_grad_(True)
        act_grad, = torch.autograd.grad(block.mlp.gelu(pre).sum(), pre)
    ybar = tokens[0].mean(0)
    post_xhat, post_rstd = _ln_stats(ybar, visual.ln_post.eps)
    z_un = visual.ln_post(ybar) @ visual.proj
    ln2_xhat, ln2_rstd = _ln_stats(act.y1[0], block.ln_2.eps)
    d = ln2_xhat.shape[-1]
    gamma2 = _weight_or_ones(block.ln_2, d, ln2_xhat)
    ls1 = vit.layer_scale(block.ls_1, d, ln2_xhat)
    z_norm = z_un.norm()
    return ImageState(
        global_embedding=vit.global_embedding(visual, tokens)[0],
        z_unit=z_un / z_norm, z_norm=z_norm, post_xhat=post_xhat, post_rstd=post_rstd.squeeze(-1),
        ln2_rstd=ln2_rstd, act_grad=act_grad.detach(),
        xhat_fc=(ln2_xhat * gamma2) @ block.mlp.c_fc.weight.T, xhat_out=(ln2_xhat * ls1) @ block.attn.out_proj.weight,
        values=values[0, :, 1:, :].contiguous(), grid=vit.grid_side(tokens.shape[1]), size=pixels.shape[-1],
    )


def _weight_or_ones(norm: torch.nn.Module, width: int, like: torch.Tensor) -> torch.Tensor:
    w = getattr(norm, "weight", None)
    return w.detach() if w is not None else torch.ones(width, dtype=like.dtype, device=like.device)


@dataclass
class BlockConstants:
    """Products of the last block's weights used by every image (computed once per model)."""

    fc_out: torch.Tensor  # [m, d] c_fc.weight · diag(ln_2.weight * ls_1) · out_proj.weight
    fc_gamma: torch.Tensor  # [m] c_fc.weight @ ln_2.weight
    ones_out: torch.Tensor  # [d] ls_1 @ out_proj.weight
    ls1: torch.Tensor  # [d]
    ls2: torch.Tensor  # [d]


_constants: "weakref.WeakKeyDictionary[torch.nn.Module, BlockConstants]" = weakref.WeakKeyDictionary()


@torch.no_grad()
def block_constants(visual: torch.nn.Module) -> BlockConstants:
    """:class:`BlockConstants` of ``visual``'s last block (cached per module)."""
    block = visual.transformer.resblocks[-1]
    consts = _constants.get(block)
    if consts is None:
        w_fc, w_out = block.mlp.c_fc.weight, block.attn.out_proj.weight
        d = w_out.shape[0]
        gamma2 = _weight_or_ones(block.ln_2, d, w_fc)
        ls1 = vit.layer_scale(block.ls_1, d, w_fc)
        consts = BlockConstants(fc_out=(w_fc * (gamma2 * ls1)) @ w_out, fc_gamma=w_fc @ gamma2,
                                ones_out=ls1 @ w_out, ls1=ls1, ls2=vit.layer_scale(block.ls_2, d, w_fc))
        _constants[block] = consts
    return consts


class _PositiveMeanGrad(torch.autograd.Function):
    """``clamp(g_o @ Vᵀ, 0)`` summed over heads and rows, times ``scale``: ``[N, H, n, dh]`` -> ``[N, n-1]``.

    The ``[N, H, n, n-1]`` product is recomputed in backward instead of stored, and the clamp and its
    gradient are done in place, so one such buffer is alive at a time.
    """

    @staticmethod
    def forward(ctx, g_o: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(g_o, values)
        ctx.scale = scale
        x = g_o @ values.transpose(-1, -2)[None]
        return x.clamp_(min=0).sum(dim=(1, 2)).mul_(scale)

    @staticmethod
    def backward(ctx, grad_rel: torch.Tensor):
        g_o, values = ctx.saved_tensors
        x = g_o @ values.transpose(-1, -2)[None]
        x.gt_(0).mul_((grad_rel * ctx.scale)[:, None, None, :])
        return x @ values[None], None, None


def decomposed_relevance(visual: torch.nn.Module, state: ImageState, emb: torch.Tensor) -> torch.Tensor:
    """Patch relevance ``[N, n-1]`` (clamped ∂s/∂A averaged over heads and rows) for embeddings ``emb`` ``[N, D]``.

    Differentiable w.r.t. ``emb`` with first-order autograd only; cost per embedding is independent of depth.
    """
    block = visual.transformer.resblocks[-1]
    k = block_constants(visual)
    n, d = state.xhat_out.shape
    heads = block.attn.num_heads
    u = F.normalize(emb, dim=-1)
    # s = <u, z_un / |z_un|>  ->  ∂s/∂z_un = (u - <u,z> z) / |z_un|
    g_z = (u - (u @ state.z_unit)[:, None] * state.z_unit) / state.z_norm  # [N, D]
    g_ybar = ln_backward(g_z @ visual.proj.T, visual.ln_post.weight, state.post_xhat, state.post_rstd)  # [N, d]
    g_y = g_ybar / n  # the mean spreads the same cotangent over every token
    # MLP branch Y = Y1 + ls2 * c_proj(act(c_fc(ln_2(Y1)))): the cotangent is shared by all tokens,
    # so the c_proj product is done once per embedding, not once per token.
    t = state.act_grad[None] * ((g_y * k.ls2) @ block.mlp.c_proj.weight)[:, None, :]  # [N, n, m] at c_fc's output
    # ln_2's backward per token, then ls_1 and out_proj, folded into fixed matrices:
    # g_o_i = rstd_i (t_i W - mean_γ(t_i) u0 - mean_γx̂(t_i) X_i) + (ls1 * g_y) @ out_proj.weight
    g_o = state.ln2_rstd * (t @ k.fc_out - (t @ k.fc_gamma)[..., None] * (k.ones_out / d)
                            - (t * state.xhat_fc).sum(-1, keepdim=True) * (state.xhat_out / d))
    g_o = g_o + ((g_y * k.ls1) @ block.attn.out_proj.weight)[:, None, :]  # [N, n, d]
    g_o = g_o.view(emb.shape[0], n, heads, d // heads).transpose(1, 2)  # [N, H, n, dh]
    return _PositiveMeanGrad.apply(g_o, state.values, 1.0 / (heads * n))


def relevance_to_map(rel: torch.Tensor, grid: int, patch: int) -> torch.Tensor:
    """Patch relevance ``[N, g²]`` -> min-max normalised map ``[N, g*p, g*p]`` (bilinear upsampling)."""
    e = F.interpolate(rel.view(-1, 1, grid, grid), scale_factor=patch, mode="bilinear", align_corners=False)
    e = e[:, 0]
    lo = e.amin(dim=(1, 2), keepdim=True)
    hi = e.amax(dim=(1, 2), keepdim=True)
    return (e - lo) / (hi - lo).clamp_min(1e-12)


def autograd_relevance(visual: torch.nn.Module, pixels: torch.Tensor, pos: torch.Tensor,
                       emb: torch.Tensor) -> torch.Tensor:
    """Reference patch relevance ``[N, n-1]``: the image repeated per embedding, full ViT forward each call,
    ∂s/∂A by autograd with ``create_graph=True`` (so the result is differentiable w.r.t. ``emb``)."""
    block = visual.transformer.resblocks[-1]
    batch = pixels.expand(emb.shape[0], -1, -1, -1)
    with torch.no_grad():
        x = vit.trunk_forward(visual, batch, pos)
        attn, values = vit.last_block_attention(block, x)
    need_graph = torch.is_grad_enabled() and emb.requires_grad
    attn = attn.detach().requires_grad_(True)
    with torch.enable_grad():
        tokens = vit.last_block_after_attention(block, x, attn, values).out
        z = F.normalize(vit.pooled_feature(visual, tokens), dim=-1)
        s = (F.normalize(emb, dim=-1) * z).sum(-1)
        grad_attn, = torch.autograd.grad(s.sum(), attn, create_graph=need_graph)
    return grad_attn[..., 1:].clamp(min=0).mean(dim=(1, 2))
