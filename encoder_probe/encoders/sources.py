"""Where encoder sources come from: the ``encoder_probe.sources`` entry points, plus in-process ones.

A source is a :class:`Source` object. Built-in and third-party sources alike are named in an
installed package's entry points (``[options.entry_points] encoder_probe.sources = NAME =
module:OBJECT``) and imported only when a spec names them or a directory has to be recognised;
``register_source`` adds one from running code (a notebook, a test). A directory's config.json is
offered to the sources in ``detect_order`` (lower first), never in import order, so which source
reads a checkpoint does not depend on what happened to be imported.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Callable

from ..errors import CheckpointError, SpecError

GROUP = "encoder_probe.sources"


@dataclass(frozen=True, kw_only=True)
class Source:
    """One way to load encoders: ``load(target, weights, *, spec, layer, with_projector, **options)``."""
    name: str
    load: Callable
    description: str
    detect_order: int  # directories are offered to detect() lowest first: the more specific layouts go first
    detect: Callable[[dict], bool] | None = None  # for directories: does this config.json belong to us?
    takes_weights: bool = False  # accepts TARGET@WEIGHTS


_IN_PROCESS: dict[str, Source] = {}
_LOADED: dict[str, Source] = {}  # entry points already imported


def register_source(name: str, *, description: str, detect_order: int, detect=None, takes_weights: bool = False):
    """Decorator for an in-process source: ``load(target, weights, **options) -> VisionEncoder``
    becomes source ``name`` (it wins over an installed source of the same name)."""

    def decorate(load):
        _IN_PROCESS[name] = Source(name=name, load=load, description=description, detect_order=detect_order,
                                   detect=detect, takes_weights=takes_weights)
        return load

    return decorate


def _entry_points() -> dict:
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def _load(ep) -> Source:
    """Import one entry point; a broken or wrong one is a one-line SpecError naming it."""
    if ep.name not in _LOADED:
        where = f"encoder source {ep.name!r} ({ep.value})"
        try:
            source = ep.load()
        except Exception as e:
            raise SpecError(f"{where} failed to import: {type(e).__name__}: {e}") from None
        if not isinstance(source, Source):
            raise SpecError(f"{where}: expected an encoder_probe.encoders.sources.Source, got {type(source).__name__}")
        if source.name != ep.name:
            raise SpecError(f"{where}: the Source is named {source.name!r}; the entry point must use its name")
        _LOADED[ep.name] = source
    return _LOADED[ep.name]


def source_names() -> list[str]:
    """Every known source name, without importing any source."""
    return sorted({*_entry_points(), *_IN_PROCESS})


def get_source(name: str) -> Source | None:
    """The source called ``name`` (importing only that one), or None."""
    if name in _IN_PROCESS or name in _LOADED:
        return _IN_PROCESS.get(name) or _LOADED[name]
    ep = _entry_points().get(name)
    return _load(ep) if ep is not None else None


def list_sources() -> list[Source]:
    """Every source, in detection order."""
    found = {name: _load(ep) for name, ep in _entry_points().items() if name not in _IN_PROCESS}
    return sorted({**found, **_IN_PROCESS}.values(), key=lambda s: (s.detect_order, s.name))


def read_config(directory: Path) -> dict:
    file = directory / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{directory}: no recognisable checkpoint (no config.json)")
    try:
        config = json.loads(file.read_text())
    except ValueError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return config


def detect_directory(directory: Path) -> Source:
    """The first source, in detect_order, whose detect() claims the directory's config.json."""
    config = read_config(directory)
    for source in list_sources():
        if source.detect is not None and source.detect(config):
            return source
    what = config.get("model_type") or config.get("architectures") or "no model_type"
    raise CheckpointError(f"{directory / 'config.json'}: no recognisable checkpoint ({what}); "
                          "supported: LLaVA/PIVOT, LlavaOnevision, Qwen2-VL, Qwen2.5-VL, InternVL, "
                          "CLIP, SigLIP, SigLIP2, DINOv2")
