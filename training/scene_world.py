"""A generated scene world: coloured shapes on textured backgrounds, with exact instance masks and captions.

Every scene is a pure function of ``(world seed, scene index)``: scene ``i`` can be rebuilt alone, in any
order, on any machine. Captions describe the whole image (all objects, varying order and wording), the way
web captions describe whole photos; no caption says which pixels belong to which word.

    world = SceneWorld(seed=0)
    scene = world.scene(17)            # Scene: .image (PIL RGB), .objects (colour, shape, mask [H, W])
    world.caption(scene, rng)          # "a photo of a blue star and a red circle."
    world.class_names                  # ["red circle", "red square", ...] (colour x shape)

``python -m training.scene_world --out DIR --split test --count 300`` exports scenes as a COCO-style
dataset (``DIR/images/*.png`` + ``DIR/instances.json`` with compressed-RLE instance masks) that
``benchmarks/region_classification.py`` reads like any COCO subset.
"""

from __future__ import annotations

import argparse
import colorsys
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageDraw

# Hue (degrees) of each colour word; objects are saturated and bright, backgrounds are not.
COLOURS: dict[str, float] = {
    "red": 0.0,
    "orange": 28.0,
    "yellow": 56.0,
    "green": 125.0,
    "blue": 222.0,
    "purple": 282.0,
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "heart")
# The default world's vocabulary (5 x 5 = 25 classes): hues at least 56 degrees apart and shapes that stay
# distinct at 2-3 patches across. Orange (28 degrees from red) and heart (a circle at this resolution) are known
# words that a world may add (see docs/scene_world.md for why the default left them out).
DEFAULT_COLOURS: tuple[str, ...] = ("red", "yellow", "green", "blue", "purple")
DEFAULT_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
PLURALS: dict[str, str] = {"cross": "crosses"}
BACKGROUNDS: tuple[str, ...] = ("noisy", "striped", "checkered", "cloudy")
NUMBERS = ("no", "one", "two", "three", "four", "five", "six")

# Split name -> offset of its scene indices, so train/val/test scenes never coincide for one world seed.
SPLITS: dict[str, int] = {"train": 0, "val": 1 << 40, "test": 2 << 40}


@dataclass(frozen=True)
class SceneObject:
    """One object: its class words and its exact instance mask ``[H, W]`` (bool)."""

    colour: str
    shape: str
    mask: np.ndarray
    centre: tuple[float, float]  # (x, y) in [0, 1] image coordinates
    size: str = ""  # "small", "large" or "" (the middle third of the world's radius range)

    @property
    def label(self) -> str:
        return f"{self.colour} {self.shape}"

    def mention(self, mirrored: bool = False) -> "Mention":
        x, y = self.centre
        return Mention(self.label, ((1.0 - x) if mirrored else x, y), self.size)


class Mention(NamedTuple):
    """What a caption may say about one object: its class, centre ``(x, y)`` in [0, 1] and size word."""

    label: str
    centre: tuple[float, float]
    size: str = ""


