"""Segmentation metrics, accumulated over a whole split as mmsegmentation and DINOv2 report ADE20K.

Pixel level: a confusion matrix summed over every valid pixel of the split (255 = ignore), from
which IoU_c = TP_c / (TP_c + FP_c + FN_c). mIoU averages IoU over the classes with a non-zero
union, i.e. classes present in the split's ground truth or predicted somewhere in it; a class
absent from both is left out (mmsegmentation's nanmean), and ``classes_counted`` says how many
counted. Pixel accuracy = correct valid pixels / valid pixels.

Patch level (the patch-seg "union" protocol the PIVOT paper reports): every patch of the token
grid is labelled with the *set* of classes covering any of its valid pixels; a multi-label head
predicts that set from the patch token alone; macro recall = the mean over classes present in the
truth of (patches where the class is predicted and present) / (patches where it is present).

View ``full`` (several views, tokens with boxes on the original image; masks at the original
resolution): logits are painted onto the mask through the token boxes
(:func:`paint_logits`, ``TokenLayout.paint``), and a token's patch label is the set of classes of
the valid pixels whose centres fall in its box (:func:`layout_union_targets`).
"""
from __future__ import annotations

from functools import lru_cache

import torch

from .data.base import IGNORE_INDEX


def confusion_matrix(truth: torch.Tensor, pred: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(C, C) int64 counts, rows = truth, columns = prediction, over pixels whose truth is not ignored."""
    valid = truth != ignore_index
    t, p = truth[valid].long(), pred[valid].long()
    if t.numel() and (int(t.max()) >= num_classes or int(t.min()) < 0):
        raise ValueError(f"truth labels must be 0..{num_classes - 1} or {ignore_index}, found {int(t.max())}")
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).view(num_classes, num_classes)


def pixel_scores(confusion: torch.Tensor) -> dict:
    """mIoU, pixel accuracy and per-class IoU (NaN where a class has no union) from a summed confusion."""
    confusion = confusion.double()
    tp = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    counted = union > 0
    total = confusion.sum()
    return {"mIoU": float(iou[counted].mean()) if counted.any() else float("nan"),
            "pixel_accuracy": float(tp.sum() / total) if total > 0 else float("nan"),
            "iou": iou.tolist(), "classes_counted": int(counted.sum())}


def patch_cells(size: tuple[int, int], grid: tuple[int, int], device=None) -> torch.Tensor:
    """(H, W) long: the token-grid cell of every pixel (row-major), floor(i * h / H) per axis."""
    (H, W), (h, w) = size, grid
    rows = torch.arange(H, device=device) * h // H
    cols = torch.arange(W, device=device) * w // W
    return rows[:, None] * w + cols[None, :]


def patch_union_targets(masks: torch.Tensor, grid: tuple[int, int], num_classes: int,
                        ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(B, h*w, C) bool: which classes cover any valid pixel of each patch (one scatter per batch)."""
    B, H, W = masks.shape
    cells = grid[0] * grid[1]
    labels = masks.reshape(B, -1).long()
    labels = torch.where(labels == ignore_index, num_classes, labels)  # ignore -> a spare column, dropped
    index = patch_cells((H, W), grid, masks.device).reshape(1, -1) * (num_classes + 1) + labels
    out = torch.zeros(B, cells * (num_classes + 1), dtype=torch.uint8, device=masks.device).scatter_(1, index, 1)
    return out.view(B, cells, num_classes + 1)[..., :num_classes].bool()


@lru_cache(maxsize=32)
def _bilinear_matrix(n_out: int, n_in: int, device, dtype) -> torch.Tensor:
    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
    low = src.floor().long().clamp(max=n_in - 1)
    high = (low + 1).clamp(max=n_in - 1)
    weight = src - low
    matrix = torch.zeros(n_out, n_in, dtype=torch.float64)
    matrix[torch.arange(n_out), low] += 1 - weight
    matrix[torch.arange(n_out), high] += weight
    return matrix.to(device=device, dtype=dtype)


def upsample_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=False)`` as two small matmuls.

    Bilinear resizing is separable and linear, so it is ``A_H @ x @ A_W.T``; forward and backward
    through two GEMMs cost a fraction of the interpolation kernel's backward on CPU.
    """
    (H, W), (h, w) = size, x.shape[-2:]
    return _bilinear_matrix(H, h, x.device, x.dtype) @ x @ _bilinear_matrix(W, w, x.device, x.dtype).T


def patch_counts(truth: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """(3, C) int64: per class true positives, positives in truth, positives predicted, over all patches."""
    truth, pred = truth.reshape(-1, truth.shape[-1]), pred.reshape(-1, pred.shape[-1])
    return torch.stack([(truth & pred).sum(0), truth.sum(0), pred.sum(0)]).long()


def patch_scores(counts: torch.Tensor) -> dict:
    """Macro recall (and precision, F1) over the classes present in the truth, from summed counts."""
    tp, positives, predicted = counts.double()
    present = positives > 0
    if not present.any():
        return {"patch_macro_recall": float("nan"), "patch_macro_precision": float("nan"),
                "patch_macro_f1": float("nan")}
    recall = tp[present] / positives[present]
    precision = torch.where(predicted[present] > 0, tp[present] / predicted[present].clamp(min=1), 0.0)
    f1 = torch.where(recall + precision > 0, 2 * recall * precision / (recall + precision).clamp(min=1e-12), 0.0)
    return {"patch_macro_recall": float(recall.mean()), "patch_macro_precision": float(precision.mean()),
            "patch_macro_f1": float(f1.mean())}


# -- view "full": tokens with boxes on the original image ---------------------------------------
def _span_index(centres: torch.Tensor, spans) -> torch.Tensor:
    """(n,) long: the span [lo, hi) holding each coordinate, -1 where none does (a tile seam, outside)."""
    lo = torch.tensor([s[0] for s in spans], dtype=torch.float64, device=centres.device)
    hi = torch.tensor([s[1] for s in spans], dtype=torch.float64, device=centres.device)
    k = torch.searchsorted(hi, centres, right=True).clamp(max=len(spans) - 1)  # first span ending after x
    inside = (centres >= lo[k]) & (centres < hi[k])
    return torch.where(inside, k, torch.full_like(k, -1))


def token_pixels(layout, size: tuple[int, int] | None = None, device=None) -> list[torch.Tensor]:
    """Per view, (H, W) long: the layout token (index into the whole sequence) whose box holds
    each pixel's centre, -1 for none. ``size`` (default the original image) is the mask's (H, W);
    its pixel centres are mapped onto the original image."""
    ys, xs = layout.pixel_centres(size, device)
    out = []
    for view, offset in zip(layout.views, layout.offsets()):
        r, c = _span_index(ys, view.rows), _span_index(xs, view.cols)
        token = offset + r[:, None] * view.grid[1] + c[None, :]
        out.append(torch.where((r >= 0)[:, None] & (c >= 0)[None, :], token, torch.full_like(token, -1)))
    return out


def layout_union_targets(mask: torch.Tensor, layout, num_classes: int,
                         ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(N, C) bool for one image of view full: which classes cover any valid pixel whose centre lies
    in each token's box (the patch-seg "union" label of :func:`patch_union_targets`, by box).

    Every view counts separately (a base token and the tile tokens over the same pixels each get
    those pixels' classes); tokens over padding or a seam only get the pixels inside their box."""
    n = layout.num_tokens
    labels = mask.long()
    labels = torch.where(labels == ignore_index, num_classes, labels)
    out = torch.zeros(n * (num_classes + 1), dtype=torch.uint8, device=mask.device)
    for token in token_pixels(layout, tuple(mask.shape), mask.device):
        hit = token >= 0
        out.scatter_(0, token[hit] * (num_classes + 1) + labels[hit], 1)
    return out.view(n, num_classes + 1)[:, :num_classes].bool()


