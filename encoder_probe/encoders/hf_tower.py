"""One adapter over the HF vision transformers (CLIP, SigLIP, SigLIP2, DINOv2, InternViT).

The `hf`, `llava` and `hf-mllm` sources all hold one of these towers; this module is the only
place that knows each family's prefix tokens, patchification and pooling head.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, SpecError
from .base import CLIP_MEAN, CLIP_STD, HALF, IMAGENET_MEAN, IMAGENET_STD, Layer, Preprocess, Tokens, VisionEncoder

# dual-tower model_type -> the model_type of its vision half
DUAL_TOWER = {"clip": "clip_vision_model", "siglip": "siglip_vision_model", "siglip2": "siglip2_vision_model"}
VISION_TYPES = {"clip_vision_model", "siglip_vision_model", "siglip2_vision_model", "dinov2",
                "dinov2_with_registers", "internvl_vision"}
# PIL resample codes used in preprocessor_config.json
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def load_config(directory: Path):
    """transformers' config for a local directory, or a one-line error naming it."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(directory, local_files_only=True)
    except Exception as e:
        raise CheckpointError(f"{Path(directory) / 'config.json'}: not a config transformers can read "
                              f"({' '.join(str(e).split())[:200]})") from None


def vision_config_of(config, directory: Path):
    """The vision half of a dual-tower config, or the config itself."""
    if config.model_type in DUAL_TOWER:
        return config.vision_config
    if config.model_type not in VISION_TYPES:
        raise CheckpointError(f"{Path(directory) / 'config.json'}: model_type {config.model_type!r} is not a "
                              f"supported vision tower (supported: {', '.join(sorted(VISION_TYPES | set(DUAL_TOWER)))})")
    return config


def build_tower(vision_config, *, num_layers: int | None = None, use_head: bool | None = None) -> nn.Module:
    """A randomly initialised HF vision model from its config, optionally truncated."""
    from transformers import AutoModel

    cfg = copy.deepcopy(vision_config)
    if num_layers is not None:
        cfg.num_hidden_layers = num_layers
    if use_head is not None and hasattr(cfg, "vision_use_head"):
        cfg.vision_use_head = use_head
    return AutoModel.from_config(cfg)


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (list, tuple)) else (int(v), int(v))


class HFTower:
    """Runs an HF vision model and splits its hidden states into Tokens."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self.kind = self.config.model_type
        self.patch = _pair(self.config.patch_size)
        registers = getattr(self.config, "num_register_tokens", 0) if self.kind == "dinov2_with_registers" else 0
        self.num_prefix = 0 if self.kind.startswith("siglip") else 1 + registers
        self.depth = self.config.num_hidden_layers

    @property
    def native_size(self) -> tuple[int, int]:
        return native_size(self.config)

    def grid(self, pixels: torch.Tensor) -> tuple[int, int]:
        """The (h, w) patch grid the model's own patch embedding makes of ``pixels``.

        CLIP, SigLIP, DINOv2 and InternViT embed patches with a stride-``patch`` conv that floors
        (SigLIP so400m/14 at 384: 27x27, the last 6 px dropped); SigLIP2 NaFlex takes whole patches.
        """
        h, w = (int(v) for v in pixels.shape[-2:])
        (ph, pw), kind = self.patch, self.kind
        if h < ph or w < pw:
            raise SpecError(f"{kind} input {h}x{w} is smaller than one {ph}x{pw} patch")
        if kind == "siglip2_vision_model" and (h % ph or w % pw):
            raise SpecError(f"siglip2 (NaFlex) input {h}x{w} is not a multiple of the patch size {ph}: the model "
                            f"takes whole patches (its image processor resizes to multiples of {ph}); pass a size "
                            f"such as {h // ph * ph}x{w // pw * pw}")
        return h // ph, w // pw

    def run(self, pixels: torch.Tensor):
        """The model's own forward with all hidden states."""
        if self.kind == "siglip2_vision_model":
            b, c, h, w = pixels.shape
            gh, gw = self.grid(pixels)
            p = self.patch[0]
            # the Siglip2 image processor's patch order: (gh, gw) row-major, each patch (p, p, C)
            patches = pixels.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, -1)
            mask = torch.ones(b, gh * gw, dtype=torch.long, device=pixels.device)
            shapes = torch.tensor([[gh, gw]] * b, device=pixels.device)
            return self.model(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes,
                              output_hidden_states=True)
        self.grid(pixels)  # a one-line error for sizes the model cannot take
        kwargs = {}
        # CLIP refuses any other input size unless asked to interpolate and SigLIP needs it for any
        # other grid; at the native grid (SigLIP so400m/14-384: 27x27 = its 729 positions) the
        # model's interpolation returns its own position embeddings unchanged.
        if self.kind in ("clip_vision_model", "siglip_vision_model") and tuple(pixels.shape[-2:]) != self.native_size:
            kwargs["interpolate_pos_encoding"] = True
        return self.model(pixel_values=pixels, output_hidden_states=True, **kwargs)

    def hidden(self, output, layer: Layer) -> torch.Tensor:
        return output.last_hidden_state if layer == "final" else output.hidden_states[layer]

    def split(self, hidden: torch.Tensor, grid: tuple[int, int], layer: Layer) -> Tokens:
        p = self.num_prefix
        return Tokens(hidden[:, p:], hidden[:, :p], grid, layer)

    def head(self, tokens: Tokens, projection: nn.Module | None = None) -> torch.Tensor:
        """The model's own pooled embedding from its final tokens."""
        hidden = torch.cat([tokens.prefix, tokens.patches], dim=1)
        if self.kind == "clip_vision_model":
            pooled = self.model.post_layernorm(hidden[:, 0])
            return projection(pooled) if projection is not None else pooled
        if self.kind.startswith("siglip") and getattr(self.model, "head", None) is not None:
            return self.model.head(hidden)
        if self.kind.startswith("dinov2"):
            return hidden[:, 0]
        raise NotImplementedError(f"{self.kind} has no pooling head here; use cls, mean or cls+mean")


