"""worker.settings.WorkerSettings.from_env: every worker variable, read once, bad values name the variable."""

from __future__ import annotations

import pytest

from worker.protocol import SettingError
from worker.settings import CaptionerSettings, WorkerSettings, WorkerSettingsError


def test_defaults_match_the_documented_ones():
    s = WorkerSettings.from_env({})
    assert s == WorkerSettings()
    assert (s.model, s.pretrained, s.device, s.seed, s.gpu_dtype) == ("ViT-B-16", "openai", None, 0, "fp32")
    assert (s.cache_bytes, s.chunk_memory_bytes) == (2048 * 2**20, 4096 * 2**20)
    assert (s.max_image_pixels, s.max_steps, s.max_size) == (50_000_000, 200, 1024)
    assert s.captioner == CaptionerSettings() and s.captioner.source is None
    assert (s.queue, s.redis_prefix, s.heartbeat_s, s.log_level) == ("maskinv", "maskinv", 5.0, "INFO")


def test_parsing():
    s = WorkerSettings.from_env({
        "MASKINV_MODEL": "maskinv-test-tiny", "MASKINV_PRETRAINED": "none", "MASKINV_DEVICE": "cpu",
        "MASKINV_SEED": "7", "MASKINV_GPU_DTYPE": "BF16", "MASKINV_CACHE_MB": "16", "MASKINV_CHUNK_MEMORY_MB": "0",
        "MASKINV_MAX_IMAGE_PIXELS": "1000", "MASKINV_MAX_STEPS": "20", "MASKINV_MAX_SIZE": "64",
        "MASKINV_CAPTIONER": "/caps/x", "MASKINV_CAPTION_DECODING": "Greedy", "MASKINV_CAPTION_BEAM": "4",
        "MASKINV_CAPTION_MAX_TOKENS": "9", "MASKINV_CAPTION_LENGTH_PENALTY": "0.5", "REDIS_URL": "redis://r:1/2",
        "MASKINV_QUEUE": "q", "MASKINV_REDIS_PREFIX": "p", "MASKINV_WORKER_NAME": "w1",
        "MASKINV_WORKER_HEARTBEAT": "0.5", "MASKINV_LOG_LEVEL": "debug"})
    assert (s.model, s.pretrained, s.device, s.seed, s.gpu_dtype) == ("maskinv-test-tiny", "none", "cpu", 7, "bf16")
    assert (s.cache_bytes, s.chunk_memory_bytes, s.max_image_pixels) == (16 * 2**20, 0, 1000)
    assert (s.max_steps, s.max_size) == (20, 64)
    assert s.captioner == CaptionerSettings("/caps/x", "greedy", 4, 9, 0.5)
    assert (s.redis_url, s.queue, s.redis_prefix, s.worker_name) == ("redis://r:1/2", "q", "p", "w1")
    assert (s.heartbeat_s, s.log_level) == (0.5, "DEBUG")
    for off in ("", "none", "retrieval"):
        assert WorkerSettings.from_env({"MASKINV_CAPTIONER": off}).captioner.source is None


