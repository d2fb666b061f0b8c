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

``--fit`` fits the product's objectness (``worker/proposals/objectness.py``) on the **val** split only: the
product's candidates (default sources, at each of ``--fit-settings``) of val scenes ``0..fit_scenes-1`` are
inverted and labelled like proposals, each with its objectness features and whether it covers an object at IoU
>= 0.5 (the target); a logistic regression is fitted on them; on the next ``choose_scenes`` val scenes the
ranking's probability exponent is chosen for AP50 and the keep threshold as the lowest objectness whose kept
proposals (NMS, cap) reach ``--target-precision``. Writes ``worker/proposals/objectness.json``:

    python -m benchmarks.proposal_ranking --fit --fit-scenes 80 --choose-scenes 60

``--before-after`` compares, on the same labelled candidates of ``--split`` (default settings as ``--fit``), the
selection before (best-label probability × (1 - d)², NMS, p >= 0.2, at most 20) and after (the committed
objectness at ``--target-precision``, at most ``--max-keep``): precision, recall, AP50 and its share of the
ground-truth masks' AP50 with the same labeller, proposals per image:

    python -m benchmarks.proposal_ranking --before-after --split test --scenes 100 \
        --results benchmarks/results/proposals_objectness.json
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
from worker.proposals import objectness as obj
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
    lets = P.mixed_with_crops(engine, item.image, masks, res.lets[ok], crop_weight)[0]  # the product's labels
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


# ------------------------------------------------------------------------------------------------ the fit
@dataclass
class Labelled:
    """One image's product candidates, labelled: masks ``[N, H, W]`` at the ground truth's frame, best-label
    probability and index ``[N]``, full objectness features ``[N, F]``, IoU with the ground truth ``[N, G]``."""

    masks: np.ndarray
    p_best: np.ndarray
    best: np.ndarray
    x: np.ndarray
    iou: np.ndarray

    @property
    def covers(self) -> np.ndarray:
        return self.iou.max(axis=1) >= 0.5 if self.iou.size else np.zeros(len(self.masks), bool)


def labelled_candidates(engine, scorer, item: Item, labels: Sequence[str], size: int, steps: int, refine: bool,
                        crop_weight: float = DEFAULT_CROP_WEIGHT,
                        sources: Sequence[str] = P.DEFAULT_SOURCES, ground_truth: bool = False) -> Labelled:
    """The product's candidates of one image (``worker.proposals.pipeline.propose`` up to the selection), or
    with ``ground_truth`` the ground-truth masks, labelled the same way."""
    img = item.image
    keys = P.image_keys(engine, img, size)
    if ground_truth:
        cands = [P.Candidate(m, "gt") for m in to_frame(item.masks, (size, size))]
    else:
        cands = P.cap_candidates(P.gather_candidates(engine, scorer, img, labels, DEFAULT_TEMPLATES, size, sources,
                                                     keys=keys))
        if refine:
            seg = P.superpixels(img, size)
            cands = [P.Candidate(P.snap_to_superpixels(c.mask, seg), c.source, c.hint) for c in cands]
        cands = P.dedupe(cands)[:P.MAX_CANDIDATES]
    props = P.label_candidates(engine, scorer, img, cands, labels, DEFAULT_TEMPLATES, size, steps, top_k=1,
                               crop_weight=crop_weight, keys=keys)
    masks = np.stack([p.mask for p in props])
    x = obj.features(np.stack([p.features for p in props if p.features is not None]), masks,
                     [p.source for p in props])
    frame = to_frame(masks, item.masks.shape[1:])
    return Labelled(frame, np.array([p.score for p in props]),
                    np.array([list(labels).index(p.label) for p in props]), x, P.mask_iou(frame, item.masks))


def select_labelled(lab: Labelled, o: np.ndarray, prob_power: float, threshold: float, max_keep: int,
                    min_score: float, min_keep: int = 0) -> list[int]:
    """The product's selection (``pipeline.select``) on one image's labelled candidates with objectness ``o``."""
    rank = lab.p_best ** prob_power * o
    keep = P.nms(lab.masks, rank.tolist(), P.NMS_IOU)
    probable = [i for i in keep if lab.p_best[i] >= min_score]
    return [i for k, i in enumerate(probable) if k < min_keep or o[i] >= threshold][:max_keep]


