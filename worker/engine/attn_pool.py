"""LeGrad over attention-pooled vision towers (SigLIP / SigLIP 2: a timm ViT trunk whose image embedding is one
learned query attending over the patch tokens; PE-Core: a timm Eva trunk with a class token and rotary position
embeddings, the same pool and a linear projection after it), decomposed per image like the class-token path of
:mod:`worker.engine.legrad`.

The map (the public ``legrad-torch`` 1.1 ``compute_legrad_siglip``, one score per mask). Shapes: n = g² patch
tokens (after ``p`` prefix tokens: 0 for SigLIP, the class token for PE-Core), width d, heads H, head width
dh = d/H, MLP width m, embedding dim D (= d when the head is empty; PE-Core projects d -> D by ``W_h``):

* ``Y`` ``[n, d]``: the last block's output, read *before* the trunk's final norm (as the package reads it; the
  image embedding itself, :attr:`PooledImageState.global_embedding`, is the model's own, after that norm);
* the pool: ``K, V = kv(Y)``; ``A_h = softmax(q_h K_hᵀ / √dh)`` ``[H, 1, p + n]``;
  ``x = W_p concat_h(A_h V_h) + b_p``; ``z = W_h (x + mlp(norm(x))) + b_h`` ``[D]``; the score ``s = <u, z / |z|>``,
  ``u = normalize(LET)``;
* ``rel = mean_h relu(∂s/∂A_h)`` over the n patch columns (prefix columns dropped) ``[n]``; cells where the
  min-max normalised map of the empty prompt (:data:`EMPTY_PROMPT`, threshold :data:`EMPTY_THRESHOLD`) exceeds
  0.8 set to 0; min-max on the ``[g, g]`` grid; bilinear upsampling by the patch size (:func:`relevance_to_map`).

Decomposition. ``A`` does not depend on the LET, and ``z`` depends on ``A`` only through ``o_h = A_h V_h``, so

    ∂s/∂A_h[j] = <g_o_h, V_h[j]>,   g_o = W_pᵀ (I + J_mlp(x))ᵀ W_hᵀ (I − ẑẑᵀ) u / |z|,

with ``J_mlp(x)ᵀ g = norm'(x)ᵀ W_fc1ᵀ (act'(pre) ⊙ W_fc2ᵀ g)`` at the image's fixed ``x``. ``g_o`` is linear in ``u``;
one forward pass of the image freezes ``ẑ, |z|``, the norm's statistics, ``act'(pre)`` and ``V``
(:class:`PooledImageState`), and the map of N masks is then a few ``[N, ·]`` products (2·d·m + d² + n·d MAC per
mask), differentiable in ``u`` by plain first-order autograd: no autograd through the network, nothing second
order. :func:`autograd_relevance` is the reference (autograd of ``s`` w.r.t. ``A``, ``create_graph=True``).

One score per mask: the package's batched call sums the whole ``[N, N]`` similarity matrix, so every mask of a
call gets the map of the sum of all LETs; here mask i's map is ``∂<u_i, ẑ>/∂A`` whatever the batch.

PE-Core (no rule in the public package; the same rule, chosen here): the feature is the pool and projection over
the last block's output before the trunk's final norm, as for SigLIP; the pool attends over the class token and
the patches, the map keeps the patch columns; position embeddings (absolute and rotary) are rebuilt for each
input size.
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


def head_linears(visual: Tower) -> list[nn.Linear]:
    """The linear layers after the pool, in order (the trunk's ``head``, then open_clip's ``head``): empty for
    SigLIP, the projection d -> D for PE-Core. Only Linear, Dropout and Identity are read (:func:`tower_problem`)."""
    out = []
    for module in (visual.trunk.head, visual.head):
        for m in (module if isinstance(module, nn.Sequential) else [module]):
            if isinstance(m, nn.Linear):
                out.append(m)
    return out


def _head_problem(visual: Tower) -> str | None:
    for where, module in (("the trunk's head", visual.trunk.head), ("the projection head", visual.head)):
        for m in (module if isinstance(module, nn.Sequential) else [module]):
            if not isinstance(m, (nn.Linear, nn.Dropout, nn.Identity)):
                return f"{where} after the attention pool must be linear, got {type(m).__name__}"
    return None


def tower_problem(visual: Tower) -> str | None:
    """Why the attention-pooled ``visual`` cannot be decomposed here, or None when it can: a timm ViT or Eva trunk
    (class or register tokens, absolute and rotary position embeddings allowed), a pool with one latent query, no
    qk-norm and no position embedding of its own, MLP fc1 -> act -> fc2, and only linear layers after it."""
    trunk_ = getattr(visual, "trunk", None)
    pool = getattr(trunk_, "attn_pool", None)
    if trunk_ is None or pool is None:
        return f"{type(visual).__name__} has no attention-pooled timm trunk"
    for name in ("patch_embed", "blocks", "norm", "head"):
        if getattr(trunk_, name, None) is None:
            return f"the trunk ({type(trunk_).__name__}) has no {name}"
    if not isinstance(getattr(trunk_.patch_embed, "proj", None), nn.Conv2d):
        return "the patch embedding must be one Conv2d"
    if getattr(trunk_, "rope_mixed", False):
        return "depth-dependent (mixed) rotary position embeddings are not supported"
    rope = getattr(trunk_, "rope", None)
    if rope is not None and not hasattr(rope, "get_embed"):
        return f"rotary position embeddings of type {type(rope).__name__} are not supported"
    if not _is_identity(getattr(trunk_, "fc_norm", None)):
        return "a norm after the attention pool (fc_norm) is not supported"
    problem = _head_problem(visual)
    if problem is not None:
        return problem
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


def n_prefix(visual: Tower) -> int:
    """p: the class and register tokens before the patch tokens (0 for SigLIP, 1 for PE-Core)."""
    return int(getattr(visual.trunk, "num_prefix_tokens", 0) or 0)


class PosEmbedCache:
    """Absolute position embeddings of one pooled tower per input size ``S`` (``[1, p' + (S/p)², d]``, ``p'`` the
    prefix tokens that carry one, or None when the trunk has none): timm's ``resample_abs_pos_embed`` from the
    trunk's own grid, as the trunk does for dynamic sizes; the model is never mutated."""

    def __init__(self, visual: Tower):
        self.visual = visual
        self._by_size: dict[int, torch.Tensor | None] = {}

    def get(self, size: int) -> torch.Tensor | None:
        if size not in self._by_size:
            p = patch_size_of(self.visual)
            if size % p:
                raise ValueError(f"input size {size} is not a multiple of the patch size {p}")
            trunk_ = self.visual.trunk
            pos = trunk_.pos_embed.detach() if getattr(trunk_, "pos_embed", None) is not None else None
            old = list(trunk_.patch_embed.grid_size)
            if pos is not None and old != [size // p] * 2:
                prefix = 0 if getattr(trunk_, "no_embed_class", False) else n_prefix(self.visual)
                pos = resample_abs_pos_embed(pos, new_size=[size // p] * 2, old_size=old, num_prefix_tokens=prefix)
            self._by_size[size] = pos
        return self._by_size[size]


def rope_embed(visual: Tower, grid: tuple[int, int]) -> torch.Tensor | None:
    """The trunk's rotary position embedding for a ``grid`` of patches (None without one): its own cached embedding
    at its own grid, rebuilt from its frequency bands at another (as timm does for dynamic sizes)."""
    rope = getattr(visual.trunk, "rope", None)
    if rope is None:
        return None
    own = getattr(rope, "feat_shape", None)
    if own is None or tuple(own) == tuple(grid) or not getattr(rope, "_use_cached_embed", False):
        return rope.get_embed(shape=list(grid))
    return rope._build_embed_cat(list(grid), rope.bands)


def _embed_tokens(visual: Tower, pixels: torch.Tensor, pos: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Tokens entering the first block ``[B, p + n, d]`` and the rotary embedding (or None), as the trunk's own
    ``patch_embed``, ``_pos_embed`` and ``norm_pre``."""
    trunk_ = visual.trunk
    pe = trunk_.patch_embed
    x = pe.proj(pixels.to(pe.proj.weight.dtype))
    grid = (int(x.shape[-2]), int(x.shape[-1]))
    x = pe.norm(x.flatten(2).transpose(1, 2))
    prefix = [t.expand(x.shape[0], -1, -1) for t in (getattr(trunk_, "cls_token", None),
                                                    getattr(trunk_, "reg_token", None)) if t is not None]
    if getattr(trunk_, "no_embed_class", False):
        x = x + pos.to(x.dtype) if pos is not None else x
        x = torch.cat(prefix + [x], dim=1) if prefix else x
    else:
        x = torch.cat(prefix + [x], dim=1) if prefix else x
        x = x + pos.to(x.dtype) if pos is not None else x
    return trunk_.norm_pre(x), rope_embed(visual, grid)


def _run_blocks(blocks: Any, x: torch.Tensor, rope: torch.Tensor | None, gemm: str) -> torch.Tensor:
    if rope is None:
        return trunk.run_blocks(blocks, x, gemm, parts_of=lambda _block: None)
    for block in blocks:
        x = block(x, rope=rope)
    return x


def tokens_forward(visual: Tower, pixels: torch.Tensor, pos: torch.Tensor | None, gemm: str = "onednn"
                   ) -> torch.Tensor:
    """The last block's output ``Y`` ``[B, p + n, d]`` (before the trunk's final norm) for pixels ``[B, 3, S, S]``."""
    x, rope = _embed_tokens(visual, pixels, pos)
    return _run_blocks(visual.trunk.blocks, x, rope, gemm)


@torch.no_grad()
def patch_keys(visual: Tower, pixels: torch.Tensor, pos: torch.Tensor | None, gemm: str = "onednn"
               ) -> torch.Tensor:
    """The last block's patch keys ``[B, n, d]`` (heads concatenated, prefix tokens dropped, before any rotary
    embedding: the tokens' content, not their position) for pixels ``[B, 3, S, S]``."""
    x, rope = _embed_tokens(visual, pixels, pos)
    blocks = visual.trunk.blocks
    x = blocks[-1].norm1(_run_blocks(blocks[:-1], x, rope, gemm))
    attn = blocks[-1].attn
    d = x.shape[-1]
    qkv = getattr(attn, "qkv", None)
    if isinstance(qkv, nn.Linear):
        bias = qkv.bias[d:2 * d] if qkv.bias is not None else None
        keys = F.linear(x, qkv.weight[d:2 * d], bias)
    elif isinstance(getattr(attn, "k_proj", None), nn.Linear):
        keys = attn.k_proj(x)
    else:
        raise NotImplementedError(f"the last block's attention ({type(attn).__name__}) has no qkv or k_proj Linear")
    return keys[:, n_prefix(visual):]


def global_embedding(visual: Tower, tokens: torch.Tensor) -> torch.Tensor:
    """The model's own image embedding ``[B, D]``: the trunk's final norm, pool and head, then open_clip's head, on
    the last block's output ``tokens`` ``[B, p + n, d]``."""
    trunk_ = visual.trunk
    return visual.head(trunk_.forward_head(trunk_.norm(tokens)))


def embed(visual: Tower, pixels: torch.Tensor, pos: torch.Tensor | None, gemm: str = "onednn") -> torch.Tensor:
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


def _apply_head(visual: Tower, z: torch.Tensor) -> torch.Tensor:
    for lin in head_linears(visual):
        z = lin(z)
    return z


def _pool_output(visual: Tower, attn: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The map's feature ``z`` ``[B, D]`` from the pool's attention ``[B, H, 1, t]`` and values ``[B, H, t, dh]``."""
    pool = visual.trunk.attn_pool
    b, heads, _, dh = attn.shape[0], attn.shape[1], attn.shape[2], values.shape[-1]
    x = pool.proj((attn @ values).transpose(1, 2).reshape(b, 1, heads * dh))
    return _apply_head(visual, (x + pool.mlp(pool.norm(x)))[:, 0])


@dataclass
class PooledImageState:
    """What the decomposed map needs from one forward pass of one image at one input size (shapes above)."""

    global_embedding: torch.Tensor  # [D] the model's image embedding (unnormalised)
    z_unit: torch.Tensor  # [D] the map's pooled feature z / |z|
    z_norm: torch.Tensor  # [] |z|
    norm_xhat: torch.Tensor  # [d] the pool MLP's LayerNorm input x, normalised
    norm_rstd: torch.Tensor  # [] its 1/std
    act_grad: torch.Tensor  # [m] act'(fc1(norm(x)))
    values: torch.Tensor  # [H, n, dh] the pool's values of the patch tokens
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
def build_image_state(visual: Tower, pixels: torch.Tensor, pos: torch.Tensor | None, empty_unit: torch.Tensor | None,
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
    z = _apply_head(visual, x + pool.mlp(pool.norm(x)))
    z_norm = z.norm()
    patches = values[0, :, n_prefix(visual):].contiguous()
    n = patches.shape[1]
    grid = int(round(n ** 0.5))
    if grid * grid != n:
        raise ValueError(f"{n} tokens do not form a square grid")
    state = PooledImageState(global_embedding=global_embedding(visual, tokens[:1])[0], z_unit=z / z_norm,
                             z_norm=z_norm, norm_xhat=xhat, norm_rstd=rstd.squeeze(-1), act_grad=act_grad.detach(),
                             values=patches, keep=torch.ones(n, dtype=x.dtype, device=x.device),
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
    for lin in reversed(head_linears(visual)):  # back through the projection after the pool: [N, D] -> [N, d]
        g_z = g_z @ lin.weight
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


def autograd_relevance(visual: Tower, pixels: torch.Tensor, pos: torch.Tensor | None, emb: torch.Tensor,
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
        z = F.normalize(_pool_output(visual, attn, values.expand(n_emb, -1, -1, -1)), dim=-1)
        s = (F.normalize(emb, dim=-1) * z).sum(-1)
        grad, = torch.autograd.grad(s.sum(), attn, create_graph=torch.is_grad_enabled() and emb.requires_grad)
    rel = grad.clamp(min=0).mean(dim=1)[:, 0, n_prefix(visual):]
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

