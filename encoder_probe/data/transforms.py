"""Joint image + mask geometry for dense probes.

Convention: the mask goes through exactly the geometry the encoder's own preprocessing applies
to the image (``exact`` resize to the input size, or short-side resize + centre crop), with
nearest-neighbour interpolation so labels stay labels. The image side is bit-identical to
``Preprocess.transform``: a dense probe sees the same pixels a classification probe does.

View ``full`` (the checkpoint's own processor: tiles, native resolution) has no one input size to
resize a mask to; every token knows its box on the original image instead, so the mask stays at
the original resolution (:class:`FullViewSegmentationTransform`) and probes paint token values
onto it (``TokenLayout.paint``).
"""
from __future__ import annotations

import numpy as np
import torch

from ..encoders.base import Preprocess


class SegmentationTransform:
    """(PIL image, (H, W) uint8 mask) -> ((3, h, w) float tensor, (h, w) uint8 tensor)."""

    def __init__(self, preprocess: Preprocess):
        from torchvision.transforms import v2

        self.preprocess = preprocess
        self.image = preprocess.transform
        size = preprocess.size
        if preprocess.resize == "exact":
            geometry = [v2.Resize(size, interpolation=v2.InterpolationMode.NEAREST_EXACT)]
        else:
            geometry = [v2.Resize(preprocess.resize_to or min(size), interpolation=v2.InterpolationMode.NEAREST_EXACT),
                        v2.CenterCrop(size)]
        self.mask = v2.Compose(geometry)

    def __call__(self, image, mask: np.ndarray):
        _check_fits(image, mask)
        from torchvision import tv_tensors
        return self.image(image), self.mask(tv_tensors.Mask(torch.from_numpy(mask)[None]))[0].as_subclass(torch.Tensor)


class FullViewSegmentationTransform:
    """(PIL image, (H, W) uint8 mask) -> (ProcessedImage, (H, W) uint8 tensor): the image through the
    checkpoint's processor (view full), the mask unchanged at the image's original size."""

    def __init__(self, preprocess):
        self.preprocess = preprocess
        self.image = preprocess.transform

    def __call__(self, image, mask: np.ndarray):
        _check_fits(image, mask)
        return self.image(image), torch.from_numpy(np.ascontiguousarray(mask, dtype=np.uint8))


def _check_fits(image, mask: np.ndarray) -> None:
    if mask.shape != (image.height, image.width):
        raise ValueError(f"mask is {mask.shape[1]}x{mask.shape[0]} but the image is {image.width}x{image.height}")