def selection_metrics(labs: Sequence[Labelled], items: Sequence[Item], labels: Sequence[str], model, threshold: float,
                      max_keep: int, min_score: float, prob_power: float, with_ap: bool = True) -> dict:
    """Precision (kept proposals covering an object at IoU >= 0.5), recall (objects covered by a kept one), AP /
    AP50 (COCOeval, score = rank; with ``with_ap``) and kept proposals per image, in percent."""
    dets, good, kept, hit, objects = [], 0, 0, 0, 0
    for lab, it in zip(labs, items):
        o = model.predict(lab.x)
        sel = select_labelled(lab, o, prob_power, threshold, max_keep, min_score, model.min_keep)
        kept += len(sel)
        good += int(lab.covers[sel].sum())
        objects += lab.iou.shape[1]
        hit += int((lab.iou[sel] >= 0.5).any(axis=0).sum()) if sel else 0
        for i in sel:
            dets.append({"image_id": it.image_id, "category_id": int(lab.best[i]) + 1,
                         "segmentation": _coco_rle(lab.masks[i]), "score": float(lab.p_best[i] ** prob_power * o[i])})
    ap_, ap50 = coco_ap(items, labels, dets) if with_ap else (float("nan"), float("nan"))
    return {"precision": 100.0 * good / max(kept, 1), "recall": 100.0 * hit / max(objects, 1), "ap": ap_,
            "ap50": ap50, "per_image": kept / max(len(items), 1)}


def collect(engine, scorer, items: Sequence[Item], labels: Sequence[str], settings: Sequence[str], steps: int,
            crop_weight: float, cache=None, data: dict | None = None, save_every: int = 2) -> dict:
    """``{setting: [Labelled per item]}`` for ``size:refined|patch|gt`` settings (``gt``: the ground-truth
    masks), scene by scene (every setting of a scene before the next scene), pickled to ``cache`` every
    ``save_every`` scenes; what ``data`` already holds is kept."""
    import pickle

    data = {} if data is None else data
    for s in settings:
        data.setdefault(s, [])
    t0 = time.perf_counter()
    for k, it in enumerate(items):
        todo = [s for s in settings if len(data[s]) <= k]
        for setting in todo:
            size, kind = int(setting.split(":")[0]), setting.split(":")[1]
            data[setting].append(labelled_candidates(engine, scorer, it, labels, size, steps, kind == "refined",
                                                     crop_weight, ground_truth=kind == "gt"))
        if todo and (k + 1) % save_every == 0 or k + 1 == len(items):
            print(f"{k + 1} scenes, {time.perf_counter() - t0:.0f} s", flush=True)
            if cache:
                tmp = cache.with_suffix(".tmp")
                tmp.write_bytes(pickle.dumps(data))
                tmp.replace(cache)  # readers never see half a file
    return data


def complete(data: dict, settings: Sequence[str]) -> int:
    """How many leading scenes every setting of ``data`` holds."""
    return min(len(data.get(s, [])) for s in settings)


THRESHOLDS = tuple(float(t) for t in np.round(np.arange(0.0, 1.0, 0.02), 2))