def native_size(vision_config) -> tuple[int, int]:
    """The input resolution the tower was trained at (SigLIP2 NaFlex: its square patch budget)."""
    if vision_config.model_type == "siglip2_vision_model":
        side = int(round(vision_config.num_patches ** 0.5)) * _pair(vision_config.patch_size)[0]
        return side, side
    return _pair(vision_config.image_size)


def default_preprocess(vision_config, size: tuple[int, int] | None = None) -> Preprocess:
    """The family's published preprocessing when no preprocessor_config.json is at hand."""
    kind = vision_config.model_type
    size = size or native_size(vision_config)
    if kind == "clip_vision_model":
        return Preprocess(size, CLIP_MEAN, CLIP_STD, "bicubic", "shortest", min(size))
    if kind.startswith("dinov2"):
        return Preprocess(size, IMAGENET_MEAN, IMAGENET_STD, "bicubic", "shortest", round(min(size) * 256 / 224))
    if kind == "internvl_vision":
        return Preprocess(size, IMAGENET_MEAN, IMAGENET_STD, "bicubic", "exact")
    return Preprocess(size, HALF, HALF, "bicubic", "exact")


def preprocess_from_dir(directory: Path, vision_config) -> tuple[Preprocess, str]:
    """Preprocessing from preprocessor_config.json if the directory has one, else the family default."""
    file = directory / "preprocessor_config.json"
    if not file.is_file():
        return default_preprocess(vision_config), "family default (no preprocessor_config.json)"
    try:
        cfg = json.loads(file.read_text())
    except ValueError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    base = default_preprocess(vision_config)
    size, crop = cfg.get("size"), cfg.get("crop_size")
    interpolation = _RESAMPLE.get(cfg.get("resample"), base.interpolation)
    mean = tuple(cfg.get("image_mean", base.mean))
    std = tuple(cfg.get("image_std", base.std))
    if isinstance(size, dict) and "shortest_edge" in size and vision_config.model_type != "siglip2_vision_model":
        crop_hw = _pair((crop["height"], crop["width"])) if isinstance(crop, dict) else _pair(crop or size["shortest_edge"])
        if cfg.get("do_center_crop", True):
            return Preprocess(crop_hw, mean, std, interpolation, "shortest", int(size["shortest_edge"])), file.name
        return Preprocess(crop_hw, mean, std, interpolation, "exact"), file.name
    if isinstance(size, dict) and "height" in size:
        return Preprocess(_pair((size["height"], size["width"])), mean, std, interpolation, "exact"), file.name
    return Preprocess(base.size, mean, std, interpolation, base.resize, base.resize_to), file.name


