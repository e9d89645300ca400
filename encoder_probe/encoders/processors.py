"""The checkpoint's own transformers image processor as the preprocessing of a ``full`` view.

Anyres tiling (LLaVA-OneVision / LLaVA-NeXT), InternVL's dynamic tiles + thumbnail and Qwen2-VL's
``smart_resize`` are the processor's work, not ours: it is built offline from the directory's
``preprocessor_config.json`` or, when the directory has none, from the published settings of the
family (with the checkpoint's own grid pinpoints, patch and merge sizes). A worker process
rebuilds it from its class name and settings, so the transform pickles as plain strings.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path

import torch

from ..errors import CheckpointError, ImageRefused
from .base import CLIP_MEAN, CLIP_STD, HALF, IMAGENET_MEAN, IMAGENET_STD

QWEN_MIN_PIXELS, QWEN_MAX_PIXELS = 3136, 12845056  # Qwen2-VL / 2.5-VL preprocessor_config.json
INTERNVL_MAX_TILES = 12


@dataclass
class ProcessedImage:
    """One image as the processor gives it: ``pixel_values`` plus what the model reads beside them."""

    pixel_values: torch.Tensor  # (tiles, 3, h, w); Qwen: (patches, C*T*P*P)
    image_size: tuple[int, int]  # original (H, W)
    extra: dict = field(default_factory=dict)  # image_grid_thw (Qwen), num_patches (InternVL)


@dataclass(frozen=True)
class ProcessorPreprocess:
    """A transformers image processor, named by class and settings (both enter the fingerprint)."""

    processor: str  # class name under transformers, e.g. "LlavaOnevisionImageProcessor"
    settings: str  # its to_dict() as sorted JSON

    @classmethod
    def of(cls, processor) -> "ProcessorPreprocess":
        settings = {k: v for k, v in processor.to_dict().items() if not k.startswith("_")}
        return cls(type(processor).__name__, json.dumps(settings, sort_keys=True, default=_plain))

    @property
    def transform(self) -> "ProcessorTransform":
        return _transform(self.processor, self.settings)

    def build(self):
        return self.transform.processor

    @property
    def options(self) -> dict:
        return json.loads(self.settings)

    def describe(self) -> str:
        o = self.options
        mean = ", ".join(f"{m:.3g}" for m in o.get("image_mean") or ())
        std = ", ".join(f"{s:.3g}" for s in o.get("image_std") or ())
        size = o.get("size") or {}
        if "image_grid_pinpoints" in o:
            points = o["image_grid_pinpoints"]
            tile = size.get("height") or size.get("shortest_edge")
            areas = sorted(points, key=lambda p: p[0] * p[1])
            how = (f"base view: resize to {tile}x{tile}; anyres tiles of {tile}x{tile}: fit the best of "
                   f"{len(points)} pinpoints ({areas[0][0]}x{areas[0][1]} .. {areas[-1][0]}x{areas[-1][1]}) "
                   "keeping the aspect ratio, pad, cut")
        elif o.get("crop_to_patches"):
            how = (f"dynamic tiles of {size.get('height')}x{size.get('width')}: resize to the closest of "
                   f"{o.get('min_patches')}..{o.get('max_patches')} tiles' aspect ratios, cut, + a thumbnail")
        elif "merge_size" in o:
            lo, hi = size.get("shortest_edge"), size.get("longest_edge")
            factor = o["patch_size"] * o["merge_size"]
            how = (f"native resolution: smart_resize to multiples of {factor} px with {lo:,} to {hi:,} pixels, "
                   f"patches of {o['patch_size']} px")
        else:
            how = f"size {size}"
        return f"{self.processor}: {how}, mean ({mean}) std ({std})"


@lru_cache(maxsize=8)
def _transform(processor: str, settings: str) -> "ProcessorTransform":
    """One transform (and so one built processor) per processor and settings in a process."""
    return ProcessorTransform(processor, settings)


def _plain(value):
    return value.value if hasattr(value, "value") else str(value)  # PIL resampling enums -> int


class ProcessorTransform:
    """PIL image -> :class:`ProcessedImage` through the processor (built once per process)."""

    def __init__(self, processor: str, settings: str):
        self.name, self.settings = processor, settings

    def __getstate__(self):
        return {"name": self.name, "settings": self.settings}

    def __setstate__(self, state):
        self.__dict__.update(state)

    @cached_property
    def processor(self):
        import transformers
        return getattr(transformers, self.name).from_dict(json.loads(self.settings))

    def __call__(self, image) -> ProcessedImage:
        if image.mode != "RGB":
            image = image.convert("RGB")
        try:
            out = self.processor(images=image, return_tensors="pt")
        except ValueError as e:  # the processor's own refusals (smart_resize's aspect limit, ...)
            raise ImageRefused(f"a {image.width}x{image.height} image: {self.name} refuses it "
                               f"({' '.join(str(e).split())[:160]})") from None
        pixels = out["pixel_values"]
        extra = {}
        if "image_grid_thw" in out:
            extra["image_grid_thw"] = out["image_grid_thw"][0]
        elif pixels.ndim == 5:  # anyres: (1, tiles, 3, h, w)
            pixels = pixels[0]
        if "num_patches" in out:
            extra["num_patches"] = int(out["num_patches"][0])
        return ProcessedImage(pixels, (image.height, image.width), extra)


def image_processor(directory: Path, family: str, config) -> tuple[ProcessorPreprocess, str]:
    """The checkpoint's processor from its preprocessor_config.json, else the family's published one."""
    file = Path(directory) / "preprocessor_config.json"
    if file.is_file():
        from transformers import AutoImageProcessor
        try:
            processor = AutoImageProcessor.from_pretrained(directory, local_files_only=True)
        except Exception as e:
            raise CheckpointError(f"{file}: not an image processor transformers can build "
                                  f"({' '.join(str(e).split())[:200]})") from None
        return ProcessorPreprocess.of(processor), f"{file.name} ({type(processor).__name__})"
    processor = published_processor(family, config)
    return ProcessorPreprocess.of(processor), f"published {family} settings ({type(processor).__name__})"


def published_processor(family: str, config):
    """The processor the family publishes, with the checkpoint's own geometry from its config."""
    import transformers as T
    vision = config.vision_config
    if family in ("llava_onevision", "llava_next"):
        side = vision.image_size
        points = [list(p) for p in config.image_grid_pinpoints]
        if family == "llava_onevision":  # the class defaults to CLIP mean/std; the checkpoints use 0.5
            return T.LlavaOnevisionImageProcessor(size={"height": side, "width": side}, image_mean=list(HALF),
                                                  image_std=list(HALF), image_grid_pinpoints=points, do_pad=True)
        return T.LlavaNextImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                                         image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
                                         image_grid_pinpoints=points)
    if family == "llava":  # LLaVA-1.5: CLIP's shortest edge + centre crop
        side = vision.image_size
        return T.CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                                    image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    if family in ("qwen2_vl", "qwen2_5_vl"):
        return T.Qwen2VLImageProcessor(min_pixels=QWEN_MIN_PIXELS, max_pixels=QWEN_MAX_PIXELS,
                                       patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
                                       temporal_patch_size=vision.temporal_patch_size,
                                       image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    if family == "internvl":
        side = vision.image_size[0] if isinstance(vision.image_size, (list, tuple)) else vision.image_size
        return T.GotOcr2ImageProcessor(size={"height": side, "width": side}, crop_to_patches=True, min_patches=1,
                                       max_patches=INTERNVL_MAX_TILES, image_mean=list(IMAGENET_MEAN),
                                       image_std=list(IMAGENET_STD))
    raise CheckpointError(f"no published image processor for {family!r}")
