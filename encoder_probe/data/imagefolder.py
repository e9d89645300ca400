"""ImageNet layout (torchvision ImageFolder): ``ROOT/<split>/<class>/<image>``.

Classes are the sorted sub-directory names (so labels match torchvision's ImageFolder and
every published ImageNet class index). Human-readable names come from ``LOC_synset_mapping.txt``
(``n01440764 tench, Tinca tinca`` per line, as the ImageNet Kaggle release ships it) when the
root has one; otherwise the directory names are the names.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from .base import ImageDataset, Sample, list_images, require_dir, subsample_options, subsample_per_class

SYNSET_MAP = "LOC_synset_mapping.txt"


def read_synset_map(path: Path) -> dict[str, str]:
    names = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        wnid, _, words = line.strip().partition(" ")
        if not words:
            raise DataError(f"{path}:{n}: expected '<wnid> <name>[, synonyms]', got {line.strip()!r}")
        names[wnid] = words.split(",")[0].strip()
    return names


class ImageFolder(ImageDataset):
    """ImageNet layout (torchvision ImageFolder): ROOT/{train,val}/<class>/<image>.

    ``per_class`` keeps a seeded subset of every class.
    """

    name = "imagenet"

    def __init__(self, root: str | Path, split: str = "train", *, per_class: int | None = None, seed: int = 0,
                 classes: list[str] | None = None):
        root = require_dir(Path(root), "dataset root")
        split_dir = require_dir(root / split, f"split {split!r} (expected ROOT/{split}/<class>/<image>)")
        class_dirs = sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not class_dirs:
            raise DataError(f"{split_dir}: no class directories (expected {split_dir}/<class>/<image>)")
        if classes is not None:  # another split's class list: labels must mean the same classes
            unknown = [d.name for d in class_dirs if d.name not in classes]
            if unknown:
                raise DataError(f"{split_dir}: classes absent from the train split: {', '.join(unknown[:5])}")
            index = {name: i for i, name in enumerate(classes)}
        else:
            index = {d.name: i for i, d in enumerate(class_dirs)}
        samples = []
        for class_dir in class_dirs:
            label = index[class_dir.name]
            images = list_images(class_dir)
            if not images:
                raise DataError(f"{class_dir}: class directory has no images")
            samples += [Sample(path, label) for path in images]
        synsets = root / SYNSET_MAP
        names = read_synset_map(synsets) if synsets.is_file() else {}
        wnids = list(classes) if classes is not None else [d.name for d in class_dirs]
        class_names = [names.get(w, w) for w in wnids]
        super().__init__(root, split, subsample_per_class(samples, per_class, seed), class_names,
                         options=subsample_options(per_class, seed))
        self.wnids = wnids
