"""Preference records {image, question, chosen, rejected} (MMPR-like JSONL) for every stage.

SFT and pretraining read the chosen answer; DPO reads both. The records become TRL's conversational
datasets (:func:`preference_dataset`, :func:`completion_dataset`). The whole file is checked before any
training starts: a malformed line or a missing image is one DataError naming the file (and the
line), so a run never dies halfway through an epoch.
"""
from __future__ import annotations

from pathlib import Path

from ..data.images import read_errors
from ..data.records import read_pairs
from ..errors import DataError

__all__ = ["check_images", "completion_dataset", "demo_pairs", "preference_dataset", "read_pairs"]


def demo_pairs(split: str = "train") -> Path:
    """The built-in demo data's VQA preference records (generated once, then cached)."""
    from ..data.demo import demo_data
    return demo_data() / "vqa" / f"{split}.jsonl"


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