def covered(layout, size: tuple[int, int] | None = None, device=None) -> torch.Tensor:
    """(H, W) bool: pixels whose centre lies in some view's box (what ``TokenLayout.paint`` paints)."""
    ys, xs = layout.pixel_centres(size, device)
    return torch.stack([view.covers(ys, xs) for view in layout.views]).any(0)


def _axis_matrix(centres: torch.Tensor, spans) -> torch.Tensor:
    """(n_pixels, n_tokens) grid_sample bilinear weights along one axis (align_corners=False, border)."""
    from .encoders.views import fractional_index
    n = len(spans)
    ix = (fractional_index(centres, spans) - 0.5).clamp(0, n - 1)
    low = ix.floor().long().clamp(max=n - 1)
    w = ix - low
    out = torch.zeros(len(centres), n, dtype=torch.float64, device=centres.device)
    out[torch.arange(len(centres)), low] += 1 - w
    out[torch.arange(len(centres)), (low + 1).clamp(max=n - 1)] += w
    return out


def paint_operators(layout, size: tuple[int, int] | None = None, device=None, dtype=torch.float32) -> list:
    """``TokenLayout.paint(values, size)`` (bilinear) as separable matrices, one triple per view:
    (A_y (H, h), A_x (W, w), weight (H, W)) with painted = sum_v weight_v * (A_y Z_v A_x^T).

    Bilinear sampling over a view's spans is separable, so painting a view is two GEMMs, as
    :func:`upsample_bilinear` is for the base grid; ``weight`` is the view's box indicator over the
    number of views covering the pixel. Forward and backward cost a fraction of ``grid_sample``'s
    on CPU (the seg head's training loss paints every image of every step)."""
    ys, xs = layout.pixel_centres(size, device)
    insides = [view.covers(ys, xs) for view in layout.views]
    cover = torch.stack(insides).sum(0).clamp(min=1)
    return [(_axis_matrix(ys, v.rows).to(dtype), _axis_matrix(xs, v.cols).to(dtype), (inside / cover).to(dtype))
            for v, inside in zip(layout.views, insides)]


def paint_logits(logits: torch.Tensor, layout, size: tuple[int, int] | None = None,
                 operators: list | None = None) -> torch.Tensor:
    """(N, C) per-token logits -> (C, H, W) on the image (default its original size) through the
    token boxes: bilinear within each view, views averaged where they overlap (``TokenLayout.paint``,
    or its :func:`paint_operators`).

    The thin strips no view covers (the patch conv drops the last 6 of 384 px of every view; an
    unpadded edge) take the nearest covered pixel's logits, as the base view's upsampled grid
    stretches over its dropped remainder, so every pixel gets a prediction."""
    if operators is None:
        painted = layout.paint(logits, size, mode="bilinear")
    else:  # the same painting as two GEMMs per view (paint_operators(layout, size))
        painted = 0
        for view, span, (ay, ax, weight) in zip(layout.views, layout.offsets(), operators):
            z = logits[span:span + view.size].float().T.reshape(-1, *view.grid)
            painted = painted + weight * (ay @ z @ ax.T)
    cover = covered(layout, tuple(painted.shape[-2:]), painted.device)
    if cover.all() or not cover.any():
        return painted
    rows, cols = cover.any(1).nonzero()[:, 0], cover.any(0).nonzero()[:, 0]
    ys = torch.arange(cover.shape[0], device=cover.device).clamp(int(rows.min()), int(rows.max()))
    xs = torch.arange(cover.shape[1], device=cover.device).clamp(int(cols.min()), int(cols.max()))
    return torch.where(cover, painted, painted[:, ys[:, None], xs[None, :]])