class HFTowerEncoder(VisionEncoder):
    """A VisionEncoder over an HFTower; the `hf`, `llava` and `hf-mllm` sources all return one.

    ``projector_takes_prefix``: the MLLM feeds CLS/registers to its projector too (select strategy
    "full"). ``shuffle``: InternVL's pixel-shuffle ratio, applied before the projector.
    """

    def __init__(self, *, tower: HFTower, source: str, projector_takes_prefix: bool = False,
                 shuffle: float | None = None, head_projection: nn.Module | None = None,
                 views=None, newline: torch.Tensor | None = None, **kwargs):
        self.tower = tower
        self.source = source
        self.projector_takes_prefix = projector_takes_prefix
        self.shuffle = shuffle
        self.head_projection = head_projection
        self.views = views  # multiview.AnyresViews | TileViews: the full view's geometry
        self.newline = newline  # the MLLM's image_newline vector (anyres), read by lm_sequence
        super().__init__(**kwargs)
        self.details.setdefault("token_layout", f"{tower.num_prefix} prefix token(s), patch {tower.patch[0]}x{tower.patch[1]}")

    def _layout(self) -> dict:
        layout = {"prefix_tokens": self.tower.num_prefix, "pixel_shuffle": self.shuffle,
                  "projector_takes_prefix": self.projector_takes_prefix}
        if self.view == "full":
            layout["views"] = self.views.settings()
        return layout

    def _covered(self, grid, size):
        return float(grid[0] * self.tower.patch[0]), float(grid[1] * self.tower.patch[1])

    tiles_per_pass = 64  # tiles are independent: a batch of many-tile images runs in passes of at most this

    def _forward_full(self, images, layers):
        """The tiles of every image through the tower (in passes of ``tiles_per_pass``, so memory is
        that of a 64-image base batch), then each image's tokens in LM order."""
        counts = [im.pixel_values.shape[0] for im in images]
        pixels = torch.cat([im.pixel_values for im in images])
        passes = [self._forward_layers(part.to(self.device, self.dtype), layers)
                  for part in torch.split(pixels, self.tiles_per_pass)]
        per_layer = [passes[0][k] if len(passes) == 1 else
                     Tokens(torch.cat([p[k].patches for p in passes]), torch.cat([p[k].prefix for p in passes]),
                            passes[0][k].grid, passes[0][k].layer) for k in range(len(layers))]
        out, start = [], 0
        for image, n in zip(images, counts):
            layout = self.views.layout(image.image_size)
            row = []
            for tokens in per_layer:
                patches, prefix = tokens.patches[start:start + n], tokens.prefix[start:start + 1]
                if hasattr(self.views, "split"):
                    sequence = self.views.split(patches, image.image_size)
                else:
                    if n != len(layout.views):
                        raise ValueError(f"{self.spec}: the processor made {n} tiles of a {image.image_size[1]}x"
                                         f"{image.image_size[0]} image, the layout expects {len(layout.views)}")
                    sequence = patches.reshape(-1, patches.shape[-1])
                row.append(Tokens(sequence[None], prefix, None, tokens.layer, layout))
            out.append(row)
            start += n
        return out

    def _forward_layers(self, pixels, layers):
        if self.shuffle:
            h, w = pixels.shape[-2:]
            gh, gw = self.tower.grid(pixels)
            if gh != gw:
                raise SpecError(f"InternVL input {h}x{w} gives a non-square {gh}x{gw} patch grid: InternVL tiles are "
                                f"square (its processor cuts {self.tower.native_size[0]}x{self.tower.native_size[1]} "
                                "tiles and the model reshapes its tokens to a square)")
            step = round(1 / self.shuffle)
            if gh % step:
                raise SpecError(f"InternVL input {h}x{w} gives a {gh}x{gw} patch grid that pixel shuffle "
                                f"{self.shuffle} cannot take (the sides must be multiples of {step})")
        output = self.tower.run(pixels)
        grid = self.tower.grid(pixels)
        tokens = [self.tower.split(self.tower.hidden(output, layer), grid, layer) for layer in layers]
        return [pixel_shuffle(t, self.shuffle) for t in tokens] if self.shuffle else tokens

    def _lm_layout(self, layout):
        if self.view == "full" and hasattr(self.views, "lm_layout") and len(layout.views) > 1:
            return self.views.lm_layout(layout)
        return layout

    def _project(self, tokens: Tokens) -> Tokens:
        if self.view == "full" and hasattr(self.views, "project") and len(tokens.layout.views) > 1:
            return self.views.project(tokens, self.projector)
        if not (self.projector_takes_prefix and tokens.num_prefix):
            return super()._project(tokens)
        p = tokens.num_prefix
        projected = self.projector(torch.cat([tokens.prefix, tokens.patches], dim=1))
        return Tokens(projected[:, p:], projected[:, :p], tokens.grid, tokens.layer)

    def _head(self, tokens: Tokens) -> torch.Tensor:
        if self.shuffle:
            return super()._head(tokens)
        try:
            return self.tower.head(tokens, self.head_projection)
        except NotImplementedError:
            return super()._head(tokens)


def pixel_shuffle(tokens: Tokens, ratio: float) -> Tokens:
    """InternVL's space-to-depth: (h, w, D) -> (h*r, w*r, D/r^2); the CLS token is dropped."""
    b, _, d = tokens.patches.shape
    h, w = tokens.grid
    if (h * ratio) % 1 or (w * ratio) % 1 or (d / ratio ** 2) % 1:
        raise SpecError(f"a {h}x{w} patch grid of width {d} cannot be pixel-shuffled by {ratio} "
                        f"(grid sides times {ratio} and width / {ratio}^2 must be whole numbers)")
    x = tokens.patches.reshape(b, h, w, d)
    x = x.reshape(b, h, int(w * ratio), int(d / ratio)).permute(0, 2, 1, 3)
    x = x.reshape(b, int(w * ratio), int(h * ratio), int(d / ratio ** 2)).permute(0, 2, 1, 3)
    grid = (int(h * ratio), int(w * ratio))
    x = x.reshape(b, grid[0] * grid[1], -1)
    return Tokens(x, x[:, :0], grid, tokens.layer)