def fit(a) -> None:
    """``--fit`` (module docstring)."""
    import json
    import pickle
    from pathlib import Path

    clip = load_clip(SCENE_MODEL, str(SCENE_CHECKPOINT))
    engine, scorer = MaskInversionEngine(clip), LabelScorer(clip)
    items, labels = val_items(a.fit_scenes + a.choose_scenes, a.start, "val")
    cache = Path(a.cache) if a.cache else None
    data: dict = pickle.loads(cache.read_bytes()) if cache and cache.exists() else {}
    if not a.no_collect:
        data = collect(engine, scorer, items, labels, a.fit_settings, a.steps, a.crop_weight, cache, data)
    avail = complete(data, a.fit_settings)
    if avail < a.fit_scenes + a.choose_scenes:  # --no-collect on a partial cache: the same shares of what is there
        a.fit_scenes = max(1, round(avail * a.fit_scenes / (a.fit_scenes + a.choose_scenes)))
        a.choose_scenes = avail - a.fit_scenes
        print(f"{avail} scenes collected: fit on {a.fit_scenes}, choose on {a.choose_scenes}")
    n = a.fit_scenes
    x = np.concatenate([lab.x for s in a.fit_settings for lab in data[s][:n]])
    y = np.concatenate([lab.covers for s in a.fit_settings for lab in data[s][:n]]).astype(float)
    mean, scale, coef, bias = obj.fit_logistic(x, y, l2=a.l2)
    print(f"fitted on {len(y)} candidates of {n} val scenes x {len(a.fit_settings)} settings "
          f"({y.mean() * 100:.1f} % cover an object)")
    for name, c in sorted(zip(obj.FEATURES, coef), key=lambda t: -abs(t[1])):
        print(f"  {name:>14} {c:+.3f}")
    choose = items[n:n + a.choose_scenes]

    def pooled(power: float, t: float, with_ap: bool, min_keep: int) -> tuple[dict, list[dict]]:
        model = obj.ObjectnessModel(mean, scale, coef, bias, t, a.target_precision, power, min_keep=min_keep)
        per = [selection_metrics(data[s][n:n + a.choose_scenes], choose, labels, model, t, a.max_keep, a.min_score,
                                 power, with_ap) for s in a.fit_settings]
        return {k: float(np.mean([p[k] for p in per])) for k in per[0]}, per

    print("| min keep | prob power | threshold | precision | recall | AP | AP50 | per image |\n"
          "|---:|---:|---:|---:|---:|---:|---:|---:|")
    choices = []
    for min_keep in a.min_keeps:
        for power in a.prob_powers:
            curve = [(t, pooled(power, t, False, min_keep)[0]) for t in THRESHOLDS]
            reached = [t for t, m in curve if m["precision"] >= 100 * a.target_precision]
            t = min(reached) if reached else max(curve, key=lambda c: c[1]["precision"])[0]
            m, per = pooled(power, t, True, min_keep)
            m0 = pooled(power, 0.0, True, min_keep)[0]
            for tt, mm in ((0.0, m0), (t, m)):
                print(f"| {min_keep} | {power} | {tt:.2f} | {mm['precision']:.1f} | {mm['recall']:.1f} | "
                      f"{mm['ap']:.1f} | {mm['ap50']:.1f} | {mm['per_image']:.1f} |", flush=True)
            ok = m["precision"] >= 100 * a.target_precision
            choices.append((ok, m["ap50"], m["recall"], min_keep, power, t, m, per, curve))
    _, _, _, min_keep, power, t, m, per, curve = max(choices, key=lambda c: c[:3])
    model = obj.ObjectnessModel(mean, scale, coef, bias, t, a.target_precision, power, min_keep=min_keep, meta={
        "fitted_on": f"scene world val scenes {a.start}..{a.start + n - 1}, settings {list(a.fit_settings)}",
        "chosen_on": f"scene world val scenes {a.start + n}..{a.start + n + a.choose_scenes - 1}",
        "target": "candidate covers a ground-truth object at mask IoU >= 0.5",
        "max_keep": a.max_keep, "min_score": a.min_score, "l2": a.l2,
        "val_chosen": {s: {k: round(v, 2) for k, v in p.items()} for s, p in zip(a.fit_settings, per)},
        "command": "python -m benchmarks.proposal_ranking --fit " + " ".join(a.argv)},
        curve=tuple((tt, round(mm["precision"] / 100, 4)) for tt, mm in curve))
    out = Path(a.out)
    out.write_text(json.dumps(model.to_dict(), indent=1) + "\n")
    print(f"min keep {min_keep}, prob power {power}, threshold {t:.2f}: val precision {m['precision']:.1f} % "
          f"recall {m['recall']:.1f} % AP50 {m['ap50']:.1f}, {m['per_image']:.1f} per image -> {out}")


#: the selection before the objectness: p × (1 - d)², NMS 0.5, p >= 0.2, at most 20, no objectness threshold
BEFORE = {"max_keep": 20, "min_score": 0.2, "threshold": 0.0}


