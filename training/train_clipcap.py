"""Train a ClipCap captioner on image–caption pairs over a frozen CLIP model.

The CLIP image embeddings are computed once (the worker's own global-embedding path,
``MaskInversionEngine.embed_images``); the mapping network is trained on them, GPT-2 optionally too.

Data sources (one of):
    --pairs FILE.jsonl       one {"image": path, "caption": str} object per line (paths relative to the file)
    --scene-world N          the project's generated scene world (training/scene_world.py): N single-object
                             training scenes, each paired with its object's phrase (see docs/captions.md)

GPT-2:
    --gpt2 gpt2              a hub id or local path of a pretrained GPT-2 (its tokenizer comes with it)
    --gpt2 tiny              a small randomly initialised GPT-2 (--gpt2-layers/-width/-heads) with a byte-level
                             BPE tokenizer trained on the captions (--vocab-size)

Examples::

    python -m training.train_clipcap --scene-world 6000 --model maskinv-scene-tiny \\
        --pretrained assets/tiny_scene_clip/model.safetensors --gpt2 tiny --train-lm --out assets/tiny_clipcap
    python -m training.train_clipcap --pairs coco_pairs.jsonl --model ViT-B-16 --pretrained openai \\
        --gpt2 gpt2 --mapping transformer --prefix-length 10 --out captioner/
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from worker.text.clipcap import ClipCap, ClipCapConfig, ClipCapModel, save_clipcap

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"


# ---------------------------------------------------------------------------------------------- tokenizer / LM
def train_bpe_tokenizer(texts: Sequence[str], vocab_size: int = 320) -> Any:
    """A byte-level BPE tokenizer (transformers fast tokenizer, ``<|endoftext|>`` = eos = bos = pad) trained
    on ``texts``; it encodes any text (bytes never seen fall back to single-byte tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if not texts:
        raise ValueError("no texts to train a tokenizer on")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS,
                                   pad_token=EOS)


def tiny_gpt2(vocab_size: int, eos_id: int, n_layer: int = 2, n_embd: int = 64, n_head: int = 4,
              n_positions: int = 48, seed: int = 0) -> Any:
    """A randomly initialised GPT-2 (``transformers.GPT2LMHeadModel``) of the given size."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                     n_head=n_head, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(cfg)


def pretrained_gpt2(ref: str) -> tuple[Any, Any]:
    """GPT-2 and its tokenizer from a hub id (e.g. ``"gpt2"``) or a local directory."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(ref)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer of {ref!r} has no end-of-text token")
    return GPT2LMHeadModel.from_pretrained(ref), tokenizer


def build_captioner(cfg: ClipCapConfig, lm: Any, tokenizer: Any, seed: int = 0) -> ClipCap:
    """A fresh captioner: a new mapping network (seeded) on ``lm``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ClipCapModel(cfg, lm)
    return ClipCap(model=model, tokenizer=tokenizer, source="")


def encode_captions(tokenizer: Any, captions: Sequence[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids ``[M, T]`` (caption + end-of-text, at most ``max_tokens``) and lengths ``[M]``."""
    eos = int(tokenizer.eos_token_id)
    ids = [tokenizer(c.strip(), add_special_tokens=False)["input_ids"][:max_tokens - 1] + [eos] for c in captions]
    t = max(len(x) for x in ids)
    tokens = torch.full((len(ids), t), eos, dtype=torch.long)
    for i, x in enumerate(ids):
        tokens[i, :len(x)] = torch.tensor(x)
    return tokens, torch.tensor([len(x) for x in ids])


# ---------------------------------------------------------------------------------------------- training
@dataclass
class FitConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 2e-3
    lm_lr: float = 5e-4  # GPT-2's learning rate when it is trained too
    weight_decay: float = 0.01
    warmup: int = 100  # linear warm-up steps, then cosine decay to 0
    train_lm: bool = False  # also fine-tune GPT-2 (else only the mapping network learns)
    noise_std: float = 0.0  # Gaussian noise added to the normalised embeddings while training
    seed: int = 0


