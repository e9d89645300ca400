"""Errors that reach the user as one line: what went wrong and with which file."""


class EncoderProbeError(Exception):
    """Base class: the CLI prints these as one line and exits with status 2."""


class SpecError(EncoderProbeError):
    """A malformed or unknown encoder spec, probe name or option."""


class CheckpointError(EncoderProbeError):
    """A checkpoint that cannot be read safely or does not match the architecture."""


class LayerError(EncoderProbeError):
    """A layer index the encoder does not have."""


class DataError(EncoderProbeError):
    """A dataset directory, image or mask that cannot be read as the layout promises."""


class ImageRefused(DataError):
    """A readable image the model's own image processor will not take (Qwen2-VL: aspect ratio over 200)."""
