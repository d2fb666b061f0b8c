"""Do captions agree with the labels an annotator sees? Contradiction rate and caption accuracy on the scene world.

Every object of a test scene (world seed 0, test split) gets the worker's region embedding (the LET, alone and mixed
with its masked crop as the product does), its label (top-1 of the text prototypes over the world's 25 classes)
and one caption per captioner variant, given that label:

* ``retrieval, attribute bank before``: retrieval captions from the phrase bank that added every colour to any label
  ("a red blue cross");
* ``retrieval``: retrieval captions (``worker.text.captions``);
* ``ClipCap, free``: the tiny ClipCap captioner's best beam hypothesis, labels not used;
* ``ClipCap, top-1 else retrieval``: the best hypothesis when it names the label, otherwise the retrieval caption;
* ``ClipCap, beam B + agreement``: the best of the B beam hypotheses that names the label, otherwise the retrieval
  caption (``ClipCapCaptioner`` with ``agree_with_labels``, the product).

**Contradiction**: the caption's class words (the world's colour and shape words) differ from the label's.
**Correct** (the measure of ``benchmarks/localized_captions.py``): CLIP's text encoder matches the caption best to
the object's own phrase among the phrases of all objects in its scene; **exact**: the caption is that phrase.

    nice python -m benchmarks.caption_agreement         # -> benchmarks/results/captions_label_agreement.{md,json}
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from benchmarks.localized_captions import DEFAULT_CAPTIONER, DEFAULT_CLIP, ObjectRecord, accuracy, judge
from training.scene_world import SceneWorld
from training.train_clipcap import object_phrase
from worker.engine.embedding import mix_crop
from worker.engine.engine import MaskInversionEngine
from worker.engine.models import load_clip
from worker.protocol import DEFAULT_CROP_WEIGHT, DEFAULT_TEMPLATES
from worker.text.captions import COLOURS, MATERIALS, POSITIONS, SIZES, RetrievalCaptioner, with_article
from worker.text.clipcap import ClipCapCaptioner, load_clipcap
from worker.text.label_agreement import mentions_label, words
from worker.text.labels import LabelScorer

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "captions_label_agreement"
EMBEDDINGS = ("LET α=0", f"LET α=0 + masked crop (w {DEFAULT_CROP_WEIGHT:g}, the product)")
TARGET_CONTRADICTION = 5.0


class AttributeBankBefore(RetrievalCaptioner):
    """Retrieval captions from the phrase bank as it was: every colour, material and size word before any label."""

    def phrases(self, label: str) -> list[str]:
        return ([with_article(label)] + [f"{with_article(w)} {label}" for w in COLOURS + MATERIALS + SIZES]
                + [f"{with_article(label)} {pos}" for pos in POSITIONS])


def class_words(text: str, world: SceneWorld) -> frozenset[str]:
    """The world's colour and shape words in ``text``."""
    return frozenset(w for w in words(text) if w in world.colours or w in world.shapes)


