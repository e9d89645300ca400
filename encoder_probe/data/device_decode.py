"""Decoding JPEGs where the forward runs: workers read file bytes, the main process decodes a batch.

On a GPU, PIL decoding in loader processes bounds small models; ``torchvision.io.decode_jpeg(list,
device=...)`` decodes a whole batch on the device and the encoder's own ``Resize`` / ``CenterCrop`` /
``Normalize`` objects run there on tensors (no second copy of their parameters). Only a plain
resize / crop / normalise pipeline over JPEG files qualifies; anything else keeps PIL in the workers
(:func:`device_pipeline` says why). Pixels are close to, not equal to, PIL's (resize kernels differ),
so the cache key records the decode.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .images import BadSample

JPEG_SUFFIXES = (".jpg", ".jpeg")


@dataclass
class DevicePipeline:
    """The encoder's geometry steps (applied per image, on tensors) and its Normalize."""

    geometry: list
    normalize: object

    def __call__(self, images: list[torch.Tensor]) -> torch.Tensor:
        """(3, h, w) uint8 images on the device -> (B, 3, H, W) float32, as ToTensor + Normalize."""
        out = []
        for image in images:
            for step in self.geometry:
                image = step(image)
            out.append(image)
        return self.normalize(torch.stack(out).float().div(255))


def device_pipeline(transform, dataset) -> tuple[DevicePipeline | None, str]:
    """(pipeline, "") when ``dataset`` can be decoded on the device, else (None, why not)."""
    from torchvision import transforms as T

    from ..encoders.base import _ToRGB
    from .base import ImageDataset
    steps = list(getattr(transform, "transforms", [transform]))
    steps = [s for s in steps if not isinstance(s, _ToRGB)]
    kinds = [type(s).__name__ for s in steps]
    geometry = all(isinstance(s, (T.Resize, T.CenterCrop)) for s in steps[:-2])
    if not (kinds[-2:] == ["ToTensor", "Normalize"] and geometry):
        return None, f"preprocessing is not a plain resize / crop / normalise pipeline ({' -> '.join(kinds)})"
    if any(isinstance(s, T.Resize) and (s.max_size is not None or s.antialias is False) for s in steps):
        return None, "Resize with max_size or without antialias"
    if dataset.has_masks:
        return None, "the dataset has masks (they follow the image through PIL)"
    if type(dataset).read_image is not ImageDataset.read_image:
        return None, f"{type(dataset).__name__} does not read plain image files"
    other = next((s.path for s in dataset.samples if s.path.suffix.lower() not in JPEG_SUFFIXES), None)
    if other is not None:
        return None, f"{other}: not a JPEG file"
    return DevicePipeline(steps[:-2], steps[-1]), ""


class FileBytes(torch.utils.data.Dataset):
    """What loader workers do under decode="device": read each file's bytes, nothing else."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        from torchvision.io import read_file
        sample = self.dataset.samples[index]
        try:
            data = read_file(str(sample.path))
        except RuntimeError as e:
            return BadSample(index, str(sample.path), f"unreadable image ({e})")
        return {"index": index, "bytes": data, "label": sample.label, "path": str(sample.path)}


def collate_bytes(items):
    """A batch of file bytes: decoding happens in :func:`decode_batch`, in the main process."""
    good = [x for x in items if not isinstance(x, BadSample)]
    return {"bad": [x for x in items if isinstance(x, BadSample)], "bytes": [x["bytes"] for x in good],
            "paths": [x["path"] for x in good], "index": [x["index"] for x in good],
            "label": [x["label"] for x in good]}


def decode_batch(batch: dict, pipeline: DevicePipeline, device) -> dict:
    """File bytes -> the batch ``_Extraction.forward`` reads; a file that does not decode is a BadSample."""
    from torchvision.io import ImageReadMode, decode_jpeg
    try:
        images = decode_jpeg(batch["bytes"], mode=ImageReadMode.RGB, device=device) if batch["bytes"] else []
        keep = list(range(len(images)))
    except RuntimeError:  # one bad file fails the whole call: find it (them) one by one
        images, keep = [], []
        for i, data in enumerate(batch["bytes"]):
            try:
                images.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
                keep.append(i)
            except RuntimeError as e:
                reason = " ".join(str(e).split())[:160]
                batch["bad"].append(BadSample(batch["index"][i], batch["paths"][i], f"unreadable image ({reason})"))
    out = {"bad": batch["bad"], "index": torch.tensor([batch["index"][i] for i in keep], dtype=torch.int64),
           "label": torch.tensor([batch["label"][i] for i in keep], dtype=torch.int64)}
    if images:
        out["pixels"] = pipeline(images)
    return out
