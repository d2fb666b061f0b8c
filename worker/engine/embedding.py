"""Region-embedding arithmetic: one embedding per region from the LETs of its views and its masked crop.

A drawn region (``worker.jobs.embed``) and a proposed one (``worker.proposals.pipeline``) are embedded the same
way: the LETs of its views combined (:func:`combine_views`), then mixed with the embedding of its masked crop
(:func:`mix_crop`, :func:`mixed_with_crops`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch

    from worker.engine.engine import MaskInversionEngine
    from worker.engine.preprocess import ImageLike


def _unit_rows(x: np.ndarray, axis: int) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def combine_views(lets: np.ndarray) -> np.ndarray:
    """One embedding per region from the LETs of its views ``[V, N, D]`` -> ``[N, D]``: the mean direction of the
    views' unit LETs, at the first view's norm (what scoring and captioning expect of a LET's scale)."""
    lets = np.asarray(lets, np.float32)
    norms = np.linalg.norm(lets, axis=2, keepdims=True)
    mean = (lets / np.maximum(norms, 1e-12)).mean(axis=0)
    return (_unit_rows(mean, 1) * norms[0]).astype(np.float32)


def mix_crop(lets: np.ndarray, crops: np.ndarray, weight: float) -> np.ndarray:
    """Region embeddings ``[N, D]`` from LETs ``[N, D]`` and masked-crop embeddings ``[N, D]``: the direction of
    unit(LET) + ``weight`` x unit(crop), at the LET's norm (``weight`` 0: the LETs unchanged)."""
    lets = np.asarray(lets, np.float32)
    if not weight:
        return lets
    norms = np.linalg.norm(lets, axis=1, keepdims=True)
    crops = np.asarray(crops, np.float32)
    mix = lets / np.maximum(norms, 1e-12) + float(weight) * crops / np.maximum(
        np.linalg.norm(crops, axis=1, keepdims=True), 1e-12)
    return (_unit_rows(mix, 1) * norms).astype(np.float32)


def mixed_with_crops(engine: MaskInversionEngine, image: ImageLike, masks: Sequence[np.ndarray],
                     lets: torch.Tensor, crop_weight: float) -> tuple[torch.Tensor, np.ndarray | None]:
    """LETs ``[N, D]`` of ``masks`` mixed (:func:`mix_crop`) with their masked crops at the model's native size
    (``engine.crop_embeddings``), on the LETs' device, and those crops ``[N, D]``; ``crop_weight`` 0: the LETs
    unchanged and no crops."""
    if not crop_weight:
        return lets, None
    import torch

    crops = engine.crop_embeddings(image, list(masks), "masked_crop")[0].float().cpu().numpy()
    return torch.from_numpy(mix_crop(lets.detach().float().cpu().numpy(), crops, crop_weight)).to(lets.device), crops
