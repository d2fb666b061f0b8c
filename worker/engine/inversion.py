"""The MaskInversion optimisation loop: LETs whose explainability maps match their masks."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from worker.protocol.deadline import check_time

MapFn = Callable[[torch.Tensor], torch.Tensor]  # LETs [N, D] -> maps [N, S, S] in [0, 1]
DiceFn = Callable[[torch.Tensor], torch.Tensor]  # LETs [N, D] -> soft Dice loss of their maps [N]


def soft_dice_loss(maps: torch.Tensor, masks: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss per mask ``[N]`` between maps and masks ``[N, S, S]``."""
    inter = (maps * masks).sum(dim=(1, 2))
    total = maps.sum(dim=(1, 2)) + masks.sum(dim=(1, 2))
    return 1.0 - (2.0 * inter + smooth) / (total + smooth)


def inversion_loss(maps: torch.Tensor, masks: torch.Tensor, lets: torch.Tensor, global_emb: torch.Tensor,
                   alpha: float) -> torch.Tensor:
    """Dice + ``alpha * (1 - cos(LET, global embedding))`` per mask ``[N]``."""
    return regularised(soft_dice_loss(maps, masks), lets, global_emb, alpha)


def regularised(dice: torch.Tensor, lets: torch.Tensor, global_emb: torch.Tensor, alpha: float) -> torch.Tensor:
    """``dice [N] + alpha * (1 - cos(LET, global embedding))``."""
    if alpha:
        dice = dice + alpha * (1.0 - F.cosine_similarity(lets, global_emb[None], dim=-1))
    return dice


def optimise_lets(map_fn: MapFn | None, global_emb: torch.Tensor, masks: torch.Tensor, steps: int = 10,
                  lr: float = 0.1, alpha: float = 0.0, final_loss: bool = True,
                  dice_fn: DiceFn | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimise one LET per mask, all masks in one batch.

    Args:
        map_fn: LETs ``[N, D]`` -> explainability maps ``[N, S, S]``, differentiable w.r.t. the LETs.
        global_emb: ``[D]`` the image embedding every LET starts from.
        masks: ``[N, S, S]`` targets in [0, 1].
        dice_fn: instead of ``map_fn``: LETs -> the soft Dice loss of their maps against ``masks`` ``[N]``
            (:class:`worker.engine.grid_dice.GridDice` computes it without the ``[N, S, S]`` maps).
    Returns:
        LETs ``[N, D]`` after ``steps`` AdamW steps (lr ``lr``, weight decay 0) and the loss per step
        ``[steps + 1, N]`` (row k: before step k; last row: the final LETs, one more map evaluation), or
        ``[steps, N]`` without that last row when ``final_loss`` is false.
    Each mask's LET depends only on its own mask: the loss is a sum of per-mask terms and AdamW is elementwise.
    """
    if (map_fn is None) == (dice_fn is None):
        raise ValueError("give exactly one of map_fn and dice_fn")

    def loss_of(e: torch.Tensor) -> torch.Tensor:
        if dice_fn is not None:
            dice = dice_fn(e)
        else:
            assert map_fn is not None  # exactly one of the two is given
            dice = soft_dice_loss(map_fn(e), masks)
        return regularised(dice, e, global_emb, alpha)

    lets = global_emb.detach()[None].repeat(masks.shape[0], 1).requires_grad_(True)
    opt = torch.optim.AdamW([lets], lr=lr, weight_decay=0.0)
    history = []
    with torch.enable_grad():
        for _ in range(steps):
            check_time("an inversion step")  # a job past its time limit (embedded mode) stops here
            loss = loss_of(lets)
            history.append(loss.detach())
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            opt.step()
    lets = lets.detach()
    if final_loss:
        with torch.no_grad():
            history.append(loss_of(lets))
    if not history:
        return lets, torch.zeros(0, masks.shape[0], device=lets.device)
    return lets, torch.stack(history)
