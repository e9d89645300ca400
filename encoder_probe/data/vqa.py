"""VQA preference records (MMPR-like JSONL) for MLLM gradient maps: ``--data vqa=FILE``.

The trainer's record format (:func:`encoder_probe.data.records.read_pairs`: ``image`` relative to
the file's folder or its parent, ``question``, ``chosen``, ``rejected``), plus an optional ``mask``
(a PNG the size of the image: 0 background, 255 ignored, any other value object) for localisation
scores. ROOT is a ``.jsonl`` file (split ``val``) or a folder with ``{split}.jsonl``. With no ROOT:
the demo's VQA records, whose masks are their scenes' ADE20K annotations.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import DataError
from .base import IGNORE_INDEX, ImageDataset, Sample
from .images import load_mask
from .records import read_pairs


class VQAPairs(ImageDataset):
    """VQA preference records (JSONL: image, question, chosen, rejected[, mask]) for target mllm; demo: its VQA pairs."""

    name = "vqa"
    task = "vqa"

    def __init__(self, root, split: str = "val"):
        root = Path(root)
        if root.suffix == ".jsonl" and split != "val":
            raise DataError(f"{root}: one JSONL file is split 'val' only (no {split!r} split)")
        file = root if root.suffix == ".jsonl" else root / f"{split}.jsonl"
        if not file.is_file():
            raise DataError(f"{file}: no such VQA records file")
        records = read_pairs(file, masks=True)
        scenes = _demo_scenes(file)
        samples = []
        for record in records:
            scene = scenes.get(record["image"])
            if scene is not None:  # the demo: the scene's ADE20K image and annotation
                record.update(image=scene["image"], mask=scene["mask"], ade20k=True)
            samples.append(Sample(Path(record["image"]), mask=Path(record["mask"]) if "mask" in record else None))
        self.records, self.file = records, file
        super().__init__(file.parent, split, samples, ["object"])

    @classmethod
    def default_root(cls) -> Path:
        from .demo import demo_data
        return demo_data() / "vqa"

    @property
    def has_masks(self) -> bool:
        return any(s.mask is not None for s in self.samples)

    def labels(self, index: int) -> np.ndarray | None:
        """The record's mask as train ids (0 background, 255 ignored, > 0 object), or None."""
        sample = self.samples[index]
        if sample.mask is None:
            return None
        raw = load_mask(sample.mask)
        if self.records[index].get("ade20k"):  # the demo scenes: ADE20K's raw labels (0 = other, ignored)
            mapped = raw.astype(np.int16) - 1
            mapped[raw == 0] = IGNORE_INDEX
            return mapped.astype(np.uint8)
        return raw


def _demo_scenes(file: Path) -> dict:
    """Absolute image path -> the demo scene's ADE20K image and mask, when ``file`` is the demo's own records."""
    root = file.parent.parent
    manifest = root / "manifest.json"
    if file.parent.name != "vqa" or not manifest.is_file():
        return {}
    try:
        scenes = json.loads(manifest.read_text())["scenes"]
    except (ValueError, KeyError):
        return {}
    return {str(root / s["image"]): {"image": str(root / s["ade_image"]), "mask": str(root / s["ade_annotation"])}
            for split in scenes.values() for s in split if "ade_annotation" in s}