@dataclass(frozen=True)
class Scene:
    """An RGB image ``[H, W, 3]`` with 1..k non-overlapping objects on a background."""

    index: int
    image: Image.Image
    objects: tuple[SceneObject, ...]
    background: str


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _rgb(hue_deg: float, sat: float, val: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb((hue_deg % 360.0) / 360.0, sat, val), dtype=np.float32)


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Binary dilation of ``[H, W]`` by a ``(2r+1)²`` square (separable shifted maxima)."""
    out = mask.copy()
    for k in range(1, r + 1):
        out[k:] |= mask[:-k]
        out[:-k] |= mask[k:]
    rows = out.copy()
    for k in range(1, r + 1):
        out[:, k:] |= rows[:, :-k]
        out[:, :-k] |= rows[:, k:]
    return out


def _shape_outline(shape: str, rng: np.random.Generator) -> np.ndarray:
    """Unit outline ``[V, 2]`` (radius about 1, centred at 0) of a shape, rotated at random."""
    if shape == "circle":
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], 1)
        angle = 0.0
    elif shape == "square":
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64) * 0.82
        angle = rng.uniform(-0.35, 0.35)
    elif shape == "triangle":
        t = np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        pts = np.stack([np.cos(t), -np.sin(t)], 1) * 1.1
        pts[:, 1] += 0.15
        angle = rng.uniform(-0.3, 0.3)
    elif shape == "star":
        t = -np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.1, 0.45)
        pts = np.stack([np.cos(t) * r, np.sin(t) * r], 1)
        angle = rng.uniform(-0.4, 0.4)
    elif shape == "cross":
        a, b = 0.95, 0.33
        pts = np.array([[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a], [-b, a], [-b, b], [-a, b],
                        [-a, -b], [-b, -b]], dtype=np.float64)
        angle = rng.uniform(-0.35, 0.35)
    elif shape == "heart":
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        pts = np.stack([x, y + 2.5], 1) / 16.0
        angle = rng.uniform(-0.3, 0.3)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    c, s = math.cos(angle), math.sin(angle)
    return pts @ np.array([[c, s], [-s, c]])


class SceneWorld:
    """Deterministic generator of scenes, instance masks and whole-image captions.

    Args:
        seed: world seed; ``(seed, split, index)`` fixes a scene completely.
        image_size: side of the square images in pixels.
        min_objects, max_objects: objects per scene (uniform), non-overlapping.
        radius: object radius range as a fraction of the image side.
        colours, shapes: the vocabulary (class = "colour shape").
    """

    def __init__(self, seed: int = 0, image_size: int = 112, min_objects: int = 1, max_objects: int = 4,
                 radius: tuple[float, float] = (0.14, 0.22), colours: Sequence[str] = DEFAULT_COLOURS,
                 shapes: Sequence[str] = DEFAULT_SHAPES, supersample: int = 3):
        if not 1 <= min_objects <= max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
        if image_size < 32:
            raise ValueError(f"image_size must be >= 32, got {image_size}")
        unknown = [c for c in colours if c not in COLOURS] + [s for s in shapes if s not in SHAPES]
        if unknown:
            raise ValueError(f"unknown colour/shape words {unknown}; known: {list(COLOURS)}, {list(SHAPES)}")
        self.seed = int(seed)
        self.image_size = int(image_size)
        self.min_objects, self.max_objects = int(min_objects), int(max_objects)
        self.radius = (float(radius[0]), float(radius[1]))
        self.colours, self.shapes = tuple(colours), tuple(shapes)
        self.supersample = int(supersample)

    # ------------------------------------------------------------------ vocabulary
    @property
    def class_names(self) -> list[str]:
        """All ``"colour shape"`` classes, colour-major."""
        return [f"{c} {s}" for c in self.colours for s in self.shapes]

    def rng(self, index: int, split: str = "train", stream: int = 0) -> np.random.Generator:
        """Random stream ``stream`` of one scene: 0 classes, 1 background, 2 layout, 3-4 its shape twin, 5 its
        binding twin, 6+ free."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; known: {list(SPLITS)}")
        return np.random.default_rng([self.seed, SPLITS[split] + int(index), int(stream)])

    # ------------------------------------------------------------------ rendering
    def _background(self, rng: np.random.Generator) -> tuple[np.ndarray, str]:
        """Background ``[S, S, 3]`` float32 in [0, 1]: desaturated texture, and its kind."""
        s = self.image_size
        kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
        # two close, desaturated tones: the texture is visible but its edges are weaker than the objects'
        hue, val = rng.uniform(0, 360), rng.uniform(0.3, 0.75)
        base = _rgb(hue, rng.uniform(0.0, 0.25), val)
        other = _rgb(hue + rng.uniform(-60, 60), rng.uniform(0.0, 0.25), val + rng.choice([-1, 1]) *
                     rng.uniform(0.06, 0.16))
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
        if kind == "striped":
            theta = rng.uniform(0, np.pi)
            period = rng.uniform(0.05, 0.2)
            w = (np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period) > 0).astype(np.float32)
        elif kind == "checkered":
            cell = rng.uniform(0.06, 0.2)
            w = ((np.floor(xx / cell) + np.floor(yy / cell)) % 2).astype(np.float32)
        elif kind == "cloudy":
            low = rng.random((5, 5)).astype(np.float32)
            w = np.asarray(Image.fromarray((low * 255).astype(np.uint8)).resize((s, s), Image.BICUBIC),
                           dtype=np.float32) / 255.0
        else:  # noisy
            w = np.zeros((s, s), np.float32)
        img = base * (1 - w[..., None]) + other * w[..., None]
        img = img + np.float32(rng.uniform(0.02, 0.06)) * rng.standard_normal((s, s, 3), dtype=np.float32)
        return img, kind

    def _place(self, rng: np.random.Generator, shape: str,
               occupied: np.ndarray) -> tuple[np.ndarray, tuple, float] | None:
        """Soft coverage ``[S, S]`` of a shape placed away from ``occupied`` ``[S, S]`` (bool), or None."""
        s, k = self.image_size, self.supersample
        for _ in range(30):
            r = rng.uniform(*self.radius) * s
            outline = _shape_outline(shape, rng) * r
            lo, hi = outline.min(0), outline.max(0)
            cx = rng.uniform(-lo[0] + 1, s - hi[0] - 1)
            cy = rng.uniform(-lo[1] + 1, s - hi[1] - 1)
            x0, y0 = max(int(cx + lo[0]) - 1, 0), max(int(cy + lo[1]) - 1, 0)
            x1, y1 = min(int(cx + hi[0]) + 2, s), min(int(cy + hi[1]) + 2, s)
            canvas = Image.new("L", ((x1 - x0) * k, (y1 - y0) * k), 0)
            ImageDraw.Draw(canvas).polygon([((x + cx - x0) * k, (y + cy - y0) * k) for x, y in outline], fill=255)
            part = np.asarray(canvas.resize((x1 - x0, y1 - y0), Image.BOX), dtype=np.float32) / 255.0
            if (part >= 0.5).sum() < 16 or (part > 0)[occupied[y0:y1, x0:x1]].any():
                continue
            cover = np.zeros((s, s), np.float32)
            cover[y0:y1, x0:x1] = part
            return cover, (cx / s, cy / s), r / s
        return None

    def _classes(self, index: int, split: str) -> list[tuple[str, str]]:
        """The ``(colour, shape)`` of each object scene ``index`` asks for (stream 0)."""
        rng = self.rng(index, split, 0)
        n = int(rng.integers(self.min_objects, self.max_objects + 1))
        return [(self.colours[rng.integers(len(self.colours))], self.shapes[rng.integers(len(self.shapes))])
                for _ in range(n)]

    def scene(self, index: int, split: str = "train") -> Scene:
        """Scene ``index`` of ``split``: same arguments, same pixels and masks."""
        return self._render(index, split, self._classes(index, split), layout_stream=2)

    def _placed(self, index: int, split: str, base: Scene | None) -> list[tuple[str, str]]:
        """The ``(colour, shape)`` of the objects scene ``index`` holds (fewer than asked where room ran out)."""
        base = base if base is not None else self.scene(index, split)
        return [(o.colour, o.shape) for o in base.objects]

    def twin(self, index: int, split: str = "train", base: Scene | None = None) -> Scene:
        """The shape twin of scene ``index``: the same background and object colours, every object another
        shape, a new layout. A scene and its twin differ only in shapes, so training batches that hold both
        reward the model for seeing shapes, not just colours. ``base``: the scene, if already rendered."""
        rng = self.rng(index, split, 4)
        classes = []
        for colour, shape in self._placed(index, split, base):
            others = [x for x in self.shapes if x != shape]
            classes.append((colour, others[rng.integers(len(others))]))
        return self._render(index, split, classes, layout_stream=3)

    def binding_twin(self, index: int, split: str = "train", base: Scene | None = None) -> Scene:
        """The binding twin of scene ``index``: the same background, shapes and layout, the colours moved to
        other objects ("a red star and a blue circle" becomes "a blue star and a red circle"). The bags of
        colours and of shapes are unchanged, so only a model that binds each colour to its shape, where the
        object is, tells the pair apart. Where no permutation changes the classes (one object, or one colour),
        one object gets another colour. ``base``: the scene, if already rendered."""
        rng = self.rng(index, split, 5)
        classes = self._placed(index, split, base)
        before = sorted(classes)
        colours = [c for c, _ in classes]
        for _ in range(20):
            moved = [colours[j] for j in rng.permutation(len(colours))]
            swapped = [(c, s) for c, (_, s) in zip(moved, classes)]
            if sorted(swapped) != before:
                return self._render(index, split, swapped, layout_stream=2)
        k = int(rng.integers(len(classes)))
        others = [c for c in self.colours if c != classes[k][0]]
        classes[k] = (others[rng.integers(len(others))], classes[k][1])
        return self._render(index, split, classes, layout_stream=2)

    def _render(self, index: int, split: str, classes: Sequence[tuple[str, str]], layout_stream: int) -> Scene:
        """Paint ``classes`` on the scene's background (stream 1) at places from ``layout_stream``."""
        s = self.image_size
        img, bg = self._background(self.rng(index, split, 1))
        rng = self.rng(index, split, layout_stream)
        occupied = np.zeros((s, s), bool)
        objects: list[SceneObject] = []
        for colour, shape in classes:
            placed = self._place(rng, shape, occupied)
            if placed is None:  # no room left: fewer objects
                break
            cover, centre, radius = placed
            lo, hi = self.radius
            size = "small" if radius < lo + (hi - lo) / 3 else "large" if radius > hi - (hi - lo) / 3 else ""
            mask = cover >= 0.5
            # keep a gap of 2 px between objects so that instance masks never touch
            occupied |= _dilate(mask, 2)
            hue = COLOURS[colour] + rng.uniform(-7, 7)
            fill = _rgb(hue, rng.uniform(0.75, 1.0), rng.uniform(0.8, 1.0))
            ys, xs = np.nonzero(cover)
            box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
            c = cover[box][..., None]
            shade = 1.0 + rng.normal(0.0, 0.03, size=c.shape).astype(np.float32)
            img[box] = img[box] * (1 - c) + (fill * shade) * c
            objects.append(SceneObject(colour=colour, shape=shape, mask=mask, centre=centre, size=size))
        pixels = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
        return Scene(index=index, image=Image.fromarray(pixels, "RGB"), objects=tuple(objects), background=bg)

    # ------------------------------------------------------------------ captions
    @staticmethod
    def caption(scene: Scene, rng: np.random.Generator, mirrored: bool = False) -> str:
        """One whole-image caption of ``scene`` in random wording (of its left-right mirror if ``mirrored``)."""
        return make_caption([o.mention(mirrored) for o in scene.objects], scene.background, rng)


