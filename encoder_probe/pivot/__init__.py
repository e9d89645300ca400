"""The minimal PIVOT trainer: an MLLM around any VisionEncoder, SFT and DPO with the tower unfrozen."""
from .losses import dpo_loss
from .model import MLLM, build_mllm, is_mllm_checkpoint, load_mllm, save_mllm, tiny_mllm

__all__ = ["MLLM", "build_mllm", "dpo_loss", "is_mllm_checkpoint", "load_mllm", "save_mllm", "tiny_mllm"]
