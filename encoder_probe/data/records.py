"""Preference records {image, question, chosen[, rejected][, mask]} (MMPR-like JSONL), read and checked.

One reader for the two users of the format: the trainer (encoder_probe.pivot) and the VQA dataset
(``--data vqa=FILE``). It lives with the data readers so that reading records does not import the
trainer.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import DataError

FIELDS = ("image", "question", "chosen", "rejected")


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