def _where(centre: tuple[float, float]) -> str:
    """Coarse position words for a centre ``(x, y)`` in [0, 1]."""
    x, y = centre
    h = "left" if x < 0.38 else "right" if x > 0.62 else ""
    v = "top" if y < 0.38 else "bottom" if y > 0.62 else ""
    if h and v:
        return f"in the {v} {h}"
    if h:
        return f"on the {h}"
    if v:
        return f"at the {v}"
    return "in the middle"


# Caption frames: web-caption-like openings, including the words of the label scorer's prompt templates
# ("a close-up photo of", "a cropped photo of", "a bright photo of", ...), so that no prompt word is unseen.
FRAMES: tuple[str, ...] = (
    "a photo of {}", "a photo of {}", "a photo of {}", "an image of {}", "a picture of {}", "{}", "{}",
    "there is {}", "a close-up photo of {}", "a cropped photo of {}", "a good photo of {}",
    "a bright photo of {}", "a dark photo of {}", "{n}: {}", "{} on a {bg} background",
)


def make_caption(objects: Sequence[Mention], background: str, rng: np.random.Generator,
                 shape_only: bool = True, list_share: float = 0.4, position_rate: float = 0.4) -> str:
    """A whole-image caption naming every object once, in random order and wording.

    Styles: a list of objects, sometimes with size words and positions ("a small red circle on the left and
    ..."), grouped with counts ("two red stars and a blue heart"), or by shape alone ("two stars and a heart":
    colours cannot match such a caption, only shapes can), inside a random frame ("a photo of ...",
    "three shapes: ...", "... on a striped background"). ``shape_only=False`` leaves out the shape-alone style, so
    that every shape is named with its colour. ``list_share``: share of the list style (at most 0.75, the rest
    grouped); ``position_rate``: share of list captions that say where each object is.
    """
    if not 0.0 <= list_share <= 0.75 or not 0.0 <= position_rate <= 1.0:
        raise ValueError(f"need 0 <= list_share <= 0.75 and 0 <= position_rate <= 1, got {list_share}, "
                         f"{position_rate}")
    if not objects:
        raise ValueError("a scene without objects has no caption")
    order = rng.permutation(len(objects))
    style = rng.random()
    if style < list_share:  # one phrase per object
        with_pos, with_size = rng.random() < position_rate, rng.random() < 0.4
        parts = []
        for i in order:
            o = objects[i]
            words = f"{o.size} {o.label}" if with_size and o.size else o.label
            phrase = f"{_article(words)} {words}"
            parts.append(f"{phrase} {_where(o.centre)}" if with_pos else phrase)
    else:  # grouped with counts: by class ("two red stars"), or by shape alone ("two stars and a heart")
        by_shape = style >= 0.75 and shape_only
        counts: dict[str, int] = {}
        for i in order:
            key = objects[i].label.split(" ", 1)[1] if by_shape else objects[i].label
            counts[key] = counts.get(key, 0) + 1
        parts = []
        for key, c in counts.items():
            if c == 1:
                parts.append((_article(key) if rng.random() < 0.8 else "one") + " " + key)
            else:
                *colour, shape = key.split(" ")
                parts.append(" ".join([NUMBERS[c], *colour, PLURALS.get(shape, shape + "s")]))
    if len(parts) == 1:
        body = parts[0]
    elif len(parts) == 2:
        body = str(rng.choice([" and ", " with ", ", "])).join(parts)
    else:
        body = ", ".join(parts[:-1]) + " and " + parts[-1]
    n = len(objects)
    frame = FRAMES[rng.integers(len(FRAMES))]
    text = frame.format(body, n=f"{NUMBERS[n]} shape{'s' if n != 1 else ''}", bg=background)
    return text + "."


