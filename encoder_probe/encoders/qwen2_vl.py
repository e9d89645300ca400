"""Qwen2-VL and Qwen2.5-VL: the `visual` tower with its 2x2 patch merger.

The tower takes flattened patches in merge-window order plus ``grid_thw`` and, for 2.5-VL, runs
its blocks on tokens re-ordered into attention windows. This adapter patchifies fixed-size
images exactly as the Qwen2-VL image processor does and undoes both orderings, so block outputs
come back row-major over the (h, w) patch grid. The merger is the projector: its input (the last
block's output) is the default layer; with_projector gives its (h/2, w/2) output.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import CheckpointError, SpecError
from .base import CLIP_MEAN, CLIP_STD, LayerInfo, Preprocess, Tokens, VisionEncoder
from .checkpoint import CheckpointReader, load_into, training_details
from .hf_tower import load_config
from .sources import Source, read_config
from .views import TokenLayout, View, single_view

MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
VISION_PREFIXES = ("model.visual.", "visual.")
DEFAULT_SIZE = 448


def detect(config: dict) -> bool:
    return config.get("model_type") in MODEL_TYPES


class QwenVisionEncoder(VisionEncoder):
    source = "qwen2-vl"

    def __init__(self, *, visual, **kwargs):
        self.visual = visual
        cfg = visual.config
        self.patch, self.merge, self.temporal = cfg.patch_size, cfg.spatial_merge_size, cfg.temporal_patch_size
        self.windowed = hasattr(visual, "fullatt_block_indexes")
        super().__init__(**kwargs)

    def _grid(self, pixels) -> tuple[int, int]:
        h, w = pixels.shape[-2:]
        factor = self.patch * self.merge
        if h % factor or w % factor:
            raise ValueError(f"Qwen2-VL input {h}x{w} must be a multiple of {factor} (patch x merge)")
        return h // self.patch, w // self.patch

    def _patchify(self, pixels):
        """The Qwen2-VL image processor's flattening: (B*h*w, C*T*P*P) in merge-block order."""
        b, c, _, _ = pixels.shape
        (gh, gw), p, m = self._grid(pixels), self.patch, self.merge
        x = pixels.reshape(b, c, gh // m, m, p, gw // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
        x = x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, self.temporal, -1, -1)
        grid_thw = torch.tensor([[1, gh, gw]] * b, device=pixels.device)
        return x.reshape(b * gh * gw, c * self.temporal * p * p), grid_thw

    def _merge_order(self, tokens: torch.Tensor, grid) -> torch.Tensor:
        """(B, h*w, D) row-major -> merge-block order; `_row_major` is its inverse."""
        b, _, d = tokens.shape
        (h, w), m = grid, self.merge
        return tokens.reshape(b, h // m, m, w // m, m, d).permute(0, 1, 3, 2, 4, 5).reshape(b, h * w, d)

    def _row_major(self, tokens: torch.Tensor, grid) -> torch.Tensor:
        b, _, d = tokens.shape
        (h, w), m = grid, self.merge
        return tokens.reshape(b, h // m, w // m, m, m, d).permute(0, 1, 3, 2, 4, 5).reshape(b, h * w, d)

    def _forward_layers(self, pixels, layers):
        grid = self._grid(pixels)
        flat, grid_thw = self._patchify(pixels)
        per_image = self._run(flat, grid_thw, layers)
        result = []
        for k, layer in enumerate(layers):
            x = torch.stack([image[k] for image in per_image])
            result.append(Tokens(x, x[:, :0], grid, layer))
        return result

    def _run(self, flat, grid_thw, layers) -> list[list[torch.Tensor]]:
        """The tower on flattened patches of any number of images of any sizes (the model packs them
        into one sequence); per image, per layer: (h*w, D) row-major over its patch grid."""
        out = self.visual(flat, grid_thw=grid_thw, output_hidden_states=True)
        unwindow = None
        if self.windowed:
            from transformers.vision_utils import get_vision_window_index
            window_index, _ = get_vision_window_index(grid_thw, self.merge, self.visual.window_size, self.patch)
            unwindow = torch.argsort(window_index.to(flat.device))
        sizes = [int(t * h * w) for t, h, w in grid_thw.tolist()]
        per_layer = []
        for layer in layers:
            x = out.hidden_states[layer]  # (sum h*w, D), merge-block order (window order for 2.5)
            if unwindow is not None:
                unit = self.merge ** 2
                x = x.reshape(-1, unit, x.shape[-1])[unwindow].reshape(x.shape)
            per_layer.append([self._row_major(part[None], (int(h), int(w)))[0] for part, (_, h, w)
                              in zip(torch.split(x, sizes), grid_thw.tolist())])
        return [[per_layer[k][i] for k in range(len(layers))] for i in range(len(sizes))]

    patches_per_pass = 64 * 1024  # images are independent: a batch runs in passes of about this many patches

    def _forward_full(self, images, layers):
        """Native resolution: each image at the size the processor's smart_resize chose, packed into
        one sequence per pass (as the model packs them), passes of about ``patches_per_pass``."""
        groups, size = [[]], 0
        for image in images:
            n = image.pixel_values.shape[0]
            if groups[-1] and size + n > self.patches_per_pass:
                groups.append([])
                size = 0
            groups[-1].append(image)
            size += n
        per_image = []
        for group in groups:
            flat = torch.cat([im.pixel_values for im in group]).to(self.device, self.dtype)
            grid_thw = torch.stack([im.extra["image_grid_thw"] for im in group]).to(self.device)
            per_image += self._run(flat, grid_thw, layers)
        out = []
        for image, tokens in zip(images, per_image):
            thw = image.extra["image_grid_thw"].tolist()
            grid = (int(thw[1]), int(thw[2]))
            layout = single_view(grid, image.image_size, name="image")
            out.append([Tokens(t[None], t[None, :0], grid, layer, layout) for t, layer in zip(tokens, layers)])
        return out

    def _project(self, tokens: Tokens) -> Tokens:
        """The merger on any layer's tokens: groups of merge x merge neighbours -> one LLM token."""
        b, _, d = tokens.patches.shape
        x = self._merge_order(tokens.patches, tokens.grid)
        merged = self.visual.merger(x.reshape(-1, d)).reshape(b, -1, self.visual.merger.mlp[-1].out_features)
        grid = (tokens.grid[0] // self.merge, tokens.grid[1] // self.merge)
        layout = self._lm_layout(tokens.layout) if tokens.layout is not None else None
        return Tokens(merged, merged[:, :0], grid, tokens.layer, layout)

    def _lm_layout(self, layout: TokenLayout) -> TokenLayout:
        """Merged tokens cover the same box, merge x merge patches each."""
        view = layout.views[0]
        grid = (view.grid[0] // self.merge, view.grid[1] // self.merge)
        return TokenLayout(layout.image_size, (View.uniform(view.name, grid, view.box),))


def _preprocess(path: Path, factor: int, image_size: tuple[int, int] | None) -> tuple[Preprocess, str]:
    file = path / "preprocessor_config.json"
    cfg = {}
    if file.is_file():
        try:
            cfg = json.loads(file.read_text())
        except ValueError as e:
            raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    size = image_size or (DEFAULT_SIZE, DEFAULT_SIZE)
    if size[0] % factor or size[1] % factor:
        raise SpecError(f"{path}: image size {size[0]}x{size[1]} is not a multiple of {factor} "
                        f"(patch x merge) in both sides, as Qwen2-VL needs")
    mean, std = tuple(cfg.get("image_mean", CLIP_MEAN)), tuple(cfg.get("image_std", CLIP_STD))
    return Preprocess(size, mean, std, "bicubic", "exact"), (file.name if cfg else "Qwen2-VL defaults")


def load(directory: str, weights=None, *, spec: str, layer=None, with_projector=False, image_size=None, view="base"):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    path = Path(directory)
    if view == "full" and image_size is not None:
        raise SpecError(f"{path}: view 'full' is the native resolution the processor chooses (min/max pixels "
                        "from preprocessor_config.json); --image-size is for view base")
    read_config(path)
    config = load_config(path)
    cls = {"qwen2_vl": Qwen2VisionTransformerPretrainedModel,
           "qwen2_5_vl": Qwen2_5_VisionTransformerPretrainedModel}[config.model_type]
    vcfg = config.vision_config
    preprocess, preprocess_from = _preprocess(path, vcfg.patch_size * vcfg.spatial_merge_size, image_size)
    reader = CheckpointReader(path)
    prefix = reader.first_prefix(VISION_PREFIXES)
    if prefix is None:
        raise CheckpointError(f"{path}: missing vision keys (none under {' or '.join(VISION_PREFIXES)})")
    visual = cls._from_config(vcfg)
    load_into(visual, reader.load_prefix(prefix), source=path)
    depth = vcfg.depth
    full = {}
    if view == "full":
        from .processors import image_processor
        full_preprocess, preprocess_from = image_processor(path, config.model_type, config)
        full = {"full_preprocess": full_preprocess}
    return QwenVisionEncoder(
        visual=visual, spec=spec, module=visual, preprocess=preprocess, projector=visual.merger,
        layers=LayerInfo(depth, depth, depth, has_final=False, note="last block output = the merger's input"),
        layer=layer, with_projector=with_projector,
        details={"architecture": f"{config.model_type} ({cls.__name__})", "vision_keys": prefix + "*",
                 "merge": f"{vcfg.spatial_merge_size}x{vcfg.spatial_merge_size} merger", "preprocess_from": preprocess_from,
                 **training_details(path)},
        view=view, **full)


SOURCE = Source(name="qwen2-vl", load=load, detect_order=30,
                description="Qwen2-VL / Qwen2.5-VL dirs (visual tower + merger, dynamic "
                "resolution at a fixed --image-size)", detect=detect)
