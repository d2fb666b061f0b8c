"""A simulated labelling loop on the scene world: how many labels an order saves, and how far verified
suggestions can be trusted.

Regions and embeddings are made as in ``benchmarks.few_shot`` (committed tiny scene CLIP, ground-truth masks, LETs
mixed with the masked crop; one view without examples, two views with): the **pool** is every region of val
scenes 300..699, the **test** set the regions of multi-object test scenes 0..299 (663, as few_shot), never
labelled. LETs are computed once and cached on disk (``--cache``; ``--collect pool|test`` fills one set, so two
processes can fill both); the loop itself is numpy.

Start from zero labels. Each round a person labels the ``--batch`` (25) pool regions an order picks (the true
label); the product's prototypes are refitted (``backend.learning.fit``) and the test regions scored
(``backend.trust.heldout.label_probabilities``, the worker's scoring). Orders:

* ``random``: any unlabelled region;
* ``uncertainty``: the lowest top-1 probability first (the task score before trust: the lowest region score);
* ``product``: the product's task score (``backend.trust.score.region_priority``): calibrated uncertainty plus
  coverage, ``1 - labelled_similarity`` (the region's largest cosine to a labelled region, what the region
  search gives a suggestion's ``meta``), computed here from the embeddings. A region with no labelled region yet
  has no similarity (the first round is uncertainty alone).

The similarity weight is chosen on the pool alone (``select_weight``: the loop on the pool's even scenes scored
on its odd scenes and back, 6 rounds) and then reported on test.

After the last round, the labelled regions are the project's examples: they are calibrated out of sample
(``backend.trust.heldout`` folds grouped by image, ``backend.trust.calibration``) at the target precision, and on
test we count the share of regions verified and the precision they actually reach. ``--seeds`` seeds (random
picks and the pool's order), own names and opaque names (``type-00`` .. ``type-24``).

Writes ``benchmarks/results/active_loop.{json,md,png}`` and the reliability diagram of the product's calibration
on test ``active_loop_reliability.png`` (with ``--docs`` both also to ``docs/active_loop.png`` and
``docs/trust_reliability.png``).

    python -m benchmarks.active_loop
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from backend.learning.fit import FEATURE_ANCHOR, fit_prototypes, vision_prototypes
from backend.trust.calibration import Calibration, fit_calibration
from backend.trust.heldout import heldout_predictions, label_probabilities
from backend.trust.score import SIMILARITY_WEIGHT, region_priority
from worker.protocol import normalize
from worker.protocol.features import learning_features, text_features

RESULTS = Path(__file__).with_name("results")
DOCS = Path(__file__).resolve().parent.parent / "docs"
ORDERS = ("random", "uncertainty", "product")
TARGET = 0.95


# ---------------------------------------------------------------------- data
#: (split, first scene, scenes) of the pool and the test set
SPECS = {"pool": ("val", 300, 400), "test": ("test", 0, 300)}


def collect_set(clip: Any, name: str, cache: Path) -> dict[str, np.ndarray]:
    """One set's regions, from the ``.npz`` cache when present: ``lets`` / ``lets_hflip`` (the raw LETs of
    ``benchmarks.few_shot.collect``), ``crops`` (masked-crop embeddings), ``label``, ``scene``, ``n_in_image``."""
    from benchmarks.few_shot import LR, SIZE, STEPS, collect, collect_crops

    split, start, count = SPECS[name]
    tag = hashlib.sha256(f"{clip.id}|{split}|{start}|{count}|{SIZE}|{STEPS}|{LR}|hflip".encode()).hexdigest()[:16]
    path = cache / f"active_loop_{name}_{tag}.npz"
    if path.is_file():
        return dict(np.load(path))
    t0 = time.perf_counter()
    data = collect(clip, split, start, count)
    data["crops"] = collect_crops(clip, split, start, count)
    np.savez(path, **data)
    print(f"{name}: {len(data['label'])} regions embedded in {time.perf_counter() - t0:.0f}s -> {path}", flush=True)
    return data


def load_data(cache: Path, only: str | None = None, crop_weight: float | None = None
              ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray], float]:
    """Pool and test regions (``x1`` one view, ``x2`` two views ``[N, D]``, both mixed with the masked crop as
    the product does at ``crop_weight``, default ``MASKINV_CROP_WEIGHT``'s; ``label`` ``[N]``, ``scene``
    ``[N]``; the unmixed ``lets``, ``lets2`` and ``crops``), text prototypes per naming ``[L, D]`` and the logit
    scale. ``only``: embed that set and stop (to fill the cache in parallel)."""
    import torch

    from benchmarks.few_shot import SIZE
    from benchmarks.region_classification import SCENE_CHECKPOINT, SCENE_MODEL
    from training.scene_world import SceneWorld
    from worker.engine.models import load_clip
    from worker.jobs.embed import combine_views, mix_crop
    from worker.protocol import DEFAULT_CROP_WEIGHT, DEFAULT_TEMPLATES
    from worker.text.labels import LabelScorer

    torch.set_num_threads(1)  # a shared 2-core host: one thread per process is faster than contention
    clip = load_clip(SCENE_MODEL, str(SCENE_CHECKPOINT))
    cache.mkdir(parents=True, exist_ok=True)
    sets = {}
    for name in SPECS:
        if only is None or only == name:
            raw = collect_set(clip, name, cache)
            if name == "test":  # evaluated on regions of multi-object scenes, as benchmarks.few_shot
                raw = {k: v[raw["n_in_image"] >= 2] for k, v in raw.items()}
            views2 = combine_views(np.stack([raw["lets"], raw["lets_hflip"]]))
            w = DEFAULT_CROP_WEIGHT if crop_weight is None else crop_weight
            x2 = mix_crop(views2, raw["crops"], w)
            sets[name] = {"x1": mix_crop(raw["lets"], raw["crops"], w), "x2": x2,
                          "f2": learning_features(x2, raw["crops"]),
                          "label": raw["label"], "scene": raw["scene"], "lets": raw["lets"], "lets2": views2,
                          "crops": raw["crops"]}
    if only is not None:
        raise SystemExit(0)
    names = SceneWorld(image_size=SIZE).class_names
    scorer = LabelScorer(clip)
    texts = {"own": scorer.prototypes(names, DEFAULT_TEMPLATES).cpu().numpy(),
             "opaque": scorer.prototypes([f"type-{i:02d}" for i in range(len(names))],
                                         DEFAULT_TEMPLATES).cpu().numpy()}
    return sets["pool"], sets["test"], texts, float(clip.model.logit_scale.exp())


# ---------------------------------------------------------------------- the product's pieces
class Project:
    """The product's state for a set of labelled regions: prototypes, and (on demand) its calibration. ``x``
    ``[N, 2D]``: the regions' learning features (``worker.protocol.features``: the two-view embedding beside the
    masked crop, what the product keeps per example), fitted with ``backend.learning.fit.FEATURE_ANCHOR``."""

    def __init__(self, text: np.ndarray, scale: float, x: np.ndarray, y: np.ndarray, groups: np.ndarray):
        self.scale, self.x, self.y, self.groups = scale, x, y, groups
        self.text = text_features(text) if len(y) else text
        n = len(text)
        if len(y):
            self.w, self.b = fit_prototypes(self.text, x, y, scale, anchor=FEATURE_ANCHOR)
            self.means, self.counts = vision_prototypes(self.text, x, y)
        else:
            self.w, self.b = text.astype(np.float32), np.zeros(n, np.float32)
            self.means, self.counts = np.zeros_like(self.w), np.zeros(n, np.int64)

    def probabilities(self, data: dict[str, np.ndarray], idx: np.ndarray | None = None) -> np.ndarray:
        """``[N, L]`` label probabilities, as the worker computes them (one view without examples; with examples
        the learning features of two views)."""
        x = data["f2" if len(self.y) else "x1"]
        x = x if idx is None else x[idx]
        return label_probabilities(x, self.text, self.scale, self.w, self.b, self.means, self.counts)

    def calibration(self, target: float = TARGET) -> Calibration | None:
        """Out-of-sample calibration of the labelled regions (folds grouped by image), None without labels."""
        if len(self.y) < 2:
            return None
        order = np.argsort(self.groups, kind="stable")
        pred, score = heldout_predictions(self.text, self.scale, self.x[order], self.y[order],
                                          [str(g) for g in self.groups[order]], anchor=FEATURE_ANCHOR)
        labels = [str(i) for i in range(len(self.text))]
        return fit_calibration(labels, pred, score, pred == self.y[order], self.counts, target)


def priorities(order: str, probs: np.ndarray, project: Project, rng: np.random.Generator,
               calib: Calibration | None, similarity: np.ndarray | None = None,
               coverage_weight: float = SIMILARITY_WEIGHT) -> np.ndarray:
    """Labelling priority ``[N]`` of pool regions with label probabilities ``probs`` (high = label first);
    ``similarity`` ``[N]``: each region's largest cosine to a labelled region (None: nothing labelled)."""
    if order == "random":
        return rng.random(len(probs))
    top, score = probs.argmax(1), probs.max(1)
    if order == "uncertainty":
        return 1.0 - score
    p = score if calib is None else np.array([calib.probability(str(c), s) for c, s in zip(top, score)])
    sims = [None] * len(p) if similarity is None else [float(v) for v in similarity]
    return np.array([region_priority(pi, int(project.counts[c]), coverage_weight=coverage_weight, similarity=si)
                     for pi, c, si in zip(p, top, sims)])


