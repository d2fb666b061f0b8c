"""MaskInversionEngine: localized embedding tokens (LETs) for region masks over a frozen open_clip ViT.

Two kinds of vision tower: open_clip ViTs (the class-token / mean-token map of :mod:`worker.engine.legrad`) and
attention-pooled timm towers such as SigLIP (the pool's map of :mod:`worker.engine.attn_pool`); the engine picks
the decomposition by the tower.

Settings are explicit constructor arguments (the worker's runtime reads them from the environment once):
the image-state cache bound, the working-memory budget of one chunk of masks, and the GPU step's precision.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image
import torch
import torch.nn.functional as F

from worker.engine import cpu_gemm as cpu_gemm_backends

from worker.engine import attn_pool, legrad

from worker.engine import vit
from worker.engine.bounded_cache import BoundedCache
from worker.engine.grid_dice import GridDice
from worker.engine.inversion import optimise_lets
from worker.engine.models import ClipModel
from worker.engine.preprocess import (ImageLike, RegionError, image_to_tensor, mask_box, mask_to_target, masked_crop,
                         open_image)

log = logging.getLogger(__name__)

METHODS = ("decomposed", "autograd")
BASELINES = ("global", "crop", "masked_crop")
GPU_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_CACHE_BYTES = 2048 * 2**20
DEFAULT_CHUNK_MEMORY_BYTES = 4096 * 2**20


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


ImageState = legrad.ImageState | attn_pool.PooledImageState  # per tower kind


@dataclass
class _InversionPlan:
    """What every chunk of one :meth:`MaskInversionEngine.invert` call shares."""

    state: ImageState
    size: int
    steps: int
    lr: float
    alpha: float
    final_loss: bool
    method: str
    pixels: torch.Tensor | None = None  # [1, 3, S, S], the autograd method only
    basis: torch.Tensor | None = None  # the map's linear basis (legrad.relevance_basis), when it pays


@dataclass
class EngineStats:
    vit_forwards: int = 0  # images pushed through the whole ViT


def _state_bytes(_key: object, state: ImageState) -> int:
    return state.nbytes


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA out-of-memory, or a CPU allocation failure (a plain RuntimeError from the CPU allocator)."""
    return isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in str(exc) \
        or "out of memory" in str(exc).lower()


