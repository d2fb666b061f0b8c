"""Why a tiny scene CLIP does or does not separate MaskInversion from the global embedding: diagnostics.

On scenes of the scene world's **val** split (the test split stays for the benchmark), for a checkpoint:

* twin discrimination: how often the image embedding prefers its own caption to its twin's, for shape twins
  (other shapes) and binding twins (colours moved between the same shapes) — does the model see shapes, and
  does it bind each colour to its shape in the whole image?
* region readouts on objects of multi-object scenes, split into colour and shape, and into objects whose colour
  is unique in their scene and objects that share it with another: the global embedding,
  MaskInversion's LET (K steps, lr), and the mask-pooled final tokens through ``ln_post`` and ``proj`` (only
  meaningful for average-pooled towers, whose patch tokens are what the embedding pools).

    python -m benchmarks.scene_diagnostics --pretrained assets/tiny_scene_clip/maskinv-scene-tiny.safetensors
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.region_classification import SCENE_CHECKPOINT, SCENE_MODEL
from training.scene_world import SceneWorld, make_caption
from worker.engine import vit
from worker.engine.engine import MaskInversionEngine
from worker.text.labels import LabelScorer
from worker.engine.models import ClipModel, load_clip
from worker.protocol import DEFAULT_TEMPLATES


@torch.no_grad()
def twin_discrimination(clip: ClipModel, world: SceneWorld, scenes: int, split: str = "val") -> dict[str, float]:
    """Percent of (scene, twin) pairs of multi-object scenes whose images each prefer their own caption."""
    engine = MaskInversionEngine(clip)
    size = world.image_size
    hits: dict[str, list[float]] = {"shape": [], "binding": []}
    for i in range(scenes):
        base = world.scene(i, split)
        if len(base.objects) < 2:
            continue
        for kind, twin in (("shape", world.twin(i, split, base=base)),
                           ("binding", world.binding_twin(i, split, base=base))):
            captions = [make_caption([o.mention() for o in sc.objects], sc.background, np.random.default_rng(i),
                                     shape_only=False) for sc in (base, twin)]
            img = F.normalize(engine.embed_images([base.image, twin.image], size=size).float(), dim=-1)
            txt = F.normalize(clip.model.encode_text(clip.tokenizer(captions).to(clip.device)).float(), dim=-1)
            sim = img @ txt.T  # [2, 2]
            hits[kind].append((int(sim[0, 0] > sim[0, 1]) + int(sim[1, 1] > sim[1, 0])) / 2)
    return {k: 100.0 * float(np.mean(v)) for k, v in hits.items()}


def region_readouts(clip: ClipModel, world: SceneWorld, scenes: int, steps: int = 10, lr: float = 0.1,
                    split: str = "val") -> dict[str, dict[str, float]]:
    """Acc@1, colour and shape accuracy (percent) of each readout on objects of multi-object scenes."""
    engine, scorer = MaskInversionEngine(clip), LabelScorer(clip)
    labels, n_shapes, size = world.class_names, len(world.shapes), world.image_size
    visual, patch = clip.visual, clip.patch_size
    preds: dict[str, list[int]] = {"global": [], "maskinversion": [], "mask-pooled tokens": []}
    truth: list[int] = []
    shared: list[bool] = []  # another object of the scene has the same colour
    for i in range(scenes):
        sc = world.scene(i, split)
        if len(sc.objects) < 2:
            continue
        masks = np.stack([o.mask for o in sc.objects])  # [N, S, S]
        truth += [labels.index(o.label) for o in sc.objects]
        colours = [o.colour for o in sc.objects]
        shared += [colours.count(c) > 1 for c in colours]
        emb = {"global": engine.baseline_embeddings(sc.image, masks, kind="global", size=size),
               "maskinversion": engine.invert(sc.image, masks, size=size, steps=steps, lr=lr, alpha=0.0).lets}
        with torch.no_grad():
            tokens = visual.transformer.resblocks[-1](vit.trunk_forward(visual, engine._pixels(sc.image, size),
                                                                        engine.pos.get(size)))  # [1, n, d]
            cover = F.avg_pool2d(torch.from_numpy(masks.astype(np.float32))[:, None], patch).flatten(1)  # [N, g²]
            pooled = (cover / cover.sum(1, keepdim=True)) @ tokens[0, 1:].float()  # [N, d]
            emb["mask-pooled tokens"] = visual.ln_post(pooled) @ visual.proj
        for name, e in emb.items():
            preds[name] += scorer.probabilities(e, labels, DEFAULT_TEMPLATES).argmax(1).tolist()
    t, sh = np.array(truth), np.array(shared)
    out = {}
    for name, p in preds.items():
        p = np.array(p)
        out[name] = {"acc1": 100 * float(np.mean(p == t)),
                     "colour": 100 * float(np.mean(p // n_shapes == t // n_shapes)),
                     "shape": 100 * float(np.mean(p % n_shapes == t % n_shapes)), "regions": len(t),
                     "acc1_unique_colour": 100 * float(np.mean((p == t)[~sh])) if (~sh).any() else float("nan"),
                     "acc1_shared_colour": 100 * float(np.mean((p == t)[sh])) if sh.any() else float("nan"),
                     "regions_shared_colour": int(sh.sum())}
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=SCENE_MODEL, help=f"open_clip model [{SCENE_MODEL}]")
    ap.add_argument("--pretrained", default=str(SCENE_CHECKPOINT), help="checkpoint [the committed tiny one]")
    ap.add_argument("--scenes", type=int, default=150, help="val scenes [150]")
    ap.add_argument("--steps", type=int, default=10, help="MaskInversion steps [10]")
    ap.add_argument("--lr", type=float, default=0.1, help="MaskInversion learning rate [0.1]")
    ap.add_argument("--out", default=None, help="also write the numbers as JSON to this path")
    a = ap.parse_args(argv)
    clip = load_clip(a.model, a.pretrained)
    world = SceneWorld(image_size=int(clip.visual.image_size[0]))
    out = {"twins": twin_discrimination(clip, world, a.scenes),
           "regions": region_readouts(clip, world, a.scenes, a.steps, a.lr)}
    out["config"] = {"model": a.model, "pretrained": Path(a.pretrained).name, "split": "val", "scenes": a.scenes,
                     "steps": a.steps, "lr": a.lr}
    text = json.dumps(out, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return out


if __name__ == "__main__":
    main()