# ---------------------------------------------------------------------- COCO export
def export_coco(world: SceneWorld, out_dir: str | Path, split: str = "test", count: int = 300,
                start: int = 0) -> Path:
    """Write scenes ``start .. start+count`` of ``split`` as a COCO instance dataset; returns the JSON path.

    Layout: ``out_dir/images/<split>_<index>.png`` and ``out_dir/instances.json`` (compressed RLE masks,
    one category per ``"colour shape"`` class, ``iscrowd`` 0).
    """
    from pycocotools import mask as mask_utils

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    cats = world.class_names
    cat_id = {name: i + 1 for i, name in enumerate(cats)}
    images, anns = [], []
    for index in range(start, start + count):
        sc = world.scene(index, split)
        name = f"{split}_{index:06d}.png"
        sc.image.save(out / "images" / name)
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": name, "width": sc.image.width, "height": sc.image.height})
        for obj in sc.objects:
            rle = mask_utils.encode(np.asfortranarray(obj.mask.astype(np.uint8)))
            box = mask_utils.toBbox(rle).tolist()
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat_id[obj.label],
                         "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                         "area": int(obj.mask.sum()), "bbox": box, "iscrowd": 0})
    doc = {
        "info": {"description": f"maskinversion scene world, seed {world.seed}, split {split}, "
                                f"scenes {start}..{start + count - 1}", "image_size": world.image_size},
        "images": images,
        "annotations": anns,
        "categories": [{"id": cat_id[c], "name": c, "supercategory": c.split(" ")[1]} for c in cats],
    }
    path = out / "instances.json"
    path.write_text(json.dumps(doc))
    return path


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder (images/ + instances.json)")
    ap.add_argument("--split", default="test", choices=list(SPLITS))
    ap.add_argument("--count", type=int, default=300)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--min-objects", type=int, default=1)
    ap.add_argument("--max-objects", type=int, default=4)
    a = ap.parse_args(argv)
    world = SceneWorld(seed=a.seed, image_size=a.image_size, min_objects=a.min_objects, max_objects=a.max_objects)
    print(export_coco(world, a.out, a.split, a.count, a.start))


if __name__ == "__main__":
    main()
