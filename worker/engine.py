"""MaskInversionEngine: localized embedding tokens (LETs) for region masks over a frozen open_clip ViT.

Environment (defaults in brackets):
    MASKINV_CACHE_MB         bound of the image-state cache in MiB [2048]
    MASKINV_CHUNK_MEMORY_MB  working-memory budget for one chunk of masks in MiB [2048]
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch

from . import legrad, vit
from .env import env_int
from .image_cache import ByteLRUCache
from .inversion import optimise_lets
from .models import ClipModel
from .preprocess import (ImageLike, RegionError, image_to_tensor, mask_box, mask_to_target, masked_crop,
                         open_image)

log = logging.getLogger(__name__)

METHODS = ("decomposed", "autograd")
BASELINES = ("global", "crop", "masked_crop")


@dataclass
class InversionResult:
    """LETs for N masks of one image."""

    lets: torch.Tensor  # [N, D] unnormalised; the global embedding where errors[i] is set
    global_embedding: torch.Tensor  # [D]
    errors: list[str | None]  # per mask
    losses: torch.Tensor  # [steps + 1, N] (NaN-free; 0 rows for failed masks)
    image_hit: bool = False
    image_sha256: str = ""
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class EngineStats:
    vit_forwards: int = 0  # images pushed through the whole ViT


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA out-of-memory, or a CPU allocation failure (a plain RuntimeError from the CPU allocator)."""
    return isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in str(exc) \
        or "out of memory" in str(exc).lower()


def _env_mb(name: str, default: int) -> int:
    """A size in MiB from the environment, in bytes."""
    return env_int(name, default, minimum=0) * 2**20


