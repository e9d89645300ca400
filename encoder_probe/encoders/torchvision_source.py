"""`torchvision:NAME[@WEIGHTS]`: torchvision classification CNNs with a ``features`` stage stack.

Layer k is the output of ``features[k-1]`` (MobileNet, EfficientNet, VGG, ConvNeXt... all keep
their trunk there); "final" is the whole trunk. Feature maps become a token grid with no
prefix. WEIGHTS is a weights-only file, or ``imagenet`` for the built-in asset (verified by
sha256, loaded strictly), with the preprocessing published for exactly those weights.
"""
from __future__ import annotations

import torch

from ..errors import SpecError
from .base import LayerInfo, Preprocess, VisionEncoder
from .checkpoint import CheckpointReader, load_into
from .sources import Source
from .timm_source import _map_tokens

# name -> (asset, torchvision weights enum member whose file the asset is)
BUILTIN_WEIGHTS = {"mobilenet_v2": ("mobilenet_v2-imagenet", "IMAGENET1K_V1")}


def _preprocess(name: str, member: str | None) -> Preprocess:
    import torchvision
    enum = torchvision.models.get_model_weights(name)
    t = (enum[member] if member else enum.DEFAULT).transforms()
    crop, resize = t.crop_size[0], t.resize_size[0]
    return Preprocess((crop, crop), tuple(t.mean), tuple(t.std), t.interpolation.value, "shortest", resize)


class TorchvisionEncoder(VisionEncoder):
    source = "torchvision"

    def _forward_layers(self, pixels, layers):
        wanted = {self.layers.available if layer == "final" else layer for layer in layers}
        outs, x = {}, pixels
        for k, stage in enumerate(self.module.features, 1):
            x = stage(x)
            if k in wanted:
                outs[k] = x
            if k >= max(wanted):
                break
        return [_map_tokens(outs[self.layers.available if layer == "final" else layer], layer) for layer in layers]

    def _head(self, tokens):
        """The model's own pooling before its classifier: global average of the final map."""
        return tokens.patches.mean(1)


def load(name: str, weights=None, *, spec: str, layer=None, with_projector=False):
    import torchvision

    if name not in torchvision.models.list_models(torchvision.models):
        raise SpecError(f"torchvision: unknown classification model {name!r}")
    model = torchvision.models.get_model(name, weights=None)
    if not isinstance(getattr(model, "features", None), torch.nn.Sequential):
        raise SpecError(f"torchvision: {name} has no `features` stage stack to read tokens from")
    member = None
    if weights is not None:
        if weights == "imagenet":
            if name not in BUILTIN_WEIGHTS:
                raise SpecError(f"torchvision: no built-in imagenet weights for {name} "
                                f"(built in: {', '.join(BUILTIN_WEIGHTS)})")
            from ..assets import asset_path
            asset, member = BUILTIN_WEIGHTS[name]
            weights = str(asset_path(asset))
        reader = CheckpointReader(weights)
        load_into(model, reader.load(reader.keys()), source=weights)
    depth = len(model.features)
    return TorchvisionEncoder(
        spec=spec, module=model, preprocess=_preprocess(name, member),
        layers=LayerInfo("final", depth, depth, note="output of the features trunk", first=1),
        layer=layer, with_projector=with_projector,
        details={"architecture": f"torchvision {name}", "weights": weights or "random init"},
    )


SOURCE = Source(name="torchvision", load=load, detect_order=60,
                description="torchvision CNNs: torchvision:NAME (random init), NAME@weights.pth, "
                "or NAME@imagenet (built-in: " + ", ".join(BUILTIN_WEIGHTS) + ")", takes_weights=True)
