"""The PIVOT trainer's own checkpoint directories (``probe train ...`` output).

The tower is rebuilt by the loader it was first loaded with (the spec recorded in config.json),
then the trained weights replace its own; the token layout, layer and preprocessing therefore
come from that one adapter, exactly as the trainer saw them. The projector comes along.
"""
from __future__ import annotations

from pathlib import Path

from .registry import register_source


def detect(config: dict) -> bool:
    from ..pivot.model import CONFIG_KEY
    return CONFIG_KEY in config


@register_source("pivot", description="PIVOT trainer checkpoint dir (probe train pretrain|sft|dpo|transplant)",
                 detect=detect)
def load(directory: str, weights=None, *, spec: str, layer=None, with_projector=False):
    from ..pivot.model import WEIGHTS, load_projector, load_tower_weights, read_mllm_config
    from .checkpoint import CheckpointReader
    from .registry import load_encoder

    path = Path(directory)
    config = read_mllm_config(path)
    vision = config["vision"]
    encoder = load_encoder(vision["spec"], layer=vision.get("layer") if layer is None else layer,
                           **vision.get("options", {}))
    reader = CheckpointReader(path / WEIGHTS)
    load_tower_weights(path, encoder, reader)
    projector = load_projector(path, config, reader)
    encoder.tower_source, encoder.source = encoder.source, "pivot"
    encoder.spec = spec
    encoder.projector, encoder.with_projector = projector.eval(), with_projector
    stage = config.get("stage", "?")
    # the tower's own loader recorded where *its* weights came from ("random init", an ImageNet
    # file); the trained weights replaced them, so the trainer's file is where these come from
    encoder.details.update({"weights": f"{path / WEIGHTS} (PIVOT trainer checkpoint, stage {stage})",
                            "tower": f"{vision['spec']} ({encoder.tower_source} adapter)",
                            "stage": stage, "projector": config.get("projector_type")})
    return encoder