class MaskInversionEngine:
    """Batched MaskInversion with one cached forward pass per (image, model, size)."""

    def __init__(self, clip: ClipModel, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 chunk_memory_bytes: int = DEFAULT_CHUNK_MEMORY_BYTES, gpu_dtype: str = "fp32",
                 use_basis: bool = True, cpu_gemm: str = "auto", empty_prompt_embedding: torch.Tensor | None = None):
        """``cache_bytes``: bound of the image-state cache; ``chunk_memory_bytes``: working-memory budget of one
        chunk of masks (on CUDA also capped by free GPU memory); ``gpu_dtype``: precision of the decomposed step
        on CUDA — "fp32" (TF32 matmuls), "bf16" or "fp16" (autocast); the CPU always runs fp32. ``use_basis``:
        for requests with many mask-steps, build the map's linear basis once (:func:`legrad.relevance_basis`;
        6× fewer MACs per mask-step on ViT-B/16) when it pays and fits 2/3 of the chunk budget. ``cpu_gemm``:
        the large CPU GEMMs through oneDNN with packed weights ("onednn"), torch's BLAS ("blas"), or whichever
        is faster on this CPU ("auto", :func:`worker.engine.cpu_gemm.resolve`); :attr:`cpu_gemm` holds the backend
        chosen. See :mod:`worker.engine.cpu_gemm`. ``empty_prompt_embedding`` ``[D]``: for attention-pooled towers,
        the text embedding of :data:`worker.engine.attn_pool.EMPTY_PROMPT` the map's correction uses (None: taken
        through the model's own tokenizer on first use)."""
        if gpu_dtype not in GPU_DTYPES:
            raise ValueError(f"gpu_dtype must be one of {sorted(GPU_DTYPES)}, got {gpu_dtype!r}")
        cpu_gemm = cpu_gemm_backends.resolve(cpu_gemm)
        for name, value in (("cache_bytes", cache_bytes), ("chunk_memory_bytes", chunk_memory_bytes)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        vit.check_supported(clip.visual)
        self.clip = clip
        self.visual = clip.visual
        self.patch = clip.patch_size
        self.pooled = attn_pool.is_attention_pooled(self.visual)
        self.pos: vit.PosEmbedCache | attn_pool.PosEmbedCache = (
            attn_pool.PosEmbedCache(self.visual) if self.pooled else vit.PosEmbedCache(self.visual))
        self._empty_unit = None if empty_prompt_embedding is None else F.normalize(
            empty_prompt_embedding.detach().reshape(-1).float(), dim=0).to(clip.device)
        self.cache: BoundedCache[ImageState] = BoundedCache(None, cache_bytes, _state_bytes)
        self.chunk_memory_bytes = chunk_memory_bytes
        self.gpu_dtype = gpu_dtype
        self.use_basis = use_basis
        self.cpu_gemm = cpu_gemm
        self.stats = EngineStats()
        if self.pooled:
            pool = self.visual.trunk.attn_pool
            self._heads, self._width, self._mlp = int(pool.num_heads), pool.proj.in_features, pool.mlp.fc1.out_features
        else:
            view = vit.last_block(self.visual)
            self._heads, self._width, self._mlp = view.heads, view.width, view.mlp_width
        if self._is_cuda:
            torch.set_float32_matmul_precision("high")  # TF32 matmuls on CUDA (process-wide)

    @property
    def _is_cuda(self) -> bool:
        return torch.device(self.clip.device).type == "cuda"

    def step_dtype(self) -> torch.dtype:
        """The dtype of the decomposed step's large products: ``gpu_dtype`` on CUDA, float32 elsewhere."""
        return GPU_DTYPES[self.gpu_dtype] if self._is_cuda else torch.float32

    def _step_precision(self) -> contextlib.AbstractContextManager:
        """Autocast for a reduced-precision CUDA step; a no-op for fp32 and on the CPU."""
        dtype = self.step_dtype()
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=dtype)

    def _sync(self) -> None:
        if self._is_cuda:
            torch.cuda.synchronize(self.clip.device)

    # ------------------------------------------------------------------ image state
    def _check_size(self, size: int) -> None:
        if not isinstance(size, int) or size <= 0 or size % self.patch:
            raise ValueError(f"input size must be a positive multiple of the patch size {self.patch}, got {size!r}")

    def _pixels(self, img, size: int) -> torch.Tensor:
        return image_to_tensor(img, size, self.clip.mean, self.clip.std, self.clip.device)

    def empty_unit(self) -> torch.Tensor:
        """The normalised embedding ``[D]`` of the empty prompt (attention-pooled towers), computed once."""
        if self._empty_unit is None:
            self._empty_unit = attn_pool.empty_prompt_embedding(self.clip.model, self.clip.tokenizer, self.clip.device)
        return self._empty_unit

    def _build_state(self, img, size: int) -> ImageState:
        if self.pooled:
            return attn_pool.build_image_state(self.visual, self._pixels(img, size), self.pos.get(size),
                                               self.empty_unit(), self.cpu_gemm)
        return legrad.build_image_state(self.visual, self._pixels(img, size), self._vit_pos(size), self.cpu_gemm)

    def _vit_pos(self, size: int) -> torch.Tensor:
        """The class-token tower's position embedding at ``size`` (it always has one)."""
        pos = self.pos.get(size)
        assert pos is not None  # vit.PosEmbedCache never answers None
        return pos

    @torch.no_grad()
    def patch_keys(self, image: ImageLike, size: int = 448) -> tuple[torch.Tensor, int]:
        """The last block's patch keys ``[g², d]`` of ``image`` at ``size`` (heads concatenated, class and other
        prefix tokens dropped) and the grid side g, for either tower kind (one trunk forward, not cached): the
        affinities MaskCut and the key-seed proposals cut."""
        self._check_size(size)
        keys = vit.patch_keys(self.visual, self._pixels(open_image(image)[0], size), self.pos.get(size),
                              self.cpu_gemm)[0]
        return keys, size // self.patch

    def image_state(self, image: ImageLike, size: int = 448) -> tuple[ImageState, bool, str, Image.Image]:
        """The cached forward-pass state of an image: ``(state, cache_hit, sha256, pil_image)``."""
        self._check_size(size)
        img, digest = open_image(image)
        key = (digest, self.clip.id, size)
        state = self.cache.get(key)
        if state is not None:
            log.debug("image cache hit %s@%d", digest[:12], size)
            return state, True, digest, img
        state = self._build_state(img, size)
        self.stats.vit_forwards += 1
        if not self.cache.put(key, state):
            log.warning("image state of %.1f MiB exceeds the cache bound (%.1f MiB): not cached",
                        state.nbytes / 2**20, self.cache.max_bytes / 2**20)
        return state, False, digest, img

    # ------------------------------------------------------------------ chunking
    def mask_bytes(self, size: int) -> int:
        """Working memory of one mask in a chunk: the kept sign pattern of ∂s/∂A ``[H, n, n-1]``, the map and
        its gradients ``[S, S]`` several times over, and per-token cotangents."""
        n = (size // self.patch) ** 2 + 1
        if self.pooled:  # per-head products [H, n], the map and its gradients [S, S], the MLP cotangents
            return 4 * (2 * self._heads * n + 8 * size * size + 4 * (self._width + self._mlp))
        elt = torch.finfo(self.step_dtype()).bits // 8
        return elt * self._heads * n * (n - 1) + 4 * (8 * size * size + 4 * n * self._width + 4 * self._mlp)

    def _chunk_budget(self) -> int:
        """The working-memory budget of one chunk (on CUDA also ~80 % of the free GPU memory)."""
        budget = self.chunk_memory_bytes
        if self._is_cuda:
            free, _ = torch.cuda.mem_get_info(self.clip.device)
            budget = min(budget, int(0.8 * free))
        return budget

    def masks_per_chunk(self, size: int) -> int:
        """How many masks fit the working-memory budget at once."""
        return max(1, self._chunk_budget() // self.mask_bytes(size))

    def _basis_fits(self, state: legrad.ImageState) -> bool:
        """The map's linear basis (:func:`legrad.relevance_basis`) is used only when it takes at most 2/3 of the
        chunk budget, so the masks keep the rest (1.2 GB of the default 4 GiB at 448 px on ViT-B/16)."""
        return self.use_basis and legrad.basis_bytes(state) <= 2 * self._chunk_budget() // 3

    @staticmethod
    def _chunks(idx: Sequence[int], k: int) -> Iterator[list[int]]:
        for i in range(0, len(idx), k):
            yield list(idx[i:i + k])

    # ------------------------------------------------------------------ inversion
    def invert(self, image: ImageLike, masks: np.ndarray | Sequence[np.ndarray], size: int = 448, steps: int = 10,
               lr: float = 0.1, alpha: float = 0.0, method: str = "decomposed", final_loss: bool = True
               ) -> InversionResult:
        """LETs for ``masks`` ``[N, H, W]`` (bool or float thresholded at 0.5, any size) on ``image``.

        ``final_loss=False`` skips the map evaluation of the final LETs (``losses`` is then ``[steps, N]``).
        Timings: seconds (CUDA synchronised), the chunk size, and on CUDA the peak GPU memory of each chunk."""
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        self._sync()
        t0 = time.perf_counter()
        state, hit, digest, img = self.image_state(image, size)
        self._sync()
        t_fwd = time.perf_counter() - t0
        g = state.global_embedding
        lets = g[None].repeat(len(masks), 1)
        losses = torch.zeros(steps + int(final_loss), len(masks), device=g.device)
        targets, errors = self._targets(masks, size)
        plan = _InversionPlan(state, size, steps, lr, alpha, final_loss, method,
                              pixels=self._pixels(img, size) if method == "autograd" and targets else None)
        chunk, t_basis = self._plan_chunks(plan, len(targets))
        chunk_peaks = self._invert_chunks(plan, targets, chunk, lets, losses, errors)
        self._sync()
        t_total = time.perf_counter() - t0
        timings = {"forward_s": t_fwd, "inversion_s": t_total - t_fwd, "total_s": t_total, "chunk_masks": float(chunk),
                   "basis_s": t_basis}
        if chunk_peaks:
            timings["peak_gpu_mib"] = max(chunk_peaks)
            timings.update({f"chunk{k}_peak_gpu_mib": p for k, p in enumerate(chunk_peaks)})
        return InversionResult(lets=lets, global_embedding=g, errors=errors, losses=losses, image_hit=hit,
                               image_sha256=digest, timings=timings)

    @staticmethod
    def _targets(masks: np.ndarray | Sequence[np.ndarray], size: int
                 ) -> tuple[dict[int, np.ndarray], list[str | None]]:
        """The ``[S, S]`` targets of the usable masks, by position, and every mask's error (None: usable)."""
        targets: dict[int, np.ndarray] = {}
        errors: list[str | None] = [None] * len(masks)
        for i, m in enumerate(masks):
            try:
                targets[i] = mask_to_target(m, size)
            except RegionError as exc:
                errors[i] = str(exc)
        return targets, errors

    def _plan_chunks(self, plan: _InversionPlan, n_masks: int) -> tuple[int, float]:
        """Masks per chunk for ``n_masks`` masks, and the seconds spent building the map's linear basis (kept in
        ``plan.basis``) when the decomposed method has enough mask-steps to pay for it and it fits the budget."""
        if plan.method != "decomposed":
            return max(1, n_masks), 0.0
        chunk = self.masks_per_chunk(plan.size)
        if not isinstance(plan.state, legrad.ImageState):  # the pooled map has no basis: it is cheap per mask
            return chunk, 0.0
        if not (self._basis_fits(plan.state)
                and legrad.basis_pays(plan.state, n_masks * (plan.steps + int(plan.final_loss)))):
            return chunk, 0.0
        t0 = time.perf_counter()
        plan.basis = legrad.relevance_basis(self.visual, plan.state, self.cpu_gemm)
        self._sync()
        t_basis = time.perf_counter() - t0
        chunk = max(1, (self._chunk_budget() - legrad.basis_bytes(plan.state)) // self.mask_bytes(plan.size))
        log.debug("linear basis of the map built in %.2fs (%d masks, %d per chunk)", t_basis, n_masks, chunk)
        return chunk, t_basis

    def _invert_chunks(self, plan: _InversionPlan, targets: dict[int, np.ndarray], chunk: int, lets: torch.Tensor,
                       losses: torch.Tensor, errors: list[str | None]) -> list[float]:
        """Invert the masks of ``targets`` ``chunk`` at a time into ``lets`` ``[N, D]`` and ``losses``
        ``[steps (+1), N]`` (a diverged mask gets an error instead); a chunk out of memory is retried in halves.
        Returns the peak GPU memory (MiB) of each chunk on CUDA."""
        device = plan.state.global_embedding.device
        pending = list(self._chunks(list(targets), chunk))
        chunk_peaks: list[float] = []
        while pending:
            idx = pending.pop(0)
            tgt = torch.from_numpy(np.stack([targets[i] for i in idx])).to(device)
            if self._is_cuda:
                torch.cuda.reset_peak_memory_stats(self.clip.device)
            try:
                out, hist = self._invert_chunk(plan, tgt)
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                if not is_out_of_memory(exc) or len(idx) == 1:
                    raise
                half = len(idx) // 2
                log.warning("out of memory with %d masks per chunk; retrying with %d", len(idx), half)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                pending[:0] = [idx[:half], idx[half:]]
                continue
            if self._is_cuda:
                chunk_peaks.append(torch.cuda.max_memory_allocated(self.clip.device) / 2**20)
            finite = torch.isfinite(out).all(dim=1) & torch.isfinite(hist).all(dim=0)
            for j, i in enumerate(idx):
                if bool(finite[j]):
                    lets[i] = out[j]
                    losses[:, i] = hist[:, j]
                else:
                    errors[i] = "inversion diverged (non-finite values); try a smaller learning rate"
        return chunk_peaks

    def _invert_chunk(self, plan: _InversionPlan, tgt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """LETs ``[n, D]`` and losses ``[steps (+1), n]`` of one chunk of targets ``[n, S, S]``."""
        state = plan.state
        map_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
        dice_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
        if isinstance(state, attn_pool.PooledImageState):
            map_fn, dice_fn = self._pooled_loss(plan, state, tgt)
        elif plan.method == "decomposed":
            workspace = legrad.Workspace()  # one sign-pattern buffer for all steps of this chunk
            dice = GridDice(tgt, state.grid, self.patch)  # the loss on the patch grid, no [N, S, S] map

            def dice_fn(e: torch.Tensor) -> torch.Tensor:
                return dice(legrad.decomposed_relevance(self.visual, state, e, workspace, plan.basis, self.cpu_gemm))
        else:
            pixels = plan.pixels
            assert pixels is not None  # the autograd method's plan carries the image's pixels

            def map_fn(e: torch.Tensor) -> torch.Tensor:
                return legrad.relevance_to_map(legrad.autograd_relevance(self.visual, pixels, self._vit_pos(plan.size),
                                                                         e), state.grid, self.patch)
        with self._step_precision() if plan.method == "decomposed" else contextlib.nullcontext():
            return optimise_lets(map_fn, state.global_embedding, tgt, steps=plan.steps, lr=plan.lr, alpha=plan.alpha,
                                 final_loss=plan.final_loss, dice_fn=dice_fn)

    def _pooled_loss(self, plan: _InversionPlan, state: attn_pool.PooledImageState, tgt: torch.Tensor
                     ) -> tuple[Callable[[torch.Tensor], torch.Tensor] | None,
                                Callable[[torch.Tensor], torch.Tensor] | None]:
        """``(map_fn, dice_fn)`` of an attention-pooled tower: the decomposed map's Dice on the patch grid (min-max
        on the grid, as :func:`attn_pool.relevance_to_map`), or the autograd reference's maps."""
        if plan.method == "decomposed":
            dice = GridDice(tgt, state.grid, self.patch, extremes="grid")
            return None, lambda e: dice(attn_pool.decomposed_relevance(self.visual, state, e))
        pixels, pos = plan.pixels, self.pos.get(plan.size)
        assert pixels is not None  # the autograd method's plan carries the image's pixels
        return (lambda e: attn_pool.relevance_to_map(attn_pool.autograd_relevance(self.visual, pixels, pos, e,
                                                                                  state.keep),
                                                     state.grid, self.patch)), None

    # ------------------------------------------------------------------ explainability
    @torch.no_grad()
    def explain(self, image: ImageLike, embeddings: torch.Tensor, size: int = 448) -> torch.Tensor:
        """LeGrad maps ``[N, S, S]`` of ``embeddings`` ``[N, D]`` on ``image`` (decomposed path)."""
        state, *_ = self.image_state(image, size)
        emb = embeddings.to(state.global_embedding)
        if isinstance(state, attn_pool.PooledImageState):
            return attn_pool.relevance_to_map(attn_pool.decomposed_relevance(self.visual, state, emb), state.grid,
                                              self.patch)
        maps = [legrad.relevance_to_map(legrad.decomposed_relevance(self.visual, state, emb[idx],
                                                                     gemm=self.cpu_gemm), state.grid,
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
            if self.pooled:
                out.append(attn_pool.embed(self.visual, pix, self.pos.get(size), self.cpu_gemm))
            else:
                tokens = vit.tokens_forward(self.visual, pix, self._vit_pos(size), self.cpu_gemm)
                out.append(vit.global_embedding(self.visual, tokens))
            self.stats.vit_forwards += pix.shape[0]
        return torch.cat(out) if out else torch.zeros(0, self.clip.embed_dim, device=self.clip.device)

    @property
    def native_size(self) -> int:
        """The model's own input side (224 for ViT-B/16; the size its position embedding was trained at)."""
        side = getattr(self.visual, "image_size", None)
        side = side[0] if isinstance(side, (tuple, list)) else side
        return int(side) if side else 224

    @torch.no_grad()
    def crop_embeddings(self, image: ImageLike, masks: np.ndarray | Sequence[np.ndarray], kind: str = "masked_crop",
                        size: int | None = None) -> tuple[torch.Tensor, list[str | None]]:
        """Embeddings ``[N, D]`` of each mask's box crop (``crop``) or of that crop with the pixels outside the
        mask set to the dataset mean (``masked_crop``), each resized to ``size`` (default :attr:`native_size`),
        and each mask's error (its row is then zeros). No image forward pass is made."""
        if kind not in ("crop", "masked_crop"):
            raise ValueError(f"crop kind must be 'crop' or 'masked_crop', got {kind!r}")
        size = self.native_size if size is None else int(size)
        img = open_image(image)[0]
        r, g, b = (int(round(c * 255)) for c in self.clip.mean)
        fill = (r, g, b)
        crops, where = [], []
        errors: list[str | None] = [None] * len(masks)
        for i, m in enumerate(masks):
            try:
                crops.append(img.crop(mask_box(m, img.size)) if kind == "crop" else masked_crop(img, m, fill))
                where.append(i)
            except RegionError as exc:
                errors[i] = str(exc)
        out = torch.zeros(len(masks), self.clip.embed_dim, device=self.clip.device)
        if crops:
            out[where] = self.embed_images(crops, size).to(out.dtype)
        return out, errors

    @torch.no_grad()
    def baseline_embeddings(self, image: ImageLike, masks: np.ndarray | Sequence[np.ndarray], kind: str = "global",
                            size: int = 448) -> torch.Tensor:
        """Region embeddings ``[N, D]`` without inversion.

        ``global``: the whole image's embedding for every mask; ``crop`` / ``masked_crop``: see
        :meth:`crop_embeddings` (at ``size``). Empty masks fall back to the global embedding.
        """
        if kind not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES}, got {kind!r}")
        state, _, _, img = self.image_state(image, size)
        g = state.global_embedding
        if kind == "global":
            return g[None].repeat(len(masks), 1)
        emb, errors = self.crop_embeddings(img, masks, kind, size)
        failed = [i for i, e in enumerate(errors) if e is not None]
        emb[failed] = g.to(emb.dtype)
        return emb
