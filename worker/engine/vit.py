"""The one adapter over open_clip's ViT: the trunk, and a :class:`LastBlock` view of the last block.

Every other module of the worker reads the model through this one (``last_block``, ``trunk_forward``,
``tokens_forward``, ``global_embedding``, ``last_block_keys`` ...); none reaches into open_clip's modules itself:
:mod:`worker.engine.trunk` runs the trunk's blocks from the :class:`~worker.engine.trunk.BlockParts` that
:func:`onednn_parts` reads here.

Two shapes of last block are supported, both with a fused qkv projection:

* open_clip's ``ResidualAttentionBlock`` around ``nn.MultiheadAttention`` (batch-first, ``in_proj_weight``);
* a block around open_clip's own ``Attention`` class (``in_proj_weight`` parameters or a ``qkv`` Linear,
  an ``out_proj`` or ``proj`` Linear, tokens batch-first), without qk-norm, scaled-cosine attention, head
  scales or inner norms (they would change the attention the map differentiates).

The loaded model is never mutated: position embeddings for other input sizes are resampled once per size
and kept beside the model (:class:`PosEmbedCache`).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import resample_abs_pos_embed

from worker.engine import attn_pool, trunk

Tower = Any  # an open_clip vision tower (read by attribute: open_clip's modules are typed as nn.Module)


def resample_pos_embed(pos: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """Resample an absolute position embedding ``[1 + gh*gw, C]`` (class token first) to a new grid: timm's
    ``resample_abs_pos_embed``, bicubic with antialiasing in float32, the class token kept as is."""
    if tuple(old_grid) == tuple(new_grid):
        return pos
    out = resample_abs_pos_embed(pos[None].float(), list(new_grid), list(old_grid), num_prefix_tokens=1,
                                 interpolation="bicubic", antialias=True)
    return out[0].to(pos.dtype)


class PosEmbedCache:
    """Position embeddings of one ViT per input size, computed once per size."""

    def __init__(self, visual: Tower):
        self.visual = visual
        self._by_size: dict[int, torch.Tensor] = {}

    def get(self, size: int) -> torch.Tensor:
        """Position embedding ``[1 + (size/p)^2, width]`` for square inputs of ``size`` pixels."""
        if size not in self._by_size:
            p = patch_size_of(self.visual)
            if size % p:
                raise ValueError(f"input size {size} is not a multiple of the patch size {p}")
            old = tuple(self.visual.grid_size)
            self._by_size[size] = resample_pos_embed(self.visual.positional_embedding.detach(), old,
                                                     (size // p, size // p))
        return self._by_size[size]


def patch_size_of(visual: Tower) -> int:
    p = visual.patch_size
    return int(p[0] if isinstance(p, (tuple, list)) else p)


def _is_identity(module: nn.Module | None) -> bool:
    return module is None or isinstance(module, nn.Identity)


def _fused_qkv(attn: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``(weight [3d, d], bias [3d] | None)`` of a fused qkv projection, or None when there is none."""
    if isinstance(attn, nn.MultiheadAttention):
        return (attn.in_proj_weight, attn.in_proj_bias) if attn._qkv_same_embed_dim else None
    weight = getattr(attn, "in_proj_weight", None)
    if isinstance(weight, torch.Tensor):
        return weight, getattr(attn, "in_proj_bias", None)
    qkv = getattr(attn, "qkv", None)
    if isinstance(qkv, nn.Linear):
        return qkv.weight, qkv.bias
    return None


def _out_projection(attn: nn.Module) -> nn.Linear | None:
    for name in ("out_proj", "proj"):
        lin = getattr(attn, name, None)
        if isinstance(lin, nn.Linear):
            return lin
    return None


