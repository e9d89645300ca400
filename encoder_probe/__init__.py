"""encoder-probe: how good is a vision encoder, and what did post-training do to it?"""
from .encoders import Preprocess, Tokens, VisionEncoder, list_sources, load_encoder
from .errors import CheckpointError, EncoderProbeError, LayerError, SpecError

__version__ = "0.1.0"
__all__ = ["load_encoder", "list_sources", "VisionEncoder", "Tokens", "Preprocess", "EncoderProbeError",
           "SpecError", "CheckpointError", "LayerError", "__version__"]
