"""`load_encoder`, the single entry point, and the checks of what it is given.

Specs are parsed by :class:`~encoder_probe.encoders.spec.Spec`; sources come from
:mod:`encoder_probe.encoders.sources` (entry points ``encoder_probe.sources``, plus in-process ones).
"""
from __future__ import annotations

import inspect
from pathlib import Path

import torch

from ..errors import SpecError
from .base import VIEWS, VisionEncoder
from .sources import Source, detect_directory, get_source, list_sources, read_config, register_source
from .spec import Spec

__all__ = ["Source", "Spec", "check_view", "detect_directory", "get_source", "list_sources", "load_encoder",
           "parse_device", "parse_dtype", "parse_image_size", "parse_spec", "read_config", "register_source",
           "short_spec", "spec_label"]


def parse_spec(spec: str) -> Spec:
    """The parsed spec (a str with .source, .target, .weights, .path), or a one-line SpecError."""
    return Spec.parse(spec)


def spec_label(spec: str) -> str:
    """An encoder spec with its paths cut to their last part: ``timm:vit_small@sft.safetensors``."""
    source, at, weights = spec.partition("@")
    prefix, colon, target = source.partition(":") if ":" in source.split("/")[0] else ("", "", source)
    label = prefix + colon + (Path(target.rstrip("/")).name if "/" in target else target)
    return label + (f"@{Path(weights).name}" if at else "")


def short_spec(spec: str, width: int = 32) -> str:
    """:func:`spec_label` in at most ``width`` characters, for progress bars: the architecture gives
    way to "…" before the weights' file name does (that is what tells two checkpoints apart),
    ``timm:vit_small_…@sft.safetensors``; else the middle of the label gives way."""
    label = spec_label(spec)
    if len(label) <= width:
        return label
    source, at, weights = label.partition("@")
    room = width - 1 - len(at + weights)
    if at and room >= 8:
        return source[:room] + "…" + at + weights
    head = max(1, (width - 1) * 2 // 5)
    return label[:head] + "…" + label[len(label) - (width - 1 - head):]


def check_view(source: Source | None, spec: str, view) -> str:
    """The view ``spec`` is asked for (None = base), if its source can give it; else a one-line SpecError."""
    view = view or "base"
    if view not in VIEWS:
        raise SpecError(f"unknown view {view!r}; choose {' or '.join(VIEWS)}")
    if view != "base" and source is not None and "view" not in inspect.signature(source.load).parameters:
        raise SpecError(f"{spec}: source {source.name!r} reads one view of an image; view 'full' is for MLLM "
                        "checkpoints with multi-view input (LLaVA-OneVision, LLaVA-NeXT, Qwen2/2.5-VL, InternVL)")
    return view


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).removeprefix("torch.").lower()
    if key not in _DTYPES:
        raise SpecError(f"unknown dtype {dtype!r} (choose {', '.join(_DTYPES)})")
    return _DTYPES[key]


def parse_device(device) -> torch.device | None:
    """A torch device from a string or device, or a one-line SpecError: checked before any work."""
    if device is None or device == "":
        return None
    try:
        parsed = device if isinstance(device, torch.device) else torch.device(str(device))
    except (RuntimeError, ValueError, TypeError):
        raise SpecError(f"unknown device {device!r} (e.g. cpu, cuda, cuda:1, mps)") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise SpecError(f"device {device!r}: CUDA is not available on this machine (torch {torch.__version__})")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise SpecError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise SpecError(f"device {device!r}: MPS is not available on this machine")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise SpecError(f"device {device!r}: only cpu, cuda[:N] and mps are supported")
    return parsed


def parse_image_size(size) -> tuple[int, int] | None:
    """``448``, ``"448"``, ``"336x504"`` (height x width), ``(336, 504)`` -> (H, W); else a one-line SpecError."""
    if size is None:
        return None
    if isinstance(size, str):
        parts = size.lower().replace("*", "x").split("x")
        try:
            values = [int(p.strip()) for p in parts]
        except ValueError:
            values = []
    elif isinstance(size, bool):
        values = []
    elif isinstance(size, int):
        values = [size]
    elif isinstance(size, (tuple, list)) and all(isinstance(v, int) and not isinstance(v, bool) for v in size):
        values = list(size)
    else:
        values = []
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) < 1:
        raise SpecError(f"image size {size!r}: expected N or HxW with positive integers (e.g. 448 or 336x504)")
    return values[0], values[1]


def load_encoder(spec: str | Spec, *, device=None, dtype=None, layer=None, with_projector: bool = False,
                 **options) -> VisionEncoder:
    """Load the vision tower a spec names, with its exact preprocessing and feature layer.

    ``layer`` overrides the default (what the MLLM's projector consumes, or the model's own final
    tokens for plain encoders); random-init towers are seeded (0), so a spec always names the
    same weights; ``with_projector=True`` makes ``forward_tokens`` return projected
    tokens. ``view``: "base" (default; the single view every source has) or "full" (MLLMs: every
    token the LM reads, tiles and native resolution included, through the checkpoint's own image
    processor; tokens carry their layout on the image). Source-specific options (``vision_config=DIR``, ``image_size=448`` or ``"336x504"`` or
    ``(336, 504)``, height x width) pass through; ``device`` is checked before anything is read.
    """
    spec = Spec.parse(spec)
    source = spec.source
    accepted = inspect.signature(source.load).parameters
    view = check_view(source, spec, options.pop("view", None))
    if "view" in accepted:
        options["view"] = view
    for name in options:
        if name not in accepted:
            raise SpecError(f"source {source.name!r} takes no option {name!r}")
    if "image_size" in options:
        options["image_size"] = parse_image_size(options["image_size"])
    device = parse_device(device)
    with torch.random.fork_rng(devices=[]):  # random-init towers (timm:NAME) are the same on every load
        torch.manual_seed(0)
        encoder = source.load(spec.target, spec.weights, spec=spec, layer=layer, with_projector=with_projector, **options)
    return encoder.to(device=device, dtype=parse_dtype(dtype))