def block_problem(block: Any, which: str = "the last block") -> str | None:
    """Why ``block`` is not a ResidualAttentionBlock of the supported shape (fused qkv, plain attention, LayerNorms,
    MLP c_fc -> activation -> c_proj), or None when it is. ``which`` names it in the message."""
    attn = getattr(block, "attn", None)
    if attn is None:
        return f"{which} ({type(block).__name__}) has no attention module"
    if _fused_qkv(attn) is None:
        return (f"{which}'s attention ({type(attn).__name__}) has no fused qkv projection "
                "(separate q/k/v projections are not supported)")
    if _out_projection(attn) is None:
        return f"{which}'s attention ({type(attn).__name__}) has no output projection"
    if not getattr(attn, "batch_first", True):
        return f"{which}'s attention must be batch-first"
    if not isinstance(getattr(attn, "num_heads", None), int):
        return f"{which}'s attention ({type(attn).__name__}) does not say its head count"
    for name in ("ln_q", "ln_k", "ln_inner"):
        if not _is_identity(getattr(attn, name, None)):
            return f"attention with {name} (qk-norm / inner norm) is not supported"
    for name in ("logit_scale", "head_scale"):
        if getattr(attn, name, None) is not None:
            return f"attention with {name} (scaled-cosine attention / head scales) is not supported"
    if not _is_identity(getattr(block, "ln_attn", None)):
        return "blocks with a norm after attention (ln_attn) are not supported"
    mlp = getattr(block, "mlp", None)
    names = [n for n, m in mlp.named_children() if not isinstance(m, nn.Identity)] if mlp is not None else []
    if names != ["c_fc", "gelu", "c_proj"]:
        return f"{which}'s MLP must be c_fc, activation, c_proj; got {names}"
    for name in ("ln_1", "ln_2"):
        if not isinstance(getattr(block, name, None), nn.LayerNorm):
            return f"{which}'s {name} must be a LayerNorm"
    return None


def onednn_parts(block: Any) -> trunk.BlockParts | None:
    """The pieces :mod:`worker.engine.trunk` needs to run ``block`` through oneDNN, or None when it cannot: the shape
    the
    engine supports (:func:`block_problem`) with ``nn.MultiheadAttention`` (no added key/value biases) and
    ``nn.Linear`` layers."""
    if block_problem(block, "the block") is not None:
        return None
    attn, mlp = block.attn, block.mlp
    if not (isinstance(attn, nn.MultiheadAttention) and attn.bias_k is None
            and all(isinstance(m, nn.Linear) for m in (attn.out_proj, mlp.c_fc, mlp.c_proj))):
        return None
    return trunk.BlockParts(heads=int(attn.num_heads), qkv_weight=attn.in_proj_weight, qkv_bias=attn.in_proj_bias,
                            out=attn.out_proj, fc=mlp.c_fc, act=mlp.gelu, proj=mlp.c_proj, ln_1=block.ln_1,
                            ln_2=block.ln_2, ls_1=block.ls_1, ls_2=block.ls_2)


def check_supported(visual: Tower) -> None:
    """Raise a clear ``NotImplementedError`` for open_clip vision towers the engine cannot decompose: open_clip
    ViTs of the shape :class:`LastBlock` reads, and attention-pooled timm towers (SigLIP) of the shape
    :func:`worker.engine.attn_pool.tower_problem` accepts."""
    if attn_pool.is_attention_pooled(visual):
        attn_pool.check_supported(visual)
        return
    check_class_token_tower(visual)


def check_class_token_tower(visual: Tower) -> None:
    """Raise ``NotImplementedError`` unless ``visual`` is an open_clip ViT whose last block :class:`LastBlock`
    reads (the class-token / mean-token path of :mod:`worker.engine.legrad`)."""
    if not hasattr(visual, "transformer") or not hasattr(visual, "conv1"):
        raise NotImplementedError(f"{type(visual).__name__} is not an open_clip VisionTransformer "
                                  "(timm towers without an attention pool, ConvNeXt and ResNet towers are not "
                                  "supported)")
    if getattr(visual, "attn_pool", None) is not None:
        raise NotImplementedError("open_clip ViTs with attentional pooling (CoCa) are not supported")
    if not getattr(visual.transformer, "batch_first", True):
        raise NotImplementedError("the engine expects batch_first transformers (open_clip >= 2.24)")
    problem = block_problem(visual.transformer.resblocks[-1])
    if problem is not None:
        raise NotImplementedError(problem)
    if not isinstance(getattr(visual, "ln_post", None), nn.LayerNorm):
        raise NotImplementedError("the vision tower's ln_post must be a LayerNorm")


