"""What the refinement tests share (no tests here; imported as ``refine_support``): a synthetic one-object
image, mask IoU, and a tiny random SAM checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def disc_scene(h: int = 50, w: int = 60, cx: float = 25, cy: float = 20, r: float = 10,
               seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A red disc on grey noise: image ``[H, W, 3]`` uint8 and the disc's mask ``[H, W]``."""
    img = np.random.default_rng(seed).integers(90, 130, (h, w, 3)).astype(np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    obj = (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 < r ** 2
    img[obj] = (200, 30, 30)
    return img, obj


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def save_tiny_sam(path: Path) -> str:
    """A tiny random-initialised SAM (``SamConfig``) saved with its processor under ``path``: plumbing only."""
    import torch
    from transformers import (SamConfig, SamImageProcessor, SamMaskDecoderConfig, SamModel, SamProcessor,
                              SamPromptEncoderConfig, SamVisionConfig)

    torch.manual_seed(0)
    cfg = SamConfig(
        vision_config=SamVisionConfig(hidden_size=32, output_channels=32, num_hidden_layers=1, num_attention_heads=2,
                                      image_size=1024, patch_size=64, window_size=4, global_attn_indexes=[0],
                                      mlp_dim=64, num_pos_feats=16),
        prompt_encoder_config=SamPromptEncoderConfig(hidden_size=32, image_size=1024, patch_size=64),
        mask_decoder_config=SamMaskDecoderConfig(hidden_size=32, mlp_dim=64, num_hidden_layers=1,
                                                 num_attention_heads=2, iou_head_hidden_dim=32))
    SamModel(cfg).save_pretrained(path)
    SamProcessor(SamImageProcessor()).save_pretrained(path)
    return str(path)
