"""The whole MLLM (vision tower + projector + LM) as a probe target: :func:`load_mllm`."""
from .model import (FAMILIES, LOSSES, MLLM, Example, VisualGradient, base_view, keep_view, load_mllm, loss_gradient,
                    reference_logprobs)

__all__ = ["FAMILIES", "LOSSES", "MLLM", "Example", "VisualGradient", "base_view", "keep_view", "load_mllm",
           "loss_gradient", "reference_logprobs"]