def _gamma(module: nn.Module, width: int, like: torch.Tensor) -> torch.Tensor:
    """LayerScale gamma ``[d]`` of an ``ls_*`` module (ones for ``nn.Identity``)."""
    gamma = getattr(module, "gamma", None)
    if gamma is None:
        return torch.ones(width, dtype=like.dtype, device=like.device)
    return gamma.detach()


def _norm_weight(norm: nn.Module, width: int, like: torch.Tensor) -> torch.Tensor:
    w = getattr(norm, "weight", None)
    return w.detach() if w is not None else torch.ones(width, dtype=like.dtype, device=like.device)


@dataclass(frozen=True)
class LastBlock:
    """What MaskInversion reads of a ViT's last block and head, open_clip's layout hidden behind it.

    Shapes: width d, MLP width m, heads H (head width d / H), embedding dim D.
    """

    heads: int
    width: int  # d
    mlp_width: int  # m
    qkv_weight: torch.Tensor  # [3d, d]
    qkv_bias: torch.Tensor | None  # [3d]
    out_proj: nn.Linear  # d -> d (weight [d, d])
    ln_1: nn.LayerNorm
    ln_2: nn.LayerNorm
    ls_1: nn.Module  # LayerScale or Identity
    ls_2: nn.Module
    c_fc: nn.Linear  # d -> m
    act: nn.Module  # elementwise activation
    c_proj: nn.Linear  # m -> d
    ln_post: nn.LayerNorm
    proj: torch.Tensor | None  # [d, D]

    @property
    def head_width(self) -> int:
        return self.width // self.heads

    def ls1_gamma(self) -> torch.Tensor:
        """``[d]`` gamma of ls_1 (ones without LayerScale)."""
        return _gamma(self.ls_1, self.width, self.c_fc.weight)

    def ls2_gamma(self) -> torch.Tensor:
        return _gamma(self.ls_2, self.width, self.c_fc.weight)

    def ln2_gamma(self) -> torch.Tensor:
        return _norm_weight(self.ln_2, self.width, self.c_fc.weight)

    def attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention probabilities ``[B, H, n, n]`` and values ``[B, H, n, dh]`` on tokens ``x`` ``[B, n, d]``."""
        b, n, d = x.shape
        qkv = F.linear(self.ln_1(x), self.qkv_weight, self.qkv_bias)
        q, k, v = qkv.view(b, n, 3, self.heads, self.head_width).permute(2, 0, 3, 1, 4)
        attn = torch.softmax((q * self.head_width ** -0.5) @ k.transpose(-1, -2), dim=-1)
        return attn, v

    def after_attention(self, x: torch.Tensor, attn: torch.Tensor, values: torch.Tensor) -> "LastBlockActivations":
        """Finish the block from its attention: ``attn`` ``[B, H, n, n]``, ``values`` ``[B, H, n, dh]``."""
        b, n, d = x.shape
        o = (attn @ values).transpose(1, 2).reshape(b, n, d)
        y1 = x + self.ls_1(self.out_proj(o))
        pre = self.c_fc(self.ln_2(y1))
        out = y1 + self.ls_2(self.c_proj(self.act(pre)))
        return LastBlockActivations(attn=attn, values=values, y1=y1, pre_act=pre, out=out)

    def pooled_feature(self, tokens: torch.Tensor) -> torch.Tensor:
        """Explainability image feature before normalisation: ``proj(ln_post(mean over all tokens))`` ``[B, D]``."""
        pooled = self.ln_post(tokens.mean(dim=1))
        return pooled @ self.proj if self.proj is not None else pooled


@dataclass
class LastBlockActivations:
    """The last block's internals for tokens ``x`` ``[B, n, d]``."""

    attn: torch.Tensor  # A, attention probabilities [B, H, n, n]
    values: torch.Tensor  # V per head [B, H, n, dh]
    y1: torch.Tensor  # after the attention residual [B, n, d]
    pre_act: torch.Tensor  # MLP pre-activation [B, n, m]
    out: torch.Tensor  # block output [B, n, d]


_views: "weakref.WeakKeyDictionary[nn.Module, LastBlock]" = weakref.WeakKeyDictionary()


