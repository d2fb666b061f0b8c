"""The open_clip ViT, split where MaskInversion needs it: the trunk, and the last block around its attention.

The loaded model is never mutated: position embeddings for other input sizes are resampled once per size
and kept beside the model (:class:`PosEmbedCache`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


def resample_pos_embed(pos: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """Resample an absolute position embedding ``[1 + gh*gw, C]`` (class token first) to a new grid.

    Bicubic with antialiasing in float32, the class token kept as is (the same rule as timm's
    ``resample_abs_pos_embed``).
    """
    if tuple(old_grid) == tuple(new_grid):
        return pos
    cls_tok, grid = pos[:1], pos[1:]
    c = grid.shape[-1]
    grid = grid.reshape(1, old_grid[0], old_grid[1], c).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", antialias=True, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], c).to(pos.dtype)
    return torch.cat([cls_tok, grid], dim=0)


class PosEmbedCache:
    """Position embeddings of one ViT per input size, computed once per size."""

    def __init__(self, visual: nn.Module):
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


def patch_size_of(visual: nn.Module) -> int:
    p = visual.patch_size
    return int(p[0] if isinstance(p, (tuple, list)) else p)


def check_supported(visual: nn.Module) -> None:
    """Raise a clear error for open_clip vision towers the engine cannot decompose."""
    if not hasattr(visual, "transformer") or not hasattr(visual, "conv1"):
        raise NotImplementedError(f"{type(visual).__name__} is not an open_clip VisionTransformer "
                                  "(timm / ConvNeXt / ResNet towers are not supported)")
    if getattr(visual, "attn_pool", None) is not None:
        raise NotImplementedError("vision towers with attentional pooling are not supported")
    block = visual.transformer.resblocks[-1]
    if not isinstance(getattr(block, "attn", None), nn.MultiheadAttention):
        raise NotImplementedError("the last vision block must use nn.MultiheadAttention "
                                  "(custom/qk-norm attention blocks are not supported)")
    if not block.attn._qkv_same_embed_dim:
        raise NotImplementedError("attention with separate q/k/v dimensions is not supported")
    if not getattr(visual.transformer, "batch_first", True):
        raise NotImplementedError("the engine expects batch_first transformers (open_clip >= 2.24)")


def trunk_forward(visual: nn.Module, pixels: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Tokens entering the last block, ``[B, n, width]`` (n = 1 + grid²), from pixels ``[B, 3, S, S]``."""
    x = visual.conv1(pixels.to(visual.conv1.weight.dtype))
    x = x.flatten(2).transpose(1, 2)
    cls_tok = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls_tok, x], dim=1) + pos.to(x.dtype)
    x = visual.ln_pre(x)
    for block in visual.transformer.resblocks[:-1]:
        x = block(x)
    return x


@dataclass
class LastBlockActivations:
    """The last block's internals for tokens ``x`` ``[B, n, d]``."""

    attn: torch.Tensor  # A, attention probabilities [B, H, n, n]
    values: torch.Tensor  # V per head [B, H, n, dh]
    y1: torch.Tensor  # after the attention residual [B, n, d]
    pre_act: torch.Tensor  # MLP pre-activation [B, n, m]
    out: torch.Tensor  # block output [B, n, d]


def last_block_attention(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention probabilities ``[B, H, n, n]`` and values ``[B, H, n, dh]`` of ``block`` on ``x``."""
    mha: nn.MultiheadAttention = block.attn
    b, n, d = x.shape
    h = mha.num_heads
    qkv = F.linear(block.ln_1(x), mha.in_proj_weight, mha.in_proj_bias)
    q, k, v = qkv.view(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
    attn = torch.softmax((q * (d // h) ** -0.5) @ k.transpose(-1, -2), dim=-1)
    return attn, v


def last_block_after_attention(block: nn.Module, x: torch.Tensor, attn: torch.Tensor,
                               values: torch.Tensor) -> LastBlockActivations:
    """Finish the last block from its attention: ``attn`` ``[B, H, n, n]``, ``values`` ``[B, H, n, dh]``."""
    b, n, d = x.shape
    o = (attn @ values).transpose(1, 2).reshape(b, n, d)
    y1 = x + block.ls_1(block.attn.out_proj(o))
    pre = block.mlp.c_fc(block.ln_2(y1))
    out = y1 + block.ls_2(block.mlp.c_proj(block.mlp.gelu(pre)))
    return LastBlockActivations(attn=attn, values=values, y1=y1, pre_act=pre, out=out)


def layer_scale(module: nn.Module, width: int, like: torch.Tensor) -> torch.Tensor:
    """LayerScale gamma ``[d]`` of an ``ls_*`` module (ones for ``nn.Identity``)."""
    gamma = getattr(module, "gamma", None)
    if gamma is None:
        return torch.ones(width, dtype=like.dtype, device=like.device)
    return gamma.detach()


def pooled_feature(visual: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Explainability image feature before normalisation: ``proj(ln_post(mean over all tokens))`` ``[B, D]``."""
    return visual.ln_post(tokens.mean(dim=1)) @ visual.proj


def global_embedding(visual: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The model's own image embedding ``[B, D]`` (class token after ln_post and proj for CLIP ViTs)."""
    pooled, _ = visual._pool(tokens)
    return pooled @ visual.proj if visual.proj is not None else pooled


def grid_side(n_tokens: int) -> int:
    g = math.isqrt(n_tokens - 1)
    if g * g != n_tokens - 1:
        raise ValueError(f"{n_tokens} tokens do not form a square grid plus a class token")
    return g
