"""Where every token sits: views (base, anyres tiles, InternVL tiles, Qwen's native grid) and
their boxes on the original image.

An MLLM reads an image as one or more *views*: a grid of tokens that uniformly covers a
rectangle of the image. LLaVA-OneVision / LLaVA-NeXT read the squashed base view, then the
anyres tiles stitched into one grid and unpadded; InternVL reads its tiles row by row and a
thumbnail; Qwen2/2.5-VL read one grid at native resolution. A ``TokenLayout`` lists the views in
the order the projector's output is fed to the LM, with each view's box in the ORIGINAL image's
pixel coordinates (x0, y0, x1, y1; a box may reach past the image where the model padded).

From the layout alone: the box and view of every token, the LM's token count (with
``image_newline`` tokens), and ``paint``, which puts per-token values back onto the photo the
way the model laid them out (``grid_sample`` over each view's box; views that overlap, such as
a base view and the tiles, are averaged).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F

Box = tuple[float, float, float, float]


Span = tuple[float, float]


@dataclass(frozen=True)
class View:
    """A row-major token grid: token (r, c) covers ``cols[c]`` x ``rows[r]`` of the original image.

    Separable intervals rather than one box: anyres tiles stitched into one grid have a gap at
    every tile seam (SigLIP/14 covers 378 of each 384 px tile), and unpadding cuts the grid
    anywhere. ``View.uniform`` is the common case of one box split evenly.
    """

    name: str  # "base", "tiles", "tile 3", "thumbnail", "image"
    rows: tuple[Span, ...]  # (y0, y1) of every token row
    cols: tuple[Span, ...]  # (x0, x1) of every token column
    newline: bool = False  # the LM reads an image_newline token after each row of this view

    @classmethod
    def uniform(cls, name: str, grid: tuple[int, int], box: Box, newline: bool = False) -> "View":
        (h, w), (x0, y0, x1, y1) = grid, box
        return cls(name, _even(y0, y1, h), _even(x0, x1, w), newline)

    @property
    def grid(self) -> tuple[int, int]:
        return len(self.rows), len(self.cols)

    @property
    def size(self) -> int:
        return len(self.rows) * len(self.cols)

    @property
    def box(self) -> Box:
        return self.cols[0][0], self.rows[0][0], self.cols[-1][1], self.rows[-1][1]

    def boxes(self) -> torch.Tensor:
        """(h*w, 4) float64 box of every token, row-major."""
        rows = torch.tensor(self.rows, dtype=torch.float64)
        cols = torch.tensor(self.cols, dtype=torch.float64)
        r, c = torch.meshgrid(torch.arange(len(self.rows)), torch.arange(len(self.cols)), indexing="ij")
        r, c = r.reshape(-1), c.reshape(-1)
        return torch.stack([cols[c, 0], rows[r, 0], cols[c, 1], rows[r, 1]], dim=1)

    def covers(self, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        """(H, W) bool: which of the pixel centres (``TokenLayout.pixel_centres``) lie in this view's box."""
        x0, y0, x1, y1 = self.box
        return ((ys >= y0) & (ys <= y1))[:, None] & ((xs >= x0) & (xs <= x1))[None, :]

    def to_dict(self) -> dict:
        """Plain data: a grid and a box when the view is uniform (the usual case), else every span."""
        if View.uniform(self.name, self.grid, self.box, self.newline) == self:
            return {"name": self.name, "grid": list(self.grid), "box": list(self.box), "newline": self.newline}
        return {"name": self.name, "rows": [list(s) for s in self.rows], "cols": [list(s) for s in self.cols],
                "newline": self.newline}

    @classmethod
    def from_dict(cls, d: dict) -> "View":
        if "box" in d:
            return cls.uniform(d["name"], tuple(d["grid"]), tuple(d["box"]), bool(d.get("newline", False)))
        return cls(d["name"], tuple(tuple(s) for s in d["rows"]), tuple(tuple(s) for s in d["cols"]),
                   bool(d.get("newline", False)))


def _even(a: float, b: float, n: int) -> tuple[Span, ...]:
    step = (b - a) / n
    return tuple((float(a + i * step), float(a + (i + 1) * step)) for i in range(n))


def fractional_index(x: torch.Tensor, spans: tuple[Span, ...]) -> torch.Tensor:
    """Map coordinates to fractional token index (token k spans [k, k+1)), piecewise linear over
    the spans; coordinates in a seam between two tokens go to the seam's midpoint."""
    lo = torch.tensor([s[0] for s in spans], dtype=torch.float64, device=x.device)
    hi = torch.tensor([s[1] for s in spans], dtype=torch.float64, device=x.device)
    k = torch.searchsorted(hi, x, right=True).clamp(max=len(spans) - 1)  # first token ending after x
    inside = x >= lo[k]
    frac = k + ((x - lo[k]) / (hi[k] - lo[k])).clamp(0, 1)
    return torch.where(inside, frac, k.to(x.dtype))  # in a seam: the boundary between k-1 and k


