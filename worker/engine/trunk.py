"""The ViT trunk's blocks with their four linear layers through oneDNN on the CPU (weights packed once per model).

``worker.engine.vit.trunk_forward`` runs every block but the last on each new image (the image-state cache's miss path,
the masked crops and the proposal keys). open_clip's blocks call ``F.linear`` / ``nn.MultiheadAttention``,
whose fp32 CPU GEMMs go through torch's BLAS (MKL's sgemm); on an AVX-512 EPYC that ran the blocks' shapes
at 87–108 GMAC/s against 235–250 for oneDNN with the weight packed (``benchmarks/results/cpu_gemm.md``); on an AVX2
CPU the two are even, and ``MASKINV_CPU_GEMM=auto`` (the default) keeps the blocks' own forward there. A block
here is the same computation, written out: ``x + ls_1(out_proj(attention(in_proj(ln_1(x)))))`` then
``x + ls_2(c_proj(act(c_fc(ln_2(x)))))``, the attention by ``F.scaled_dot_product_attention``; equal to the
block's own forward to fp32 rounding (tests). The model is never changed: packed copies live beside it, in a
weak-keyed cache (one extra copy of each block's weights: 4·(4d² + 2·d·m) bytes per block, 28 MB per ViT-B/16
block, 0.3 GB for the trunk).

Blocks of another shape (qk-norm, scaled-cosine attention, a norm after attention or inside the MLP, separate
q/k/v projections, attention masks), non-fp32 inputs, other devices and ``MASKINV_CPU_GEMM=blas`` run the block's
own forward. This module never reads open_clip's modules: the adapter (:func:`worker.engine.vit.onednn_parts`) hands it
each block's :class:`BlockParts`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from worker.engine import cpu_gemm


@dataclass(frozen=True)
class BlockParts:
    """One block as ``x + ls_1(out(attention(qkv(ln_1(x)))))`` then ``x + ls_2(proj(act(fc(ln_2(x)))))``:
    the fused qkv weight ``[3d, d]`` (bias ``[3d]``), three ``nn.Linear`` layers and the block's own modules."""

    heads: int
    qkv_weight: torch.Tensor
    qkv_bias: torch.Tensor | None
    out: nn.Linear
    fc: nn.Linear
    act: nn.Module
    proj: nn.Linear
    ln_1: nn.Module
    ln_2: nn.Module
    ls_1: nn.Module
    ls_2: nn.Module


@dataclass
class PackedBlock:
    """One block's linear layers packed for oneDNN (``[out, in]`` weights in its blocked layout) and its parts."""

    parts: BlockParts
    heads: int
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    out: torch.Tensor
    out_bias: torch.Tensor | None
    fc: torch.Tensor
    fc_bias: torch.Tensor | None
    proj: torch.Tensor
    proj_bias: torch.Tensor | None


_packed: "weakref.WeakKeyDictionary[nn.Module, PackedBlock | None]" = weakref.WeakKeyDictionary()


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None)


def _bias(bias: torch.Tensor | None) -> torch.Tensor | None:
    return None if bias is None else bias.detach().contiguous()


PartsOf = Callable[[nn.Module], "BlockParts | None"]


def packed_block(block: nn.Module, parts_of: PartsOf) -> PackedBlock | None:
    """The :class:`PackedBlock` of ``block`` (built on first use), None when ``parts_of(block)`` is None."""
    if block in _packed:
        return _packed[block]
    parts = parts_of(block)
    pb = None
    if parts is not None:
        with torch.no_grad():
            pb = PackedBlock(parts=parts, heads=parts.heads, qkv=_pack(parts.qkv_weight),
                             qkv_bias=_bias(parts.qkv_bias), out=_pack(parts.out.weight),
                             out_bias=_bias(parts.out.bias), fc=_pack(parts.fc.weight), fc_bias=_bias(parts.fc.bias),
                             proj=_pack(parts.proj.weight), proj_bias=_bias(parts.proj.bias))
    _packed[block] = pb
    return pb


def block_forward(pb: PackedBlock, x: torch.Tensor) -> torch.Tensor:
    """The block's output for tokens ``x`` ``[B, n, d]`` with the packed linear layers of ``pb``."""
    b, n, d = x.shape
    dh = d // pb.heads
    p = pb.parts
    qkv = cpu_gemm.linear(p.ln_1(x), pb.qkv, pb.qkv_bias).view(b, n, 3, pb.heads, dh).permute(2, 0, 3, 1, 4)
    a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # [B, H, n, dh]
    a = cpu_gemm.linear(a.transpose(1, 2).reshape(b, n, d), pb.out, pb.out_bias)
    x = x + p.ls_1(a)
    h = p.act(cpu_gemm.linear(p.ln_2(x), pb.fc, pb.fc_bias))
    return x + p.ls_2(cpu_gemm.linear(h, pb.proj, pb.proj_bias))


def uses_onednn(backend: str, x: torch.Tensor) -> bool:
    """Whether blocks run here for inputs like ``x`` under ``MASKINV_CPU_GEMM=backend``."""
    return cpu_gemm.onednn_applies(backend, x) and not torch.is_grad_enabled()


def run_blocks(blocks: Iterable[nn.Module], x: torch.Tensor, backend: str, parts_of: PartsOf) -> torch.Tensor:
    """Run ``blocks`` on ``x`` ``[B, n, d]`` in order: each one ``parts_of`` can describe through oneDNN (see
    :func:`uses_onednn`), the others through their own forward."""
    fast = uses_onednn(backend, x)
    for block in blocks:
        pb = packed_block(block, parts_of) if fast else None
        x = block_forward(pb, x) if pb is not None else block(x)
    return x
