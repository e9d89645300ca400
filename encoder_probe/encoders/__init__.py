"""Encoder sources. Importing this package registers every built-in source."""
from .base import Preprocess, Tokens, VisionEncoder
from .registry import list_sources, load_encoder, parse_spec, register_source
from . import llava, hf_mllm, qwen2_vl, hf_source, timm_source, torchvision_source, open_clip_source  # noqa: F401  (registration order = detection order)

__all__ = ["Preprocess", "Tokens", "VisionEncoder", "list_sources", "load_encoder", "parse_spec", "register_source"]
