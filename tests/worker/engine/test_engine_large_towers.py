"""Class-token towers at their real widths (OpenAI ViT-L-14-336: width 1024, 16 heads, patch 14; LAION ViT-H-14:
width 1280, 16 heads, embedding 1024) through the real loading path with random weights and two layers: the
decomposed LETs against autograd, chunks of masks that do not change a LET, and the chunk's working-memory estimate
(``mask_bytes``, which MASKINV_CHUNK_MEMORY_MB divides) against the memory one more mask takes."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.profiler import ProfilerActivity, profile

from worker.engine.engine import MaskInversionEngine
from worker.engine.models import load_clip
from worker.jobs.runtime import build_engine
from worker.settings import WorkerSettings

TOWERS = {"ViT-L-14-336": (1024, 16, 14, 768), "ViT-H-14": (1280, 16, 14, 1024)}  # width, heads, patch, D


def _two_layers(name: str) -> dict:
    cfg = open_clip.get_model_config(name)
    return {"vision_cfg": {**cfg["vision_cfg"], "layers": 2}, "text_cfg": {**cfg["text_cfg"], "layers": 1}}


@pytest.fixture(scope="module", params=list(TOWERS))
def clip(request):
    return load_clip(request.param, "none", "cpu", config_overrides=_two_layers(request.param))


@pytest.fixture(scope="module")
def image():
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 120, 3), dtype=np.uint8))


def _masks(n: int) -> np.ndarray:
    out = np.zeros((n, 100, 120), bool)
    for i in range(n):
        out[i, 5 + 3 * i:60 + 2 * i, 8:90 - 4 * i] = True
    return out


def test_real_widths_load(clip):
    width, heads, patch, dim = TOWERS[clip.name]
    block = clip.visual.transformer.resblocks[-1]
    assert (block.attn.embed_dim, block.attn.num_heads, clip.patch_size, clip.embed_dim) == (width, heads, patch, dim)
    assert clip.id == f"{clip.name}/random-seed0+cfg"  # a shrunk config never shares an identity with the real one


def test_decomposed_lets_equal_autograd(clip, image):
    eng = MaskInversionEngine(clip)
    ours = eng.invert(image, _masks(2), size=84, steps=3)
    ref = eng.invert(image, _masks(2), size=84, steps=3, method="autograd")
    assert F.cosine_similarity(ours.lets, ref.lets).min() > 0.9999
    assert F.cosine_similarity(ours.lets, ours.global_embedding[None]).max() < 0.99999  # the LETs moved


def test_chunks_follow_the_memory_setting_and_do_not_change_a_let(clip, image):
    width, heads, patch, _ = TOWERS[clip.name]
    size = 448 - 448 % patch
    n = (size // patch) ** 2 + 1
    one = MaskInversionEngine(clip).mask_bytes(size)
    assert one >= 4 * heads * n * (n - 1)  # the sign pattern of ∂s/∂A, fp32, dominates at 448
    settings = WorkerSettings.from_env({"MASKINV_CHUNK_MEMORY_MB": str(3 * one // 2**20 + 1)})
    eng = build_engine(clip, settings)
    assert eng.masks_per_chunk(size) == 3
    small = build_engine(clip, WorkerSettings.from_env({"MASKINV_CHUNK_MEMORY_MB": "1"}))
    k = small.masks_per_chunk(84)
    assert 1 <= k < 5
    chunked = small.invert(image, _masks(5), size=84, steps=3)
    whole = MaskInversionEngine(clip, chunk_memory_bytes=2**34).invert(image, _masks(5), size=84, steps=3)
    assert chunked.timings["chunk_masks"] == k and whole.timings["chunk_masks"] >= 5
    torch.testing.assert_close(chunked.lets, whole.lets, atol=1e-5, rtol=1e-4)


def _peak_bytes(eng: MaskInversionEngine, image, n: int, size: int) -> int:
    """Peak CPU memory (bytes, over the image-state cache, already warm) of inverting ``n`` masks in one chunk."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        eng.invert(image, _masks(n), size=size, steps=2)
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    return int(np.cumsum([e.self_cpu_memory_usage for e in events]).max())


def test_mask_bytes_bounds_the_memory_of_one_more_mask(clip, image):
    """What one more mask takes in a chunk stays within the estimate the chunk size is computed from, and the
    estimate is not so loose that chunks get needlessly small (within 8×)."""
    size = 140
    eng = MaskInversionEngine(clip, use_basis=False)
    eng.invert(image, _masks(1), size=size, steps=1)  # the image state, cached
    per_mask = (_peak_bytes(eng, image, 4, size) - _peak_bytes(eng, image, 1, size)) / 3
    assert 0 < per_mask <= eng.mask_bytes(size) <= 8 * per_mask
