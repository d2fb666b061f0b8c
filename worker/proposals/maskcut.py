"""MaskCut (CutLER, Wang et al. 2023): class-agnostic object masks by Normalized Cut on ViT key affinities.

Pure functions on a patch-key tensor ``[n, d]`` (one row per patch of a ``g x g`` grid, row-major):

* :func:`key_affinity` — ``W_ij = 1`` where ``cos(k_i, k_j) > tau`` else ``eps`` ``[n, n]``;
* :func:`ncut_vector` — the second-smallest generalised eigenvector of ``(D - W) y = λ D y`` ``[n]``;
* :func:`bipartition` — the foreground side: the side holding the eigenvector's largest-magnitude entry,
  flipped when it covers ``corner_limit`` or more of the grid's 4 corners;
* :func:`maskcut` — ``n_cuts`` rounds: bipartition, keep the connected component holding the seed (or all
  components), then mask the found patches out (their keys set to zero, so they only keep ``eps`` affinities)
  and cut again.

The keys come from the last block: ``k = ln_1(x) @ W_k + b_k`` for the tokens ``x`` entering it
(:func:`worker.engine.vit.last_block_keys`), all heads concatenated, class token dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

TAU = 0.15
EPS = 1e-5
N_CUTS = 3
CORNER_LIMIT = 2


def key_affinity(keys: torch.Tensor, tau: float = TAU, eps: float = EPS) -> torch.Tensor:
    """Binary cosine affinity ``[n, n]`` of keys ``[n, d]``: 1 where cos > ``tau``, else ``eps``.

    An all-zero key (a masked-out patch) has cosine 0 with everything, hence only ``eps`` affinities.
    """
    if keys.ndim != 2:
        raise ValueError(f"keys must be [n, d], got shape {tuple(keys.shape)}")
    k = F.normalize(keys.double(), dim=-1)
    cos = k @ k.T
    return torch.where(cos > tau, torch.ones_like(cos), torch.full_like(cos, eps))


def ncut_vector(affinity: torch.Tensor) -> torch.Tensor:
    """Second-smallest generalised eigenvector ``y`` ``[n]`` of ``(D - W) y = λ D y`` for a symmetric ``W``.

    Solved through the symmetric normalised Laplacian ``I - D^-1/2 W D^-1/2`` (eigenvector ``v``,
    ``y = D^-1/2 v``); the sign is arbitrary.
    """
    w = affinity.double()
    d = w.sum(dim=1)
    if bool((d <= 0).any()):
        raise ValueError("affinity has a row without positive weight")
    r = d.rsqrt()
    lap = torch.eye(w.shape[0], dtype=w.dtype, device=w.device) - r[:, None] * w * r[None, :]
    _, vecs = torch.linalg.eigh(lap)
    return r * vecs[:, 1]


def corners_covered(mask: np.ndarray) -> int:
    """How many of the 4 corners of a ``[g, g]`` mask are set."""
    return int(mask[0, 0]) + int(mask[0, -1]) + int(mask[-1, 0]) + int(mask[-1, -1])


def bipartition(vec: torch.Tensor, grid: tuple[int, int], corner_limit: int = CORNER_LIMIT,
                allowed: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Foreground ``[gh, gw]`` bool and the seed patch index from an NCut vector ``[n]``.

    The split is at the vector's mean; the foreground is the side holding the largest-magnitude entry
    (the seed), flipped when it covers ``corner_limit`` or more corners (then the seed is the largest entry
    of the other side). ``allowed`` ``[gh, gw]`` restricts the seed to patches not yet found.
    """
    v = vec.detach().cpu().double().numpy()
    gh, gw = grid
    if v.shape != (gh * gw,):
        raise ValueError(f"vector of {v.shape[0]} entries does not fit a {gh} x {gw} grid")
    ok = np.ones(gh * gw, bool) if allowed is None else allowed.reshape(-1).astype(bool)
    mag = np.where(ok, np.abs(v), -1.0)
    seed = int(mag.argmax())
    if v[seed] < 0:
        v = -v
    fg = v > v[ok].mean() if ok.any() else v > v.mean()
    fg &= ok
    fg2 = fg.reshape(gh, gw)
    if corners_covered(fg2) >= corner_limit:
        fg = ~fg & ok
        fg2 = fg.reshape(gh, gw)
        seed = int(np.where(fg, -v, -np.inf).argmax())
    return fg2, seed


