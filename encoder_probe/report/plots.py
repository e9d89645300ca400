"""Report figures: bar charts with 95% CI error bars, and gradient-map overlays side by side.

Figures are built with matplotlib's object API (no pyplot state, any backend) and saved as PNG
atomically, so a report dir never holds half a picture.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

IMAGE_KINDS = ("overlay", "grid", "plot")  # artifact kinds shown as pictures; others are links


def _save(fig, path: Path) -> Path:
    from ..cache import save_png
    return save_png(fig, path, bbox_inches="tight")


def _colors(n: int):
    from matplotlib import colormaps
    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def metric_bars(table: pd.DataFrame, labels: list[str], path: str | Path, title: str = "") -> Path:
    """One panel per metric of ``table`` (rows of one probe), one bar per run, CI error bars where known."""
    from matplotlib.figure import Figure
    metrics = list(dict.fromkeys(table["metric"]))
    cols = min(len(metrics), 4)
    rows = math.ceil(len(metrics) / cols)
    fig = Figure(figsize=(max(3.2 * cols, 4), 2.9 * rows + 0.4 * max(map(len, labels)) / 10))
    colors = dict(zip(labels, _colors(len(labels))))
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(rows, cols, i + 1)
        group = table[table["metric"] == metric].set_index("run").reindex(labels)
        values = group["value"].astype(float).to_numpy()
        low, high = group["ci_low"].astype(float).to_numpy(), group["ci_high"].astype(float).to_numpy()
        x = np.arange(len(labels))
        present = ~np.isnan(values)  # a run without the metric gets no bar (not a bar at 0)
        ax.bar(x[present], values[present], color=[colors[label] for label, p in zip(labels, present) if p])
        for i in np.flatnonzero(~present):
            ax.text(x[i], 0, "n/a", ha="center", va="bottom", fontsize=8, color="#666")
        has_ci = ~np.isnan(low) & present
        if has_ci.any():  # error bars only where a run has a CI (over items; over seeds in older results)
            ax.errorbar(x[has_ci], values[has_ci], yerr=np.vstack([values - low, high - values])[:, has_ci],
                        fmt="none", ecolor="black", capsize=4)
        ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
        ax.set_xlim(-0.5, len(labels) - 0.5)
        better = "higher" if bool(group["higher_is_better"].dropna().iloc[0]) else "lower"
        ax.set_title(f"{metric} ({better} is better)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, Path(path))


def artifact_path(record: dict, probe: str, kind: str) -> Path | None:
    """Absolute path of a probe's artifact of ``kind`` (paths in results.json are relative to its dir)."""
    relative = record["probes"].get(probe, {}).get("artifacts", {}).get(kind)
    if relative is None or "_path" not in record:
        return None
    path = Path(record["_path"]).parent / relative
    return path if path.is_file() else None


def overlays_side_by_side(records: list[dict], labels: list[str], probe: str, path: str | Path,
                          kind: str = "overlay") -> Path | None:
    """Each run's ``kind`` picture of ``probe`` in one row, titled by run; None when no run has one."""
    from matplotlib.figure import Figure
    from matplotlib.image import imread
    found = [(label, artifact_path(r, probe, kind)) for label, r in zip(labels, records)]
    found = [(label, p) for label, p in found if p is not None and p.suffix.lower() == ".png"]
    if not found:
        return None
    images = [(label, imread(p)) for label, p in found]
    width, height = sum(img.shape[1] for _, img in images), max(img.shape[0] for _, img in images)
    scale = min(1.0, 3000 / width)  # at most 3000 px wide; smaller pictures keep their own pixels
    fig = Figure(figsize=(width * scale / 100, height * scale / 100 + 0.6))
    for i, (label, img) in enumerate(images):
        ax = fig.add_subplot(1, len(images), i + 1)
        ax.imshow(img)
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"{probe}: {kind}")
    fig.tight_layout()
    return _save(fig, Path(path))
