"""ADE20K scene parsing, the ``ADEChallengeData2016`` release layout.

``images/{training,validation}/*.jpg`` pair by file stem with
``annotations/{training,validation}/*.png``. Raw label 0 ("other") becomes the ignore index 255
and labels 1..150 become train ids 0..149 (the mmsegmentation ``reduce_zero_label`` convention
that DINOv2's numbers use). Class names come from ``objectInfo150.txt`` when present (its row
count sets ``num_classes``; a label above it is an error), else 150 numbered classes.
Image and mask are resized/cropped together by the encoder's own geometry, the mask with
nearest-neighbour (see ``transforms.SegmentationTransform``).
"""
from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from .base import ImageDataset, Sample, list_images, require_dir

RELEASE_DIR = "ADEChallengeData2016"
SPLITS = {"train": "training", "training": "training", "val": "validation", "validation": "validation"}
NUM_CLASSES = 150


def read_object_info(path: Path) -> list[str]:
    """Names from objectInfo150.txt (tab-separated ``Idx Ratio Train Val Name``), first synonym."""
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:] if line.strip()]
    if any(len(row) < 5 for row in rows):
        raise DataError(f"{path}: expected tab-separated columns Idx, Ratio, Train, Val, Name")
    return [row[4].split(";")[0].strip() for row in sorted(rows, key=lambda r: int(r[0]))]


class ADE20K(ImageDataset):
    """ADE20K ADEChallengeData2016: images/{training,validation}/*.jpg + annotations/*.png, 150 classes."""

    name = "ade20k"
    task = "segmentation"

    def __init__(self, root: str | Path, split: str = "train"):
        root = Path(root)
        if (root / RELEASE_DIR).is_dir():
            root = root / RELEASE_DIR
        if split not in SPLITS:
            raise DataError(f"{root}: ADE20K split must be one of {sorted(SPLITS)}, got {split!r}")
        folder = SPLITS[split]
        images = list_images(require_dir(root / "images" / folder, f"ADE20K images/{folder}"))
        annotations = require_dir(root / "annotations" / folder, f"ADE20K annotations/{folder}")
        if not images:
            raise DataError(f"{root / 'images' / folder}: no images")
        orphans = sorted({p.stem for p in annotations.glob("*.png")} - {p.stem for p in images})
        if orphans:
            raise DataError(f"{annotations / (orphans[0] + '.png')}: annotation has no image of the same name "
                            f"in images/{folder} ({len(orphans)} such)")
        samples = []
        for image in images:
            mask = annotations / f"{image.stem}.png"
            if not mask.is_file():
                raise DataError(f"{mask}: annotation missing for image {image.name}")
            samples.append(Sample(image, -1, mask))
        info = root / "objectInfo150.txt"
        names = read_object_info(info) if info.is_file() else [f"class_{i}" for i in range(1, NUM_CLASSES + 1)]
        super().__init__(root, "train" if folder == "training" else "val", samples, names)
