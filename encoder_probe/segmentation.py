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
"""
from __future__ import annotations

from functools import lru_cache

import torch

IGNORE_INDEX = 255


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
