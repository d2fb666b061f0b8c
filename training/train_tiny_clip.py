"""Train the tiny scene CLIP (``maskinv-scene-tiny``) contrastively on generated scene–caption pairs.

The model is a plain open_clip CLIP built from ``worker/engine/model_configs/maskinv-scene-tiny.json``; the loss is
open_clip's own ``ClipLoss``. Training pairs come from :mod:`training.scene_world` (train split): a pool of
scenes is rendered once, each with its twins (the shape twin: same colours, other shapes; the binding twin: same
shapes and layout, colours moved to other objects), then every step draws a batch of scenes with their twins,
mirrors each image left-right with probability 1/2 and writes a fresh whole-image caption for it (of the mirrored
scene when mirrored). Nothing tells the model which pixels belong to which word: the twins only make colours alone,
or bags of colours and shapes, useless for telling captions apart.

The text tower trains through :class:`training.compact_text.CompactTextTower`: only the token-table rows the
captions use, padding cut off. It gives the same model as training open_clip's full table, with less work per step
(a dense gradient and an AdamW update of 49 408 rows, most never used, at every step).

The result is a plain fp16 ``state_dict`` in safetensors format that open_clip loads like any local checkpoint:

    open_clip.create_model_and_transforms("maskinv-scene-tiny", pretrained="assets/tiny_scene_clip/...")
    worker.engine.models.load_clip("maskinv-scene-tiny", "assets/tiny_scene_clip/maskinv-scene-tiny.safetensors")

Run from the repository root (one stage with the defaults: 1500 steps, 10-15 minutes on 2 CPU cores; the
committed checkpoint took two stages, 18 + 12 minutes, whose commands are in docs/scene_world.md):

    nice python -m training.train_tiny_clip
    nice python -m training.train_tiny_clip --steps 200 --pool 2000 --out /tmp/try.safetensors   # a quick try
    nice python -m training.train_tiny_clip --minutes 15    # a time budget instead of a step count
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from multiprocessing import get_context
from pathlib import Path
from typing import Sequence

import numpy as np
import open_clip
import torch
from tqdm import tqdm

from training.compact_text import CompactTextTower
from training.scene_world import (COLOURS, DEFAULT_COLOURS, DEFAULT_SHAPES, SHAPES, Mention, SceneWorld,
                                    make_caption)
from worker.engine.models import register_project_configs

MODEL_NAME = "maskinv-scene-tiny"
ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny_scene_clip"
DEFAULT_OUT = ASSET_DIR / f"{MODEL_NAME}.safetensors"


# ---------------------------------------------------------------------- data
TWINS = ("shape", "binding")


class ScenePool:
    """Rendered training scenes in groups of ``group = 1 + len(twins)`` rows (a scene, then its twins in order):
    images ``[N, S, S, 3]`` uint8, per row what captions may say, and (``bound``) whether its captions must bind
    every shape to its colour (the binding twins' rows)."""

    def __init__(self, images: np.ndarray, objects: list[list[Mention]], backgrounds: list[str],
                 twins: Sequence[str] = ()):
        self.images, self.objects, self.backgrounds = images, objects, backgrounds
        self.group = 1 + len(twins)
        kinds = ("scene", *twins)
        self.bound = [kinds[row % self.group] == "binding" for row in range(len(images))]

    def __len__(self) -> int:
        return len(self.images)


def _render_range(args: tuple[dict, tuple[str, ...], int, int]) -> tuple[np.ndarray, list, list]:
    world_kwargs, twins, start, stop = args
    world = SceneWorld(**world_kwargs)
    makers = {"shape": world.twin, "binding": world.binding_twin}
    imgs, objs, bgs = [], [], []
    for i in range(start, stop):
        base = world.scene(i, "train")
        for sc in [base] + [makers[t](i, "train", base=base) for t in twins]:
            imgs.append(np.asarray(sc.image))
            objs.append([o.mention() for o in sc.objects])
            bgs.append(sc.background)
    return np.stack(imgs), objs, bgs


def render_pool(world_kwargs: dict, count: int, twins: Sequence[str] = TWINS, workers: int = 2,
                chunk: int = 250) -> ScenePool:
    """Render train scenes ``0 .. count-1``, each followed by its ``twins`` (deterministic; with g = 1 + len(twins),
    pool row ``g·i`` is scene ``i``, the next rows its twins in order) with ``workers`` processes and a progress
    bar."""
    unknown = [t for t in twins if t not in TWINS]
    if unknown:
        raise ValueError(f"unknown twin kind(s) {unknown}; known: {list(TWINS)}")
    twins = tuple(twins)
    jobs = [(world_kwargs, twins, a, min(a + chunk, count)) for a in range(0, count, chunk)]
    parts = []
    with get_context("spawn" if workers > 1 else "fork").Pool(max(1, workers)) as pool:
        for part in tqdm(pool.imap(_render_range, jobs), total=len(jobs), desc="render scenes", unit="chunk"):
            parts.append(part)
    return ScenePool(np.concatenate([p[0] for p in parts]), [o for p in parts for o in p[1]],
                     [b for p in parts for b in p[2]], twins=twins)


class Batches:
    """Deterministic batches ``(pixels [B, 3, S, S], captions)`` from a pool: epoch-wise shuffles, mirrors.

    Each batch holds B/g scenes, each with its g - 1 twins, so that colours alone (shape twins) or bags of
    colours and shapes (binding twins) cannot tell its captions apart. A binding twin's captions always name
    each shape with its colour (a shape-only caption would equal its scene's)."""

    def __init__(self, pool: ScenePool, batch: int, seed: int, mean: Sequence[float], std: Sequence[float],
                 list_share: float = 0.4, position_rate: float = 0.4):
        self.pool, self.batch = pool, batch
        self.caption_style = {"list_share": list_share, "position_rate": position_rate}
        self.rng = np.random.default_rng([seed, 7])
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]
        self._order = np.zeros(0, dtype=np.int64)

    def next(self) -> tuple[torch.Tensor, list[str]]:
        g = self.pool.group
        groups = self.batch // g
        if len(self._order) < groups:
            self._order = np.concatenate([self._order, self.rng.permutation(len(self.pool) // g)])
        first, self._order = self._order[:groups], self._order[groups:]
        idx = (g * first[:, None] + np.arange(g)[None, :]).reshape(-1)
        mirror = self.rng.random(len(idx)) < 0.5
        imgs = self.pool.images[idx].copy()
        imgs[mirror] = imgs[mirror][:, :, ::-1]
        captions = []
        for i, m in zip(idx, mirror):
            objs = [o._replace(centre=(1.0 - o.centre[0], o.centre[1])) if m else o for o in self.pool.objects[i]]
            captions.append(make_caption(objs, self.pool.backgrounds[i], self.rng,
                                         shape_only=not self.pool.bound[i], **self.caption_style))
        x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div_(255.0)
        return (x - self.mean) / self.std, captions


# ---------------------------------------------------------------------- training
def lr_at(step: int, base: float, warmup: int, progress: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to zero over ``progress`` in [0, 1], the share of the
    post-warm-up schedule done (of its steps, or of its time budget); beyond 1 the rate stays at zero."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def calibrate_embedding_scale(model: torch.nn.Module, pixels: torch.Tensor, target_rms: float) -> float:
    """Rescale ``model.visual.proj`` so that image embeddings of ``pixels`` ``[B, 3, S, S]`` have per-coordinate
    RMS ``target_rms``; returns the factor applied.

    A CLIP model's embedding scale is a free gauge: every use of an embedding normalises it, so the rescaled
    model classifies, retrieves and explains exactly as before. MaskInversion's Adam steps, however, are about
    ``lr`` per coordinate whatever the scale, so the scale decides how far ``lr = 0.1`` moves a LET in K steps.
    Calibrating the tiny model to the order of public CLIP ViT-B embeddings (norms of the order of 10 in 512-d,
    RMS about 0.45) runs the paper's lr and K under the geometry they were chosen for."""
    was_training = model.training
    model.eval()
    emb = model.encode_image(pixels)
    factor = target_rms / float(emb.pow(2).mean().sqrt())
    model.visual.proj.mul_(factor)
    model.train(was_training)
    return factor


def save_fp16(model: torch.nn.Module, path: Path) -> None:
    """Write the model's ``state_dict`` as fp16 safetensors (a plain open_clip state dict)."""
    from safetensors.torch import save_file

    sd = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))


def train(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    register_project_configs()
    if args.config_dir:
        open_clip.add_model_config(args.config_dir)
    model = open_clip.create_model(args.model)
    tokenizer = open_clip.get_tokenizer(args.model)
    image_size = int(model.visual.image_size[0])
    world_kwargs = {"seed": args.seed, "image_size": image_size, "colours": list(args.colours),
                    "shapes": list(args.shapes)}
    if args.init:
        from safetensors.torch import load_file

        state = {k: v.float() for k, v in load_file(args.init).items()}
        model.load_state_dict(state)
        print(f"initialised from {args.init}")

    t0 = time.time()
    pool = render_pool(world_kwargs, args.pool, twins=args.twins, workers=args.workers)
    t_render = time.time() - t0
    batches = Batches(pool, args.batch, args.seed, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD,
                      list_share=args.list_share, position_rate=args.position_rate)

    text = CompactTextTower(model)
    params = text.parameters_to_train()  # the compact token table, like the full one, is not decayed
    decayed = {id(p) for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n}
    opt = torch.optim.AdamW([{"params": [p for p in params if id(p) in decayed], "weight_decay": args.wd},
                             {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = open_clip.loss.ClipLoss()
    model.train()
    history = []
    budget = args.minutes * 60.0 if args.minutes else None
    t1 = time.time()
    t_warm = t1  # when warm-up ended: a time-budgeted run decays over the rest of its budget
    bar = tqdm(total=None if budget else args.steps, desc="train", unit="step")
    step = 0
    while (time.time() - t1 < budget) if budget else step < args.steps:
        if budget:
            if step == args.warmup:
                t_warm = time.time()
            progress = (time.time() - t_warm) / max(1e-9, t1 + budget - t_warm)
        else:
            progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        lr = lr_at(step, args.lr, args.warmup, progress)
        for g in opt.param_groups:
            g["lr"] = lr
        pixels, captions = batches.next()
        img_f = model.encode_image(pixels, normalize=True)
        txt_f = torch.nn.functional.normalize(text(tokenizer(captions)), dim=-1)
        loss = loss_fn(img_f, txt_f, model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        history.append(float(loss.detach()))
        step += 1
        bar.update(1)
        if args.save_every and step % args.save_every == 0:
            text.write_back()
            out = Path(args.out)
            save_fp16(model, out.with_name(f"{out.stem}.step{step}{out.suffix}"))
        if step % 10 == 1:
            bar.set_postfix(loss=f"{np.mean(history[-20:]):.3f}", scale=f"{model.logit_scale.exp().item():.1f}",
                            lr=f"{lr:.1e}")
    bar.close()
    t_train = time.time() - t1
    text.write_back()
    model.eval()
    factor = None
    if args.embed_rms > 0:
        factor = calibrate_embedding_scale(model, batches.next()[0], args.embed_rms)
        print(f"image embedding scale calibrated to per-coordinate RMS {args.embed_rms} (proj x {factor:.4f})")
    save_fp16(model, Path(args.out))
    return {
        "model": args.model,
        "checkpoint": Path(args.out).name,
        "init": Path(args.init).name if args.init else None,
        "seed": args.seed,
        "world": {**world_kwargs, "split": "train", "scenes": args.pool,
                  "twins": list(args.twins)},
        "captions": {"list_share": args.list_share, "position_rate": args.position_rate},
        "steps": step, "minutes": args.minutes, "batch": args.batch, "lr": args.lr, "warmup": args.warmup,
        "weight_decay": args.wd,
        "embed_rms": args.embed_rms if factor is not None else None, "proj_factor": factor,
        "loss_first_20": float(np.mean(history[:20])) if history else None,
        "loss_last_20": float(np.mean(history[-20:])) if history else None,
        "loss_every_50": [round(float(np.mean(history[i:i + 50])), 4) for i in range(0, len(history), 50)],
        "render_s": round(t_render, 1), "train_s": round(t_train, 1), "threads": args.threads,
        "torch": torch.__version__, "open_clip": open_clip.__version__, "machine": platform.processor() or
        platform.machine(),
    }


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=MODEL_NAME, help=f"open_clip model config name [{MODEL_NAME}]")
    ap.add_argument("--config-dir", default=None, help="extra folder of open_clip model configs (experiments)")
    ap.add_argument("--steps", type=int, default=1500, help="optimizer steps [1500]")
    ap.add_argument("--minutes", type=float, default=None,
                    help="train for this many minutes instead of --steps: warm-up, then the cosine decay spans the "
                         "rest of the budget (the step count then depends on the machine's speed; the record has it)")
    ap.add_argument("--batch", type=int, default=None,
                    help="image-caption pairs per step, a multiple of 1 + len(--twins) [the largest <= 128]")
    ap.add_argument("--twins", nargs="*", default=list(TWINS), choices=TWINS,
                    help=f"twins rendered with every scene and batched with it [{' '.join(TWINS)}]")
    ap.add_argument("--pool", type=int, default=8000,
                    help="train scenes rendered once (each with its twins) and reused [8000]")
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate [1e-3]")
    ap.add_argument("--warmup", type=int, default=100, help="warm-up steps [100]")
    ap.add_argument("--wd", type=float, default=0.1, help="AdamW weight decay on matrices [0.1]")
    ap.add_argument("--seed", type=int, default=0, help="world and initialisation seed [0]")
    ap.add_argument("--colours", nargs="+", default=list(DEFAULT_COLOURS), choices=list(COLOURS),
                    help=f"colour words of the world [{' '.join(DEFAULT_COLOURS)}]")
    ap.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), choices=list(SHAPES),
                    help=f"shape words of the world [{' '.join(DEFAULT_SHAPES)}]")
    ap.add_argument("--list-share", type=float, default=0.4,
                    help="share of captions that list objects one by one (the rest group them) [0.4]")
    ap.add_argument("--position-rate", type=float, default=0.4,
                    help="share of list captions that say where each object is ('on the left') [0.4]")
    ap.add_argument("--init", default=None, help="start from this checkpoint (a second training stage)")
    ap.add_argument("--embed-rms", type=float, default=0.45,
                    help="after training, rescale the image projection to this per-coordinate embedding RMS, the "
                         "order of public CLIP ViT-B models (a free gauge; see calibrate_embedding_scale); 0: off "
                         "[0.45]")
    ap.add_argument("--threads", type=int, default=2, help="torch threads [2]")
    ap.add_argument("--workers", type=int, default=2, help="processes rendering the pool [2]")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help=f"checkpoint path [{DEFAULT_OUT}]")
    ap.add_argument("--save-every", type=int, default=0,
                    help="also save <out>.step<N> checkpoints every N steps, to watch a long run [0: off]")
    ap.add_argument("--record", default=None, help="training record JSON [<out without suffix>.json]")
    args = ap.parse_args(argv)
    group = 1 + len(args.twins)
    if args.batch is None:
        args.batch = 128 // group * group
    if args.batch < max(2, group) or args.batch % group:
        ap.error(f"--batch must be a multiple of {group} (each scene comes with {group - 1} twin(s)) and >= 2, "
                 f"got {args.batch}")
    record = train(args)
    rec_path = Path(args.record) if args.record else Path(args.out).with_suffix(".json")
    rec_path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in ("checkpoint", "loss_first_20", "loss_last_20", "train_s")}))


if __name__ == "__main__":
    main()
