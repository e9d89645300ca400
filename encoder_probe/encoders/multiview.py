"""The ``full`` view of the HF-ViT MLLMs: every token the LM reads, laid out on the image.

- :class:`AnyresViews` (LLaVA-OneVision, LLaVA-NeXT): the base view, then the anyres tiles
  stitched into one grid and unpadded, an ``image_newline`` after each of its rows; OneVision
  also shrinks that grid (bilinear, after the projector) when it exceeds ``anyres_max_N``.
- :class:`TileViews` (InternVL): every 448 px tile in order, then the thumbnail.

The pixels come from the checkpoint's own image processor (:mod:`.processors`); which tiles it
made is recomputed here with transformers' own helpers (``select_best_resolution``,
``get_patch_output_size``, ``unpad_image``, ``get_optimal_tiled_canvas``), so a layout can never
disagree with the processor or the model about where a token sits.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .base import Tokens
from .views import TokenLayout, View


def _spans(edges) -> tuple[tuple[float, float], ...]:
    return tuple((float(a), float(b)) for a, b in edges)


def resample_spans(spans, n_out: int) -> tuple[tuple[float, float], ...]:
    """Spans of a bilinear resize (align_corners=False) of a token axis to ``n_out`` tokens: output
    token i covers fractional input tokens [i n/n_out, (i+1) n/n_out], mapped through the input spans."""
    n = len(spans)
    lo = np.array([s[0] for s in spans])
    hi = np.array([s[1] for s in spans])

    def at(f):
        k = min(int(f), n - 1)
        return lo[k] + (hi[k] - lo[k]) * (f - k)

    return tuple((float(at(i * n / n_out)), float(at((i + 1) * n / n_out))) for i in range(n_out))


class AnyresViews:
    """LLaVA-OneVision / LLaVA-NeXT anyres: geometry from the model's own config and functions."""

    def __init__(self, config, *, max_tiles: int | None):
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image
        self._grid_shape, self._unpad = get_anyres_image_grid_shape, unpad_image
        self.pinpoints = [list(p) for p in config.image_grid_pinpoints]
        self.tile = config.vision_config.image_size
        self.patch = config.vision_config.patch_size
        self.side = self.tile // self.patch  # the model's own formula: 384 // 14 = 27
        self.max_tiles = max_tiles  # OneVision's anyres_max_N; None for LLaVA-NeXT (no shrinking)

    def settings(self) -> dict:
        return {"kind": "anyres", "pinpoints": self.pinpoints, "tile": self.tile, "max_tiles": self.max_tiles}

    def tile_grid(self, image_size) -> tuple[int, int]:
        """(rows, cols) of tiles the processor cuts for an image of (H, W)."""
        return tuple(self._grid_shape(list(image_size), self.pinpoints, self.tile))

    def layout(self, image_size) -> TokenLayout:
        """Base view + the unpadded tile grid, as the LM reads them (before any anyres_max shrink)."""
        from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
        from transformers.image_utils import ChannelDimension
        h, w = image_size
        g, p, t = self.side, self.patch, self.tile
        covered = g * p / t  # the patch conv floors: 27 x 14 = 378 of 384 px
        base = View.uniform("base", (g, g), (0.0, 0.0, w * covered, h * covered))
        bh, bw = select_best_resolution((h, w), self.pinpoints)
        nh, nw = get_patch_output_size(np.empty((h, w, 1), np.uint8), (bh, bw), ChannelDimension.LAST)
        py, px = (bh - nh) // 2, (bw - nw) // 2  # where the resized image sits on the padded canvas
        rows, cols = self.tile_grid(image_size)
        # canvas pixel edges of every token of the stitched grid (tile seams leave t - g p uncovered)
        ys = [(r // g * t + r % g * p, r // g * t + (r % g + 1) * p) for r in range(rows * g)]
        xs = [(c // g * t + c % g * p, c // g * t + (c % g + 1) * p) for c in range(cols * g)]
        kept = self._unpad(torch.arange(rows * g * cols * g).reshape(1, rows * g, cols * g), [h, w])[0]
        r0, c0 = int(kept[0, 0]) // (cols * g), int(kept[0, 0]) % (cols * g)
        ys, xs = ys[r0:r0 + kept.shape[0]], xs[c0:c0 + kept.shape[1]]
        to_y, to_x = h / nh, w / nw
        tiles = View("tiles", _spans(((a - py) * to_y, (b - py) * to_y) for a, b in ys),
                     _spans(((a - px) * to_x, (b - px) * to_x) for a, b in xs), newline=True)
        return TokenLayout((h, w), (base, tiles))

    def split(self, features: torch.Tensor, image_size) -> torch.Tensor:
        """(tiles, g*g, D) tower tokens of one image -> (N, D) in LM order: base, then unpadded tiles."""
        g = self.side
        rows, cols = self.tile_grid(image_size)
        grid = features[1:].reshape(rows, cols, g, g, -1).permute(4, 0, 2, 1, 3).reshape(-1, rows * g, cols * g)
        grid = self._unpad(grid, list(image_size))
        return torch.cat([features[0], grid.flatten(1).T])

    def lm_layout(self, layout: TokenLayout) -> TokenLayout:
        """What the LM reads: OneVision shrinks a tile grid of more than 1.1^2 x anyres_max_N tiles'
        tokens to ``int(side // ratio)`` per side (the model's pack_image_features formula)."""
        base, tiles = layout.views
        if self.max_tiles is None:
            return layout
        h, w = tiles.grid
        ratio = math.sqrt(h * w / (self.max_tiles * self.side ** 2))
        if ratio <= 1.1:
            return layout
        size = (int(h // ratio), int(w // ratio))
        tiles = View("tiles", resample_spans(tiles.rows, size[0]), resample_spans(tiles.cols, size[1]), newline=True)
        return TokenLayout(layout.image_size, (base, tiles))

    def project(self, tokens: Tokens, projector) -> Tokens:
        """The projector per token, then OneVision's shrink of the tile grid (bilinear, on projected
        tokens, as the model's pack_image_features does it)."""
        projected = projector(tokens.patches)
        layout = self.lm_layout(tokens.layout)
        base, tiles = tokens.layout.views
        if layout.views[1].grid != tiles.grid:
            b, _, d = projected.shape
            grid = projected[:, base.size:].transpose(1, 2).reshape(b, d, *tiles.grid)
            grid = F.interpolate(grid, list(layout.views[1].grid), mode="bilinear")
            projected = torch.cat([projected[:, :base.size], grid.flatten(2).transpose(1, 2)], dim=1)
        return Tokens(projected, projected[:, :0], None, tokens.layer, layout)


class TileViews:
    """InternVL's dynamic tiles: ``cols x rows`` tiles of the squashed image, then a thumbnail."""

    def __init__(self, processor_options: dict, tile: int, tokens_side: int, covered: float):
        self.min_tiles = int(processor_options.get("min_patches", 1))
        self.max_tiles = int(processor_options.get("max_patches", 12))
        self.thumbnail = bool(processor_options.get("use_thumbnail", True))
        self.tile, self.side, self.covered = tile, tokens_side, covered

    def settings(self) -> dict:
        return {"kind": "tiles", "min": self.min_tiles, "max": self.max_tiles, "thumbnail": self.thumbnail}

    def tile_grid(self, image_size) -> tuple[int, int]:
        from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas
        cols, rows = get_optimal_tiled_canvas(tuple(image_size), (self.tile, self.tile), self.min_tiles, self.max_tiles)
        return rows, cols

    def layout(self, image_size) -> TokenLayout:
        h, w = image_size
        rows, cols = self.tile_grid(image_size)
        g, c = self.side, self.covered
        views = []
        for i in range(rows * cols):
            r, q = divmod(i, cols)
            x0, y0 = q * w / cols, r * h / rows
            views.append(View.uniform(f"tile {i + 1}", (g, g), (x0, y0, x0 + c * w / cols, y0 + c * h / rows)))
        if self.thumbnail and rows * cols > 1:
            views.append(View.uniform("thumbnail", (g, g), (0.0, 0.0, c * w, c * h)))
        return TokenLayout((h, w), tuple(views))

