"""Encoder sources and `load_encoder`. Sources are found through the ``encoder_probe.sources`` entry
points (see :mod:`encoder_probe.encoders.sources`) and imported when first needed."""
from .base import Preprocess, Tokens, VisionEncoder
from .registry import list_sources, load_encoder, parse_spec, register_source
from .sources import Source
from .spec import Spec

__all__ = ["Preprocess", "Source", "Spec", "Tokens", "VisionEncoder", "list_sources", "load_encoder", "parse_spec",
           "register_source"]
