"""PNG grids of gradient maps over their images: rows are images, columns encoders or methods.

Each map is min-max normalised on its own for the picture only (the raw maps and their
magnitudes live in the npz beside it); the column title carries the raw peak, so a column of a
checkpoint whose gradients collapsed still says so.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def denormalize(pixels: torch.Tensor, mean, std) -> np.ndarray:
    """(B, 3, H, W) normalised tensor -> (B, H, W, 3) float RGB in [0, 1]."""
    mean = torch.as_tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (pixels.float().cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def overlay_grid(images: np.ndarray, columns: dict[str, np.ndarray], path: str | Path, *,
                 masks: np.ndarray | None = None, row_labels: list[str] | None = None,
                 alpha: float = 0.5, cmap: str = "jet", dpi: int = 100) -> Path:
    """Write a grid: column 0 the image (mask outline if given), then one column per entry of
    ``columns`` (name -> (N, h, w) raw maps), each map upsampled and normalised per image.
    Written atomically."""
    from matplotlib.figure import Figure

    from .attribution import minmax
    from .cache import save_png
    from .localization import upsample

    n, height, width = images.shape[0], images.shape[1], images.shape[2]
    names = list(columns)
    fig = Figure(figsize=(1.8 * (len(names) + 1), 1.8 * n))
    axes = fig.subplots(n, len(names) + 1, squeeze=False)
    for j, name in enumerate(names):
        raw = torch.as_tensor(np.asarray(columns[name], np.float32))
        shown = minmax(upsample(raw, (height, width))).numpy()
        for i in range(n):
            ax = axes[i, j + 1]
            ax.imshow(images[i])
            ax.imshow(shown[i], cmap=cmap, alpha=alpha, vmin=0, vmax=1)
            if i == 0:
                ax.set_title(name, fontsize=7)
            ax.set_xlabel(f"max {float(raw[i].abs().max()):.3g}", fontsize=6, labelpad=1)
    for i in range(n):
        ax = axes[i, 0]
        ax.imshow(images[i])
        if masks is not None:
            ax.contour(masks[i].astype(float), levels=[0.5], colors="white", linewidths=0.8)
        if row_labels is not None:
            ax.set_ylabel(row_labels[i], fontsize=6)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout(pad=0.3)
    return save_png(fig, path, dpi=dpi)


def compare_overlays(npz_files: dict[str, str | Path], path: str | Path, *, method: str = "gradcam",
                     rows: int | None = None) -> Path:
    """One method's maps from several encoders' ``maps.npz`` side by side (columns = encoders).

    The encoders must have mapped the same images (same data, same order); the rows are the
    images each npz keeps for pictures (the probe's ``overlay_rows``), shown from the first file.
    A view-full npz contributes its ``painted/<method>`` rows (maps painted on the photo); mixing
    views needs images of one size, so compare full with full.
    """
    from .errors import DataError
    loaded = {name: np.load(file) for name, file in npz_files.items()}
    first = next(iter(loaded.values()))

    def shown(data):  # view full keeps ragged token maps; its overlay rows are painted on the photo
        return f"painted/{method}" if f"painted/{method}" in data else f"map/{method}"
    for name, data in loaded.items():
        if f"map/{method}" not in data:
            raise DataError(f"{npz_files[name]}: has no maps of method {method!r}")
        if not np.array_equal(data["index"], first["index"]):
            raise DataError(f"{npz_files[name]}: maps of different images than {next(iter(npz_files.values()))}")
    k = slice(0, len(first["images"]) if rows is None else min(rows, len(first["images"])))
    return overlay_grid(first["images"][k], {name: d[shown(d)][k] for name, d in loaded.items()}, path,
                        masks=first["inside"][k] if "inside" in first else None)