def last_block(visual: Tower) -> LastBlock:
    """The :class:`LastBlock` view of ``visual`` (checked with :func:`check_supported`, built once per model)."""
    view = _views.get(visual)
    if view is None:
        check_class_token_tower(visual)
        block = visual.transformer.resblocks[-1]
        attn = block.attn
        qkv, out_proj = _fused_qkv(attn), _out_projection(attn)
        assert qkv is not None and out_proj is not None  # check_class_token_tower checked both
        weight, bias = qkv
        view = LastBlock(heads=int(attn.num_heads), width=int(weight.shape[1]),
                         mlp_width=int(block.mlp.c_fc.out_features), qkv_weight=weight, qkv_bias=bias,
                         out_proj=out_proj, ln_1=block.ln_1, ln_2=block.ln_2, ls_1=block.ls_1,
                         ls_2=block.ls_2, c_fc=block.mlp.c_fc, act=block.mlp.gelu, c_proj=block.mlp.c_proj,
                         ln_post=visual.ln_post, proj=visual.proj)
        _views[visual] = view
    return view


def trunk_forward(visual: Tower, pixels: torch.Tensor, pos: torch.Tensor, gemm: str = "onednn") -> torch.Tensor:
    """Tokens entering the last block, ``[B, n, width]`` (n = 1 + grid²), from pixels ``[B, 3, S, S]``. ``gemm``
    ("onednn" | "blas", MASKINV_CPU_GEMM): under "onednn", without gradients, fp32 on the CPU, the blocks' linear
    layers go through oneDNN with packed weights (:mod:`worker.engine.trunk`)."""
    x = visual.conv1(pixels.to(visual.conv1.weight.dtype))
    x = x.flatten(2).transpose(1, 2)
    cls_tok = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls_tok, x], dim=1) + pos.to(x.dtype)
    x = visual.ln_pre(x)
    return trunk.run_blocks(visual.transformer.resblocks[:-1], x, gemm, parts_of=onednn_parts)


def tokens_forward(visual: Tower, pixels: torch.Tensor, pos: torch.Tensor, gemm: str = "onednn") -> torch.Tensor:
    """The last block's output tokens ``[B, n, width]`` for pixels ``[B, 3, S, S]`` (``gemm``: see
    :func:`trunk_forward`)."""
    view = last_block(visual)
    x = trunk_forward(visual, pixels, pos, gemm)
    attn, values = view.attention(x)
    return view.after_attention(x, attn, values).out


def global_embedding(visual: Tower, tokens: torch.Tensor) -> torch.Tensor:
    """The model's own image embedding ``[B, D]`` (class token after ln_post and proj for CLIP ViTs)."""
    pool = getattr(visual, "_pool", None) or getattr(visual, "_global_pool")
    pooled, _ = pool(tokens)
    return pooled @ visual.proj if visual.proj is not None else pooled


@torch.no_grad()
def last_block_keys(visual: Tower, tokens: torch.Tensor) -> torch.Tensor:
    """Patch keys ``[B, g², d]`` (heads concatenated, class token dropped) of the last block for the tokens
    ``[B, 1 + g², d]`` entering it (:func:`trunk_forward`'s output)."""
    view = last_block(visual)
    d = view.width
    bias = view.qkv_bias[d:2 * d] if view.qkv_bias is not None else None
    return F.linear(view.ln_1(tokens), view.qkv_weight[d:2 * d], bias)[:, 1:]


def patch_keys(visual: Tower, pixels: torch.Tensor, pos: torch.Tensor | None, gemm: str = "onednn") -> torch.Tensor:
    """The last block's patch keys ``[B, g², d]`` (heads concatenated, prefix tokens dropped) of pixels
    ``[B, 3, S, S]`` for either tower kind: :func:`last_block_keys` for class-token ViTs,
    :func:`worker.engine.attn_pool.patch_keys` for attention-pooled towers (``pos`` from the tower's
    ``PosEmbedCache``)."""
    if attn_pool.is_attention_pooled(visual):
        return attn_pool.patch_keys(visual, pixels, pos, gemm)
    assert pos is not None  # class-token towers always have a position embedding
    with torch.no_grad():
        return last_block_keys(visual, trunk_forward(visual, pixels, pos, gemm))


def grid_side(n_tokens: int) -> int:
    g = math.isqrt(n_tokens - 1)
    if g * g != n_tokens - 1:
        raise ValueError(f"{n_tokens} tokens do not form a square grid plus a class token")
    return g
