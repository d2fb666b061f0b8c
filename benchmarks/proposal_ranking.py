"""Which score ranks proposals best for auto-tagging AP? A study on the scene world's **val** split.

The product's proposals are ranked (NMS order, detection score) by their best label's probability; the
diagnosis in benchmarks/results/proposals.md says that flat probabilities rank background and partial
candidates as high as objects. This script inverts the default sources' candidates once per scene, keeps per
candidate the label probabilities and terms that could say "object or not" — the inversion's final Dice loss
(how well the LET's LeGrad map explains the mask), the Dice loss of the global embedding's map (step 0), the
LET's cosine to the global embedding, and a *stability*: the share of the key-affinity seed regions seeded inside
the candidate (every patch a seed, ``worker.proposals.maskcut.SEED_TAUS``) that reproduce it at IoU >= 0.5 — and
reports AP /
AP50 (COCOeval, segm) of the kept proposals for several ranking scores, so the score is chosen on val scenes
before anything runs on test. Labels are the product's: the LET mixed with the masked crop (``--crop-weight``).

Bounds (rows marked *oracle*, which use the ground truth): ranking by whether a candidate covers an object, and
the ground-truth masks themselves labelled and ranked like proposals (what perfect masks reach with this labeller).

    python -m benchmarks.proposal_ranking --scenes 40 --size 224
    python -m benchmarks.proposal_ranking --scenes 80 --size 224 --refine          # the product's refined union
    python -m benchmarks.proposal_ranking --scenes 100 --size 224 --refine --split test   # check a choice
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from benchmarks.proposals import SCENE_CHECKPOINT, SCENE_MODEL, Item, coco_ap, to_frame, _coco_rle
from worker.proposals import maskcut
from worker.proposals import pipeline as P
from worker.engine.engine import MaskInversionEngine
from worker.text.labels import LabelScorer
from worker.engine.models import load_clip
from worker.protocol import DEFAULT_TEMPLATES
from worker.protocol import DEFAULT_CROP_WEIGHT


@dataclass
class Scored:
    """One image's candidates: masks ``[N, H, W]`` at the ground truth's size and per-candidate terms ``[N]``."""

    masks: np.ndarray
    probs: np.ndarray  # [N, L]
    loss_final: np.ndarray
    loss_start: np.ndarray
    cos_global: np.ndarray
    area: np.ndarray
    source: list[str]
    stability: np.ndarray | None = None  # [N] (see the module docstring); None: not computed
    covers: np.ndarray | None = None  # [N] bool: covers some ground-truth object at IoU >= 0.5 (oracle rows)
    right: np.ndarray | None = None  # [N] bool: ... and its best label is that object's (oracle rows)


def val_items(count: int, start: int = 0, split: str = "val") -> tuple[list[Item], list[str]]:
    from training.scene_world import SceneWorld

    world = SceneWorld(seed=0, image_size=112)
    items = []
    for k, index in enumerate(range(start, start + count)):
        sc = world.scene(index, split)
        items.append(Item(k + 1, sc.image, np.stack([o.mask for o in sc.objects]), [o.label for o in sc.objects]))
    return items, world.class_names


@torch.no_grad()
def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(a.float(), dim=-1) @ torch.nn.functional.normalize(b.float(), dim=-1)


def stability(engine, image, masks: np.ndarray, size: int) -> np.ndarray:
    """Per candidate ``[N, S, S]``: the share of key-affinity seed regions seeded inside it (every patch a seed,
    each of ``maskcut.SEED_TAUS``) whose region has IoU >= 0.5 with it, on the patch grid (0 if no seed inside)."""
    keys, g = P.image_keys(engine, image, size)
    found = maskcut.seed_regions(keys, (g, g), maskcut.SEED_TAUS, range(g * g))
    seeds = [i for i, _ in found]
    reg = np.stack([r.reshape(-1) for _, r in found]).astype(np.float32)
    cell = size // g
    grid = masks[:, :g * cell, :g * cell].reshape(len(masks), g, cell, g, cell).mean(axis=(2, 4)) >= 0.5
    grid = grid.reshape(len(masks), -1).astype(np.float32)
    inter = grid @ reg.T
    iou = inter / np.maximum(grid.sum(1)[:, None] + reg.sum(1)[None] - inter, 1)
    inside = grid[:, seeds] > 0
    return np.array([(iou[c][inside[c]] >= 0.5).mean() if inside[c].any() else 0.0 for c in range(len(masks))])


def score_candidates(engine, scorer, item: Item, labels: Sequence[str], size: int, steps: int,
                     sources: Sequence[str], refine: bool = False, crop_weight: float = DEFAULT_CROP_WEIGHT,
                     ground_truth: bool = False) -> Scored:
    """The default sources' candidates (refined like the product with ``refine``), or the ground-truth masks
    (``ground_truth``), inverted and labelled like proposals."""
    if ground_truth:
        cands = [P.Candidate(m, "gt") for m in to_frame(item.masks, (size, size))]
    else:
        cands = P.gather_candidates(engine, scorer, item.image, labels, DEFAULT_TEMPLATES, size, sources)
        if refine:
            seg = P.superpixels(item.image, size)
            cands = [P.Candidate(P.snap_to_superpixels(c.mask, seg), c.source, c.hint) for c in cands]
        cands = P.dedupe(cands)[:P.MAX_CANDIDATES]
    res = engine.invert(item.image, np.stack([c.mask for c in cands]), size=size, steps=steps)
    ok = [i for i, e in enumerate(res.errors) if e is None]
    masks = np.stack([cands[i].mask for i in ok])
    lets = P.mixed_with_crops(engine, item.image, masks, res.lets[ok], crop_weight)  # the product's labels
    probs = scorer.probabilities(lets, labels, DEFAULT_TEMPLATES).cpu().numpy()
    frame = to_frame(masks, item.masks.shape[1:])
    iou = P.mask_iou(frame, item.masks)
    gt_label = np.array([labels.index(c) for c in item.categories])
    best = probs.argmax(axis=1)
    return Scored(frame, probs, res.losses[-1, ok].cpu().numpy(), res.losses[0, ok].cpu().numpy(),
                  _cos(res.lets[ok], res.global_embedding).cpu().numpy(), masks.mean(axis=(1, 2)),
                  [cands[i].source for i in ok], stability(engine, item.image, masks, size),
                  iou.max(axis=1) >= 0.5, np.array([((iou[i] >= 0.5) & (gt_label == best[i])).any()
                                                     for i in range(len(ok))]))


#: ranking scores tried: name -> f(Scored) -> [N]
def _p(s: Scored) -> np.ndarray:
    return s.probs.max(axis=1)


SCORES: dict[str, Callable[[Scored], np.ndarray]] = {
    "probability (product)": _p,
    "p x (1 - final Dice loss)": lambda s: _p(s) * (1 - s.loss_final),
    "p x (1 - final loss)^2": lambda s: _p(s) * (1 - s.loss_final) ** 2,
    "p x (1 - final loss)^4": lambda s: _p(s) * (1 - s.loss_final) ** 4,
    "1 - final loss": lambda s: 1 - s.loss_final,
    "p x loss gain (start - final)": lambda s: _p(s) * np.clip(s.loss_start - s.loss_final, 0, None),
    "p x (1 - cos to global)": lambda s: _p(s) * (1 - s.cos_global),
    "p x (1 - final loss) x (1 - cos)": lambda s: _p(s) * (1 - s.loss_final) * (1 - s.cos_global),
    "p margin (top1 - top2)": lambda s: np.diff(np.sort(s.probs, axis=1)[:, -2:], axis=1)[:, 0],
    "p x (stability + 0.05)^2": lambda s: _p(s) * (s.stability + 0.05) ** 2,
    "p x (1 - final loss) x (stability + 0.05)": lambda s: _p(s) * (1 - s.loss_final) * (s.stability + 0.05),
    "p x (1 - final loss)^2 x (stability + 0.05)^2":
        lambda s: _p(s) * (1 - s.loss_final) ** 2 * (s.stability + 0.05) ** 2,
    "*oracle*: p x [covers an object at IoU >= 0.5]": lambda s: _p(s) * (s.covers + 1e-3 * (1 - s.loss_final) ** 2),
    "*oracle*: [covers an object with its label]": lambda s: _p(s) * (s.right + 1e-3 * (1 - s.loss_final) ** 2),
}


def detections(scored: Sequence[Scored], items: Sequence[Item], labels: Sequence[str], fn, min_score: float,
               max_proposals: int) -> list[dict]:
    """The product's selection (NMS at 0.5 in score order, best-label probability >= min_score, cap) under
    ranking score ``fn``; COCO detections with that score."""
    out = []
    for s, it in zip(scored, items):
        rank = fn(s)
        keep = P.nms(s.masks, rank.tolist(), P.NMS_IOU)
        best = s.probs.argmax(axis=1)
        p = s.probs.max(axis=1)
        kept = [i for i in keep if p[i] >= min_score][:max_proposals]
        for i in kept:
            out.append({"image_id": it.image_id, "category_id": int(best[i]) + 1,
                        "segmentation": _coco_rle(s.masks[i]), "score": float(rank[i])})
    return out


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenes", type=int, default=40)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--split", default="val", choices=("val", "test"),
                    help="scene-world split [val: choose there; test only to check a choice]")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--min-score", type=float, default=P.DEFAULT_MIN_SCORE)
    ap.add_argument("--max-proposals", type=int, default=P.DEFAULT_MAX_PROPOSALS)
    ap.add_argument("--sources", nargs="+", default=["maskcut", "keyseeds", "text"])
    ap.add_argument("--refine", action="store_true", help="snap candidates to SLIC superpixels (the product's "
                                                          "refined setting)")
    ap.add_argument("--crop-weight", type=float, default=DEFAULT_CROP_WEIGHT,
                    help=f"masked-crop weight of the label embeddings [{DEFAULT_CROP_WEIGHT}]")
    ap.add_argument("--save", default=None, help="pickle the scored candidates here")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    clip = load_clip(SCENE_MODEL, str(SCENE_CHECKPOINT))
    engine, scorer = MaskInversionEngine(clip), LabelScorer(clip)
    items, labels = val_items(a.scenes, a.start, a.split)
    t0 = time.perf_counter()
    scored = [score_candidates(engine, scorer, it, labels, a.size, a.steps, a.sources, a.refine, a.crop_weight)
              for it in items]
    truth = [score_candidates(engine, scorer, it, labels, a.size, a.steps, a.sources, crop_weight=a.crop_weight,
                              ground_truth=True) for it in items]
    print(f"{len(items)} {a.split} scenes, {sum(len(s.probs) for s in scored)} candidates, "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    if a.save:
        import pickle

        with open(a.save, "wb") as f:
            pickle.dump({"scored": scored, "items": items, "labels": labels}, f)
    report(scored, items, labels, a.min_score, a.max_proposals, truth)


def report(scored, items, labels, min_score: float, max_proposals: int, truth=None) -> None:
    print("| ranking score | AP | AP50 |\n|---|---:|---:|")
    for name, fn in SCORES.items():
        ap_, ap50 = coco_ap(items, labels, detections(scored, items, labels, fn, min_score, max_proposals))
        print(f"| {name} | {ap_:.1f} | {ap50:.1f} |", flush=True)
    if truth is not None:
        fn = SCORES["p x (1 - final loss)^2"]
        ap_, ap50 = coco_ap(items, labels, detections(truth, items, labels, fn, min_score, max_proposals))
        print(f"| *oracle*: the ground-truth masks, labelled and ranked like proposals | {ap_:.1f} | {ap50:.1f} |")


if __name__ == "__main__":
    main()
