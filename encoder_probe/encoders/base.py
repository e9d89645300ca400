"""VisionEncoder and Tokens: the one shape every loader returns and every probe reads.

A loader's whole job is to say where the tokens the MLLM (or the encoder's own head) consumes
come from; probes then never guess "drop one CLS, assume a square 14x14 grid".

Layer numbering follows the HF ``hidden_states`` convention: 0 is the embedding output, k the
output of block k (1-based), negatives count from the end of the *full* tower. ``"final"`` is
the source's own token output after its final norm.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Sequence

import torch
from torch import nn

from ..errors import LayerError, SpecError
from .spec import Spec
from .views import TokenLayout, single_view

Layer = int | str  # an int index, or "final"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)


VIEWS = ("base", "full")


@dataclass
class Tokens:
    """Tokens of one layer. ``patches`` is row-major over ``grid``; ``prefix`` holds CLS/registers.

    ``layout`` (optional for one view, required for several) says where every token sits on the
    original image (:class:`~encoder_probe.encoders.views.TokenLayout`); tokens of several views
    (anyres tiles, InternVL tiles) have ``grid`` None and one image per Tokens.
    """

    patches: torch.Tensor  # (B, N, D): N = h*w, or the layout's token count
    prefix: torch.Tensor  # (B, P, D), P may be 0
    grid: tuple[int, int] | None  # (h, w); None for several views
    layer: Layer
    layout: TokenLayout | None = None

    def __post_init__(self):
        b, n, _ = self.patches.shape
        if self.layout is not None:
            if n != self.layout.num_tokens:
                raise ValueError(f"{n} tokens for a layout of {self.layout.num_tokens}")
            if self.grid is None and len(self.layout.views) == 1:
                self.grid = self.layout.views[0].grid
        elif self.grid is None:
            raise ValueError("tokens need a grid or a layout")
        if self.grid is not None and n != self.grid[0] * self.grid[1]:
            raise ValueError(f"{n} patch tokens do not fill a {self.grid[0]}x{self.grid[1]} grid")

    def to_map(self) -> torch.Tensor:
        """Patch tokens as a (B, D, h, w) feature map (one view; see ``view``)."""
        if self.grid is None:
            raise ValueError(f"tokens of {len(self.layout.views)} views have no single grid: "
                             "take one with .view(name) or paint them with .layout.paint")
        b, _, d = self.patches.shape
        return self.patches.transpose(1, 2).reshape(b, d, *self.grid)

    def view(self, view: int | str) -> "Tokens":
        """The tokens of one view (by index or name), with their one-view layout."""
        if self.layout is None:
            if view in (0, "base"):
                return self
            raise KeyError(f"these tokens have one view (base); no view {view!r}")
        i = self.layout.index(view)
        part = self.patches[:, self.layout.span(i)]
        layout = TokenLayout(self.layout.image_size, (self.layout.views[i],))
        return Tokens(part, self.prefix, self.layout.views[i].grid, self.layer, layout)

    @property
    def num_tokens(self) -> int:
        return self.patches.shape[1]

    @property
    def num_prefix(self) -> int:
        return self.prefix.shape[1]


class _ToRGB:
    """Grayscale, CMYK, palette and alpha images all become 3-channel RGB (picklable for workers)."""

    def __call__(self, image):
        return image if image.mode == "RGB" else image.convert("RGB")


@dataclass(frozen=True)
class Preprocess:
    """The exact preprocessing the source model uses; part of the fingerprint.

    resize="shortest": scale the short side to ``resize_to`` then centre-crop ``size`` (CLIP, timm).
    resize="exact": scale straight to ``size`` (SigLIP, InternVL, Qwen2-VL at a fixed resolution).
    """

    size: tuple[int, int]  # (H, W) of the tensor the tower receives
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize: str = "exact"
    resize_to: int | None = None

    def __post_init__(self):
        if self.resize not in ("exact", "shortest"):
            raise ValueError(f"resize must be 'exact' or 'shortest', got {self.resize!r}")

    @property
    def transform(self):
        from torchvision import transforms as T

        mode = T.InterpolationMode(self.interpolation)
        if self.resize == "exact":
            geometry = [T.Resize(self.size, interpolation=mode, antialias=True)]
        else:
            geometry = [
                T.Resize(self.resize_to or min(self.size), interpolation=mode, antialias=True),
                T.CenterCrop(self.size),
            ]
        return T.Compose([_ToRGB(), *geometry, T.ToTensor(), T.Normalize(self.mean, self.std)])

    def describe(self) -> str:
        h, w = self.size
        how = f"resize to {h}x{w}" if self.resize == "exact" else (
            f"resize short side to {self.resize_to or min(self.size)}, centre-crop {h}x{w}")
        mean = ", ".join(f"{m:.3g}" for m in self.mean)
        std = ", ".join(f"{s:.3g}" for s in self.std)
        return f"{how} ({self.interpolation}), mean ({mean}) std ({std})"


@dataclass
class LayerInfo:
    """What the default layer is and why, for `probe inspect` and results.json."""

    default: Layer
    depth: int  # blocks in the full architecture
    available: int  # blocks present in the checkpoint (a truncated tower has fewer)
    has_final: bool = True  # whether the final norm is there for layer "final"
    note: str = ""
    first: int = 0  # 1 where the source exposes block outputs but not the embedding output


class VisionEncoder:
    """A loaded vision tower with its preprocessing and token layout.

    Subclasses implement ``_forward_layers`` (and ``_project`` / ``_head`` where they have one).
    ``forward_tokens`` does not disable autograd: extraction wraps it in inference mode, gradient
    probes call it with gradients on.
    """

    source: str = ""

    def __init__(
        self,
        *,
        spec: Spec | str,
        module: nn.Module,
        preprocess: Preprocess,
        layers: LayerInfo,
        layer: Layer | None = None,
        projector: nn.Module | None = None,
        with_projector: bool = False,
        details: dict | None = None,
        view: str = "base",
        full_preprocess=None,
    ):
        self.spec = Spec.parse(spec)  # what load_encoder parsed (a str given here is parsed now)
        self.module = module.eval()
        self.projector = projector.eval() if projector is not None else None
        self.preprocess = preprocess
        self.layers = layers
        self.layer = self.resolve_layer(layers.default if layer is None else layer)
        if with_projector and projector is None:
            raise SpecError(f"{spec}: has no projector (with_projector needs an MLLM checkpoint)")
        self.with_projector = with_projector
        self.details = dict(details or {})
        if view not in VIEWS:
            raise SpecError(f"{spec}: unknown view {view!r}; choose base or full")
        if view == "full" and full_preprocess is None:
            raise SpecError(f"{spec}: view 'full' is for MLLM checkpoints with multi-view input (LLaVA-OneVision, "
                            f"LLaVA-NeXT, Qwen2/2.5-VL, InternVL); source {self.source!r} has one view: use base")
        self.view = view
        self.base_preprocess = preprocess
        if view == "full":  # the checkpoint's own image processor (encoders.processors.ProcessorPreprocess)
            self.preprocess = full_preprocess

    # -- public API -------------------------------------------------------------------------
    @property
    def transform(self):
        return self.preprocess.transform

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def to(self, device=None, dtype=None) -> "VisionEncoder":
        for m in (self.module, self.projector):
            if m is not None:
                m.to(device=device, dtype=dtype)
        return self

    def resolve_layer(self, layer: Layer) -> Layer:
        """Normalise a layer request to a non-negative index or "final", or fail clearly."""
        if isinstance(layer, str):
            if layer == "final":
                if not self.layers.has_final:
                    raise LayerError(f"{self.spec}: layer 'final' is not available "
                                     "(the checkpoint has no final norm); pass an integer layer")
                return layer
            try:
                layer = int(layer)
            except ValueError:
                raise LayerError(f"{self.spec}: layer must be an integer or 'final', got {layer!r}")
        depth, available, first = self.layers.depth, self.layers.available, self.layers.first
        index = layer + depth + 1 if layer < 0 else layer
        if not first <= index <= available:
            removed = "" if available == depth else f" (blocks {available + 1}..{depth} were removed)"
            raise LayerError(f"{self.spec}: layer {layer} out of range; this tower has layers "
                             f"{first}..{available} of {depth}{removed}")
        return index

    def forward_tokens(self, pixels: torch.Tensor, layers: Layer | Sequence[Layer] | None = None):
        """Tokens for the default layer, one layer (-> Tokens), or several (-> list[Tokens])."""
        """Tokens for the default layer, one layer (-> Tokens), or several (-> list[Tokens]).

        ``pixels``: a (B, 3, H, W) tensor (view base), or for view full a list of
        :class:`~encoder_probe.encoders.processors.ProcessedImage` (``encoder.transform(image)``);
        then the result is one entry per image, each a Tokens (or list) with its layout.
        """
        single = layers is None or isinstance(layers, (int, str))
        wanted = [self.layer] if layers is None else [layers] if single else list(layers)
        wanted = [self.resolve_layer(layer) for layer in wanted]
        if self.view == "full":
            if isinstance(pixels, torch.Tensor) or not isinstance(pixels, (list, tuple)):
                raise ValueError(f"{self.spec}: view 'full' takes processed images (a list of encoder.transform"
                                 "(image)), not a pixel tensor; use encoder.encode(image)")
            per_image = self._forward_full(list(pixels), wanted)
            if self.with_projector:
                per_image = [[self.project(t) for t in image] for image in per_image]
            return [image[0] if single else image for image in per_image]
        if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must be (B, 3, H, W), got {tuple(getattr(pixels, 'shape', ())) or type(pixels).__name__}")
        pixels = pixels.to(device=self.device, dtype=self.dtype)
        out = self._forward_layers(pixels, wanted)
        if self.with_projector:
            out = [self.project(t) for t in out]
        return out[0] if single else out

    def encode(self, images, layers: Layer | Sequence[Layer] | None = None):
        """PIL image(s) -> Tokens with their layout on the original image, in either view.

        One image gives one Tokens (or list for several layers); a list gives a list.
        """
        one = not isinstance(images, (list, tuple))
        images = [images] if one else list(images)
        if self.view == "full":
            out = self.forward_tokens([self.transform(im) for im in images], layers)
            return out[0] if one else out
        pixels = torch.stack([self.transform(im) for im in images])
        out = self.forward_tokens(pixels, layers)
        layered = [out] if isinstance(out, Tokens) else out
        per_image = [[Tokens(t.patches[i:i + 1], t.prefix[i:i + 1], t.grid, t.layer,
                             self.base_layout((im.height, im.width), t.grid)) for t in layered]
                     for i, im in enumerate(images)]
        per_image = [p[0] if isinstance(out, Tokens) else p for p in per_image]
        return per_image[0] if one else per_image

    def base_layout(self, image_size: tuple[int, int], grid: tuple[int, int]) -> TokenLayout:
        """Where the base view's ``grid`` sits on an image of ``image_size`` (H, W), through the
        base preprocessing (resize, or resize + centre crop) and the part of the input the tokens cover."""
        prep = self.base_preprocess
        h, w = image_size
        ih, iw = prep.size
        ch, cw = self._covered(grid, prep.size)
        if prep.resize == "exact":
            sy, sx, oy, ox = h / ih, w / iw, 0.0, 0.0
        else:  # torchvision: short side to resize_to, then centre crop (offsets rounded as CenterCrop does)
            short = prep.resize_to or min(prep.size)
            rh, rw = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
            sy, sx = h / rh, w / rw
            oy, ox = int(round((rh - ih) / 2.0)) * sy, int(round((rw - iw) / 2.0)) * sx
        return single_view(grid, image_size, (ox, oy, ox + cw * sx, oy + ch * sy))

    def _covered(self, grid: tuple[int, int], size: tuple[int, int]) -> tuple[float, float]:
        """Pixels of a ``size`` input that ``grid`` tokens cover (patch towers drop a remainder)."""
        return float(size[0]), float(size[1])

    def project(self, tokens: Tokens) -> Tokens:
        """What the MLLM's projector makes of these tokens (the LLM's input embeddings)."""
        if self.projector is None:
            raise SpecError(f"{self.spec}: has no projector")
        return self._project(tokens)

    def pool(self, tokens: Tokens, how: str = "cls", view: int | str | None = None) -> torch.Tensor:
        """One vector per image: cls | mean | cls+mean | head (the model's own pooling head).

        Over the whole token sequence (every view), or over one ``view`` (index or name).
        """
        if view is not None:
            tokens = tokens.view(view)
        if how == "mean":
            return tokens.patches.mean(1)
        if how in ("cls", "cls+mean"):
            if tokens.num_prefix == 0:
                raise SpecError(f"{self.spec}: has no CLS token at layer {tokens.layer}; "
                                "use pool 'mean' or 'head'")
            cls = tokens.prefix[:, 0]
            return cls if how == "cls" else torch.cat([cls, tokens.patches.mean(1)], dim=-1)
        if how == "head":
            if tokens.layer != "final":
                raise SpecError(f"{self.spec}: pool 'head' needs tokens of layer 'final', "
                                f"got layer {tokens.layer}")
            return self._head(tokens)
        raise SpecError(f"unknown pooling {how!r}; choose cls, mean, cls+mean or head")

    @cached_property
    def fingerprint(self) -> str:
        """sha256 over everything that changes the tokens: the key of every cache.

        The weights, the resolved architecture (``architecture()``: head counts, norms, patch and
        image size, which the weights' shapes alone do not pin down), the token layout, the
        preprocessing, the layer and whether the projector is applied.
        """
        h = hashlib.sha256()
        meta = {"source": self.source, "layer": self.layer, "with_projector": self.with_projector,
                "preprocess": asdict(self.preprocess), "architecture": self.architecture()}
        if self.view != "base":  # base fingerprints stay what they were
            meta["view"] = self.view
        h.update(json.dumps(meta, sort_keys=True, default=str).encode())
        for module in self._fingerprinted_modules():
            for name, tensor in sorted(module.state_dict().items()):
                t = tensor.detach().to("cpu").contiguous()
                h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy())
        return h.hexdigest()

    def architecture(self) -> dict:
        """The resolved network: its config (HF), every submodule's class and structural settings,
        and the adapter's own token layout (``_layout``). Plain data, stable across processes."""
        return {"adapter": type(self).__name__, "layout": self._layout(),
                **{role: module_architecture(module) for role, module in
                   zip(("tower", "projector"), self._fingerprinted_modules())}}

    def _fingerprinted_modules(self) -> list[nn.Module]:
        return [self.module] + ([self.projector] if self.with_projector else [])

    def describe(self) -> dict:
        """Everything `probe inspect` shows, as plain data."""
        return {
            "spec": self.spec,
            "source": self.source,
            "layer": self.layer,
            "layer_note": self.layers.note,
            "depth": self.layers.depth,
            "available_layers": self.layers.available,
            "with_projector": self.with_projector,
            "view": self.view,
            "preprocess": self.preprocess.describe(),
            "n_params": self.n_params,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            **self.details,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}, layer={self.layer})"

    # -- for subclasses -----------------------------------------------------------------------
    def _forward_layers(self, pixels: torch.Tensor, layers: list[Layer]) -> list[Tokens]:
        raise NotImplementedError

    def _forward_full(self, images: list, layers: list[Layer]) -> list[list[Tokens]]:
        """Per image, per layer: Tokens with their layout (sources with a ``full`` view)."""
        raise SpecError(f"{self.spec}: source {self.source!r} has no full view")

    def lm_layout(self, layout: TokenLayout) -> TokenLayout:
        """The layout of what the MLLM's LM reads for tokens laid out as ``layout``: after the
        projector's 2x2 merge (Qwen) or anyres_max shrink (OneVision); unchanged for projected tokens."""
        return layout if self.with_projector else self._lm_layout(layout)

    def token_counts(self, layout: TokenLayout) -> dict:
        """``layout.counts()`` with ``lm_tokens`` what the LM reads (``lm_layout``), newlines included."""
        return {**layout.counts(), "lm_tokens": self.lm_layout(layout).lm_tokens}

    def _lm_layout(self, layout: TokenLayout) -> TokenLayout:
        return layout

    def lm_sequence(self, tokens: Tokens) -> torch.Tensor:
        """(B, lm_tokens, D): projected tokens with the MLLM's newline vectors where the LM reads them."""
        if tokens.layout is None or not tokens.layout.num_newlines:
            return tokens.patches
        newline = getattr(self, "newline", None)
        if newline is None:
            raise SpecError(f"{self.spec}: the checkpoint has no image_newline weight")
        return torch.stack([tokens.layout.with_newlines(p, newline) for p in tokens.patches])

    def _project(self, tokens: Tokens) -> Tokens:
        projected = self.projector(tokens.patches)
        return Tokens(projected, projected[:, :0], tokens.grid, tokens.layer, tokens.layout)

    def _head(self, tokens: Tokens) -> torch.Tensor:
        raise SpecError(f"{self.spec}: source {self.source!r} has no pooling head; "
                        "use pool cls, mean or cls+mean")

    def _layout(self) -> dict:
        """Adapter settings that change the tokens beyond the module itself (prefix split, shuffles)."""
        return {}


# module attributes that say how a module runs, not what it computes
_RUNTIME_ATTRIBUTES = frozenset({"training", "fused_attn", "grad_checkpointing", "gradient_checkpointing",
                                 "is_hf_initialized", "name_or_path"})
# config keys that name where or with what a model was saved, not what it is
_VOLATILE_CONFIG = frozenset({"transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype",
                              "_attn_implementation_autoset", "_attn_implementation", "_commit_hash",
                              "output_hidden_states", "output_attentions", "return_dict", "use_cache"})


def _plain(value):
    """A JSON-stable form of a settings value, or None when it is not plain data."""
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (tuple, list)):
        items = [_plain(v) for v in value]
        return items if all(i is not None or v is None for i, v in zip(items, value)) else None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))
                if str(k) not in _VOLATILE_CONFIG}
    return None


def module_architecture(module: nn.Module) -> dict:
    """What a module computes apart from its weights: the HF config when it has one, and every
    submodule's class with its plain settings (``num_heads``, ``eps``, ``patch_size`` ...).

    timm keeps head counts only as attributes, HF only in the config; hashing both is what lets
    two loads of one weights file with different head counts get different fingerprints.
    """
    config = getattr(module, "config", None)
    out = {"config": _plain(config.to_dict())} if hasattr(config, "to_dict") else {}
    structure = []
    for name, sub in module.named_modules():
        settings = {k: _plain(v) for k, v in vars(sub).items()
                    if not k.startswith("_") and k not in _RUNTIME_ATTRIBUTES and k != "config"}
        structure.append([name, f"{type(sub).__module__}.{type(sub).__qualname__}",
                          {k: v for k, v in sorted(settings.items()) if v is not None}])
    out["modules"] = structure
    return out
