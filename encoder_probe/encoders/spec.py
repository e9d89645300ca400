"""An encoder spec, parsed once.

Spec forms: ``SOURCE:TARGET[@WEIGHTS]`` (``timm:vit_small_patch16_224@w.safetensors``,
``open_clip:ViT-B-32``, ``hf:/path/dir``) or a plain directory, whose config.json says which
source reads it. A :class:`Spec` is still the text the user gave (it prints, JSON-dumps, hashes and
compares as that text), with what the text names attached, so no caller splits it again.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import SpecError
from .sources import Source, detect_directory, get_source, source_names


class Spec(str):
    """``Spec.parse(text)``: the spec with ``.source`` (a Source), ``.target`` (what the source
    loads), ``.weights`` (a weights file or built-in weights name, or None) and ``.path`` (the
    checkpoint directory when the target is one, else None)."""

    source: Source
    target: str
    weights: str | None
    path: Path | None

    @classmethod
    def parse(cls, text) -> Spec:
        """The parsed spec, or a one-line SpecError; a Spec is returned as it is."""
        if isinstance(text, Spec):
            return text
        if not isinstance(text, str) or not text.strip():
            raise SpecError(f"empty encoder spec {text!r}")
        head, sep, rest = text.partition(":")
        source = get_source(head) if sep and head and "/" not in head else None
        if source is not None:
            if not rest:
                raise SpecError(f"malformed spec {text!r}: nothing after '{head}:'")
            target, at, weights = rest.partition("@") if source.takes_weights else (rest, "", "")
            if at and not weights:
                raise SpecError(f"malformed spec {text!r}: nothing after '@'")
            path = Path(target).expanduser()
            return cls._made(text, source, target, weights or None, path if path.is_dir() else None)
        path = Path(text).expanduser()
        if path.is_dir():
            return cls._made(text, detect_directory(path), str(path), None, path)
        if path.is_file():
            raise SpecError(f"{text}: a weights file needs a source, e.g. timm:NAME@{text} or open_clip:ARCH@{text}")
        if sep and "/" not in head and not path.exists():
            raise SpecError(f"unknown source {head!r} in spec {text!r} (known: {', '.join(source_names())})")
        raise SpecError(f"{text}: no such directory, and not a SOURCE:NAME spec")

    @classmethod
    def _made(cls, text: str, source: Source, target: str, weights: str | None, path: Path | None) -> Spec:
        spec = cls(text)
        spec.source, spec.target, spec.path = source, target, path
        spec.weights = str(Path(weights).expanduser()) if weights is not None else None
        return spec

    @property
    def parts(self) -> tuple[Source, str, str | None]:
        """(source, target, weights), for code written against the old tuple ``parse_spec``."""
        return self.source, self.target, self.weights
