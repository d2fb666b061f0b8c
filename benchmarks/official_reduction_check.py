"""Why the official package's LETs differ at large N: it averages the Dice loss over the batch.

``maskinversion-torch`` 1.1 minimises ``mean_i dice_i``, so each mask's gradient is scaled by 1/N and AdamW's ε
(1e-8) weighs more as N grows; this engine minimises ``sum_i dice_i`` (a mask's LET never depends on the other
masks of its request). This script re-runs this engine's decomposed maps with the official reduction on the inputs
``bench_vs_official`` saved and reports the minimum cosine to the official LETs for both reductions.

    python -m benchmarks.official_reduction_check /tmp/maskinv-vs-official-XXXX --size 224 --masks 100
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from benchmarks.bench_inversion import random_masks
from worker.engine import legrad
from worker.engine.engine import MaskInversionEngine
from worker.engine.inversion import inversion_loss
from worker.engine.models import load_clip
from worker.engine.preprocess import mask_to_target


def mean_reduction_lets(engine: MaskInversionEngine, img: Image.Image, masks: list, size: int,
                        steps: int = 10, lr: float = 0.1) -> torch.Tensor:
    """LETs ``[N, D]`` optimised on the batch-mean Dice (the official package's objective)."""
    state, *_ = engine.image_state(img, size)
    target = torch.from_numpy(np.stack([mask_to_target(m, size) for m in masks])).float()
    g = state.global_embedding
    lets = g[None].repeat(len(masks), 1).requires_grad_(True)
    opt = torch.optim.AdamW([lets], lr=lr, weight_decay=0.0)
    for _ in range(steps):
        maps = legrad.relevance_to_map(legrad.decomposed_relevance(engine.visual, state, lets), state.grid,
                                       engine.patch)
        loss = inversion_loss(maps, target, lets, g, 0.0).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return lets.detach()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", help="the temporary folder bench_vs_official printed / left under /tmp")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--masks", type=int, default=100)
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    official = torch.load(Path(args.folder) / f"inputs{args.size}.pt.lets{args.masks}.pt")
    engine = MaskInversionEngine(load_clip(args.model, "none", "cpu", seed=args.seed))
    rng = np.random.default_rng(args.seed)  # the same image and masks as bench_vs_official
    img = Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
    masks = random_masks(args.masks, 480, 640, seed=args.seed)
    summed = engine.invert(img, masks, size=args.size, steps=10, final_loss=False).lets
    averaged = mean_reduction_lets(engine, img, masks, args.size)
    for name, lets in (("sum over masks (this engine)", summed), ("mean over masks (official objective)", averaged)):
        print(f"{name}: min cos to the official LETs {F.cosine_similarity(lets, official).min().item():.6f}")


if __name__ == "__main__":
    main()
