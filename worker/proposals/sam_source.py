"""Optional proposal source: SAM's masks for a grid of point prompts, through ``transformers`` (``SamModel``).

A :class:`SamSource` is a ``worker.proposals.pipeline.MaskSource``: ``(PIL image, S) -> bool masks [N, S, S]``. It
prompts
SAM with a ``points_per_side`` × ``points_per_side`` grid of single points (the automatic mask generator's
recipe, one mask per point), keeps masks whose predicted IoU is at least ``min_iou`` and which are not empty,
and resizes them to the model input frame. Loaded from a local checkpoint (``MASKINV_SAM_CHECKPOINT``: a folder
with ``config.json`` and the processor's ``preprocessor_config.json``, or a hub id already in the local cache).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


class SamSource:
    """SAM point-grid masks as proposal candidates."""

    def __init__(self, model, processor, points_per_side: int = 8, min_iou: float = 0.7, batch: int = 64,
                 device: torch.device | str = "cpu"):
        self.model = model.eval().to(device)
        self.processor = processor
        self.points_per_side = points_per_side
        self.min_iou = min_iou
        self.batch = batch
        self.device = torch.device(device)

    @classmethod
    def from_pretrained(cls, checkpoint: str, device: torch.device | str = "cpu", **kwargs) -> "SamSource":
        from transformers import SamModel, SamProcessor

        model = SamModel.from_pretrained(checkpoint, local_files_only=True)
        processor = SamProcessor.from_pretrained(checkpoint, local_files_only=True)
        return cls(model, processor, device=device, **kwargs)

    def grid_points(self, width: int, height: int) -> list[list[float]]:
        """Point prompts ``[[x, y], ...]`` in image pixels, cell centres of a points_per_side grid."""
        k = self.points_per_side
        xs = (np.arange(k) + 0.5) * width / k
        ys = (np.arange(k) + 0.5) * height / k
        return [[float(x), float(y)] for y in ys for x in xs]

    @torch.no_grad()
    def __call__(self, image, size: int) -> np.ndarray:
        """Bool masks ``[N, size, size]`` (N may be 0)."""
        img = image.convert("RGB")
        points = self.grid_points(img.width, img.height)
        out = []
        for i in range(0, len(points), self.batch):
            chunk = points[i:i + self.batch]
            inputs = self.processor(images=img, input_points=[[[p] for p in chunk]], return_tensors="pt")
            inputs = {k: v.to(self.device) if hasattr(v, "to") else v for k, v in inputs.items()}
            pred = self.model(pixel_values=inputs["pixel_values"], input_points=inputs["input_points"],
                              multimask_output=False)
            masks = self.processor.image_processor.post_process_masks(
                pred.pred_masks.cpu(), inputs["original_sizes"].cpu(), inputs["reshaped_input_sizes"].cpu(),
                binarize=False)[0]  # [n, 1, H, W] logits
            iou = pred.iou_scores[0, :, 0].cpu()
            small = F.interpolate(masks.float(), size=(size, size), mode="bilinear", align_corners=False)[:, 0] > 0
            for m, q in zip(small.numpy(), iou.tolist()):
                if q >= self.min_iou and m.any():
                    out.append(m)
        return np.stack(out) if out else np.zeros((0, size, size), bool)