def before_after(data: dict, items: Sequence[Item], labels: Sequence[str], model, target_precision: float,
                 max_keep: int, min_score: float) -> list[dict]:
    """Per candidate setting of ``data`` (``size:refined|patch``), the selection before (:data:`BEFORE`, the
    fallback objectness) and after (``model`` at ``target_precision``, ``max_keep``, ``min_score``), each with
    precision, recall, AP, AP50, proposals per image, and AP50 as a share of the ground-truth masks' (``size:gt``,
    labelled and ranked like before: the labeller's ceiling)."""
    legacy = obj.ObjectnessModel.fallback()
    rows = []
    for setting, labs in data.items():
        size, kind = setting.split(":")
        if kind == "gt":
            continue
        gt = data.get(f"{size}:gt")
        ceiling = selection_metrics(gt, items, labels, legacy, 0.0, BEFORE["max_keep"], BEFORE["min_score"],
                                    1.0) if gt is not None else None
        t = model.threshold_for(target_precision)
        t0 = model.threshold_for(0.0)
        for name, m in (("before", selection_metrics(labs, items, labels, legacy, BEFORE["threshold"],
                                                     BEFORE["max_keep"], BEFORE["min_score"], 1.0)),
                        ("after", selection_metrics(labs, items, labels, model, t, max_keep, min_score,
                                                    model.prob_power)),
                        ("after, target precision 0", selection_metrics(labs, items, labels, model, t0, max_keep,
                                                                        min_score, model.prob_power))):
            row = {"setting": setting, "selection": name, **{k: round(v, 2) for k, v in m.items()}}
            if ceiling is not None:
                row["ceiling_ap50"] = round(ceiling["ap50"], 2)
                row["share_of_ceiling"] = round(100 * m["ap50"] / max(ceiling["ap50"], 1e-9), 1)
            rows.append(row)
            print(row, flush=True)
    return rows


def report_selection(a) -> None:
    """``--before-after`` (module docstring): collect (or read ``--cache``) and compare on ``--split``."""
    import json
    import pickle
    from pathlib import Path

    items, labels = val_items(a.scenes, a.start, a.split)
    cache = Path(a.cache) if a.cache else None
    data: dict = pickle.loads(cache.read_bytes()) if cache and cache.exists() else {}
    settings = [s for s in a.fit_settings] + sorted({f"{s.split(':')[0]}:gt" for s in a.fit_settings})
    if a.no_collect:
        items = items[:complete(data, settings)]
    elif any(s not in data or len(data[s]) < len(items) for s in settings):
        clip = load_clip(SCENE_MODEL, str(SCENE_CHECKPOINT))
        data = collect(MaskInversionEngine(clip), LabelScorer(clip), items, labels, settings, a.steps,
                       a.crop_weight, cache, data)
    data = {s: data[s][:len(items)] for s in settings}
    model = obj.load(a.out)
    rows = before_after(data, items, labels, model, a.target_precision, a.max_keep, a.min_score)
    doc = {"split": a.split, "scenes": f"{a.start}..{a.start + len(items) - 1}", "seed": 0,
           "objects": sum(len(it.masks) for it in items), "target_precision": a.target_precision,
           "threshold": model.threshold_for(a.target_precision), "prob_power": model.prob_power,
           "max_keep": a.max_keep, "min_score": a.min_score, "before": BEFORE, "rows": rows,
           "command": "python -m benchmarks.proposal_ranking " + " ".join(a.argv)}
    if a.results:
        Path(a.results).write_text(json.dumps(doc, indent=2) + "\n")


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
    ap.add_argument("--fit", action="store_true", help="fit the product's objectness on val (module docstring)")
    ap.add_argument("--fit-scenes", type=int, default=80)
    ap.add_argument("--choose-scenes", type=int, default=60)
    ap.add_argument("--fit-settings", nargs="+", default=["224:refined"],
                    help="size:refined|patch settings whose candidates the fit pools")
    ap.add_argument("--target-precision", type=float, default=0.8)
    ap.add_argument("--max-keep", type=int, default=P.DEFAULT_MAX_PROPOSALS)
    ap.add_argument("--prob-powers", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0])
    ap.add_argument("--min-keeps", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--l2", type=float, default=1.0)
    ap.add_argument("--cache", default=None, help="pickle of the labelled candidates (reused when present)")
    ap.add_argument("--out", default=str(obj.MODEL_PATH))
    ap.add_argument("--no-collect", action="store_true", help="use the scenes --cache holds, collect none")
    ap.add_argument("--before-after", action="store_true",
                    help="compare the selection before and after the objectness on --split (module docstring)")
    ap.add_argument("--results", default=None, help="--before-after: write the rows as JSON here")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    if a.before_after:
        a.argv = list(argv if argv is not None else __import__("sys").argv[1:])
        report_selection(a)
        return
    if a.fit:
        if a.split != "val":
            raise SystemExit("--fit runs on the val split only")
        a.argv = list(argv if argv is not None else __import__("sys").argv[1:])
        a.argv = [x for x in a.argv if x != "--fit"]
        fit(a)
        return
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