@dataclass(frozen=True)
class Cut:
    """One MaskCut round: the kept mask ``[gh, gw]``, the whole foreground side and the seed patch."""

    mask: np.ndarray
    foreground: np.ndarray
    seed: int
    components: tuple[np.ndarray, ...]  # every 4-connected component of the foreground, largest first


def components(mask: np.ndarray, min_size: int = 1) -> list[np.ndarray]:
    """4-connected components of a bool mask, largest first (each a bool mask of the same shape)."""
    lab, n = ndimage.label(mask)
    comps = [lab == i for i in range(1, n + 1)]
    comps = [c for c in comps if int(c.sum()) >= min_size]
    return sorted(comps, key=lambda c: -int(c.sum()))


def maskcut(keys: torch.Tensor, grid: tuple[int, int], n_cuts: int = N_CUTS, tau: float = TAU, eps: float = EPS,
            corner_limit: int = CORNER_LIMIT, check: Callable[[], None] | None = None) -> list[Cut]:
    """Up to ``n_cuts`` object masks on a ``grid`` from patch keys ``[gh*gw, d]`` (see module docstring).

    Each round keeps the connected component of the foreground that holds the seed; found patches are
    masked out of the next rounds. Stops early when no patch is left or a round finds nothing. ``check`` is
    called before each round (e.g. a job's time limit, which stops the cut by raising).
    """
    gh, gw = grid
    if keys.shape[0] != gh * gw:
        raise ValueError(f"{keys.shape[0]} keys do not fit a {gh} x {gw} grid")
    if n_cuts < 1:
        raise ValueError(f"n_cuts must be >= 1, got {n_cuts}")
    feats = keys.detach().double().clone()
    found = np.zeros((gh, gw), bool)
    cuts: list[Cut] = []
    for _ in range(n_cuts):
        if found.all():
            break
        if check is not None:
            check()
        vec = ncut_vector(key_affinity(feats, tau, eps))
        fg, seed = bipartition(vec, grid, corner_limit, allowed=~found)
        if not fg.any():
            break
        comps = components(fg)
        sy, sx = divmod(seed, gw)
        kept = next((c for c in comps if c[sy, sx]), comps[0])
        cuts.append(Cut(mask=kept, foreground=fg, seed=seed, components=tuple(comps)))
        found |= kept
        feats[torch.from_numpy(found.reshape(-1))] = 0.0
    return cuts


#: cosine thresholds of :func:`affinity_seeds`
SEED_TAUS = (0.3, 0.5)


def affinity_seeds(keys: torch.Tensor, grid: tuple[int, int], taus: tuple[float, ...] = SEED_TAUS,
                   max_seeds_side: int = 14) -> list[tuple[np.ndarray, int]]:
    """Key-affinity seed regions: for each seed patch and each ``tau``, the connected component holding the seed
    of the patches whose keys have cosine > ``tau`` with the seed's key ``[gh, gw]`` bool.

    Seeds are every patch on grids up to ``max_seeds_side`` per side, else a regular subsample. Identical regions
    are merged; returns ``(mask, seeds that produced it)``, most-produced first (a region many seeds agree on is
    a stable segment).
    """
    gh, gw = grid
    sy = max(1, -(-gh // max_seeds_side))
    sx = max(1, -(-gw // max_seeds_side))
    seeds = [y * gw + x for y in range(sy // 2, gh, sy) for x in range(sx // 2, gw, sx)]
    found: dict[bytes, list] = {}
    for _, comp in seed_regions(keys, grid, taus, seeds):
        key = np.packbits(comp).tobytes()
        if key in found:
            found[key][1] += 1
        else:
            found[key] = [comp, 1]
    return sorted(((m, c) for m, c in found.values()), key=lambda mc: -mc[1])


def seed_regions(keys: torch.Tensor, grid: tuple[int, int], taus: Sequence[float],
                 seeds: Sequence[int]) -> list[tuple[int, np.ndarray]]:
    """``(seed, region [gh, gw] bool)`` for each ``tau`` (outer) and seed patch index (inner): the connected
    component holding the seed of the patches whose keys have cosine > ``tau`` with the seed's key."""
    gh, gw = grid
    if keys.shape[0] != gh * gw:
        raise ValueError(f"{keys.shape[0]} keys do not fit a {gh} x {gw} grid")
    k = F.normalize(keys.detach().double(), dim=-1)
    cos = (k @ k.T).cpu().numpy()
    out = []
    for tau in taus:
        for i in seeds:
            lab, _ = ndimage.label((cos[i] > tau).reshape(gh, gw))
            out.append((i, lab == lab.reshape(-1)[i]))
    return out
