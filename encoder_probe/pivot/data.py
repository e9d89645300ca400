"""Preference records {image, question, chosen, rejected} (MMPR-like JSONL) for every stage.

SFT and pretraining read the chosen answer; DPO reads both. The records become TRL's conversational
datasets (:func:`preference_dataset`, :func:`completion_dataset`). The whole file is checked before any
training starts: a malformed line or a missing image is one DataError naming the file (and the
line), so a run never dies halfway through an epoch.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..data.images import read_errors
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


def check_images(records: list[dict], where) -> None:
    """Every image opens as an image (header only): a bad file stops the run before step 1, not mid-epoch."""
    from PIL import Image
    for number, record in enumerate(records, 1):
        try:
            with Image.open(record["image"]) as image:
                image.size  # noqa: B018 - the header is parsed
        except read_errors() as e:
            raise DataError(f"{where}: record {number}: image {record['image']} is unreadable ({e})") from None


def _user(question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def _assistant(answer: str) -> list[dict]:
    return [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]


def preference_dataset(records: list[dict]):
    """TRL's conversational preference format: one image, the user turn as the prompt, the two answers as
    assistant turns. Images decode lazily (RGB) when a batch is built, as TRL's vision collator wants."""
    return _dataset(records, {"prompt": [_user(r["question"]) for r in records],
                              "chosen": [_assistant(r["chosen"]) for r in records],
                              "rejected": [_assistant(r["rejected"]) for r in records]})


def completion_dataset(records: list[dict]):
    """TRL's conversational prompt-completion format on the chosen answers (SFT, pretraining): the loss
    is on the answer only, as in LLaVA and PIVOT's SFT control."""
    return _dataset(records, {"prompt": [_user(r["question"]) for r in records],
                              "completion": [_assistant(r["chosen"]) for r in records]})


def _dataset(records: list[dict], columns: dict):
    import datasets
    datasets.disable_progress_bars()  # a cast of a few thousand rows; the trainer's bar is the one that matters
    data = datasets.Dataset.from_dict({"images": [[r["image"]] for r in records], **columns})
    return data.cast_column("images", datasets.List(datasets.Image(mode="RGB")))
