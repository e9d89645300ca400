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
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn


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


class GradCAM(TokenAttribution):
    """ReLU(sum_c alpha_c A_c), alpha_c = spatial mean of dS/dA_c (Selvaraju et al.), on the token grid."""

    name = "gradcam"

    @staticmethod
    def from_gradients(act, grad):
        weights = grad.mean(dim=(2, 3), keepdim=True)
        return torch.relu((weights * act).sum(1))


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
