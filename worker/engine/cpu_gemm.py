"""The decomposed step's GEMMs through oneDNN on the CPU: products with one constant matrix (``x @ W``, ``x @ Wᵀ``)
and the per-head attention products (:func:`linear`).

The decomposed step's two large GEMMs multiply by the same constant ``[m, d]`` matrix (the last block's folded
MLP weights, :class:`worker.engine.legrad.BlockConstants`). For those shapes PyTorch's BLAS (MKL's sgemm) reached
40–92 % of what oneDNN does with the matrix packed once into its blocked layout on this project's CPUs (AMD EPYC,
Zen 4; it varies with the VM's phase: ``benchmarks/results/cpu_gemm.md``, ``vs_official.md``); the two agree to
fp32 rounding. ``backend="blas"`` (or a torch built without oneDNN, or any non-fp32 or non-CPU input) keeps the
plain ``torch.matmul``. The packed copies cost one extra ``[m, d]`` matrix per orientation (9.4 MB each for
ViT-B/16).

None of this pays without AVX-512: on an AVX2 EPYC oneDNN's fp32 products ran at MKL's rate and its
per-head attention products slower, so ``auto`` (the default, :func:`resolve`) keeps BLAS on such CPUs.

The attention side's products, ``[n, dh] × [dh, n-1]`` per head forward and ``[n, n-1] × [n-1, dh]`` per head
and mask backward, ran at 87–93 GMAC/s as torch's batched matmul (BLAS) on this project's CPU (AMD EPYC with
AVX-512) and at 160–220 as one oneDNN linear per head; below about 320 patch columns the per-call
cost of the 12-plus calls outweighs that (:data:`ONEDNN_MIN_COLUMNS`, measured crossover; ``legrad`` keeps
torch's batched matmul there).
"""

from __future__ import annotations

import torch

BACKENDS = ("onednn", "blas")
#: what MASKINV_CPU_GEMM accepts: a backend, or ``auto`` (:func:`resolve`)
CHOICES = ("auto", *BACKENDS)
#: CPU capabilities (``torch.backends.cpu.get_cpu_capability()``) on which ``auto`` picks oneDNN. Measured with
#: ``benchmarks/bench_cpu_gemm.py``: on an AVX-512 EPYC the warm inversion ran 1.83-1.96x faster through oneDNN
#: and the trunk 1.93-2.21x; on an AVX2 EPYC oneDNN's fp32 products ran no faster than MKL's (MLP
#: 64-71 vs 67-78 GMAC/s) and its per-head attention products slower (38-42 vs 51-63), so the warm inversion took
#: 0.94-0.95x and the trunk 0.98-1.15x of BLAS while the packed trunk costs 0.3 GB more.
ONEDNN_CAPABILITIES = ("AVX512",)
#: the attention products go through oneDNN per head only from this many patch columns (n - 1) on: at 196 and
#: 256 columns (S = 224, 256 at patch 16) one batched BLAS matmul was faster; at 324 (S = 288) the per-head calls
#: were even forward and faster backward, from 441 (S = 336) on faster both ways (per mask-step at 448 px:
#: 6.7 -> 3.6 ms forward, 5.6 -> 2.6 ms backward)
ONEDNN_MIN_COLUMNS = 320


def resolve(choice: str, capability: str | None = None) -> str:
    """The backend that ``choice`` (one of :data:`CHOICES`) means on this machine: ``auto`` is ``onednn`` where the
    CPU's vector capability (``capability``, default torch's reading) is in :data:`ONEDNN_CAPABILITIES` and this
    torch has the operators (:func:`onednn_available`), ``blas`` elsewhere; a backend names itself."""
    if choice not in CHOICES:
        raise ValueError(f"cpu_gemm must be one of {list(CHOICES)}, got {choice!r}")
    if choice != "auto":
        return choice
    capability = torch.backends.cpu.get_cpu_capability() if capability is None else capability
    return "onednn" if capability in ONEDNN_CAPABILITIES and onednn_available() else "blas"


def onednn_applies(backend: str, x: torch.Tensor) -> bool:
    """Whether products of fp32 CPU tensors like ``x`` go through oneDNN under ``backend`` (MASKINV_CPU_GEMM)."""
    return backend == "onednn" and x.device.type == "cpu" and x.dtype == torch.float32 and onednn_available()


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
        return onednn_applies(self.backend, x) and onednn_applies(self.backend, self.matrix)

    def mm(self, x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """``x @ W`` ``[r, c]`` (``transpose``: ``x @ Wᵀ`` ``[r, k]``) for a 2-D ``x``."""
        w = self.matrix.T if transpose else self.matrix
        if not self.uses_onednn(x):
            return x @ w.to(x.dtype)
        packed = self._packed.get(transpose)
        if packed is None:  # oneDNN's linear computes x @ weightᵀ with weight [out, in]
            packed = self._packed[transpose] = torch.ops.mkldnn._reorder_linear_weight(w.T.contiguous(), None)
        return linear(x, packed)


def heads_use_onednn(backend: str, x: torch.Tensor, columns: int) -> bool:
    """Whether the attention products of a step on tensors like ``x`` with ``columns`` patch columns go
    through :func:`linear` per head (``backend`` "onednn", fp32 on the CPU, at least :data:`ONEDNN_MIN_COLUMNS`)."""
    return columns >= ONEDNN_MIN_COLUMNS and onednn_applies(backend, x)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weightᵀ + bias`` ``[..., o]`` through oneDNN's linear for fp32 CPU ``x`` ``[..., i]`` and ``weight``
    ``[o, i]``, plain or packed once by ``torch.ops.mkldnn._reorder_linear_weight`` (constant weights)."""
    lead = x.shape[:-1]
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]).contiguous(), weight.contiguous(), bias,
                                             "none", [], "")
    return out.view(*lead, out.shape[-1])
