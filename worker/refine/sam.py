"""SAM on a prompt: the object mask for a box or a few clicks, through ``transformers`` (``SamModel``), loaded
from the local checkpoint the proposals use (``MASKINV_SAM_CHECKPOINT``, by
:meth:`worker.proposals.sam_source.SamSource.from_pretrained`).

A box is one prompt with a single output mask; clicks (all positive) are one prompt with SAM's three candidate
masks, of which the one with the highest predicted IoU is kept (SAM's own recipe for ambiguous clicks).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from worker.proposals.sam_source import SamSource
from worker.protocol.prompts import RegionPrompt


class SamRefiner:
    """Prompt -> mask with a SAM model and its processor."""

    def __init__(self, model, processor, device: torch.device | str = "cpu"):
        self.model = model.eval().to(device)
        self.processor = processor
        self.device = torch.device(device)

    @classmethod
    def from_pretrained(cls, checkpoint: str, device: torch.device | str = "cpu") -> "SamRefiner":
        """Load a local checkpoint (a folder with ``config.json`` and ``preprocessor_config.json``)."""
        src = SamSource.from_pretrained(checkpoint, device=device)
        return cls(src.model, src.processor, device)

    @torch.no_grad()
    def __call__(self, image: Image.Image, prompt: RegionPrompt) -> tuple[np.ndarray, float]:
        """Bool mask ``[H, W]`` of the prompted object and SAM's predicted IoU for it."""
        img = image.convert("RGB")
        kwargs: dict[str, Any]
        if prompt.box is not None:
            kwargs = {"input_boxes": [[list(prompt.box)]]}
            multimask = False
        else:
            kwargs = {"input_points": [[[list(p) for p in prompt.points]]],
                      "input_labels": [[[1] * len(prompt.points)]]}
            multimask = True
        inputs = self.processor(images=img, return_tensors="pt", **kwargs)
        feed = {k: v.to(self.device) for k, v in inputs.items()
                if k in ("pixel_values", "input_boxes", "input_points", "input_labels")}
        pred = self.model(**feed, multimask_output=multimask)
        masks = self.processor.image_processor.post_process_masks(
            pred.pred_masks.cpu(), inputs["original_sizes"].cpu(), inputs["reshaped_input_sizes"].cpu())[0]
        iou = pred.iou_scores[0, 0].cpu()  # [m]
        best = int(iou.argmax())
        return masks[0, best].numpy().astype(bool), float(iou[best])
