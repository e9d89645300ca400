"""Localisation scores of gradient maps against object masks, so maps compare as numbers.

Maps are upsampled bilinearly (half-pixel centres, as segmentation logits are) from the token
grid to the mask's resolution; ignore pixels (255) count as neither inside nor outside.

- pointing game (Zhang et al. 2016): a hit when the map's maximum falls inside the mask, or
  within ``tolerance`` pixels of it (the original uses 15 px at 224);
- energy in mask (Score-CAM's "energy-based pointing game"): the share of the map's positive
  mass that lies inside the mask. A map that knows nothing scores the mask's area fraction
  (reported as ``chance``), whatever its shape.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .data.base import IGNORE_INDEX


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) token-grid maps -> (B, H, W), bilinear with half-pixel centres."""
    return F.interpolate(maps[:, None].float(), size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def _dilate(inside: torch.Tensor, tolerance: int) -> torch.Tensor:
    if tolerance <= 0:
        return inside
    k = 2 * tolerance + 1
    return F.max_pool2d(inside[:, None].float(), k, stride=1, padding=tolerance)[:, 0] > 0


def pointing_game(maps: torch.Tensor, inside: torch.Tensor, valid: torch.Tensor | None = None,
                  tolerance: int = 0) -> torch.Tensor:
    """(B,) 1.0 where the maximum of the upsampled map (over valid pixels) falls in the mask.

    Tied maxima (a flat map, a map flat at its peak) score the share of them inside the mask:
    the expected hit of breaking the tie at random, so a map with no location scores chance.
    """
    up = upsample(maps, inside.shape[-2:]).flatten(1)
    if valid is not None:
        up = up.masked_fill(~valid.flatten(1), float("-inf"))
    peak = up == up.max(1, keepdim=True).values
    hit = _dilate(inside, tolerance).flatten(1)
    return (peak & hit).sum(1).float() / peak.sum(1).float()


def energy_in_mask(maps: torch.Tensor, inside: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) share of the positive part of the upsampled map inside the mask (NaN for an all-zero map)."""
    up = upsample(maps, inside.shape[-2:]).clamp(min=0)
    if valid is not None:
        up = up * valid
    total = up.flatten(1).sum(1)
    return (up * inside).flatten(1).sum(1) / total.where(total > 0, torch.full_like(total, float("nan")))


def chance(inside: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) mask area fraction: what a uniform map scores in energy, and a random point's hit rate."""
    valid = torch.ones_like(inside) if valid is None else valid
    return (inside & valid).flatten(1).sum(1).float() / valid.flatten(1).sum(1).clamp(min=1).float()


def object_masks(masks: torch.Tensor, classes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(inside, valid) boolean (B, H, W) from train-id masks: pixels of ``classes[i]`` (or any
    non-background label when a class is -1 or none are given); 255 is not valid."""
    valid = masks != IGNORE_INDEX
    foreground = valid & (masks != 0)
    if classes is None:
        return foreground, valid
    classes = classes.to(masks.device).long()
    own = masks.long() == classes.view(-1, 1, 1)
    return torch.where((classes >= 0).view(-1, 1, 1), own, foreground), valid


def scores(maps: torch.Tensor, inside: torch.Tensor, valid: torch.Tensor | None = None, tolerance: int = 0) -> dict:
    """Both scores per image, as (B,) tensors."""
    return {"pointing_game": pointing_game(maps, inside, valid, tolerance),
            "energy_in_mask": energy_in_mask(maps, inside, valid)}