class MaskInversionEngine:
    """Batched MaskInversion with one cached forward pass per (image, model, size)."""

    def __init__(self, clip: ClipModel, cache_bytes: int | None = None, chunk_memory_bytes: int | None = None):
        vit.check_supported(clip.visual)
        self.clip = clip
        self.visual = clip.visual
        self.patch = clip.patch_size
        self.pos = vit.PosEmbedCache(self.visual)
        self.cache: ByteLRUCache[legrad.ImageState] = ByteLRUCache(
            _env_mb("MASKINV_CACHE_MB", 2048) if cache_bytes is None else cache_bytes, lambda s: s.nbytes)
        self.chunk_memory_bytes = (_env_mb("MASKINV_CHUNK_MEMORY_MB", 2048) if chunk_memory_bytes is None
                                   else chunk_memory_bytes)
        self.stats = EngineStats()
        view = vit.last_block(self.visual)
        self._heads, self._width, self._mlp = view.heads, view.width, view.mlp_width

    # ------------------------------------------------------------------ image state
    def _check_size(self, size: int) -> None:
        if not isinstance(size, int) or size <= 0 or size % self.patch:
            raise ValueError(f"input size must be a positive multiple of the patch size {self.patch}, got {size!r}")

    def _pixels(self, img, size: int) -> torch.Tensor:
        return image_to_tensor(img, size, self.clip.mean, self.clip.std, self.clip.device)

    def image_state(self, image: ImageLike, size: int = 448) -> tuple[legrad.ImageState, bool, str, object]:
        """The cached forward-pass state of an image: ``(state, cache_hit, sha256, pil_image)``."""
        self._check_size(size)
        img, digest = open_image(image)
        key = (digest, self.clip.id, size)
        state = self.cache.get(key)
        if state is not None:
            log.debug("image cache hit %s@%d", digest[:12], size)
            return state, True, digest, img
        state = legrad.build_image_state(self.visual, self._pixels(img, size), self.pos.get(size))
        self.stats.vit_forwards += 1
        self.cache.put(key, state)
        return state, False, digest, img

    # ------------------------------------------------------------------ chunking
    def masks_per_chunk(self, size: int) -> int:
        """How many masks fit the working-memory budget at once (largest term: ∂s/∂A, [H, n, n-1] per mask)."""
        n = (size // self.patch) ** 2 + 1
        per_mask = 4 * (3 * self._heads * n * (n - 1) + 2 * n * self._mlp + 6 * n * self._width + 8 * size * size)
        return max(1, self.chunk_memory_bytes // per_mask)

    @staticmethod
    def _chunks(idx: Sequence[int], k: int) -> Iterator[list[int]]:
        for i in range(0, len(idx), k):
            yield list(idx[i:i + k])

    # ------------------------------------------------------------------ inversion
    def invert(self, image: ImageLike, masks: np.ndarray | Sequence[np.ndarray], size: int = 448, steps: int = 10,
               lr: float = 0.1, alpha: float = 0.0, method: str = "decomposed") -> InversionResult:
        """LETs for ``masks`` ``[N, H, W]`` (bool or float thresholded at 0.5, any size) on ``image``."""
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        t0 = time.perf_counter()
        state, hit, digest, img = self.image_state(image, size)
        t_fwd = time.perf_counter() - t0
        n_masks = len(masks)
        g = state.global_embedding
        lets = g[None].repeat(n_masks, 1)
        losses = torch.zeros(steps + 1, n_masks, device=g.device)
        errors: list[str | None] = [None] * n_masks
        targets: dict[int, np.ndarray] = {}
        for i, m in enumerate(masks):
            try:
                targets[i] = mask_to_target(m, size)
            except RegionError as exc:
                errors[i] = str(exc)
        ok = list(targets)
        pixels = self._pixels(img, size) if method == "autograd" and ok else None
        chunk = self.masks_per_chunk(size) if method == "decomposed" else max(1, len(ok))
        pending = list(self._chunks(ok, chunk))
        while pending:
            idx = pending.pop(0)
            tgt = torch.from_numpy(np.stack([targets[i] for i in idx])).to(g.device)
            try:
                if method == "decomposed":
                    def map_fn(e: torch.Tensor) -> torch.Tensor:
                        return legrad.relevance_to_map(legrad.decomposed_relevance(self.visual, state, e),
                                                       state.grid, self.patch)
                else:
                    def map_fn(e: torch.Tensor) -> torch.Tensor:
                        return legrad.relevance_to_map(legrad.autograd_relevance(self.visual, pixels,
                                                                                 self.pos.get(size), e),
                                                       state.grid, self.patch)
                out, hist = optimise_lets(map_fn, g, tgt, steps=steps, lr=lr, alpha=alpha)
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                if not is_out_of_memory(exc) or len(idx) == 1:
                    raise
                half = len(idx) // 2
                log.warning("out of memory with %d masks per chunk; retrying with %d", len(idx), half)
                if g.is_cuda:
                    torch.cuda.empty_cache()
                pending[:0] = [idx[:half], idx[half:]]
                continue
            finite = torch.isfinite(out).all(dim=1) & torch.isfinite(hist).all(dim=0)
            for j, i in enumerate(idx):
                if bool(finite[j]):
                    lets[i] = out[j]
                    losses[:, i] = hist[:, j]
                else:
                    errors[i] = "inversion diverged (non-finite values); try a smaller learning rate"
        t_total = time.perf_counter() - t0
        return InversionResult(lets=lets, global_embedding=g, errors=errors, losses=losses, image_hit=hit,
                               image_sha256=digest,
                               timings={"forward_s": t_fwd, "inversion_s": t_total - t_fwd, "total_s": t_total})

    # ------------------------------------------------------------------ explainability
    @torch.no_grad()
    def explain(self, image: ImageLike, embeddings: torch.Tensor, size: int = 448) -> torch.Tensor:
        """LeGrad maps ``[N, S, S]`` of ``embeddings`` ``[N, D]`` on ``image`` (decomposed path)."""
        state, *_ = self.image_state(image, size)
        emb = embeddings.to(state.global_embedding)
        maps = [legrad.relevance_to_map(legrad.decomposed_relevance(self.visual, state, emb[idx]), state.grid,
                                        self.patch)
                for idx in self._chunks(range(emb.shape[0]), self.masks_per_chunk(size))]
        return torch.cat(maps) if maps else torch.zeros(0, size, size)

    # ------------------------------------------------------------------ baselines
    @torch.no_grad()
    def embed_images(self, images: Sequence, size: int = 448, batch: int = 16) -> torch.Tensor:
        """Global embeddings ``[B, D]`` of whole images (PIL or bytes), each resized to S×S."""
        self._check_size(size)
        out = []
        for i in range(0, len(images), batch):
            pix = torch.cat([self._pixels(open_image(im)[0], size) for im in images[i:i + batch]])
            tokens = vit.tokens_forward(self.visual, pix, self.pos.get(size))
            out.append(vit.global_embedding(self.visual, tokens))
            self.stats.vit_forwards += pix.shape[0]
        return torch.cat(out) if out else torch.zeros(0, self.clip.embed_dim, device=self.clip.device)

    @torch.no_grad()
    def baseline_embeddings(self, image: ImageLike, masks: np.ndarray | Sequence[np.ndarray], kind: str = "global",
                            size: int = 448) -> torch.Tensor:
        """Region embeddings ``[N, D]`` without inversion.

        ``global``: the whole image's embedding for every mask; ``crop``: the embedding of the crop of the
        mask's box; ``masked_crop``: the same crop with pixels outside the mask set to the dataset mean.
        Empty masks fall back to the global embedding.
        """
        if kind not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES}, got {kind!r}")
        state, _, _, img = self.image_state(image, size)
        g = state.global_embedding
        if kind == "global":
            return g[None].repeat(len(masks), 1)
        fill = tuple(int(round(c * 255)) for c in self.clip.mean)
        crops, where = [], []
        for i, m in enumerate(masks):
            try:
                crops.append(img.crop(mask_box(m, img.size)) if kind == "crop" else masked_crop(img, m, fill))
                where.append(i)
            except RegionError:
                continue
        out = g[None].repeat(len(masks), 1)
        if crops:
            out[where] = self.embed_images(crops, size)
        return out
