"""The attention-pooled map against the public MaskInversion package (maskinversion-torch 1.1 over legrad-torch
1.1, in the venv ``scripts/official_env.sh`` makes; skipped without it): the same random-init ViT-B-16-SigLIP, image,
masks and empty-prompt vector, the package called once per mask."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from worker.engine.engine import MaskInversionEngine
from worker.engine.models import clip_from_model
from worker.engine.preprocess import mask_to_target

REPO = Path(__file__).resolve().parents[3]
VENV_PYTHON = Path(os.environ.get("OFFICIAL_VENV", REPO / ".venv-official")) / "bin" / "python"
RUNNER = Path(__file__).with_name("official_siglip.py")
MODEL = "ViT-B-16-SigLIP"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not VENV_PYTHON.exists(), reason="no official venv (scripts/official_env.sh)")]


def _masks(n: int, h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    masks = np.zeros((n, h, w), bool)
    for i in range(n):
        y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
        masks[i, y:y + h // 3, x:x + w // 3] = True
    return masks


@pytest.mark.parametrize("size", [224, 256])
def test_lets_and_maps_match_the_package_per_mask(tmp_path, size):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model(MODEL, pretrained=None)
    clip = clip_from_model(model, MODEL, None, f"{MODEL}/random-seed0")
    gen = torch.Generator().manual_seed(1)
    empty, probes = torch.randn(clip.embed_dim, generator=gen), torch.randn(2, clip.embed_dim, generator=gen)
    engine = MaskInversionEngine(clip, empty_prompt_embedding=empty)  # the package's vector on both sides
    blocks = np.random.default_rng(2).integers(0, 256, (12, 16, 3), dtype=np.uint8)  # colour blocks: LETs move
    image = Image.fromarray(blocks).resize((320, 240), Image.Resampling.NEAREST)
    masks = _masks(2, 240, 320)
    steps = 3
    targets = torch.from_numpy(np.stack([mask_to_target(m, size) for m in masks])).float()
    torch.save({"visual": model.visual.state_dict(), "pixels": engine._pixels(image, size).cpu(), "masks": targets,
                "empty": empty, "probes": probes}, tmp_path / "inputs.pt")
    spec = {"threads": torch.get_num_threads(), "inputs": str(tmp_path / "inputs.pt"), "model": MODEL,
            "steps": steps, "out": str(tmp_path / "out.pt")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    subprocess.run([str(VENV_PYTHON), str(RUNNER), str(tmp_path / "spec.json")], check=True, capture_output=True)
    official = torch.load(tmp_path / "out.pt")

    ours = engine.invert(image, masks, size=size, steps=steps, final_loss=False)
    assert F.cosine_similarity(ours.lets, ours.global_embedding[None]).max() < 0.99  # the LETs moved
    assert F.cosine_similarity(ours.lets, official["lets"]).min() >= 0.999
    maps = engine.explain(image, probes, size=size)
    torch.testing.assert_close(maps, official["maps"], atol=1e-3, rtol=0)
