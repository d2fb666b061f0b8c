"""The soft Dice loss of an upsampled, min-max normalised relevance map, computed on the patch grid.

The method's loss is ``soft_dice(minmax(up(E)), M)`` with ``up`` bilinear upsampling of the ``[g, g]`` patch
relevance ``E`` by the patch size ``p`` to ``[S, S]`` (``S = g·p``, ``align_corners=False``) and ``M`` the
``[S, S]`` mask target. ``up`` is linear, ``up(E) = U E Uᵀ`` with ``U`` ``[S, g]`` (each row: the two
interpolation weights of one output row), so the loss needs no ``[S, S]`` map:

* ``Σ up(E) ⊙ M = ⟨E, Uᵀ M U⟩`` and ``Σ up(E) = cᵀ E c`` with ``c = Uᵀ 1`` (``Uᵀ M U`` once per mask);
* ``min`` / ``max`` of ``up(E)``: a bilinear function of a cell's two fractions is linear in each, so over the
  cell's samples it peaks at its first or last sample row and column: ``U``'s rows reduced to those
  (``≤ 2g``) give the same extremes on a ``[≤2g, ≤2g]`` lattice;
* ``minmax`` is affine per mask, so ``Σ maps ⊙ M = (⟨E, UᵀMU⟩ − lo·ΣM) / (hi − lo)`` and
  ``Σ maps = (cᵀEc − lo·S²) / (hi − lo)``.

Equal to :func:`worker.engine.inversion.soft_dice_loss` of :func:`worker.engine.legrad.relevance_to_map` up to float
rounding
(and to how exact ties between different cells share the gradient of the extremes), at ``O(g²)`` per mask
instead of ``O(S²)`` forward and backward (at 448 px: 28² instead of 448²).
"""

from __future__ import annotations

import torch


def bilinear_weights(grid: int, patch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per output row of ``F.interpolate(scale_factor=p, mode="bilinear", align_corners=False)`` from ``g`` to
    ``g·p``: the two source indices ``i0``, ``i1`` ``[g·p]`` and the weight ``λ`` ``[g·p]`` (float64) of ``i1``."""
    src = ((torch.arange(grid * patch, dtype=torch.float64) + 0.5) / patch - 0.5).clamp_min(0.0)
    i0 = src.floor().long().clamp_max(grid - 1)
    return i0, (i0 + 1).clamp_max(grid - 1), src - i0


def bilinear_matrix(grid: int, patch: int, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``U`` ``[g·p, g]`` with ``up(E) = U E Uᵀ`` (:func:`bilinear_weights`), and the index ``[≤2g]`` of its rows
    that hold every cell's extreme samples (first and last row of each source interval)."""
    return _matrix_of(*bilinear_weights(grid, patch), grid, dtype, device)


def _matrix_of(i0: torch.Tensor, i1: torch.Tensor, lam1: torch.Tensor, grid: int, dtype: torch.dtype,
               device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`bilinear_matrix` from :func:`bilinear_weights`' output."""
    patch = len(i0) // grid
    rows = torch.arange(grid * patch)
    u = torch.zeros(grid * patch, grid, dtype=torch.float64)
    u.index_put_((rows, i0), 1.0 - lam1, accumulate=True)
    u.index_put_((rows, i1), lam1, accumulate=True)
    keep = []
    for k in range(grid):
        members = (i0 == k).nonzero().flatten()
        if len(members):
            keep += [int(members[lam1[members].argmin()]), int(members[lam1[members].argmax()])]
    return u.to(dtype=dtype, device=device), torch.tensor(sorted(set(keep)), device=device)


class GridDice:
    """Soft Dice loss (smoothing ``smooth``) of ``minmax(up(E))`` against fixed mask targets ``[N, S, S]``.

    ``loss(rel)`` takes the patch relevance ``[N, g²]`` and returns ``[N]``; differentiable w.r.t. ``rel``.
    ``extremes``: "upsampled" (min-max of ``up(E)``, the class-token map) or "grid" (``up(minmax(E))``, the
    attention-pooled map: ``up`` of a constant is that constant, so this is the same formula with the extremes
    taken over the ``[g, g]`` cells).
    """

    def __init__(self, targets: torch.Tensor, grid: int, patch: int, smooth: float = 1.0,
                 extremes: str = "upsampled"):
        if extremes not in ("upsampled", "grid"):
            raise ValueError(f"extremes must be 'upsampled' or 'grid', got {extremes!r}")
        self.on_grid = extremes == "grid"
        n, h, w = targets.shape
        if h != grid * patch or w != grid * patch:
            raise ValueError(f"targets must be [N, {grid * patch}, {grid * patch}], got {list(targets.shape)}")
        i0, i1, lam1 = bilinear_weights(grid, patch)
        u, extreme_rows = _matrix_of(i0, i1, lam1, grid, targets.dtype, targets.device)
        self.grid, self.smooth = grid, float(smooth)
        # Uᵀ M U [N, g, g], one mask at a time: a mask's loss never depends on the other masks of its batch
        self.down = torch.stack([u.T @ m @ u for m in targets]) if n else targets.new_zeros(0, grid, grid)
        self.mask_sum = targets.sum(dim=(1, 2))  # [N]
        self.col = u.sum(dim=0)  # [g]: Uᵀ 1
        # the extreme samples' two source indices and weights (interpolated by gathers: elementwise per mask)
        self.i0, self.i1 = i0[extreme_rows.cpu()].to(targets.device), i1[extreme_rows.cpu()].to(targets.device)
        self.w1 = lam1[extreme_rows.cpu()].to(dtype=targets.dtype, device=targets.device)
        self.area = float(h * w)

    def __call__(self, rel: torch.Tensor) -> torch.Tensor:
        e = rel.reshape(-1, self.grid, self.grid).to(self.down.dtype)
        if self.on_grid:
            ext = e
        else:
            w1, w0 = self.w1, 1.0 - self.w1
            rows = e[:, self.i0] * w0[None, :, None] + e[:, self.i1] * w1[None, :, None]  # [N, r, g]
            ext = rows[:, :, self.i0] * w0 + rows[:, :, self.i1] * w1  # [N, r, r]: where up(E) has its extremes
        lo, hi = ext.amin(dim=(1, 2)), ext.amax(dim=(1, 2))
        span = (hi - lo).clamp_min(1e-12)
        flat = hi - lo <= 1e-12  # a constant map normalises to zeros (relevance_to_map: 0 / 1e-12)
        inter = ((e * self.down).sum(dim=(1, 2)) - lo * self.mask_sum) / span
        up_sum = ((e * self.col[None, :, None]).sum(dim=1) * self.col).sum(dim=1)  # cᵀ E c
        maps_sum = (up_sum - lo * self.area) / span
        inter, maps_sum = torch.where(flat, 0.0, inter), torch.where(flat, 0.0, maps_sum)
        return 1.0 - (2.0 * inter + self.smooth) / (maps_sum + self.mask_sum + self.smooth)
