"""Where each visual token an MLLM's LM reads sits on the original image, per family.

The geometry is the one the encoders' ``full`` view uses (:mod:`encoder_probe.encoders.multiview`:
transformers' own anyres and tiling helpers), read from the model's config and its processor's
settings; the image token count the processor wrote is checked against it by the caller.
"""
from __future__ import annotations

import math

from ..encoders.views import TokenLayout, View, single_view


def lm_layout(mllm, image_size: tuple[int, int], inputs) -> TokenLayout:
    family, config = mllm.family, mllm.config
    if family in ("llava_onevision", "llava_next"):
        from ..encoders.multiview import AnyresViews
        aspect = getattr(config, "vision_aspect_ratio", None)
        max_tiles = int(aspect.removeprefix("anyres_max_")) if family == "llava_onevision" and \
            isinstance(aspect, str) and aspect.startswith("anyres_max_") else None
        views = AnyresViews(config, max_tiles=max_tiles)
        return views.lm_layout(views.layout(image_size))
    if family == "internvl":
        from ..encoders.multiview import TileViews
        vision = config.vision_config
        tile = vision.image_size[0] if isinstance(vision.image_size, (list, tuple)) else vision.image_size
        patch = vision.patch_size[0] if isinstance(vision.patch_size, (list, tuple)) else vision.patch_size
        side = tile // patch
        options = mllm.processor.image_processor.to_dict()
        return TileViews(options, tile, int(side * config.downsample_ratio), side * patch / tile).layout(image_size)
    if family in ("qwen2_vl", "qwen2_5_vl"):
        _, h, w = (int(v) for v in inputs["image_grid_thw"][0])
        merge = config.vision_config.spatial_merge_size
        return single_view((h // merge, w // merge), image_size, name="image")
    if family == "llava":
        vision = config.vision_config
        grid = vision.image_size // vision.patch_size
        box = flat_box(mllm.processor.image_processor, image_size, grid * vision.patch_size)
        return TokenLayout((int(image_size[0]), int(image_size[1])), (View.uniform("base", (grid, grid), box),))
    raise ValueError(f"no token layout for MLLM family {family!r}")


def flat_box(processor, image_size: tuple[int, int], covered: int) -> tuple[float, float, float, float]:
    """The box on the original image that a one-view processor's input covers (its first ``covered``
    pixels a side: the patch conv floors): pad to square (LLaVA's expand2square), then resize to the
    size, or the shortest edge + centre crop (CLIP)."""
    h, w = image_size
    canvas, py, px = (h, w), 0.0, 0.0
    if getattr(processor, "do_pad", False):
        side = max(h, w)
        canvas, py, px = (side, side), float((side - h) // 2), float((side - w) // 2)
    size = dict(processor.size)
    if "height" in size:
        ih, iw = size["height"], size["width"]
        sy, sx, cy, cx = canvas[0] / ih, canvas[1] / iw, 0.0, 0.0
    else:
        short = size["shortest_edge"]
        ch, cw = canvas
        rh, rw = (short, int(short * cw / ch)) if ch <= cw else (int(short * ch / cw), short)
        crop = dict(getattr(processor, "crop_size", None) or {"height": rh, "width": rw})
        sy, sx = ch / rh, cw / rw
        cy = math.floor((rh - crop["height"]) / 2) if getattr(processor, "do_center_crop", False) else 0
        cx = math.floor((rw - crop["width"]) / 2) if getattr(processor, "do_center_crop", False) else 0
    return (cx * sx - px, cy * sy - py, (cx + covered) * sx - px, (cy + covered) * sy - py)


__all__ = ["flat_box", "lm_layout", "single_view"]
