"""Localized captioning on the scene world: captions from region LETs vs from the global image embedding.

The paper's protocol: every object of a test scene is captioned by a ClipCap captioner (trained on CLIP
*image* embeddings) fed with (a) the object's LET (``engine.invert`` with the object's mask, alpha in the
captioning setting: 0 and 5 by default), (b) the global image embedding (one caption per image) and, for
reference, (c) the embedding of the object's masked crop. A caption is *correct* when the CLIP text encoder
matches it best to that object's ground-truth phrase ("a red circle") among the phrases of all objects in the
image. The bar: on scenes with >= 2 objects the LET caption is correct at least 20 points more often
than the global caption.

Run from the repository root (a few minutes on 2 CPU cores)::

    nice python -m benchmarks.localized_captions                 # -> benchmarks/results/localized_captions.md
    nice python -m benchmarks.localized_captions --scenes 40 --out /tmp/lc.md     # a quick look
"""

from __future__ import annotations

import argparse
import platform
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from training.scene_world import SceneWorld
from worker.text.clipcap import ClipCapCaptioner, load_clipcap
from worker.jobs.embed import mix_crop
from worker.engine.engine import MaskInversionEngine
from worker.text.labels import LabelScorer
from worker.engine.models import load_clip
from worker.protocol import DEFAULT_CROP_WEIGHT
from training.train_clipcap import object_phrase

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CLIP = ROOT / "assets" / "tiny_scene_clip" / "maskinv-scene-tiny.safetensors"
DEFAULT_CAPTIONER = ROOT / "assets" / "tiny_clipcap"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "localized_captions.md"
#: the product's region embedding: the LET (alpha 0) mixed with the masked crop at MASKINV_CROP_WEIGHT's default
PRODUCT = f"LET α=0 + masked crop (w {DEFAULT_CROP_WEIGHT:g}, the product)"
BAR_POINTS = 20.0


@dataclass
class ObjectRecord:
    """One test object: its scene, its phrase, the scene's candidate phrases, and a caption per method."""

    scene: int
    n_objects: int
    phrase: str
    candidates: list[str]
    captions: dict[str, str] = field(default_factory=dict)
    correct: dict[str, bool] = field(default_factory=dict)


def caption_scenes(world: SceneWorld, scenes: Sequence[int], engine: MaskInversionEngine,
                   captioner: ClipCapCaptioner, alphas: Sequence[float], size: int, steps: int, lr: float,
                   split: str = "test") -> tuple[list[ObjectRecord], dict[str, float]]:
    """Captions of every object of ``scenes`` by every method; also seconds spent per stage."""
    records: list[ObjectRecord] = []
    timing: dict[str, float] = defaultdict(float)
    for index in scenes:
        sc = world.scene(index, split)
        if not sc.objects:
            continue
        masks = np.stack([o.mask for o in sc.objects])  # [K, H, W]
        phrases = [object_phrase(o.colour, o.shape) for o in sc.objects]
        candidates = sorted(set(phrases))
        embeddings: dict[str, torch.Tensor] = {}
        for alpha in alphas:
            t0 = time.perf_counter()
            res = engine.invert(sc.image, masks, size=size, steps=steps, lr=lr, alpha=alpha)
            timing["inversion_s"] += time.perf_counter() - t0
            if any(res.errors):
                raise RuntimeError(f"scene {index}: inversion failed: {res.errors}")
            embeddings[f"LET α={alpha:g}"] = res.lets
            embeddings["global"] = res.global_embedding[None]
        embeddings["masked crop"] = engine.baseline_embeddings(sc.image, masks, "masked_crop", size)
        if 0.0 in alphas:  # the product's region embedding (MASKINV_CROP_WEIGHT), what its captions are made from
            crops = (embeddings["masked crop"] if size == engine.native_size  # the same crops (every mask inverted)
                     else engine.crop_embeddings(sc.image, masks, "masked_crop")[0])
            embeddings[PRODUCT] = torch.from_numpy(
                mix_crop(embeddings["LET α=0"].numpy(), crops.numpy(), DEFAULT_CROP_WEIGHT))
        caps: dict[str, list[str]] = {}
        for method, emb in embeddings.items():
            t0 = time.perf_counter()
            caps[method] = captioner.caption(emb)
            timing[f"caption_s:{method}"] += time.perf_counter() - t0
            timing[f"captioned:{method}"] += emb.shape[0]
        for k, phrase in enumerate(phrases):
            rec = ObjectRecord(scene=index, n_objects=len(phrases), phrase=phrase, candidates=candidates)
            for method, texts in caps.items():
                rec.captions[method] = texts[0] if method == "global" else texts[k]
            records.append(rec)
    return records, dict(timing)


@torch.no_grad()
def judge(records: list[ObjectRecord], scorer: LabelScorer) -> None:
    """Mark each caption correct when CLIP's text encoder matches it best to the object's own phrase."""
    texts = sorted({c for r in records for c in r.captions.values()} | {p for r in records for p in r.candidates})
    emb = scorer.encode_texts(texts)
    row = {t: i for i, t in enumerate(texts)}
    for r in records:
        cand = emb[[row[p] for p in r.candidates]]  # [C, D]
        for method, caption in r.captions.items():
            best = int((cand @ emb[row[caption]]).argmax())
            r.correct[method] = r.candidates[best] == r.phrase


