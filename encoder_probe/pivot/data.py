"""Preference records {image, question, chosen, rejected} (MMPR-like JSONL) for every stage.

SFT and pretraining read the chosen answer; DPO reads both. The whole file is checked before any
training starts: a malformed line or a missing image is one DataError naming the file (and the
line), so a run never dies halfway through an epoch.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..data.images import load_rgb, read_errors
from ..errors import DataError

FIELDS = ("image", "question", "chosen", "rejected")


def demo_pairs(split: str = "train") -> Path:
    """The built-in demo data's VQA preference records (generated once, then cached)."""
    from ..data.demo import demo_data
    return demo_data() / "vqa" / f"{split}.jsonl"


def _image_root(path: Path, first: str) -> Path:
    """Relative image paths resolve against the JSONL's folder, or its parent (the demo layout)."""
    for root in (path.parent, path.parent.parent):
        if (root / first).is_file():
            return root
    return path.parent


def read_pairs(path, image_root=None, limit: int | None = None, need_rejected: bool = True,
               masks: bool = False) -> list[dict]:
    """Validated records with absolute image paths; SFT-only data (captions) may leave out ``rejected``.
    ``masks``: keep an optional ``mask`` path per record (gradient maps' localisation), resolved as images are."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such preference file (JSONL of {{{', '.join(FIELDS)}}})")
    records = []
    with path.open() as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise DataError(f"{path}:{number}: not valid JSON ({e})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{number}: expected a JSON object with {', '.join(FIELDS)}")
            wanted = FIELDS if need_rejected else FIELDS[:3]
            missing = [k for k in wanted if not isinstance(record.get(k), str) or not record[k].strip()]
            if missing:
                raise DataError(f"{path}:{number}: missing or empty field(s) {', '.join(missing)}")
            kept = {k: record.get(k, "") for k in FIELDS}
            if masks and record.get("mask"):
                kept["mask"] = str(record["mask"])
            records.append(kept)
            if limit is not None and len(records) >= limit:
                break
    if not records:
        raise DataError(f"{path}: holds no preference records")
    root = Path(image_root) if image_root is not None else _image_root(path, records[0]["image"])
    for number, record in enumerate(records, 1):
        for key in ("image", "mask") if "mask" in record else ("image",):
            file = Path(record[key]).expanduser()
            file = file if file.is_absolute() else root / file
            if not file.is_file():
                raise DataError(f"{path}: record {number}: {key} {file} does not exist")
            record[key] = str(file)
    return records


class PreferenceDataset(torch.utils.data.Dataset):
    """Records with their images through the tower's own preprocessing."""

    def __init__(self, records: list[dict], transform):
        self.records, self.transform = records, transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        try:
            image = load_rgb(record["image"])
        except read_errors() as e:
            raise DataError(f"{record['image']}: unreadable image ({e})") from None
        return {**record, "pixels": self.transform(image)}


def collate(items: list[dict]) -> dict:
    batch = {k: [item[k] for item in items] for k in FIELDS}
    batch["pixels"] = torch.stack([item["pixels"] for item in items])
    return batch


def texts_of(records: list[dict]) -> list[str]:
    """Every string a word tokenizer must know."""
    return [r[k] for r in records for k in ("question", "chosen", "rejected") if r[k]]