def labelled_similarity(x: np.ndarray, labelled: np.ndarray) -> np.ndarray | None:
    """Per region of ``x`` ``[N, D]``: the largest cosine to a row of ``labelled`` ``[M, D]``; None when M is 0
    (as the region search answers for a project without human regions)."""
    if len(labelled) == 0:
        return None
    return (normalize(np.asarray(x, np.float64)) @ normalize(np.asarray(labelled, np.float64)).T).max(axis=1)


def run_loop(pool: dict, test: dict, text: np.ndarray, scale: float, order: str, seed: int, rounds: int,
             batch: int, coverage_weight: float = SIMILARITY_WEIGHT) -> tuple[list[list[float]], Project]:
    """``[[labels, test Acc@1], ...]`` over the rounds of one order and seed, and the final project."""
    rng = np.random.default_rng(seed)
    labelled = np.zeros(len(pool["label"]), bool)
    curve = []
    for r in range(rounds + 1):
        idx = np.flatnonzero(labelled)
        proj = Project(text, scale, pool["f2"][idx], pool["label"][idx], pool["scene"][idx])
        acc = float((proj.probabilities(test).argmax(1) == test["label"]).mean() * 100)
        curve.append([int(labelled.sum()), acc])
        if r == rounds:
            return curve, proj
        free = np.flatnonzero(~labelled)
        free = free[rng.permutation(len(free))]  # ties broken at random
        calib = proj.calibration() if order == "product" else None
        sim = labelled_similarity(pool["x2"][free], pool["x2"][idx]) if order == "product" else None
        pri = priorities(order, proj.probabilities(pool, free), proj, rng, calib, sim, coverage_weight)
        labelled[free[np.argsort(-pri, kind="stable")[:batch]]] = True
    raise AssertionError("unreachable")


