"""MaskInversionEngine's explicit settings: cache and chunk budgets, the GPU step's dtype (CUDA mocked on CPU),
and the optional final-loss evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from worker.engine import engine as engine_mod
from worker.engine.engine import MaskInversionEngine
from worker.jobs.runtime import build_engine
from worker.engine.models import load_clip


@pytest.fixture(scope="module")
def clip():
    return load_clip("maskinv-test-tiny", "none", "cpu")


@pytest.fixture(scope="module")
def image():
    return Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 60, 3), dtype=np.uint8))


def masks(n: int) -> np.ndarray:
    out = np.zeros((n, 50, 60), bool)
    for i in range(n):
        out[i, 5 + 3 * i:30 + 2 * i, 8:40 - 2 * i] = True
    return out


def test_bad_settings_are_named(clip):
    with pytest.raises(ValueError, match="gpu_dtype"):
        MaskInversionEngine(clip, gpu_dtype="int8")
    with pytest.raises(ValueError, match="cache_bytes"):
        MaskInversionEngine(clip, cache_bytes=-1)
    with pytest.raises(ValueError, match="chunk_memory_bytes"):
        MaskInversionEngine(clip, chunk_memory_bytes=1.5)


def test_engine_does_not_read_the_environment(clip, monkeypatch):
    monkeypatch.setenv("MASKINV_CACHE_MB", "1")
    monkeypatch.setenv("MASKINV_CHUNK_MEMORY_MB", "1")
    eng = MaskInversionEngine(clip)
    assert eng.cache.stats.max_bytes == engine_mod.DEFAULT_CACHE_BYTES
    assert eng.chunk_memory_bytes == engine_mod.DEFAULT_CHUNK_MEMORY_BYTES


def test_runtime_settings_from_env(clip):
    from worker.settings import WorkerSettings, WorkerSettingsError

    s = WorkerSettings.from_env({"MASKINV_CACHE_MB": "3", "MASKINV_CHUNK_MEMORY_MB": "5", "MASKINV_GPU_DTYPE": "BF16"})
    assert (s.cache_bytes, s.chunk_memory_bytes, s.gpu_dtype) == (3 * 2**20, 5 * 2**20, "bf16")
    eng = build_engine(clip, s)
    assert (eng.cache.stats.max_bytes, eng.chunk_memory_bytes, eng.gpu_dtype) == (3 * 2**20, 5 * 2**20, "bf16")
    assert WorkerSettings.from_env({}).gpu_dtype == "fp32"
    from worker.engine import cpu_gemm

    assert WorkerSettings.from_env({}).cpu_gemm == "auto" and eng.cpu_gemm == cpu_gemm.resolve("auto")
    assert build_engine(clip, WorkerSettings.from_env({"MASKINV_CPU_GEMM": "onednn"})).cpu_gemm == "onednn"
    assert build_engine(clip, WorkerSettings.from_env({"MASKINV_CPU_GEMM": "blas"})).cpu_gemm == "blas"
    with pytest.raises(WorkerSettingsError, match="MASKINV_GPU_DTYPE"):
        WorkerSettings.from_env({"MASKINV_GPU_DTYPE": "fp8"})
    with pytest.raises(WorkerSettingsError, match="MASKINV_CHUNK_MEMORY_MB"):
        WorkerSettings.from_env({"MASKINV_CHUNK_MEMORY_MB": "lots"})


def test_cpu_always_runs_fp32(clip, image):
    fp32 = MaskInversionEngine(clip, gpu_dtype="fp32")
    bf16 = MaskInversionEngine(clip, gpu_dtype="bf16")
    assert bf16.step_dtype() == torch.float32
    a, b = fp32.invert(image, masks(3), size=64), bf16.invert(image, masks(3), size=64)
    assert torch.equal(a.lets, b.lets)
    assert "peak_gpu_mib" not in a.timings and a.timings["chunk_masks"] >= 3


@pytest.mark.parametrize("dtype,expected", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_cuda_dtype_plumbing_mocked(clip, monkeypatch, dtype, expected):
    precision = []
    monkeypatch.setattr(MaskInversionEngine, "_is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch, "set_float32_matmul_precision", precision.append)
    eng = MaskInversionEngine(clip, gpu_dtype=dtype, chunk_memory_bytes=2**40)
    assert precision == ["high"]  # TF32 for the fp32 matmuls
    assert eng.step_dtype() == expected
    ctx = eng._step_precision()
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == expected and ctx.device == "cuda"
    # chunk size from free GPU memory (80 % of it) when that is below the budget
    free = 50 * eng.mask_bytes(64)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 10 * free))
    assert eng.masks_per_chunk(64) == int(0.8 * free) // eng.mask_bytes(64)
    # half precision halves the kept sign pattern's bytes
    fp32 = MaskInversionEngine(clip, gpu_dtype="fp32")
    assert eng.mask_bytes(448) < fp32.mask_bytes(448)


def test_final_loss_is_optional(clip, image):
    eng = MaskInversionEngine(clip)
    full = eng.invert(image, masks(4), size=64, steps=5)
    lean = eng.invert(image, masks(4), size=64, steps=5, final_loss=False)
    assert full.losses.shape == (6, 4) and lean.losses.shape == (5, 4)
    assert torch.equal(full.lets, lean.lets)
    torch.testing.assert_close(full.losses[:5], lean.losses)
    none = eng.invert(image, masks(2), size=64, steps=0, final_loss=False)
    assert none.losses.shape == (0, 2) and none.errors == [None, None]