def fit(cap: ClipCap, embeddings: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor, fc: FitConfig,
        on_epoch: Callable[[int, float], None] | None = None) -> list[float]:
    """Train ``cap`` on embeddings ``[M, D]`` and captions ``tokens`` ``[M, T]`` / ``lengths`` ``[M]``.

    Returns the mean training loss per epoch. Deterministic for a given seed on CPU.
    """
    model = cap.model
    m = embeddings.shape[0]
    if m == 0 or tokens.shape[0] != m or lengths.shape[0] != m:
        raise ValueError(f"need as many captions as embeddings, got {m} embeddings, {tokens.shape[0]} captions")
    model.lm.requires_grad_(fc.train_lm)
    model.mapping.requires_grad_(True)
    groups = [{"params": list(model.mapping.parameters()), "lr": fc.lr}]
    if fc.train_lm:
        groups.append({"params": list(model.lm.parameters()), "lr": fc.lm_lr})
    opt = torch.optim.AdamW(groups, weight_decay=fc.weight_decay)
    steps_per_epoch = math.ceil(m / fc.batch_size)
    total = fc.epochs * steps_per_epoch

    def schedule(step: int) -> float:
        if step < fc.warmup:
            return (step + 1) / fc.warmup
        return 0.5 * (1 + math.cos(math.pi * (step - fc.warmup) / max(1, total - fc.warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    gen = torch.Generator().manual_seed(fc.seed)
    device = model.lm.device
    history = []
    model.train()
    model.lm.train(fc.train_lm)  # a frozen GPT-2 stays in eval mode (no dropout)
    for epoch in range(fc.epochs):
        order = torch.randperm(m, generator=gen)
        total_loss = 0.0
        for i in range(0, m, fc.batch_size):
            idx = order[i:i + fc.batch_size]
            emb = embeddings[idx].float()
            if fc.noise_std:
                emb = torch.nn.functional.normalize(emb, dim=-1)
                emb = emb + fc.noise_std * torch.randn(emb.shape, generator=gen)
            t = int(lengths[idx].max())
            loss = model.loss(emb.to(device), tokens[idx, :t].to(device), lengths[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
            opt.step()
            sched.step()
            total_loss += loss.item() * len(idx)
        history.append(total_loss / m)
        if on_epoch:
            on_epoch(epoch, history[-1])
    model.eval().requires_grad_(False)
    return history


# ---------------------------------------------------------------------------------------------- data
def read_pairs(path: str | Path) -> tuple[list[Path], list[str]]:
    """Image paths and captions of a JSONL file of ``{"image": path, "caption": str}`` objects."""
    path = Path(path)
    images, captions = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            image, caption = obj["image"], obj["caption"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{n}: expected {{\"image\": path, \"caption\": str}}, got {line[:80]!r}") from exc
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"{path}:{n}: empty caption")
        p = Path(image) if Path(image).is_absolute() else path.parent / image
        if not p.is_file():
            raise ValueError(f"{path}:{n}: image {p} does not exist")
        images.append(p)
        captions.append(caption)
    if not images:
        raise ValueError(f"{path} holds no pairs")
    return images, captions


def object_phrase(colour: str, shape: str) -> str:
    """The caption of one scene-world object: ``"a red circle"``, ``"an orange star"``."""
    article = "an" if colour[:1] in "aeiou" else "a"
    return f"{article} {colour} {shape}"


def scene_world_pairs(n: int, seed: int = 0, split: str = "train") -> tuple[list[Any], list[str]]:
    """``n`` single-object scenes of the project's scene world (``training/scene_world.py``, world seed
    ``seed``) as PIL images, each paired with its object's phrase (see docs/captions.md for why)."""
    from training.scene_world import SceneWorld

    world = SceneWorld(seed=seed, min_objects=1, max_objects=1)
    images, captions = [], []
    for i in range(n):
        scene = world.scene(i, split)
        images.append(scene.image)
        captions.append(object_phrase(scene.objects[0].colour, scene.objects[0].shape))
    return images, captions


def embed(images: Sequence[Any], model: str, pretrained: str, size: int | None, device: str | None,
          batch: int = 32) -> tuple[torch.Tensor, Any]:
    """Global CLIP embeddings ``[M, D]`` of images (PIL images or paths) and the ClipModel used."""
    from PIL import Image

    from worker.engine.engine import MaskInversionEngine
    from worker.engine.models import load_clip

    clip = load_clip(model, pretrained, device)
    engine = MaskInversionEngine(clip)
    size = size or int(clip.visual.image_size[0])
    out = []
    for i in range(0, len(images), batch):
        chunk = [Image.open(x).convert("RGB") if isinstance(x, (str, Path)) else x for x in images[i:i + batch]]
        out.append(engine.embed_images(chunk, size).cpu())
    return torch.cat(out), clip


# ---------------------------------------------------------------------------------------------- command
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pairs", help="JSONL of {\"image\": path, \"caption\": str}")
    src.add_argument("--scene-world", type=int, metavar="N", help="N single-object scenes of the scene world")
    p.add_argument("--out", required=True, help="captioner directory to write")
    p.add_argument("--model", default="ViT-B-16", help="open_clip model name [ViT-B-16]")
    p.add_argument("--pretrained", default="openai", help="pretrained tag or checkpoint path [openai]")
    p.add_argument("--size", type=int, default=None, help="input size for the embeddings [the model's native]")
    p.add_argument("--device", default=None, help="torch device [cuda if available, else cpu]")
    p.add_argument("--gpt2", default="tiny", help="'tiny' (random small GPT-2 + BPE trained on the captions) "
                                                  "or a hub id / path of a pretrained GPT-2 [tiny]")
    p.add_argument("--gpt2-layers", type=int, default=2)
    p.add_argument("--gpt2-width", type=int, default=64)
    p.add_argument("--gpt2-heads", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=320, help="BPE vocabulary of the tiny tokenizer [320]")
    p.add_argument("--mapping", choices=("mlp", "transformer"), default="mlp")
    p.add_argument("--prefix-length", type=int, default=10)
    p.add_argument("--clip-length", type=int, default=10, help="transformer mapping: projected tokens")
    p.add_argument("--mapping-layers", type=int, default=8, help="transformer mapping: layers")
    p.add_argument("--mapping-heads", type=int, default=8, help="transformer mapping: heads")
    p.add_argument("--no-normalize", action="store_true", help="feed embeddings unnormalised")
    p.add_argument("--train-lm", action="store_true", help="fine-tune GPT-2 too (always on for --gpt2 tiny)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--lm-lr", type=float, default=5e-4)
    p.add_argument("--noise-std", type=float, default=0.0, help="noise on normalised embeddings while training")
    p.add_argument("--max-tokens", type=int, default=20, help="longest caption in tokens, end-of-text included")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads [2]")
    p.add_argument("--world-seed", type=int, default=0, help="scene world seed (--scene-world) [0]")
    p.add_argument("--seed", type=int, default=0, help="training seed [0]")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    t0 = time.perf_counter()
    if args.pairs:
        images, captions = read_pairs(args.pairs)
        source = {"pairs": str(args.pairs)}
    else:
        images, captions = scene_world_pairs(args.scene_world, args.world_seed)
        source = {"scene_world": args.scene_world, "world_seed": args.world_seed, "split": "train",
                  "objects_per_scene": 1}
    embeddings, clip = embed(images, args.model, args.pretrained, args.size, args.device)
    log.info("embedded %d images with %s in %.1fs", len(images), clip.id, time.perf_counter() - t0)

    if args.gpt2 == "tiny":
        tokenizer = train_bpe_tokenizer(captions, args.vocab_size)
        lm = tiny_gpt2(len(tokenizer), tokenizer.eos_token_id, args.gpt2_layers, args.gpt2_width, args.gpt2_heads,
                       n_positions=args.prefix_length + args.max_tokens, seed=args.seed)
        train_lm = True
    else:
        lm, tokenizer = pretrained_gpt2(args.gpt2)
        train_lm = args.train_lm
    lm.to(clip.device)
    cfg = ClipCapConfig(clip_dim=clip.embed_dim, prefix_length=args.prefix_length, mapping=args.mapping,
                        clip_length=args.clip_length, mapping_layers=args.mapping_layers,
                        mapping_heads=args.mapping_heads, normalize_input=not args.no_normalize,
                        clip_model={"name": clip.name, "pretrained": Path(clip.pretrained).name},
                        training={**source, "gpt2": args.gpt2, "pairs": len(captions), "epochs": args.epochs,
                                  "train_lm": train_lm, "noise_std": args.noise_std, "lr": args.lr,
                                  "size": args.size or int(clip.visual.image_size[0])})
    cap = build_captioner(cfg, lm, tokenizer, seed=args.seed)
    cap.model.to(clip.device)
    tokens, lengths = encode_captions(tokenizer, captions, args.max_tokens)
    fc = FitConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, lm_lr=args.lm_lr,
                   train_lm=train_lm, noise_std=args.noise_std, seed=args.seed)
    t1 = time.perf_counter()
    history = fit(cap, embeddings, tokens, lengths, fc,
                  on_epoch=lambda e, loss: log.info("epoch %d/%d: loss %.4f (%.0fs)", e + 1, fc.epochs, loss,
                                                    time.perf_counter() - t1))
    cfg.training.update(final_loss=round(history[-1], 4), train_s=round(time.perf_counter() - t1, 1))
    out = save_clipcap(cap, args.out)
    log.info("captioner written to %s (%.1f MB)", out,
             sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20)


if __name__ == "__main__":
    main()