def select_weight(pool: dict, text: np.ndarray, scale: float, weights: Sequence[float], seeds: int,
                  rounds: int = 6, batch: int = 25) -> dict:
    """The similarity weight chosen on the pool alone: the product loop on the pool's even scenes scored on its
    odd scenes and back (``seeds`` seeds), mean Acc@1 over rounds 1..``rounds``; random's curve for reference."""
    halves = [{k: v[pool["scene"] % 2 == h] for k, v in pool.items()} for h in (0, 1)]
    curves: dict[str, list[float]] = {}
    for name, order, w in [("random", "random", 0.0)] + [(f"{w:g}", "product", w) for w in weights]:
        runs = [run_loop(halves[h], halves[1 - h], text, scale, order, seed, rounds, batch, w)[0]
                for seed in range(seeds) for h in (0, 1)]
        curves[name] = np.mean([[a for _, a in c] for c in runs], axis=0).round(2).tolist()
        print(f"select {name}: {curves[name]}", flush=True)
    best = max((f"{w:g}" for w in weights), key=lambda k: float(np.mean(curves[k][1:])))
    return {"curves": curves, "chosen": float(best), "rounds": rounds}


def crop_weight_table(pool: dict, texts: dict[str, np.ndarray], scale: float, weights: Sequence[float],
                      seeds: int, sizes: Sequence[int] = (50, 250)) -> list[dict]:
    """The masked crop's weight measured on the pool alone: prototypes fitted on ``sizes`` random regions of the
    pool's even scenes score its odd scenes and back (``seeds`` draws): Acc@1, zero-shot Acc@1 (one view, text
    alone) and the precision of the 30 % most confident (top-1 probability), per naming and weight."""
    from worker.jobs.embed import mix_crop

    rows = []
    even = pool["scene"] % 2 == 0
    for naming, text in texts.items():
        for w in weights:
            x1, x2 = mix_crop(pool["lets"], pool["crops"], w), mix_crop(pool["lets2"], pool["crops"], w)
            acc: dict[int, list[float]] = {n: [] for n in sizes}
            top30: dict[int, list[float]] = {n: [] for n in sizes}
            zero = []
            for h in (even, ~even):
                tr, te = np.flatnonzero(h), np.flatnonzero(~h)
                y = pool["label"]
                z = label_probabilities(x1[te], text, scale, text, np.zeros(len(text)), np.zeros_like(text),
                                        np.zeros(len(text), np.int64))
                zero.append(float((z.argmax(1) == y[te]).mean() * 100))
                for seed in range(seeds):
                    for n in sizes:
                        idx = np.random.default_rng(seed).permutation(tr)[:n]
                        f2, tf = learning_features(x2, pool["crops"]), text_features(text)
                        wts, b = fit_prototypes(tf, f2[idx], y[idx], scale, anchor=FEATURE_ANCHOR)
                        means, counts = vision_prototypes(tf, f2[idx], y[idx])
                        p = label_probabilities(f2[te], tf, scale, wts, b, means, counts)
                        right = p.argmax(1) == y[te]
                        acc[n].append(float(right.mean() * 100))
                        top = np.argsort(-p.max(1))[: int(round(0.3 * len(te)))]
                        top30[n].append(float(right[top].mean() * 100))
            rows.append({"naming": naming, "crop_weight": w, "zero_shot": round(float(np.mean(zero)), 1),
                         **{f"acc_{n}": round(float(np.mean(acc[n])), 1) for n in sizes},
                         **{f"top30_precision_{n}": round(float(np.mean(top30[n])), 1) for n in sizes}})
            print(f"crop weight {rows[-1]}", flush=True)
    return rows


