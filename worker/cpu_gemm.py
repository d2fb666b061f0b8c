"""Products with one constant matrix, ``x @ W`` and ``x @ Wᵀ``, through oneDNN on the CPU.

The decomposed step's two large GEMMs multiply by the same constant ``[m, d]`` matrix (the last block's folded
MLP weights, :class:`worker.legrad.BlockConstants`). For those shapes PyTorch's BLAS (MKL's sgemm) reached
40–92 % of what oneDNN does with the matrix packed once into its blocked layout on this project's CPUs (AMD EPYC,
Zen 4; it varies with the VM's phase: ``benchmarks/results/cpu_gemm.md``, ``vs_official.md``); the two agree to
fp32 rounding. ``backend="blas"`` (or a torch built without oneDNN, or any non-fp32 or non-CPU input) keeps the
plain ``torch.matmul``. The packed copies cost one extra ``[m, d]`` matrix per orientation (9.4 MB each for
ViT-B/16).
"""

from __future__ import annotations

import torch

BACKENDS = ("onednn", "blas")


def onednn_available() -> bool:
    """Whether this torch has oneDNN and the packed-linear operators used here."""
    ops = torch.ops.mkldnn
    return torch.backends.mkldnn.is_available() and hasattr(ops, "_linear_pointwise") \
        and hasattr(ops, "_reorder_linear_weight")


class PackedMatrix:
    """A constant matrix ``W`` ``[k, c]`` with ``x @ W`` and ``x @ Wᵀ`` for ``x`` ``[r, k]`` / ``[r, c]``.

    With ``backend="onednn"`` each orientation is packed for oneDNN on its first fp32 CPU use (one copy of ``W``
    each) and reused; everything else goes through ``torch.matmul`` (in ``x``'s dtype).
    """

    def __init__(self, matrix: torch.Tensor, backend: str = "onednn"):
        if backend not in BACKENDS:
            raise ValueError(f"gemm backend must be one of {list(BACKENDS)}, got {backend!r}")
        if matrix.dim() != 2:
            raise ValueError(f"expected a matrix [k, c], got shape {tuple(matrix.shape)}")
        self.matrix = matrix
        self.backend = backend
        self._packed: dict[bool, torch.Tensor] = {}

    @property
    def shape(self) -> torch.Size:
        return self.matrix.shape

    def uses_onednn(self, x: torch.Tensor) -> bool:
        return (self.backend == "onednn" and x.device.type == "cpu" and x.dtype == torch.float32
                and self.matrix.dtype == torch.float32 and self.matrix.device.type == "cpu" and onednn_available())

    def mm(self, x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """``x @ W`` ``[r, c]`` (``transpose``: ``x @ Wᵀ`` ``[r, k]``) for a 2-D ``x``."""
        w = self.matrix.T if transpose else self.matrix
        if not self.uses_onednn(x):
            return x @ w.to(x.dtype)
        packed = self._packed.get(transpose)
        if packed is None:  # oneDNN's linear computes x @ weightᵀ with weight [out, in]
            packed = self._packed[transpose] = torch.ops.mkldnn._reorder_linear_weight(w.T.contiguous(), None)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, None, "none", [], "")
