"""VQA preference records (MMPR-like JSONL) for MLLM gradient maps: ``--data vqa=FILE``.

One JSON object a line: ``image`` (a path, relative to the file's folder or its parent),
``question``, ``chosen``, ``rejected`` and optionally ``mask`` (a PNG the size of the image:
0 background, 255 ignored, any other value object) for localisation scores. ROOT is a ``.jsonl``
file (split ``val``) or a folder with ``{split}.jsonl``. With no ROOT: the demo's VQA records,
whose masks are their scenes' ADE20K annotations.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import DataError
from .base import IGNORE_INDEX, ImageDataset, Sample
from .images import load_mask

FIELDS = ("image", "question", "chosen", "rejected")


class VQAPairs(ImageDataset):
    """VQA preference records (JSONL: image, question, chosen, rejected[, mask]) for target mllm; demo: its VQA pairs."""

    name = "vqa"
    task = "vqa"

    def __init__(self, root, split: str = "val"):
        root = Path(root)
        file = root if root.suffix == ".jsonl" else root / f"{split}.jsonl"
        if root.suffix == ".jsonl" and split != "val":
            raise DataError(f"{root}: one JSONL file is split 'val' only (no {split!r} split)")
        if not file.is_file():
            raise DataError(f"{file}: no such VQA records file")
        demo = _demo_scenes(file)
        records, samples = [], []
        for n, line in enumerate(file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise DataError(f"{file}:{n}: not JSON ({e})") from None
            missing = [k for k in FIELDS if not isinstance(record, dict) or not isinstance(record.get(k), str)
                       or not record[k]]
            if missing:
                raise DataError(f"{file}:{n}: needs string fields {', '.join(FIELDS)} (missing or empty: "
                                f"{', '.join(missing)})")
            scene = demo.get(record["image"]) if demo else None
            image = _resolve(file, scene["ade_image"] if scene else record["image"], n)
            mask = _resolve(file, scene["ade_annotation"] if scene else record["mask"], n) \
                if scene or record.get("mask") else None
            records.append({**record, "ade20k": bool(scene)})
            samples.append(Sample(image, mask=mask))
        if not records:
            raise DataError(f"{file}: no records")
        self.records = records
        super().__init__(file.parent, split, samples, ["object"])
        self.file = file

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
        if self.records[index]["ade20k"]:  # the demo scenes: ADE20K's raw labels (0 = other, ignored)
            mapped = raw.astype(np.int16) - 1
            mapped[raw == 0] = IGNORE_INDEX
            return mapped.astype(np.uint8)
        return raw


def _resolve(file: Path, name: str, line: int) -> Path:
    path = Path(name)
    for candidate in ((path,) if path.is_absolute() else (file.parent / path, file.parent.parent / path)):
        if candidate.is_file():
            return candidate
    raise DataError(f"{file}:{line}: {name}: no such file (relative paths are read from {file.parent} or its parent)")


def _demo_scenes(file: Path) -> dict:
    """image -> scene of the demo data's manifest, when ``file`` is the demo's own records."""
    manifest = file.parent.parent / "manifest.json"
    if file.parent.name != "vqa" or not manifest.is_file():
        return {}
    try:
        scenes = json.loads(manifest.read_text())["scenes"]
    except (ValueError, KeyError):
        return {}
    return {s["image"]: s for split in scenes.values() for s in split if "ade_annotation" in s}