def _probe(x: np.ndarray, y: np.ndarray, n_labels: int, lam: float = 1e-4, steps: int = 800,
           lr: float = 0.5) -> np.ndarray:
    """A plain multinomial logistic probe on unit rows of ``x`` ``[N, D]`` (times 3): weights ``[D + 1, L]``."""
    xb = np.hstack([3 * normalize(np.asarray(x, np.float64)), np.ones((len(x), 1))])
    w, onehot = np.zeros((xb.shape[1], n_labels)), np.eye(n_labels)[y]
    for _ in range(steps):
        z = xb @ w
        p = np.exp(z - z.max(1, keepdims=True))
        w -= lr * (xb.T @ (p / p.sum(1, keepdims=True) - onehot) / len(xb) + lam * w)
    return w


def classifier_ceilings(pool: dict, test: dict, text: np.ndarray, scale: float) -> list[dict]:
    """How far other classifiers of the same regions go, fitted on every pool region and scored on test: Acc@1
    and the share right among the 10 / 20 / 30 % most confident test regions (what any threshold could
    verify). The product's prototypes, a plain logistic probe on the product's embedding, on the LETs alone and
    on the masked crop alone, and a 10-nearest-neighbour vote."""
    def row(name: str, top: np.ndarray, conf: np.ndarray) -> dict:
        right = (top == test["label"])[np.argsort(-conf, kind="stable")]
        return {"classifier": name, "acc": round(float(right.mean() * 100), 1),
                **{f"top{c}": round(float(right[: int(round(c / 100 * len(right)))].mean() * 100), 1)
                   for c in (10, 20, 30)}}

    y, n = pool["label"], len(text)
    proj = Project(text, scale, pool["f2"], y, pool["scene"])
    p = proj.probabilities(test)
    rows = [row("product prototypes", p.argmax(1), p.max(1))]
    srt = np.sort(p, axis=1)
    rows.append(row("product prototypes, margin", p.argmax(1), srt[:, -1] - srt[:, -2]))
    w0, b0 = fit_prototypes(text, pool["x2"], y, scale)  # before the crop was kept beside the embedding
    m0, c0 = vision_prototypes(text, pool["x2"], y)
    p0 = label_probabilities(test["x2"], text, scale, w0, b0, m0, c0)
    rows.append(row("product prototypes on the embedding alone (anchor 1)", p0.argmax(1), p0.max(1)))
    for name, key in (("logistic probe, product embedding", "x2"), ("logistic probe, LETs alone", "lets2"),
                      ("logistic probe, masked crop alone", "crops")):
        w = _probe(pool[key], y, n)
        z = np.hstack([3 * normalize(np.asarray(test[key], np.float64)), np.ones((len(test[key]), 1))]) @ w
        q = np.exp(z - z.max(1, keepdims=True))
        q /= q.sum(1, keepdims=True)
        rows.append(row(name, q.argmax(1), q.max(1)))
    sim = normalize(np.asarray(test["x2"], np.float64)) @ normalize(np.asarray(pool["x2"], np.float64)).T
    near = np.argsort(-sim, axis=1)[:, :10]
    votes = np.stack([np.bincount(y[r], minlength=n) for r in near])
    rows.append(row("10-nearest-neighbour vote", votes.argmax(1), votes.max(1) + 0.01 * sim.max(1)))
    for r in rows:
        print(f"ceiling {r}", flush=True)
    return rows