def top1_else_retrieval(clipcap: ClipCapCaptioner, retrieval: RetrievalCaptioner) -> Callable[..., list[str]]:
    """Captioner variant: the free caption when it names the label, the retrieval caption otherwise."""
    def caption(emb: torch.Tensor, labels: Sequence[str]) -> list[str]:
        free, fixed = clipcap.caption(emb), retrieval.caption(emb, labels)
        return [f if mentions_label(f, lab) else r for f, r, lab in zip(free, fixed, labels)]
    return caption


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    clip = load_clip(args.model, args.pretrained, "cpu")
    engine, scorer = MaskInversionEngine(clip), LabelScorer(clip)
    cap = load_clipcap(args.captioner)
    retrieval = RetrievalCaptioner(scorer)
    captioners: dict[str, Callable[..., list[str]]] = {
        "retrieval, attribute bank before": AttributeBankBefore(scorer).caption,
        "retrieval": retrieval.caption,
        "ClipCap, free": ClipCapCaptioner(cap, beam_size=args.beam, agree_with_labels=False).caption,
        "ClipCap, top-1 else retrieval": top1_else_retrieval(ClipCapCaptioner(cap, beam_size=args.beam), retrieval),
    }
    agreeing = {b: ClipCapCaptioner(cap, beam_size=b, fallback=retrieval) for b in args.agree_beams}
    for b, c in agreeing.items():
        captioners[f"ClipCap, beam {b} + agreement"] = c.caption
    world = SceneWorld(seed=args.world_seed)
    classes = world.class_names
    size = int(clip.visual.image_size[0])
    records: dict[str, list[ObjectRecord]] = {e: [] for e in EMBEDDINGS}
    labels_of: dict[str, list[str]] = {e: [] for e in EMBEDDINGS}
    seconds: dict[str, float] = dict.fromkeys(captioners, 0.0)
    fallbacks: dict[str, dict[int, int]] = {e: {} for e in EMBEDDINGS}
    for index in range(args.scenes):
        sc = world.scene(index, "test")
        if not sc.objects:
            continue
        masks = np.stack([o.mask for o in sc.objects])  # [K, H, W]
        phrases = [object_phrase(o.colour, o.shape) for o in sc.objects]
        res = engine.invert(sc.image, masks, size=size, steps=args.steps, lr=args.lr, alpha=0.0)
        if any(res.errors):
            raise RuntimeError(f"scene {index}: inversion failed: {res.errors}")
        crops = engine.baseline_embeddings(sc.image, masks, "masked_crop", size)
        embs = {EMBEDDINGS[0]: res.lets,
                EMBEDDINGS[1]: torch.from_numpy(mix_crop(res.lets.numpy(), crops.numpy(), DEFAULT_CROP_WEIGHT))}
        for name, emb in embs.items():
            labels = [top[0][0] for top in scorer.score(emb, classes, DEFAULT_TEMPLATES, top_k=1)]
            labels_of[name] += labels
            before = {b: c.fallbacks for b, c in agreeing.items()}
            caps = {}
            for method, fn in captioners.items():
                t0 = time.perf_counter()
                caps[method] = fn(emb, labels)
                seconds[method] += time.perf_counter() - t0
            for b, c in agreeing.items():
                fallbacks[name][b] = fallbacks[name].get(b, 0) + c.fallbacks - before[b]
            caps["label (reference)"] = [with_article(lab) for lab in labels]
            for k, phrase in enumerate(phrases):
                rec = ObjectRecord(scene=index, n_objects=len(phrases), phrase=phrase, candidates=sorted(set(phrases)))
                rec.captions = {m: texts[k] for m, texts in caps.items()}
                records[name].append(rec)
    methods = list(captioners) + ["label (reference)"]
    out: dict[str, Any] = {"config": {"scenes": args.scenes, "split": "test", "world_seed": args.world_seed,
                                      "model": args.model, "size": size, "steps": args.steps, "lr": args.lr,
                                      "beam": args.beam, "crop_weight": DEFAULT_CROP_WEIGHT, "classes": len(classes),
                                      "cpu": f"{platform.machine()}×{args.threads}"},
                           "target_contradiction_pct": TARGET_CONTRADICTION, "results": {}}
    n_captions = sum(len(r) for r in records.values())
    for name, recs in records.items():
        judge(recs, scorer)
        multi = [r for r in recs if r.n_objects >= 2]
        single = [r for r in recs if r.n_objects == 1]
        rows = {}
        for m in methods:
            contra = [class_words(r.captions[m], world) != class_words(lab, world)
                      for r, lab in zip(recs, labels_of[name])]
            rows[m] = {"contradiction_pct": 100.0 * sum(contra) / len(contra),
                       "correct_multi_pct": accuracy(multi, m), "exact_multi_pct": accuracy(multi, m, exact=True),
                       "correct_single_pct": accuracy(single, m),
                       "ms_per_caption": (1000.0 * seconds[m] / n_captions) if m in seconds else None}
        for b in agreeing:
            rows[f"ClipCap, beam {b} + agreement"]["fallback_pct"] = 100.0 * fallbacks[name][b] / len(recs)
        contradicting = [(r.scene, r.phrase, lab, r.captions["ClipCap, free"]) for r, lab in zip(recs, labels_of[name])
                         if class_words(r.captions["ClipCap, free"], world) != class_words(lab, world)]
        out["results"][name] = {"objects": len(recs), "objects_multi": len(multi), "objects_single": len(single),
                                "methods": rows, "free_contradictions_sample": contradicting[:8]}
    return out


def report(data: dict[str, Any]) -> str:
    cfg = data["config"]
    lines = ["# Caption–label agreement on the scene world", "",
             "Generated by `python -m benchmarks.caption_agreement` " + " ".join(f"`{k}={v}`" for k, v in cfg.items())
             + ". Labels: top-1 of the text prototypes over the world's classes, from the same embedding. "
             "**Contradiction**: the caption's colour/shape words differ from the label's. **Correct**: CLIP's text "
             "encoder matches the caption best to the object's own phrase among its scene's phrases (the measure of "
             "`benchmarks/localized_captions.py`). `label (reference)` is the label itself as a caption.", ""]
    for name, res in data["results"].items():
        lines += [f"## {name}", "",
                  f"{res['objects']} objects ({res['objects_multi']} in scenes with ≥ 2 objects).", "",
                  "| captions | contradiction % | correct, ≥ 2 objects | exact, ≥ 2 objects | correct, 1-object "
                  "scenes | fallback % | ms per caption |", "|---|---:|---:|---:|---:|---:|---:|"]
        for m, row in res["methods"].items():
            fb = f"{row['fallback_pct']:.1f}" if "fallback_pct" in row else ""
            ms = f"{row['ms_per_caption']:.1f}" if row["ms_per_caption"] is not None else ""
            lines.append(f"| {m} | {row['contradiction_pct']:.1f} | {row['correct_multi_pct']:.1f} | "
                         f"{row['exact_multi_pct']:.1f} | {row['correct_single_pct']:.1f} | {fb} | {ms} |")
        lines += ["", "Free ClipCap captions that contradict the label (scene, object, label, caption): "
                  + "; ".join(f"{s}: {p} / {lab} / {c}" for s, p, lab, c in res["free_contradictions_sample"]), ""]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--scenes", type=int, default=300, help="test scenes [300]")
    p.add_argument("--world-seed", type=int, default=0)
    p.add_argument("--model", default="maskinv-scene-tiny")
    p.add_argument("--pretrained", default=str(DEFAULT_CLIP))
    p.add_argument("--captioner", default=str(DEFAULT_CAPTIONER))
    p.add_argument("--beam", type=int, default=3, help="beam width of the free and top-1 variants [3]")
    p.add_argument("--agree-beams", type=int, nargs="+", default=[3, 8], help="beam widths with agreement [3 8]")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(DEFAULT_OUT), help="results path without suffix (.md and .json written)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    t0 = time.perf_counter()
    data = run(args)
    text = report(data)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    print(text)
    print(f"done in {time.perf_counter() - t0:.0f}s -> {out}.md/.json")


if __name__ == "__main__":
    main()
