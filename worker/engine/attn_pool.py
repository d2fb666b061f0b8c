"""LeGrad over attention-pooled vision towers (SigLIP: a timm ViT trunk whose image embedding is one learned
query attending over the patch tokens), decomposed per image like the class-token path of
:mod:`worker.engine.legrad`.

The map (the public ``legrad-torch`` 1.1 ``compute_legrad_siglip``, one score per mask). Shapes: n = g² patch
tokens (no class token), width d, heads H, head width dh = d/H, MLP width m, embedding dim D (= d, the head is
empty):

* ``Y`` ``[n, d]``: the last block's output, read *before* the trunk's final norm (as the package reads it; the
  image embedding itself, :attr:`PooledImageState.global_embedding`, is the model's own, after that norm);
* the pool: ``K, V = kv(Y)``; ``A_h = softmax(q_h K_hᵀ / √dh)`` ``[H, 1, n]``; ``x = W_p concat_h(A_h V_h) + b_p``;
  ``z = x + mlp(norm(x))`` ``[D]``; the score ``s = <u, z / |z|>``, ``u = normalize(LET)``;
* ``rel = mean_h relu(∂s/∂A_h)`` ``[n]``; cells where the min-max normalised map of the empty prompt
  (:data:`EMPTY_PROMPT`, threshold :data:`EMPTY_THRESHOLD`) exceeds 0.8 set to 0; min-max on the ``[g, g]`` grid;
  bilinear upsampling by the patch size (:func:`relevance_to_map`).

Decomposition. ``A`` does not depend on the LET, and ``z`` depends on ``A`` only through ``o_h = A_h V_h``, so

    ∂s/∂A_h[j] = <g_o_h, V_h[j]>,   g_o = W_pᵀ (I + J_mlp(x))ᵀ (I − ẑẑᵀ) u / |z|,

with ``J_mlp(x)ᵀ g = norm'(x)ᵀ W_fc1ᵀ (act'(pre) ⊙ W_fc2ᵀ g)`` at the image's fixed ``x``. ``g_o`` is linear in ``u``;
one forward pass of the image freezes ``ẑ, |z|``, the norm's statistics, ``act'(pre)`` and ``V``
(:class:`PooledImageState`), and the map of N masks is then a few ``[N, ·]`` products (2·d·m + d² + n·d MAC per
mask), differentiable in ``u`` by plain first-order autograd: no autograd through the network, nothing second
order. :func:`autograd_relevance` is the reference (autograd of ``s`` w.r.t. ``A``, ``create_graph=True``).

One score per mask: the package's batched call sums the whole ``[N, N]`` similarity matrix, so every mask of a
call gets the map of the sum of all LETs; here mask i's map is ``∂<u_i, ẑ>/∂A`` whatever the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from worker.engine import trunk

Tower = Any  # an open_clip TimmModel: ``trunk`` (a timm VisionTransformer with ``attn_pool``) and ``head``
EMPTY_PROMPT = "a photo of a"  # the package's empty prompt for the map's correction
EMPTY_THRESHOLD = 0.8  # cells whose min-max normalised empty-prompt map exceeds this are zeroed


def _is_identity(module: nn.Module | None) -> bool:
    return module is None or isinstance(module, nn.Identity) or (isinstance(module, nn.Sequential)
                                                                 and len(module) == 0)


def is_attention_pooled(visual: Tower) -> bool:
    """Whether ``visual`` is an open_clip timm tower whose trunk pools through attention (``attn_pool``)."""
    return getattr(getattr(visual, "trunk", None), "attn_pool", None) is not None


def tower_problem(visual: Tower) -> str | None:
    """Why the attention-pooled ``visual`` cannot be decomposed here, or None when it can: a timm ViT trunk
    without class or register tokens, a pool with one latent query, no qk-norm and no position embedding,
    MLP fc1 -> act -> fc2, and no projection head after it."""
    trunk_ = getattr(visual, "trunk", None)
    pool = getattr(trunk_, "attn_pool", None)
    if trunk_ is None or pool is None:
        return f"{type(visual).__name__} has no attention-pooled timm trunk"
    for name in ("patch_embed", "pos_embed", "blocks", "norm"):
        if getattr(trunk_, name, None) is None:
            return f"the trunk ({type(trunk_).__name__}) has no {name}"
    if int(getattr(trunk_, "num_prefix_tokens", 0)):
        return "trunks with class or register tokens are not supported under an attention pool"
    if not isinstance(getattr(trunk_.patch_embed, "proj", None), nn.Conv2d):
        return "the patch embedding must be one Conv2d"
    for name in ("norm_pre", "fc_norm", "head"):
        if not _is_identity(getattr(trunk_, name, None)):
            return f"the trunk's {name} must be empty"
    if not _is_identity(getattr(trunk_.patch_embed, "norm", None)):
        return "a norm after the patch embedding is not supported"
    if not _is_identity(getattr(visual, "head", None)):
        return "a projection head after the attention pool is not supported"
    for name in ("q", "kv", "proj"):
        if not isinstance(getattr(pool, name, None), nn.Linear):
            return f"the attention pool has no {name} Linear"
    latent = getattr(pool, "latent", None)
    if not isinstance(latent, torch.Tensor) or latent.shape[1] != 1 or getattr(pool, "pool", "token") != "token":
        return "the attention pool must have one latent query"
    if getattr(pool, "pos_embed", None) is not None:
        return "an attention pool with its own position embedding is not supported"
    if not (_is_identity(getattr(pool, "q_norm", None)) and _is_identity(getattr(pool, "k_norm", None))):
        return "an attention pool with qk-norm is not supported"
    mlp = getattr(pool, "mlp", None)
    if not (isinstance(getattr(pool, "norm", None), nn.LayerNorm) and isinstance(getattr(mlp, "fc1", None), nn.Linear)
            and isinstance(getattr(mlp, "fc2", None), nn.Linear) and _is_identity(getattr(mlp, "norm", None))):
        return "the attention pool must end in x + mlp(LayerNorm(x)) with an MLP fc1 -> act -> fc2"
    return None


def check_supported(visual: Tower) -> None:
    """Raise a clear ``NotImplementedError`` when :func:`tower_problem` finds one."""
    problem = tower_problem(visual)
    if problem is not None:
        raise NotImplementedError(problem)


def patch_size_of(visual: Tower) -> int:
    p = visual.trunk.patch_embed.patch_size
    return int(p[0] if isinstance(p, (tuple, list)) else p)


class PosEmbedCache:
    """Position embeddings ``[1, (S/p)², d]`` of one pooled tower per input size ``S``: timm's
    ``resample_abs_pos_embed`` from the trunk's own grid, as the trunk does for dynamic sizes; the model is never
    mutated."""

    def __init__(self, visual: Tower):
        self.visual = visual
        self._by_size: dict[int, torch.Tensor] = {}

    def get(self, size: int) -> torch.Tensor:
        if size not in self._by_size:
            p = patch_size_of(self.visual)
            if size % p:
                raise ValueError(f"input size {size} is not a multiple of the patch size {p}")
            trunk_ = self.visual.trunk
            pos = trunk_.pos_embed.detach()
            old = list(trunk_.patch_embed.grid_size)
            if old != [size // p] * 2:
                pos = resample_abs_pos_embed(pos, new_size=[size // p] * 2, old_size=old, num_prefix_tokens=0)
            self._by_size[size] = pos
        return self._by_size[size]


def tokens_forward(visual: Tower, pixels: torch.Tensor, pos: torch.Tensor, gemm: str = "onednn") -> torch.Tensor:
    """The last block's output ``Y`` ``[B, n, d]`` (before the trunk's final norm) for pixels ``[B, 3, S, S]``."""
    trunk_ = visual.trunk
    proj = trunk_.patch_embed.proj
    x = proj(pixels.to(proj.weight.dtype)).flatten(2).transpose(1, 2)
    x = x + pos.to(x.dtype)
    return trunk.run_blocks(trunk_.blocks, x, gemm, parts_of=lambda _block: None)


def global_embedding(visual: Tower, tokens: torch.Tensor) -> torch.Tensor:
    """The model's own image embedding ``[B, D]``: the pool over the trunk's final norm of ``tokens`` ``[B, n, d]``."""
    trunk_ = visual.trunk
    return visual.head(trunk_.attn_pool(trunk_.norm(tokens)))


def embed(visual: Tower, pixels: torch.Tensor, pos: torch.Tensor, gemm: str = "onednn") -> torch.Tensor:
    """Image embeddings ``[B, D]`` of pixels ``[B, 3, S, S]``."""
    return global_embedding(visual, tokens_forward(visual, pixels, pos, gemm))


def _pool_attention(pool: Any, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The pool's attention probabilities ``[B, H, 1, n]`` and values ``[B, H, n, dh]`` on ``tokens`` ``[B, n, d]``."""
    b, n, d = tokens.shape
    heads = int(pool.num_heads)
    q = pool.q(pool.latent.expand(b, -1, -1)).reshape(b, 1, heads, d // heads).transpose(1, 2)
    k, v = pool.kv(tokens).reshape(b, n, 2, heads, d // heads).permute(2, 0, 3, 1, 4)
    attn = torch.softmax((q * pool.scale) @ k.transpose(-2, -1), dim=-1)
    return attn, v


def _pool_output(pool: Any, attn: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The pooled feature ``z`` ``[B, D]`` from attention ``[B, H, 1, n]`` and values ``[B, H, n, dh]``."""
    b, heads, _, dh = attn.shape[0], attn.shape[1], attn.shape[2], values.shape[-1]
    x = pool.proj((attn @ values).transpose(1, 2).reshape(b, 1, heads * dh))
    return (x + pool.mlp(pool.norm(x)))[:, 0]


@dataclass
class PooledImageState:
    """What the decomposed map needs from one forward pass of one image at one input size (shapes above)."""

    global_embedding: torch.Tensor  # [D] the model's image embedding (unnormalised)
    z_unit: torch.Tensor  # [D] the map's pooled feature z / |z|
    z_norm: torch.Tensor  # [] |z|
    norm_xhat: torch.Tensor  # [d] the pool MLP's LayerNorm input x, normalised
    norm_rstd: torch.Tensor  # [] its 1/std
    act_grad: torch.Tensor  # [m] act'(fc1(norm(x)))
    values: torch.Tensor  # [H, n, dh] the pool's values
    keep: torch.Tensor  # [n] 1.0 where the empty-prompt map is at most EMPTY_THRESHOLD, else 0.0
    grid: int  # g, patches per side
    size: int  # input size S

    @property
    def n_tokens(self) -> int:
        return self.values.shape[1]

    @property
    def nbytes(self) -> int:
        tensors = (getattr(self, f.name) for f in fields(self))
        return sum(t.nbytes for t in tensors if isinstance(t, torch.Tensor))


def _ln_stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    mu = x.mean(-1, keepdim=True)
    rstd = torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
    return (x - mu) * rstd, rstd


@torch.no_grad()
def build_image_state(visual: Tower, pixels: torch.Tensor, pos: torch.Tensor, empty_unit: torch.Tensor | None,
                      gemm: str = "onednn") -> PooledImageState:
    """Run the tower once on ``pixels`` ``[1, 3, S, S]`` and freeze what the decomposed map needs. ``empty_unit``
    ``[D]``: the normalised embedding of :data:`EMPTY_PROMPT` (None: no correction, every cell kept)."""
    pool = visual.trunk.attn_pool
    tokens = tokens_forward(visual, pixels, pos, gemm)
    attn, values = _pool_attention(pool, tokens[:1])
    heads, dh = values.shape[1], values.shape[-1]
    x = pool.proj((attn @ values).transpose(1, 2).reshape(1, heads * dh))[0]  # [d]
    xhat, rstd = _ln_stats(x, pool.norm.eps)
    with torch.enable_grad():  # elementwise activation derivative, whatever the activation is
        pre = pool.mlp.fc1(pool.norm(x)).detach().requires_grad_(True)
        act_grad, = torch.autograd.grad(pool.mlp.act(pre).sum(), pre)
    z = x + pool.mlp(pool.norm(x))
    z_norm = z.norm()
    n = values.shape[2]
    grid = int(round(n ** 0.5))
    if grid * grid != n:
        raise ValueError(f"{n} tokens do not form a square grid")
    state = PooledImageState(global_embedding=global_embedding(visual, tokens[:1])[0], z_unit=z / z_norm,
                             z_norm=z_norm, norm_xhat=xhat, norm_rstd=rstd.squeeze(-1), act_grad=act_grad.detach(),
                             values=values[0].contiguous(), keep=torch.ones(n, dtype=x.dtype, device=x.device),
                             grid=grid, size=pixels.shape[-1])
    if empty_unit is not None:
        state.keep = empty_prompt_keep(visual, state, empty_unit)
    return state


def empty_prompt_keep(visual: Tower, state: PooledImageState, empty_unit: torch.Tensor) -> torch.Tensor:
    """``[n]`` 1.0 where the min-max normalised map of ``empty_unit`` ``[D]`` is at most :data:`EMPTY_THRESHOLD`."""
    rel = raw_relevance(visual, state, empty_unit.to(state.z_unit)[None])[0]
    heat = (rel - rel.min()) / (rel.max() - rel.min())
    return (heat <= EMPTY_THRESHOLD).to(state.z_unit.dtype)


def _pool_output_cotangent(visual: Tower, state: PooledImageState, u: torch.Tensor) -> torch.Tensor:
    """``g_o`` ``[N, d]``: ∂s/∂(concat_h A_h V_h) for unit embeddings ``u`` ``[N, D]`` (linear in ``u``)."""
    pool = visual.trunk.attn_pool
    g_z = (u - (u @ state.z_unit)[:, None] * state.z_unit) / state.z_norm  # s = <u, z/|z|>
    t = (g_z @ pool.mlp.fc2.weight) * state.act_grad  # [N, m] at fc1's output
    g = (t @ pool.mlp.fc1.weight) * pool.norm.weight  # [N, d] at the norm's output, times its gain
    xhat = state.norm_xhat
    g_x = g_z + state.norm_rstd * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    return g_x @ pool.proj.weight


def raw_relevance(visual: Tower, state: PooledImageState, u: torch.Tensor) -> torch.Tensor:
    """``mean_h relu(∂s/∂A_h)`` ``[N, n]`` for unit embeddings ``u`` ``[N, D]``, no correction."""
    g_o = _pool_output_cotangent(visual, state, u)
    heads, n, dh = state.values.shape
    per_head = torch.einsum("khc,hjc->khj", g_o.view(-1, heads, dh), state.values)  # [N, H, n]
    return per_head.clamp(min=0).mean(dim=1)


def decomposed_relevance(visual: Tower, state: PooledImageState, emb: torch.Tensor) -> torch.Tensor:
    """The corrected patch relevance ``[N, n]`` of embeddings ``emb`` ``[N, D]`` (one map per row, whatever the
    batch); differentiable w.r.t. ``emb`` (first order)."""
    return raw_relevance(visual, state, F.normalize(emb, dim=-1)) * state.keep


def autograd_relevance(visual: Tower, pixels: torch.Tensor, pos: torch.Tensor, emb: torch.Tensor,
                       keep: torch.Tensor | None = None) -> torch.Tensor:
    """Reference relevance ``[N, n]``: the pool's attention repeated per embedding, ∂s_i/∂A_i by autograd with
    ``create_graph=True`` (differentiable w.r.t. ``emb``), times ``keep`` ``[n]`` when given."""
    pool = visual.trunk.attn_pool
    with torch.no_grad():
        tokens = tokens_forward(visual, pixels, pos)
        attn, values = _pool_attention(pool, tokens)
    n_emb = emb.shape[0]
    attn = attn.expand(n_emb, -1, -1, -1).detach().clone().requires_grad_(True)
    with torch.enable_grad():
        z = F.normalize(_pool_output(pool, attn, values.expand(n_emb, -1, -1, -1)), dim=-1)
        s = (F.normalize(emb, dim=-1) * z).sum(-1)
        grad, = torch.autograd.grad(s.sum(), attn, create_graph=torch.is_grad_enabled() and emb.requires_grad)
    rel = grad.clamp(min=0).mean(dim=1)[:, 0]
    return rel if keep is None else rel * keep


def relevance_to_map(rel: torch.Tensor, grid: int, patch: int) -> torch.Tensor:
    """Relevance ``[N, g²]`` -> map ``[N, g·p, g·p]``: min-max normalised on the grid, then bilinear upsampling."""
    e = rel.view(-1, 1, grid, grid)
    lo = e.amin(dim=(2, 3), keepdim=True)
    hi = e.amax(dim=(2, 3), keepdim=True)
    e = (e - lo) / (hi - lo).clamp_min(1e-12)
    return F.interpolate(e, scale_factor=patch, mode="bilinear", align_corners=False)[:, 0]


def empty_prompt_embedding(model: Any, tokenizer: Any, device: torch.device | str) -> torch.Tensor:
    """The normalised text embedding ``[D]`` of :data:`EMPTY_PROMPT` through the model's own tokenizer."""
    with torch.no_grad():
        return F.normalize(model.encode_text(tokenizer([EMPTY_PROMPT]).to(device)), dim=-1)[0]