def verified_on_test(proj: Project, test: dict, target: float = TARGET) -> dict:
    """Share of test regions verified at ``target`` and the precision they reach, plus the reliability data."""
    calib = proj.calibration(target)
    probs = proj.probabilities(test)
    top, score = probs.argmax(1), probs.max(1)
    right = top == test["label"]
    ver = np.array([calib is not None and calib.verified(str(c), s) for c, s in zip(top, score)])
    cal = np.array([calib.probability(str(c), s) if calib else s for c, s in zip(top, score)])
    ranked = right[np.argsort(-score, kind="stable")]
    ceiling = {f"{c}": float(ranked[: int(round(c / 100 * len(ranked)))].mean() * 100) for c in (10, 20, 30, 50)}
    return {"coverage": float(ver.mean() * 100), "precision": float(right[ver].mean() * 100) if ver.any() else None,
            "ceiling": ceiling,
            "labels": int(len(proj.y)), "verifiable_labels": len(calib.thresholds) if calib else 0,
            "_reliability": {"calibrated": cal.tolist(), "raw": score.tolist(), "right": right.tolist()}}


def labels_to_reach(curve: list[list[float]], target: float) -> int | None:
    """The first label count whose Acc@1 reaches ``target`` (None: never)."""
    return next((int(n) for n, a in curve if a >= target), None)