@dataclass(frozen=True)
class TokenLayout:
    """The views of one image in LM order; ``image_size`` is the original (H, W)."""

    image_size: tuple[int, int]
    views: tuple[View, ...]

    def __post_init__(self):
        if not self.views:
            raise ValueError("a token layout needs at least one view")

    # -- counts -----------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        """Visual tokens (what ``Tokens.patches`` holds)."""
        return sum(v.size for v in self.views)

    @property
    def num_newlines(self) -> int:
        return sum(v.grid[0] for v in self.views if v.newline)

    @property
    def lm_tokens(self) -> int:
        """Tokens the MLLM inserts into the LM sequence for this image: visual tokens + newlines."""
        return self.num_tokens + self.num_newlines

    def counts(self) -> dict:
        """Per view token counts and grids, for `probe inspect` and results.json."""
        return {"views": [{"name": v.name, "grid": f"{v.grid[0]}x{v.grid[1]}", "tokens": v.size,
                           "newlines": v.grid[0] if v.newline else 0} for v in self.views],
                "visual_tokens": self.num_tokens, "lm_tokens": self.lm_tokens}

    # -- positions --------------------------------------------------------------------------------
    def offsets(self) -> list[int]:
        out, start = [], 0
        for v in self.views:
            out.append(start)
            start += v.size
        return out

    def index(self, view: int | str) -> int:
        """A view's position from its index or name."""
        if isinstance(view, int) and not isinstance(view, bool):
            if not -len(self.views) <= view < len(self.views):
                raise IndexError(f"view {view} out of range: this layout has {len(self.views)} views")
            return view % len(self.views)
        names = [v.name for v in self.views]
        if view not in names:
            raise KeyError(f"no view {view!r} (views: {', '.join(names)})")
        return names.index(view)

    def span(self, view: int | str) -> slice:
        """The slice of ``Tokens.patches`` that holds one view."""
        i = self.index(view)
        start = self.offsets()[i]
        return slice(start, start + self.views[i].size)

    def view_ids(self) -> torch.Tensor:
        """(N,) long: the view of every token."""
        return torch.cat([torch.full((v.size,), i, dtype=torch.long) for i, v in enumerate(self.views)])

    def boxes(self) -> torch.Tensor:
        """(N, 4) float64: every token's (x0, y0, x1, y1) in original-image pixels."""
        return torch.cat([v.boxes() for v in self.views])

    def lm_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(token positions (N,), newline positions) in the MLLM's image token sequence."""
        token_pos, newline_pos, at = [], [], 0
        for v in self.views:
            h, w = v.grid
            for _ in range(h):
                token_pos.append(torch.arange(at, at + w))
                at += w
                if v.newline:
                    newline_pos.append(at)
                    at += 1
        return torch.cat(token_pos), torch.tensor(newline_pos, dtype=torch.long)

    def with_newlines(self, tokens: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
        """(N, D) visual tokens -> (lm_tokens, D): the sequence the LM reads, newline vectors in place."""
        token_pos, newline_pos = self.lm_positions()
        out = tokens.new_empty(self.lm_tokens, tokens.shape[-1])
        out[token_pos] = tokens
        out[newline_pos] = newline.to(tokens)
        return out

    # -- pictures ---------------------------------------------------------------------------------
    def pixel_centres(self, size: tuple[int, int] | None = None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(ys (H,), xs (W,)) float64: the centres of a ``size`` picture's pixels (default the original
        image) in original-image coordinates, where the views' spans live."""
        height, width = size or self.image_size
        ys = (torch.arange(height, dtype=torch.float64, device=device) + 0.5) * self.image_size[0] / height
        xs = (torch.arange(width, dtype=torch.float64, device=device) + 0.5) * self.image_size[1] / width
        return ys, xs

    def paint(self, values: torch.Tensor, size: tuple[int, int] | None = None, *,
              views: Iterable[int | str] | None = None, mode: str = "bilinear") -> torch.Tensor:
        """Per-token values (N,) or (N, C) -> (H, W) or (C, H, W) on the original image (or ``size``).

        Each view's grid is sampled over its box at the pixel centres it covers (``mode``:
        bilinear or nearest, as ``grid_sample``); pixels covered by several views get their mean,
        pixels no view covers get 0. ``views`` paints only those (default: all).
        """
        if values.shape[0] != self.num_tokens:
            raise ValueError(f"{values.shape[0]} values for a layout of {self.num_tokens} tokens")
        squeeze = values.ndim == 1
        values = values[:, None] if squeeze else values
        ys, xs = self.pixel_centres(size, values.device)
        chosen = range(len(self.views)) if views is None else [self.index(v) for v in views]
        total = values.new_zeros(values.shape[1], len(ys), len(xs), dtype=torch.float32)
        cover = values.new_zeros(len(ys), len(xs), dtype=torch.float32)
        offsets = self.offsets()
        for i in chosen:
            view = self.views[i]
            h, w = view.grid
            grid_map = values[offsets[i]:offsets[i] + view.size].float().T.reshape(1, -1, h, w)
            nx = 2 * fractional_index(xs, view.cols) / w - 1  # grid_sample, align_corners=False: token k
            ny = 2 * fractional_index(ys, view.rows) / h - 1  # spans [2k/w - 1, 2(k+1)/w - 1]
            inside = view.covers(ys, xs)
            sample = torch.stack(torch.meshgrid(nx, ny, indexing="xy"), dim=-1).float()[None]
            painted = F.grid_sample(grid_map, sample, mode=mode, padding_mode="border", align_corners=False)[0]
            total += painted * inside
            cover += inside
        out = total / cover.clamp(min=1)
        return out[0] if squeeze else out

    # -- serialisation ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"image_size": list(self.image_size), "views": [v.to_dict() for v in self.views]}

    @classmethod
    def from_dict(cls, data: dict) -> "TokenLayout":
        return cls(tuple(data["image_size"]), tuple(View.from_dict(v) for v in data["views"]))


def single_view(grid: tuple[int, int], image_size: tuple[int, int], box: Box | None = None,
                name: str = "base") -> TokenLayout:
    """One grid over ``box`` (default: the whole image)."""
    h, w = image_size
    return TokenLayout((int(h), int(w)), (View.uniform(name, tuple(grid), box or (0.0, 0.0, float(w), float(h))),))
