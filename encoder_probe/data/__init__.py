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
from .real import FashionMNIST, LFWFaces, MNIST5k, RealMasks
from .vqa import VQAPairs

DATASETS = {"imagenet": ImageFolder, "ade20k": ADE20K, "fashion-mnist": FashionMNIST, "mnist-5k": MNIST5k,
            "lfw-faces": LFWFaces, "real-masks": RealMasks, "vqa": VQAPairs}
DEMO_LAYOUT = {"imagenet": "imagenet", "ade20k": "ade20k"}  # the layouts the built-in demo data is written in


def default_root(name: str) -> Path:
    """Where dataset ``name`` lives when no root is given: the demo data, or the installed asset."""
    if name in DEMO_LAYOUT:
        from .demo import demo_data
        return demo_data() / DEMO_LAYOUT[name]
    return DATASETS[name].default_root()


def open_dataset(name: str, root: str | Path | None = None, split: str = "train", **options) -> ImageDataset:
    """A split of dataset ``name`` at ``root``; None (or "demo") = the built-in demo data / installed asset."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    cls = DATASETS[name]
    accepted = set(inspect.signature(cls).parameters) - {"root", "split"}
    unknown = {k for k, v in options.items() if v is not None} - accepted
    if unknown:
        raise DataError(f"dataset {name!r} takes no option {', '.join(sorted(unknown))}")
    options = {k: v for k, v in options.items() if k in accepted}
    if root is None or str(root) == "demo":
        root = default_root(name)
    return cls(root, split, **options)


__all__ = ["ADE20K", "DATASETS", "IGNORE_INDEX", "FashionMNIST", "ImageDataset", "ImageFolder", "LFWFaces", "MNIST5k",
           "RealMasks", "Sample", "VQAPairs", "default_root", "open_dataset"]
