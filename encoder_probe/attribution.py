"""Gradient maps on the token grid: Grad-CAM, the PIVOT gradient norm, gradient x activation.

Every method attributes a per-image score to the patch tokens of one layer, read through the
token-layout adapter (``Tokens``: prefix split off, row-major ``grid``), so CLS, no-CLS
(SigLIP), register and non-square layouts all give an (h, w) map; nothing assumes "1 CLS + 14x14"
as pytorch-grad-cam's ViT recipe does.

A *target* says which tokens and which score::

    target.tokens(pixels) -> Tokens        # the attributed layer (may run without a graph)
    target.score(tokens, rows) -> (B,)     # a differentiable score of those tokens per image

The patch tokens pass through :class:`TokenLayer`, an identity on the (B, D, h, w) token map that
captum hooks (``captum.attr.LayerGradCam`` etc. accept it as ``layer``). Layer gradients and
activations come from captum's layer machinery in one batched forward/backward; when the
target's tokens were computed without a graph (a head on the layer's own tokens, an MLLM loss
on the projector output), the backward stops at the layer instead of running through the tower.

Maps come back raw, (B, h, w) float32: their magnitude is part of the result (PIVOT compares
gradient norms across checkpoints); normalise only for pictures (:func:`minmax`).

View ``full`` (several views per image, a variable number of tokens): :func:`sequence_gradients`
takes activations and gradients per token over each image's (N, D) sequence and every method has
a ``from_sequence(act, grad, layout) -> (N,)``: gradient norm and gradient x activation per token,
Grad-CAM *per view* (channel weights = the mean gradient over the tokens of each view). The token
maps stay raw; ``layout.paint`` (bilinear) puts them on the original image for pictures and scores.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from .encoders.base import Tokens
from .encoders.views import TokenLayout
from .runtime import keep_freed_memory


class TokenLayer(nn.Module):
    """Identity on the (B, D, h, w) token map: the layer captum hooks.

    Tokens computed without a graph become a leaf that requires grad here, so the backward
    starts and ends between this layer and the score.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.requires_grad else x.detach().requires_grad_()


def score_through(layer: TokenLayer, target, pixels: torch.Tensor, rows):
    """The forward function captum sees: pixels -> tokens -> TokenLayer(map) -> target score (B,)."""
    tokens = target.tokens(pixels)
    b, n, d = tokens.patches.shape
    fmap = layer(tokens.to_map())
    tokens = replace(tokens, patches=fmap.reshape(b, d, n).transpose(1, 2))
    return target.score(tokens, rows)