# ---------------------------------------------------------------------- report
def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    styles = {"random": "k--", "uncertainty": "b-", "product": "r-"}
    for ax, naming in zip(axes, ("own", "opaque")):
        res = results[naming]
        for order in ORDERS:
            pts = np.asarray(res["loop"][order])
            std = np.asarray(res["loop_std"][order])
            ax.plot(pts[:, 0], pts[:, 1], styles[order], label=order)
            ax.fill_between(pts[:, 0], pts[:, 1] - std, pts[:, 1] + std, color=styles[order][0], alpha=0.1)
        ax.axhline(res["labels_to_reach"]["target_acc1"], color="grey", lw=0.6, ls=":")
        ax.set_xlabel("labelled regions")
        ax.set_title(f"{naming} names ({res['test_regions']} test regions)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test Acc@1 (%)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_reliability(rel: dict, path: Path, bins: int = 10) -> list[dict]:
    """Reliability diagram (calibrated and raw probability vs share right, test) and its table rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    right = np.asarray(rel["right"], float)
    rows = []
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    for key, style in (("raw", "b-o"), ("calibrated", "r-s")):
        p = np.asarray(rel[key])
        edges = np.linspace(0, 1, bins + 1)
        which = np.clip(np.digitize(p, edges) - 1, 0, bins - 1)
        xs, ys = [], []
        for b in range(bins):
            m = which == b
            if m.sum():
                xs.append(float(p[m].mean()))
                ys.append(float(right[m].mean()))
                rows.append({"kind": key, "bin": f"{edges[b]:.1f}-{edges[b + 1]:.1f}", "n": int(m.sum()),
                             "mean_p": xs[-1], "right": ys[-1]})
        ax.plot(xs, ys, style, label=key, ms=4)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("predicted probability (bin mean)")
    ax.set_ylabel("share right (test)")
    ax.set_title("reliability, own names, after the loop")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return rows


def to_markdown(out: dict, config: dict) -> str:
    lines = ["# Simulated labelling loop (scene world)", "",
             f"Model `{config['model']}`; pool: {config['pool']} regions of val scenes, test: {out['test_regions']} "
             f"regions of multi-object test scenes (never labelled); masked-crop weight "
             f"{config.get('crop_weight') or 'default (0.3)'}. {config['batch']} labels per round, "
             f"{config['rounds']} rounds, seeds {config['seeds']}; mean over seeds (± std). Orders: random, "
             "uncertainty (lowest top-1 probability first), product (calibrated uncertainty + coverage "
             f"1 - labelled similarity, weight {config['coverage_weight']}). Target precision {TARGET}.", ""]
    crops = out["details"].get("crop_weights")
    if crops:
        keys = [k for k in crops[0] if k.startswith(("acc_", "top30"))]
        lines += ["The masked crop's weight (`MASKINV_CROP_WEIGHT`) measured on the pool alone (prototypes fitted "
                  "on n random regions of its even scenes score its odd scenes and back; `top30` = precision of "
                  "the 30 % most confident):", "", "| names | crop weight | zero-shot | " + " | ".join(keys) + " |",
                  "|---|---:|---:|" + "---:|" * len(keys)]
        lines += [f"| {r['naming']} | {r['crop_weight']:g} | {r['zero_shot']:.1f} | "
                  + " | ".join(f"{r[k]:.1f}" for k in keys) + " |" for r in crops]
        lines.append("")
    ceil = out["details"].get("ceilings")
    if ceil:
        lines += ["Classifiers of the same test regions fitted on all pool regions (own names): Acc@1 and the share "
                  "right among the 10 / 20 / 30 % most confident (what any threshold could verify):", "",
                  "| classifier | Acc@1 | top 10 % | top 20 % | top 30 % |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {r['classifier']} | {r['acc']:.1f} | {r['top10']:.1f} | {r['top20']:.1f} | {r['top30']:.1f} |"
                  for r in ceil]
        lines.append("")
    sel = out["details"].get("selection")
    if sel:
        lines += [f"Similarity weight chosen on the pool alone (even scenes labelled, odd scenes scored, and back; "
                  f"mean Acc@1 over rounds 1..{sel['rounds']}): **{sel['chosen']:g}**.", "",
                  "| order | " + " | ".join(str(25 * r) for r in range(sel["rounds"] + 1)) + " |",
                  "|---|" + "---:|" * (sel["rounds"] + 1)]
        lines += [f"| {'random' if k == 'random' else 'product, weight ' + k} | " + " | ".join(f"{v:.1f}" for v in c)
                  + " |" for k, c in sel["curves"].items()]
        lines.append("")
    for naming in ("own", "opaque"):
        res = out if naming == "own" else out["opaque"]
        lines += [f"## {naming} names", "", "| labels | " + " | ".join(ORDERS) + " |",
                  "|---:|" + "---:|" * len(ORDERS)]
        for i, (n, _) in enumerate(res["loop"]["random"]):
            cells = [f"{res['loop'][o][i][1]:.1f} ± {res['loop_std'][o][i]:.1f}" for o in ORDERS]
            lines.append(f"| {int(n)} | " + " | ".join(cells) + " |")
        lt = res["labels_to_reach"]
        v = res["verified"]
        saved = (1 - lt["product"] / lt["random"]) * 100 if lt["product"] and lt["random"] else float("nan")
        lines += ["", f"Labels to reach {lt['target_acc1']:.1f} % (95 % of random's Acc@1 with all its labels): "
                      f"random {lt['random']}, uncertainty {lt.get('uncertainty')}, product {lt['product']} "
                      f"({saved:.0f} % fewer than random).", "",
                  f"Verified after the product's last round ({v['labels']} labels): "
                  f"{v['coverage']:.1f} % of test regions verified at target {TARGET}, precision "
                  f"{v['precision'] if v['precision'] is None else round(v['precision'], 1)} % "
                  f"(per seed: {res['verified_per_seed']}). What any threshold could verify: the most "
                  "confident (top-1 probability) " + ", ".join(f"{c} %: {p} % right" for c, p in res["ceiling"].items())
                  + " of test regions (mean over seeds).", ""]
    lines += ["## Bars (own names)", "", "| bar | measured | threshold | met |", "|---|---:|---:|---|"]
    for b in out["bars"]:
        lines.append(f"| {b['bar']} | {b['measured']} | {b['threshold']} | {'yes' if b['met'] else '**no**'} |")
    lines += ["", "Reliability of the calibrated probability on test (own names, product order, all seeds):", "",
              "| kind | bin | regions | mean probability | share right |", "|---|---|---:|---:|---:|"]
    for r in out["details"]["reliability"]:
        lines.append(f"| {r['kind']} | {r['bin']} | {r['n']} | {r['mean_p']:.3f} | {r['right']:.3f} |")
    lines += ["", f"Generated by `python -m benchmarks.active_loop{config['args']}` ({platform.machine()}, "
                  f"{config['seconds']:.0f} s of loop).", ""]
    return "\n".join(lines)


def summarise(curves: dict[str, list], verified: list[dict], n_test: int) -> dict:
    """Mean curves over seeds, labels to reach 95 % of random's final Acc@1, verified stats (mean over seeds)."""
    loop = {o: np.mean(np.asarray(c), axis=0).tolist() for o, c in curves.items()}
    loop_std = {o: np.std(np.asarray(c), axis=0)[:, 1].tolist() for o, c in curves.items()}
    target = 0.95 * loop["random"][-1][1]
    reach = {"target_acc1": round(target, 2), **{o: labels_to_reach(loop[o], target) for o in ORDERS}}
    precs = [v["precision"] for v in verified if v["precision"] is not None]
    return {"test_regions": n_test, "target_precision": TARGET,
            "verified": {"coverage": round(float(np.mean([v["coverage"] for v in verified])), 2),
                         "precision": round(float(np.mean(precs)), 2) if precs else None,
                         "labels": int(verified[0]["labels"])},
            "loop": {o: [[int(n), round(a, 2)] for n, a in pts] for o, pts in loop.items()},
            "labels_to_reach": reach, "loop_std": {o: [round(s, 2) for s in v] for o, v in loop_std.items()},
            "ceiling": {c: round(float(np.mean([v["ceiling"][c] for v in verified])), 1)
                        for c in verified[0]["ceiling"]},
            "verified_per_seed": [(round(v["coverage"], 1),
                                   None if v["precision"] is None else round(v["precision"], 1)) for v in verified]}


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--batch", type=int, default=25)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--coverage-weight", type=float, default=SIMILARITY_WEIGHT,
                    help="similarity weight of the product order (the product's SIMILARITY_WEIGHT)")
    ap.add_argument("--select", type=float, nargs="*", default=[1.0, 1.5, 2.0, 2.5, 3.0, 4.0],
                    help="similarity weights compared on the pool alone (none: skip)")
    ap.add_argument("--cache", default="/tmp/active_loop_cache")
    ap.add_argument("--out", default=str(RESULTS / "active_loop.md"))
    ap.add_argument("--docs", action="store_true", help="copy the two figures to docs/")
    ap.add_argument("--collect", choices=tuple(SPECS), help="only embed this set into the cache")
    ap.add_argument("--crop-weight", type=float, default=None,
                    help="MASKINV_CROP_WEIGHT of every embedding (default: the service's default)")
    ap.add_argument("--crop-weights", type=float, nargs="*", default=[0.3, 1.0, 2.0, 3.0, 5.0],
                    help="crop weights compared on the pool alone (none: skip)")
    a = ap.parse_args(argv)
    pool, test, texts, scale = load_data(Path(a.cache), a.collect, a.crop_weight)
    t0 = time.perf_counter()
    selection = select_weight(pool, texts["own"], scale, a.select, a.seeds) if a.select else None
    crop_table = crop_weight_table(pool, texts, scale, a.crop_weights, a.seeds) if a.crop_weights else None
    ceilings = classifier_ceilings(pool, test, texts["own"], scale)
    out: dict = {}
    reliability: dict = {"calibrated": [], "raw": [], "right": []}
    for naming, text in texts.items():
        curves: dict[str, list] = {o: [] for o in ORDERS}
        verified = []
        for seed in range(a.seeds):
            for order in ORDERS:
                curve, proj = run_loop(pool, test, text, scale, order, seed, a.rounds, a.batch, a.coverage_weight)
                curves[order].append(curve)
                if order == "product":
                    v = verified_on_test(proj, test)
                    rel = v.pop("_reliability")
                    if naming == "own":
                        for k in reliability:
                            reliability[k] += rel[k]
                    verified.append(v)
                print(f"{naming} seed {seed} {order}: {curve[-1]} {time.perf_counter() - t0:.0f}s", flush=True)
        out[naming] = summarise(curves, verified, int(len(test["label"])))
    result = dict(out["own"])
    result["opaque"] = out["opaque"]
    lt, v = result["labels_to_reach"], result["verified"]
    saved = (1 - lt["product"] / lt["random"]) * 100 if lt["product"] and lt["random"] else None
    result["bars"] = [
        {"bar": "verified precision on test >= 93 % at target 95 %", "measured": v["precision"], "threshold": 93.0,
         "met": bool(v["precision"] is not None and v["precision"] >= 93.0)},
        {"bar": "verified coverage of test regions >= 30 %", "measured": v["coverage"], "threshold": 30.0,
         "met": bool(v["coverage"] >= 30.0)},
        {"bar": "product order reaches target_acc1 with >= 30 % fewer labels than random",
         "measured": None if saved is None else round(saved, 1), "threshold": 30.0,
         "met": bool(saved is not None and saved >= 30.0)},
    ]
    out_md = Path(a.out)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    png_rel = out_md.with_name(out_md.stem + "_reliability.png")
    rows = plot_reliability(reliability, png_rel)
    config = {"model": "maskinv-scene-tiny", "pool": int(len(pool["label"])), "batch": a.batch,
              "crop_weight": a.crop_weight, "args": "".join(f" {v}" for v in (argv or [])),
              "rounds": a.rounds, "seeds": list(range(a.seeds)), "coverage_weight": a.coverage_weight,
              "seconds": time.perf_counter() - t0}
    result["details"] = {"config": config, "reliability": rows, "selection": selection, "crop_weights": crop_table,
                         "ceilings": ceilings}
    out_md.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out_md.write_text(to_markdown(result, config))
    plot(out, out_md.with_suffix(".png"))
    if a.docs:  # the product's figures in docs/
        shutil.copy(out_md.with_suffix(".png"), DOCS / "active_loop.png")
        shutil.copy(png_rel, DOCS / "trust_reliability.png")
    print(out_md.read_text())
    return result


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
