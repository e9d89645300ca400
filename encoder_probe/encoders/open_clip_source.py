"""`open_clip:ARCH[@weights]`: the image tower of an open_clip model.

Native ViTs read their blocks through ``forward_intermediates`` (layer "final" = last block after
``ln_post``, what the pooled embedding is made from); towers with a timm trunk (SigLIP,
ConvNeXt, ...) read the trunk. The text tower stays loaded for image-text targets.
The model is built with ``pretrained=None`` on purpose (random init, or the ``@weights`` we load
ourselves; ``describe()["weights"]`` says which), so open_clip's random-init warning is silenced.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager

import torch

from ..errors import SpecError
from .base import LayerInfo, Preprocess, Tokens, VisionEncoder
from .checkpoint import CheckpointReader, load_into
from .sources import Source
from .timm_source import timm_head, timm_tokens

_RESIZE = {"shortest": "shortest", "squash": "exact"}


class OpenClipEncoder(VisionEncoder):
    source = "open_clip"

    def __init__(self, *, clip_model, **kwargs):
        self.clip_model = clip_model
        super().__init__(**kwargs)

    @property
    def trunk(self):
        return getattr(self.module, "trunk", None)

    def _forward_layers(self, pixels, layers):
        if self.trunk is not None:
            return timm_tokens(self.trunk, pixels, layers)
        visual = self.module
        indices = sorted({layer - 1 for layer in layers if layer != "final"} | (
            {self.layers.depth - 1} if "final" in layers else set()))
        out = visual.forward_intermediates(pixels, indices=indices, output_fmt="NLC", output_extra_tokens=True,
                                           intermediates_only=True)
        grid = (pixels.shape[-2] // visual.patch_size[0], pixels.shape[-1] // visual.patch_size[1])
        found = dict(zip(indices, zip(out["image_intermediates"], out["image_intermediates_prefix"])))
        tokens = []
        for layer in layers:
            if layer == "final":
                patches, prefix = found[self.layers.depth - 1]
                hidden = visual.ln_post(torch.cat([prefix, patches], 1))
                tokens.append(Tokens(hidden[:, 1:], hidden[:, :1], grid, "final"))
            else:
                patches, prefix = found[layer - 1]
                tokens.append(Tokens(patches, prefix, grid, layer))
        return tokens

    def _head(self, tokens):
        if self.trunk is not None:
            pooled = timm_head(self.trunk, tokens)
            return self.module.head(pooled)
        visual = self.module
        if visual.attn_pool is not None or visual.final_ln_after_pool:
            return super()._head(tokens)
        pooled, _ = visual._global_pool(torch.cat([tokens.prefix, tokens.patches], 1))
        return pooled @ visual.proj if visual.proj is not None else pooled


class _DropRandomInitWarning:
    """A logging filter that drops open_clip's "No pretrained weights loaded ... initialized randomly"."""

    def filter(self, record) -> bool:
        return not (record.name == "root" and str(record.msg).startswith("No pretrained weights loaded"))


@contextmanager
def _no_random_init_warning():
    """Silence open_clip's random-init warning around ``create_model(pretrained=None)``.

    open_clip logs it through the *root* logger (``logging.warning``), which also calls
    ``logging.basicConfig()`` when root has no handler: a stderr handler would stay installed
    for the whole process. A NullHandler keeps root configured-looking meanwhile, and the
    filter drops just that record; both are removed afterwards.
    """
    root = logging.getLogger()
    guard = logging.NullHandler() if not root.handlers else None
    drop = _DropRandomInitWarning()
    if guard is not None:
        root.addHandler(guard)
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)
        if guard is not None:
            root.removeHandler(guard)


def load(arch: str, weights=None, *, spec: str, layer=None, with_projector=False):
    import open_clip
    from open_clip.transformer import VisionTransformer

    if arch not in open_clip.list_models():
        raise SpecError(f"open_clip: unknown architecture {arch!r} (see open_clip.list_models())")
    with _no_random_init_warning():  # random init (or our own weights, loaded next) is what we asked for
        model = open_clip.create_model(arch, pretrained=None)
    if weights is not None:
        reader = CheckpointReader(weights)
        state = reader.load(reader.keys())
        if all(k.startswith("module.") for k in state):
            state = {k.removeprefix("module."): v for k, v in state.items()}
        load_into(model, state, source=weights)
    visual = model.visual
    if not isinstance(visual, VisionTransformer) and not hasattr(visual, "trunk"):
        raise SpecError(f"open_clip: {arch}'s image tower ({type(visual).__name__}) is not supported "
                        "(ViT and timm-trunk towers are)")
    cfg = visual.preprocess_cfg
    if cfg.get("resize_mode", "shortest") not in _RESIZE:
        raise SpecError(f"open_clip: {arch} uses resize mode {cfg['resize_mode']!r}, not supported")
    size = tuple(cfg["size"]) if isinstance(cfg["size"], (tuple, list)) else (cfg["size"], cfg["size"])
    preprocess = Preprocess(size, tuple(cfg["mean"]), tuple(cfg["std"]), cfg.get("interpolation", "bicubic"),
                            _RESIZE[cfg.get("resize_mode", "shortest")], min(size))
    depth = len(visual.trunk.feature_info) if hasattr(visual, "trunk") else len(visual.transformer.resblocks)
    return OpenClipEncoder(
        clip_model=model, spec=spec, module=visual, preprocess=preprocess,
        layers=LayerInfo("final", depth, depth, note="last block after the final norm", first=1),
        layer=layer, with_projector=with_projector,
        details={"architecture": f"open_clip {arch} ({type(visual).__name__})", "weights": weights or "random init"},
    )


SOURCE = Source(name="open_clip", load=load, detect_order=70,
                description="open_clip image towers: open_clip:ARCH (random init) or "
                "open_clip:ARCH@weights", takes_weights=True)
