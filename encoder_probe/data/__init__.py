"""Datasets: on-disk layouts read into ImageDatasets, and the built-in demo data.

``open_dataset("imagenet", "/data/imagenet", "val")`` reads a real tree; the root ``"demo"``
(or no root) means the built-in procedural data, generated once into the cache in the same
layouts, so it goes through the very same readers.
"""
from __future__ import annotations

import inspect
from pathlib import Path

from ..errors import DataError
from .ade20k import ADE20K
from .base import IGNORE_INDEX, ImageDataset, Sample
from .imagefolder import ImageFolder

DATASETS = {"imagenet": ImageFolder, "ade20k": ADE20K}
DEMO_LAYOUT = {"imagenet": "imagenet", "ade20k": "ade20k"}


def demo_root(name: str) -> Path:
    from .demo import demo_data
    return demo_data() / DEMO_LAYOUT[name]


def open_dataset(name: str, root: str | Path | None = None, split: str = "train", **options) -> ImageDataset:
    """A split of dataset ``name`` (imagenet | ade20k) at ``root``; None or "demo" = built-in data."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    cls = DATASETS[name]
    accepted = set(inspect.signature(cls).parameters) - {"root", "split"}
    unknown = {k for k, v in options.items() if v is not None} - accepted
    if unknown:
        raise DataError(f"dataset {name!r} takes no option {', '.join(sorted(unknown))}")
    options = {k: v for k, v in options.items() if k in accepted}
    if root is None or str(root) == "demo":
        root = demo_root(name)
    return cls(root, split, **options)


__all__ = ["ADE20K", "DATASETS", "IGNORE_INDEX", "ImageDataset", "ImageFolder", "Sample", "open_dataset"]