@pytest.mark.parametrize("env, match", [
    ({"MASKINV_SEED": "zero"}, "MASKINV_SEED must be an integer, got 'zero'"),
    ({"MASKINV_SEED": "-1"}, "MASKINV_SEED must be >= 0"),
    ({"MASKINV_WORKER_HEARTBEAT": "often"}, "MASKINV_WORKER_HEARTBEAT must be a number, got 'often'"),
    ({"MASKINV_WORKER_HEARTBEAT": "0"}, "MASKINV_WORKER_HEARTBEAT must be > 0"),
    ({"MASKINV_GPU_DTYPE": "fp8"}, "MASKINV_GPU_DTYPE must be one of fp32, bf16, fp16"),
    ({"MASKINV_CPU_GEMM": "mkl"}, "MASKINV_CPU_GEMM must be one of auto, onednn, blas"),
    ({"MASKINV_CACHE_MB": "-5"}, "MASKINV_CACHE_MB must be >= 0"),
    ({"MASKINV_CHUNK_MEMORY_MB": "big"}, "MASKINV_CHUNK_MEMORY_MB must be an integer"),
    ({"MASKINV_MAX_IMAGE_PIXELS": "0"}, "MASKINV_MAX_IMAGE_PIXELS must be >= 1"),
    ({"MASKINV_MAX_STEPS": "many"}, "MASKINV_MAX_STEPS must be an integer"),
    ({"MASKINV_MAX_SIZE": "4096"}, r"MASKINV_MAX_SIZE must be in \[32, 2048\]"),
    ({"MASKINV_CAPTION_BEAM": "three"}, "MASKINV_CAPTION_BEAM must be an integer"),
    ({"MASKINV_CAPTION_LENGTH_PENALTY": "x"}, "MASKINV_CAPTION_LENGTH_PENALTY must be a number"),
    ({"MASKINV_LOG_LEVEL": "LOUD"}, "MASKINV_LOG_LEVEL"),
])
def test_bad_values_name_the_variable(env, match):
    with pytest.raises(WorkerSettingsError, match=match) as info:
        WorkerSettings.from_env(env)
    assert isinstance(info.value, SettingError) and isinstance(info.value, ValueError)


def test_backend_and_worker_share_one_parser_family():
    """The backend's SettingsError is the same family: one parser, one message format for the whole project."""
    from backend.settings import Settings, SettingsError

    with pytest.raises(SettingsError, match="MASKINV_MAX_STEPS must be an integer") as b:
        Settings.from_env({"MASKINV_MAX_STEPS": "many"})
    with pytest.raises(WorkerSettingsError, match="MASKINV_MAX_STEPS must be an integer") as w:
        WorkerSettings.from_env({"MASKINV_MAX_STEPS": "many"})
    assert isinstance(b.value, SettingError) and str(b.value) == str(w.value)


def test_the_worker_command_reports_a_bad_variable(monkeypatch, capsys):
    from worker.queue_worker import main

    monkeypatch.setenv("MASKINV_WORKER_HEARTBEAT", "soon")
    assert main(["--check"]) == 2
    assert "MASKINV_WORKER_HEARTBEAT must be a number" in capsys.readouterr().err


def test_the_runtime_is_built_from_the_settings(monkeypatch):
    """get_runtime passes every value explicitly: model, seed, engine budgets, image limit, captioner."""
    from worker.jobs import runtime as jobs
    from worker.engine import preprocess

    monkeypatch.setattr(preprocess, "_default_max_pixels", preprocess.DEFAULT_MAX_IMAGE_PIXELS)
    s = WorkerSettings.from_env({"MASKINV_MODEL": "maskinv-test-tiny", "MASKINV_PRETRAINED": "none",
                                 "MASKINV_DEVICE": "cpu", "MASKINV_SEED": "3", "MASKINV_CACHE_MB": "1",
                                 "MASKINV_CHUNK_MEMORY_MB": "2", "MASKINV_MAX_IMAGE_PIXELS": "12345"})
    rt = jobs.build_runtime(s)
    assert rt.settings is s and rt.clip.id == "maskinv-test-tiny/random-seed3"
    assert rt.engine.chunk_memory_bytes == 2 * 2**20 and rt.captioner.mode == "retrieval"
    assert preprocess._default_max_pixels == 12345


def test_refine_settings_name_their_variable():
    from worker.settings import RefineSettings, WorkerSettings, WorkerSettingsError

    assert WorkerSettings.from_env({}).refine == RefineSettings()
    s = RefineSettings.from_env({"MASKINV_REFINE_METHOD": "Seeds", "MASKINV_SAM_CHECKPOINT": "/m/sam"})
    assert s.method == "seeds" and s.boxes == "off" and s.sam_checkpoint == "/m/sam"
    for env, var in (({"MASKINV_REFINE_METHOD": "magic"}, "MASKINV_REFINE_METHOD"),
                     ({"MASKINV_REFINE_BOXES": "sam"}, "MASKINV_REFINE_BOXES"),
                     ({"MASKINV_REFINE_METHOD": "sam"}, "MASKINV_REFINE_METHOD")):
        with pytest.raises(WorkerSettingsError, match=var):
            RefineSettings.from_env(env)
