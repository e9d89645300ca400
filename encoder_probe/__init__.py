"""encoder-probe: how good is a vision encoder, and what did post-training do to it?"""
from .encoders import Preprocess, Tokens, VisionEncoder, list_sources, load_encoder
from .errors import CheckpointError, EncoderProbeError, LayerError, SpecError

__version__ = "0.1.0"
__all__ = ["load_encoder", "list_sources", "VisionEncoder", "Tokens", "Preprocess", "EncoderProbeError",
           "SpecError", "CheckpointError", "LayerError", "__version__"]

# Suite runner and reports (Python API of `probe run / compare / check`), imported on first use:
# pandas and matplotlib are not needed to load an encoder.
_LAZY = {"run_suite": ".runner", "compare": ".report.compare", "check": ".report.check", "load_mllm": ".mllm"}
__all__ += list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        from importlib import import_module
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