def token_gradients(target, pixels: torch.Tensor, rows=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(activations, gradients) of the target's score at its token layer, each (B, D, h, w) float32.

    One batched forward and backward; images are independent (eval mode), so the gradient of the
    batch's summed score at image i is the gradient of image i's own score.
    """
    from captum._utils.gradient import compute_layer_gradients_and_eval

    keep_freed_memory()  # idempotent: the backward's buffers are not re-faulted every batch
    layer = TokenLayer()
    with torch.enable_grad():
        grads, evals = compute_layer_gradients_and_eval(
            lambda x: score_through(layer, target, x, rows), layer, (pixels,))
    grad, act = grads[0], evals[0]
    if grad is None:
        raise RuntimeError("the target's score does not depend on the attributed tokens")
    return act.detach().float(), grad.detach().float()


class TokenAttribution:
    """captum-style: ``Method(target).attribute(pixels, rows) -> (B, h, w)`` raw map."""

    name = ""
    signed = False  # whether the map can be negative (localisation uses its positive part)

    def __init__(self, target):
        self.target = target

    def attribute(self, pixels: torch.Tensor, rows=None) -> torch.Tensor:
        return self.from_gradients(*token_gradients(self.target, pixels, rows))

    @staticmethod
    def from_gradients(act: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def from_sequence(cls, act: torch.Tensor, grad: torch.Tensor, layout) -> torch.Tensor:
        """View full: (N, D) activations and gradients of one image -> (N,) raw per-token map. Channels
        are axis 1 in both shapes, so a per-token method is its ``from_gradients``; Grad-CAM overrides."""
        return cls.from_gradients(act, grad)


class GradCAM(TokenAttribution):
    """ReLU(sum_c alpha_c A_c), alpha_c = spatial mean of dS/dA_c (Selvaraju et al.), on the token grid."""

    name = "gradcam"

    @staticmethod
    def from_gradients(act, grad):
        weights = grad.mean(dim=(2, 3), keepdim=True)
        return torch.relu((weights * act).sum(1))

    @staticmethod
    def from_sequence(act, grad, layout):
        """Grad-CAM per view: alpha_{v,c} = mean of dS/dA_c over the tokens of view v, then
        ReLU(sum_c alpha_{v(t),c} A_{t,c}) for every token t. Each view is its own token grid (the
        base view, the stitched anyres tiles, every InternVL tile, the thumbnail), as Selvaraju et
        al.'s spatial mean runs over one feature map; for a one-view layout this is exactly the
        (h, w) Grad-CAM above. (One mean over all tokens would let the view with the most tokens
        set every view's channel weights.)"""
        ids = layout.view_ids().to(act.device)
        counts = torch.bincount(ids, minlength=len(layout.views)).clamp(min=1).to(grad.dtype)
        weights = torch.zeros(len(layout.views), grad.shape[1], dtype=grad.dtype, device=grad.device)
        weights = weights.index_add_(0, ids, grad) / counts[:, None]
        return torch.relu((weights[ids] * act).sum(1))


class GradientNorm(TokenAttribution):
    """PIVOT's map: the per-token L1 norm over channels of dS/d(tokens)."""

    name = "gradient-norm"

    @staticmethod
    def from_gradients(act, grad):
        return grad.abs().sum(1)


class GradientXActivation(TokenAttribution):
    """sum_c A_c dS/dA_c per token (captum's LayerGradientXActivation, summed over channels); signed."""

    name = "grad-x-act"
    signed = True

    @staticmethod
    def from_gradients(act, grad):
        return (act * grad).sum(1)


METHODS = {m.name: m for m in (GradCAM, GradientNorm, GradientXActivation)}


def attribute_all(target, pixels: torch.Tensor, rows=None, methods=tuple(METHODS)) -> dict[str, torch.Tensor]:
    """Every method's (B, h, w) map from one shared forward/backward."""
    act, grad = token_gradients(target, pixels, rows)
    return {name: METHODS[name].from_gradients(act, grad) for name in methods}


def minmax(maps: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Per-map min-max to [0, 1] (a new tensor; for pictures only, raw maps keep their scale)."""
    flat = maps.flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - lo) / (hi - lo + eps)).reshape(maps.shape)


# -- view "full": per-token attribution over a ragged sequence ------------------------------------
# Tokens of several views (LLaVA-OneVision/NeXT base + anyres tiles, InternVL tiles + thumbnail,
# Qwen's native grid) have no single (h, w) map: every image is one Tokens of (1, N_i, D) with a
# TokenLayout. Activations and gradients are taken over that (N_i, D) sequence, every method
# gives one value per token, and ``TokenLayout.paint`` puts the token map back on the photo.

@dataclass
class SequenceGradients:
    """One image's activations and score gradients at the target's tokens: (N, D) float32 each."""

    act: torch.Tensor
    grad: torch.Tensor
    layout: TokenLayout

    def paint(self, values: torch.Tensor, size=None, mode: str = "bilinear") -> torch.Tensor:
        """A per-token map (N,) -> (H, W) on the original image (or ``size``) through the token boxes."""
        return self.layout.paint(values, size, mode=mode)


def sequence_gradients(target, images, rows=None) -> list[SequenceGradients]:
    """Per-image (activations, gradients) over the token sequence of a multi-view encoder.

    ``images``: what the target's ``tokens`` takes for view full (a list of
    ``encoder.transform(image)``); ``target.tokens(images)`` gives one Tokens per image (batch 1,
    with a layout) and ``target.score(tokens_i, rows[i:i+1])`` that image's score. One backward
    of the summed scores; images are independent, so each gradient is its own image's.
    """
    layer = TokenLayer()
    with torch.enable_grad():
        per_image = target.tokens(images)
        per_image = [per_image] if isinstance(per_image, Tokens) else list(per_image)
        if any(t.layout is None or t.patches.shape[0] != 1 for t in per_image):
            raise ValueError("sequence_gradients needs one Tokens (batch 1, with a layout) per image")
        xs = [layer(t.patches) for t in per_image]
        total = sum(target.score(replace(t, patches=x), None if rows is None else rows[i:i + 1]).sum()
                    for i, (t, x) in enumerate(zip(per_image, xs)))
        grads = torch.autograd.grad(total, xs, allow_unused=True)
    if all(g is None for g in grads):
        raise RuntimeError("the target's score does not depend on the attributed tokens")
    return [SequenceGradients(x.detach()[0].float(), (torch.zeros_like(x) if g is None else g)[0].detach().float(),
                              t.layout) for t, x, g in zip(per_image, xs, grads)]


def attribute_sequence(target, images, rows=None, methods=tuple(METHODS)) -> tuple[dict, list]:
    """Every method's per-token maps (a list of (N_i,) per method) and the images' layouts, from
    one shared forward/backward (view full)."""
    per_image = sequence_gradients(target, images, rows)
    maps = {name: [METHODS[name].from_sequence(g.act, g.grad, g.layout) for g in per_image] for name in methods}
    return maps, [g.layout for g in per_image]