def accuracy(records: list[ObjectRecord], method: str, exact: bool = False) -> float:
    if not records:
        return float("nan")
    hits = [(r.captions[method] == r.phrase) if exact else r.correct[method] for r in records]
    return 100.0 * sum(hits) / len(hits)


def report(records: list[ObjectRecord], methods: list[str], timing: dict[str, float], meta: dict[str, str]) -> str:
    multi = [r for r in records if r.n_objects >= 2]
    single = [r for r in records if r.n_objects == 1]
    lines = ["# Localized captions on the scene world", "",
             "Each object of a test scene is captioned by the tiny ClipCap captioner (trained on image embeddings "
             "of single-object scenes, `assets/tiny_clipcap/`) fed with the object's LET, the global image "
             "embedding, or its masked crop's embedding. **Correct**: CLIP's text encoder matches the caption "
             "best to the object's phrase among the phrases of all objects in the image. **Exact**: the caption "
             "is the object's phrase word for word.", "",
             "Generated by `python -m benchmarks.localized_captions` " + " ".join(f"`{k}={v}`" for k, v in meta.items())
             + ".", "",
             "| embedding fed to the captioner | correct, scenes with ≥ 2 objects | exact, ≥ 2 objects "
             "| correct, 1-object scenes | ms per caption |",
             "|---|---:|---:|---:|---:|"]
    for m in methods:
        ms = 1000.0 * timing[f"caption_s:{m}"] / max(1.0, timing[f"captioned:{m}"])
        lines.append(f"| {m} | {accuracy(multi, m):.1f} | {accuracy(multi, m, exact=True):.1f} | "
                     f"{accuracy(single, m):.1f} | {ms:.1f} |")
    lines += ["", f"Objects: {len(multi)} in scenes with ≥ 2 objects, {len(single)} alone in their scene.", ""]
    lines += ["Correct (%) by number of objects in the scene:", "",
              "| method | " + " | ".join(f"{k} objects (n={sum(r.n_objects == k for r in records)})"
                                       for k in sorted({r.n_objects for r in multi})) + " |",
              "|---|" + "---:|" * len({r.n_objects for r in multi})]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(f"{accuracy([r for r in multi if r.n_objects == k], m):.1f}"
                                             for k in sorted({r.n_objects for r in multi})) + " |")
    g = accuracy(multi, "global")
    lines += ["", "**Bar** (LET at least 20 points above global on scenes with ≥ 2 objects):", ""]
    for m in methods:
        if m.startswith("LET"):
            d = accuracy(multi, m) - g
            lines.append(f"- {m}: {d:+.1f} points → {'PASS' if d >= BAR_POINTS else 'FAIL'}")
    n_inv = sum(r.n_objects >= 1 for r in records)
    settings = sum(m.startswith("LET") and m != PRODUCT for m in methods)
    lines += ["", f"Inversion time: {timing['inversion_s']:.1f}s in all "
                  f"({1000.0 * timing['inversion_s'] / max(1, n_inv * settings):.1f} "
                  f"ms per object per setting, CPU).", "",
              "Sample captions (first scenes with ≥ 2 objects):", "",
              "| scene | object | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for r in [r for r in records if r.n_objects >= 2][:12]:
        cells = [f"{r.captions[m]}{'' if r.correct[m] else ' ✗'}" for m in methods]
        lines.append(f"| {r.scene} | {r.phrase} | " + " | ".join(cells) + " |")
    lines += ["", "✗: not matched best to the object's own phrase.", ""]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenes", type=int, default=300, help="test scenes [300]")
    p.add_argument("--world-seed", type=int, default=0)
    p.add_argument("--model", default="maskinv-scene-tiny")
    p.add_argument("--pretrained", default=str(DEFAULT_CLIP))
    p.add_argument("--captioner", default=str(DEFAULT_CAPTIONER))
    p.add_argument("--decoding", choices=("beam", "greedy"), default="beam")
    p.add_argument("--beam", type=int, default=3)
    p.add_argument("--alphas", type=float, nargs="+", default=[0.0, 5.0])
    p.add_argument("--size", type=int, default=None,
                   help="inversion input size [the model's native size, as the captioner's training embeddings]")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    clip = load_clip(args.model, args.pretrained, "cpu")
    engine = MaskInversionEngine(clip)
    scorer = LabelScorer(clip)
    captioner = ClipCapCaptioner(load_clipcap(args.captioner), decoding=args.decoding, beam_size=args.beam)
    world = SceneWorld(seed=args.world_seed)
    args.size = args.size or int(clip.visual.image_size[0])
    t0 = time.perf_counter()
    records, timing = caption_scenes(world, range(args.scenes), engine, captioner, args.alphas, args.size,
                                     args.steps, args.lr)
    judge(records, scorer)
    methods = [f"LET α={a:g}" for a in args.alphas] + ["global", "masked crop"]
    if 0.0 in args.alphas:
        methods.append(PRODUCT)
    meta = {"scenes": args.scenes, "split": "test", "world_seed": args.world_seed, "model": args.model,
            "size": args.size, "steps": args.steps, "lr": args.lr, "decoding": args.decoding,
            "beam": args.beam if args.decoding == "beam" else 1, "cpu": f"{platform.machine()}×{args.threads}"}
    text = report(records, methods, timing, meta)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    print(f"done in {time.perf_counter() - t0:.0f}s -> {args.out}")


if __name__ == "__main__":
    main()
