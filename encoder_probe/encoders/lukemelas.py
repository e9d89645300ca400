"""lukemelas/EfficientNet-PyTorch checkpoints (``_blocks.{i}._depthwise_conv``...) -> timm names.

The mapping is derived from the timm model itself, not by position: lukemelas numbers blocks
flat (``_blocks.0`` .. ``_blocks.15``) in execution order, timm nests them as
``blocks.{stage}.{block}``; inside a block the roles map by name, and a block without an
expansion conv (expand ratio 1) is timm's DepthwiseSeparable (conv_dw, bn1, conv_pw, bn2)
rather than an InvertedResidual (conv_pw, bn1, conv_dw, bn2, conv_pwl, bn3). Every converted
tensor must land on a timm key with the same shape, and every timm key must be filled.
"""
from __future__ import annotations

import re

import torch

from ..errors import CheckpointError

STEM = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
EXPANDED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
            "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand", "_project_conv": "conv_pwl",
            "_bn2": "bn3"}
SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_se_reduce": "se.conv_reduce",
             "_se_expand": "se.conv_expand", "_project_conv": "conv_pw", "_bn2": "bn2"}
_BLOCK = re.compile(r"_blocks\.(\d+)\.(\w+)\.(.+)")


def timm_block_names(model) -> list[str]:
    """timm's blocks in execution order, as ``blocks.{stage}.{block}``."""
    return [f"blocks.{s}.{b}" for s, stage in enumerate(model.blocks) for b in range(len(stage))]


def convert(state: dict[str, torch.Tensor], model, source: str) -> dict[str, torch.Tensor]:
    """The lukemelas state dict renamed to ``model``'s keys, checked name by name and shape by shape."""
    blocks = timm_block_names(model)
    expanded = {int(m.group(1)) for k in state if (m := _BLOCK.match(k)) and m.group(2) == "_expand_conv"}
    expected = model.state_dict()
    out = {}
    for key, tensor in state.items():
        if (m := _BLOCK.match(key)):
            index, role, leaf = int(m.group(1)), m.group(2), m.group(3)
            if index >= len(blocks):
                raise CheckpointError(f"{source}: {key}: block {index} but {type(model).__name__} has {len(blocks)}")
            roles = EXPANDED if index in expanded else SEPARABLE
            if role not in roles:
                raise CheckpointError(f"{source}: {key}: unknown block part {role!r}")
            name = f"{blocks[index]}.{roles[role]}.{leaf}"
        else:
            head, _, leaf = key.partition(".")
            if head not in STEM:
                raise CheckpointError(f"{source}: {key}: not an EfficientNet-PyTorch key")
            name = f"{STEM[head]}.{leaf}"
        if name not in expected:
            raise CheckpointError(f"{source}: {key} -> {name}: no such key in timm's model")
        if tensor.shape != expected[name].shape:
            raise CheckpointError(f"{source}: {key} -> {name}: shape {tuple(tensor.shape)} vs timm "
                                  f"{tuple(expected[name].shape)}")
        out[name] = tensor
    missing = [k for k in expected if k not in out]
    if missing:
        raise CheckpointError(f"{source}: timm keys left unfilled: {missing[:5]}")
    return out
