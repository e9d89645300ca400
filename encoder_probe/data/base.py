"""ImageDataset: what every reader returns and what extraction consumes.

A reader only scans its on-disk layout into a sorted list of samples (image path, class label,
mask path). Everything else is shared: decoding with the bad-image policy, the encoder's own
preprocessing (joint with the mask for dense data), and a content hash of exactly the files a
split uses, which keys the feature cache.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..cache import atomic_write_json
from ..errors import DataError, ImageRefused
from .images import BadSample, load_mask, load_rgb, read_errors

IGNORE_INDEX = 255


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int = -1  # class index, -1 when the data has no class labels
    mask: Path | None = None
    item: int | None = None  # row in an array file, for datasets stored as arrays


class ImageDataset(torch.utils.data.Dataset):
    """A split of a dataset: sorted samples plus class names; items are dicts for extraction.

    ``with_transform(preprocess)`` binds the encoder's preprocessing. Subclasses with masks set
    ``num_classes`` and implement ``map_labels`` (raw mask values -> train ids, ignore 255).
    """

    name = ""
    task = "classification"  # or "segmentation": which probes can read it

    def __init__(self, root: Path, split: str, samples: list[Sample], class_names: list[str], *,
                 options: dict | None = None):
        self.root = Path(root)
        self.split = split
        self.samples = samples
        self.class_names = class_names
        self.options = dict(options or {})  # subsampling etc.: part of the cache key
        self.preprocess = None
        self._transform = None

    # -- what extraction needs -------------------------------------------------------------------
    @property
    def has_masks(self) -> bool:
        return bool(self.samples) and self.samples[0].mask is not None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def with_transform(self, preprocess) -> "ImageDataset":
        """Bind the encoder's preprocessing: a ``Preprocess`` (view base: a tensor per image, masks
        resized with it) or the checkpoint's own processor (view full: ``ProcessedImage`` items,
        masks kept at the original image size)."""
        from ..encoders.base import Preprocess
        from .transforms import FullViewSegmentationTransform, SegmentationTransform
        self.preprocess = preprocess
        if not self.has_masks:
            self._transform = preprocess.transform
        elif isinstance(preprocess, Preprocess):
            self._transform = SegmentationTransform(preprocess)
        else:
            self._transform = FullViewSegmentationTransform(preprocess)
        return self

    def __len__(self) -> int:
        return len(self.samples)

    def read_image(self, sample: Sample) -> Image.Image:
        """The sample's image as RGB; raises one of ``read_errors()`` if it cannot be read."""
        return load_rgb(sample.path)

    def read_mask(self, sample: Sample) -> np.ndarray:
        """The sample's raw label map (H, W) uint8."""
        return load_mask(sample.mask)

    def __getitem__(self, index: int):
        sample = self.samples[index]
        try:
            image = self.read_image(sample)
        except read_errors() as e:
            return BadSample(index, str(sample.path), f"unreadable image ({type(e).__name__}: {e})")
        if self._transform is None:
            raise RuntimeError("call with_transform(encoder.preprocess) before reading pixels")
        if sample.mask is None:
            try:
                return {"index": index, "pixels": self._transform(image), "label": sample.label}
            except ImageRefused as e:
                return BadSample(index, str(sample.path), str(e))
        try:
            raw = self.read_mask(sample)
        except read_errors() as e:
            return BadSample(index, str(sample.mask), f"unreadable mask ({e})", fatal=True)
        if raw.shape != (image.height, image.width):
            return BadSample(index, str(sample.mask), f"mask is {raw.shape[1]}x{raw.shape[0]} but its image "
                             f"{sample.path.name} is {image.width}x{image.height}", fatal=True)
        try:
            labels = self.map_labels(raw)
        except ValueError as e:
            return BadSample(index, str(sample.mask), str(e), fatal=True)
        try:
            pixels, mask = self._transform(image, labels)
        except ImageRefused as e:
            return BadSample(index, str(sample.path), str(e))
        return {"index": index, "pixels": pixels, "label": sample.label, "mask": mask}

    def map_labels(self, raw: np.ndarray) -> np.ndarray:
        """ADE20K convention: raw 0 ("other") -> ignore 255, raw 1..num_classes -> 0..num_classes-1."""
        if raw.max(initial=0) > self.num_classes:
            raise ValueError(f"mask has label {int(raw.max())}; labels must be 0..{self.num_classes}")
        mapped = raw.astype(np.int16) - 1
        mapped[raw == 0] = IGNORE_INDEX
        return mapped.astype(np.uint8)

    # -- identity ------------------------------------------------------------------------------
    def content_hash(self, memo_dir: Path | None = None) -> str:
        """sha256 over every file's relative path, label and bytes.

        Bytes are hashed once; later calls reuse a digest while the file's (size, mtime_ns,
        inode) are unchanged, as git's index does, so a warm rerun only stats the files.
        """
        memo_path = memo_dir / f"{hashlib.sha256(str(self.root.resolve()).encode()).hexdigest()[:16]}.json" \
            if memo_dir is not None else None
        memo = {}
        if memo_path is not None and memo_path.is_file():
            try:
                memo = json.loads(memo_path.read_text())
            except ValueError:
                memo = {}
        updated = False
        h = hashlib.sha256()
        for sample in self.samples:
            for path in (sample.path, sample.mask):
                if path is None:
                    continue
                rel = os.path.relpath(path, self.root)
                try:
                    st = path.stat()
                except OSError as e:
                    raise DataError(f"{path}: cannot read ({e.strerror})")
                stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
                known = memo.get(rel)
                if known is None or known[:3] != stamp:
                    known = stamp + [_file_digest(path)]
                    memo[rel] = known
                    updated = True
                h.update(f"{rel}\0{sample.item}\0{sample.label}\0{known[3]}\n".encode())
        if updated and memo_path is not None:
            atomic_write_json(memo_path, memo)
        return h.hexdigest()

    def describe(self) -> dict:
        """Plain data for meta.json / results.json."""
        counts = np.bincount([s.label for s in self.samples if s.label >= 0], minlength=self.num_classes)
        return {"name": self.name, "root": str(self.root), "split": self.split, "size": len(self),
                "num_classes": self.num_classes, "has_masks": self.has_masks, "options": self.options,
                "per_class": {"min": int(counts.min()), "max": int(counts.max())} if counts.any() else None}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r}, split={self.split!r}, n={len(self)})"


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})")
    return h.hexdigest()


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{path}: {what} not found" + ("" if path.parent.is_dir() else
                                                        f" (and {path.parent} does not exist)"))
    return path


def list_images(directory: Path) -> list[Path]:
    from .images import is_image_file
    return sorted(p for p in directory.iterdir() if p.is_file() and is_image_file(p))


def subsample_options(per_class: int | None, seed: int) -> dict:
    """The options a per-class subsample adds to a dataset's cache key (none when not subsampled)."""
    return {"per_class": per_class, "seed": seed} if per_class is not None else {}


def subsample_per_class(samples: list[Sample], per_class: int | None, seed: int) -> list[Sample]:
    """Keep ``per_class`` samples of every class, chosen by a seeded draw, in the original order."""
    if per_class is None:
        return samples
    if per_class < 1:
        raise DataError(f"per_class must be >= 1, got {per_class}")
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        by_class.setdefault(s.label, []).append(i)
    keep = []
    for label in sorted(by_class):
        members = by_class[label]
        keep += members if len(members) <= per_class else \
            [members[j] for j in rng.choice(len(members), per_class, replace=False)]
    return [samples[i] for i in sorted(keep)]

