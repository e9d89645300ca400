"""`hf:DIR`: save_pretrained directories of CLIP, SigLIP, SigLIP2 and DINOv2 (vision or dual tower)."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from .base import LayerInfo
from .checkpoint import CheckpointReader, load_into
from .hf_tower import DUAL_TOWER, VISION_TYPES, HFTower, HFTowerEncoder, build_tower, load_config, preprocess_from_dir, vision_config_of
from .sources import Source, read_config


def _is_hf_vision(config: dict) -> bool:
    return config.get("model_type") in VISION_TYPES | set(DUAL_TOWER)


def load_hf(directory: str, weights=None, *, spec: str, layer=None, with_projector=False):
    from . import hf_mllm, qwen2_vl

    path = Path(directory)
    raw = read_config(path)
    for mllm in (hf_mllm, qwen2_vl):  # `hf:` takes the HF MLLM layouts too
        if mllm.detect(raw):
            return mllm.load(directory, weights, spec=spec, layer=layer, with_projector=with_projector)
    config = load_config(path)
    vcfg = vision_config_of(config, path)
    model = build_tower(vcfg)
    reader = CheckpointReader(path)
    prefix = reader.first_prefix(["vision_model.", "model.vision_model."]) or ""
    state = {k: v for k, v in reader.load_prefix(prefix).items()
             if prefix or not k.startswith(("visual_projection.", "text_"))}
    load_into(model, state, source=path)
    projection = None
    if "visual_projection.weight" in reader.keys():
        weight = reader.load(["visual_projection.weight"])["visual_projection.weight"]
        projection = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        projection.weight.data.copy_(weight)
    preprocess, preprocess_from = preprocess_from_dir(path, vcfg)
    tower = HFTower(model)
    return HFTowerEncoder(
        tower=tower, source="hf", head_projection=projection, spec=spec, module=model, preprocess=preprocess,
        layers=LayerInfo("final", tower.depth, tower.depth, note="the model's last_hidden_state"),
        layer=layer, with_projector=with_projector,
        details={"architecture": f"{config.model_type} ({type(model).__name__})", "preprocess_from": preprocess_from},
    )


SOURCE = Source(name="hf", load=load_hf, detect_order=40,
                description="transformers save_pretrained dir: CLIP, SigLIP, SigLIP2, DINOv2 "
                "(vision-only or dual tower); also accepts HF MLLM dirs", detect=_is_hf_vision)
