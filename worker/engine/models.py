"""Loading open_clip CLIP models: names with pretrained tags, local checkpoints, or random init.

The worker's MASKINV_MODEL / MASKINV_PRETRAINED / MASKINV_DEVICE / MASKINV_SEED (``worker.settings``) arrive
here as explicit arguments; this module reads no environment. ``pretrained`` is a tag ("openai",
"laion2b_s34b_b88k", ...), a local checkpoint path, or "none"/"" for random init (tests, benchmarks).

Project model configs (tiny test models, the scene model) live in ``worker/engine/model_configs/*.json``
and are registered with open_clip's config registry on import, so they load like built-in names.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch

log = logging.getLogger(__name__)

PROJECT_CONFIG_DIR = Path(__file__).with_name("model_configs")
DEFAULT_MODEL = "ViT-B-16"
DEFAULT_PRETRAINED = "openai"
RANDOM_INIT = ("", "none", "random")

_registered = False


def register_project_configs() -> None:
    """Register ``worker/engine/model_configs/*.json`` with open_clip (idempotent)."""
    global _registered
    if not _registered:
        open_clip.add_model_config(PROJECT_CONFIG_DIR)
        _registered = True


register_project_configs()


@dataclass
class ClipModel:
    """A frozen open_clip CLIP model and what the engine needs to know about it."""

    model: Any  # open_clip.CLIP (eval, requires_grad False)
    tokenizer: Any
    name: str
    pretrained: str
    id: str  # stable identity used in cache keys
    device: torch.device
    patch_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights: str = ""  # path-free description of the weights (tag, "none", "checkpoint sha256-..."), for reports

    @property
    def visual(self) -> Any:
        return self.model.visual

    @property
    def embed_dim(self) -> int:
        """D: the vision tower's output dim (a timm tower: its last Linear after the pool, e.g. PE-Core's
        projection, else the trunk's width)."""
        visual = self.model.visual
        dim = getattr(visual, "output_dim", None)
        if dim is not None:
            return int(dim)
        for module in (visual.head, visual.trunk.head):
            linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
            if linears:
                return int(linears[-1].out_features)
        return int(visual.trunk.num_features)


def tower_patch_size(visual: Any) -> int:
    """The patch side of an open_clip ViT (``patch_size``) or a timm trunk (``trunk.patch_embed.patch_size``)."""
    p = getattr(visual, "patch_size", None)
    if p is None:
        p = visual.trunk.patch_embed.patch_size
    return int(p[0] if isinstance(p, (tuple, list)) else p)


def default_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as a torch device; None or "": cuda when available, else cpu."""
    if device is not None and str(device).strip():
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _checkpoint_identity(path: Path) -> str:
    """Identity of a local checkpoint: ``sha256-<16 hex>`` of its whole content — not its path, so the identity
    (and ``model_version``, and result-cache keys) stays the same when the file moves and changes when its
    weights change; the same in every process."""
    with path.open("rb") as fh:
        return "sha256-" + hashlib.file_digest(fh, "sha256").hexdigest()[:16]


def load_clip(name: str = DEFAULT_MODEL, pretrained: str = DEFAULT_PRETRAINED,
              device: str | torch.device | None = None, seed: int = 0,
              config_overrides: dict[str, Any] | None = None) -> ClipModel:
    """Create a frozen CLIP model from an open_clip name and a pretrained tag, local path or random init.

    ``device`` None: cuda when available, else cpu; ``seed`` seeds random init (ignored for pretrained weights).
    ``config_overrides``: top-level keys of the model's config replaced (``vision_cfg``, ``text_cfg`` ...), for
    tests and benchmarks of large towers with fewer layers; the identity then says so (``.../random-seed0+cfg``).
    """
    name = name or DEFAULT_MODEL
    pretrained = (DEFAULT_PRETRAINED if pretrained is None else pretrained).strip()
    seed = 0 if seed is None else int(seed)
    dev = default_device(device)

    if name not in open_clip.list_models() and not name.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(f"unknown open_clip model {name!r}; known: {', '.join(open_clip.list_models()[:8])}, ... "
                         f"or add a config JSON to {PROJECT_CONFIG_DIR}")
    random_init = pretrained.lower() in RANDOM_INIT
    if random_init:
        identity = f"{name}/random-seed{seed}" + ("+cfg" if config_overrides else "")
    elif Path(pretrained).expanduser().is_file():
        pretrained = str(Path(pretrained).expanduser())
        identity = f"{name}/{_checkpoint_identity(Path(pretrained))}"
    elif Path(pretrained).expanduser().exists():
        raise ValueError(f"MASKINV_PRETRAINED={pretrained!r} is a directory, expected a checkpoint file")
    else:
        tags = open_clip.list_pretrained_tags_by_model(name)
        if tags and pretrained not in tags:
            raise ValueError(f"unknown pretrained tag {pretrained!r} for {name}; known tags: {tags} "
                             f"(or give a local checkpoint path)")
        identity = f"{name}/{pretrained}"

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, _, _ = open_clip.create_model_and_transforms(
            name, pretrained=None if random_init else pretrained, device=dev, **(config_overrides or {}))
    tokenizer = open_clip.get_tokenizer(name)
    log.info("model loaded: %s (%s) on %s", name, pretrained or "random init", dev)
    return clip_from_model(model, name, tokenizer, identity, pretrained or "none", dev)


def clip_from_model(model: Any, name: str, tokenizer: Any, identity: str, pretrained: str = "none",
                    device: str | torch.device = "cpu") -> ClipModel:
    """Freeze an open_clip ``model`` (eval, no gradients) and describe it as a :class:`ClipModel`. ``identity``:
    ``"<name>/<weights>"``, the cache identity; ``tokenizer`` may be None where no text is encoded."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    visual = model.visual
    mean = tuple(getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN)
    std = tuple(getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD)
    weights = identity.split("/", 1)[1] if "/" in identity else identity
    weights = f"checkpoint {weights}" if weights.startswith("sha256-") else weights
    return ClipModel(model=model, tokenizer=tokenizer, name=name, pretrained=pretrained, id=identity,
                     device=torch.device(device), patch_size=tower_patch_size(visual), mean=mean,
                     std=std, weights=weights)
