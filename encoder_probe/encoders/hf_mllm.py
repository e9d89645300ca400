"""HF multimodal checkpoints whose tower is an HF ViT: LLaVA(-NeXT/-OneVision) and InternVL.

Each family is data: where its tower and projector keys live (transformers 5's on-disk layout,
its in-memory ``model.`` layout, and the 4.x layout with a ``vision_model.`` infix are all
accepted), which projector class it uses, and whether it pixel-shuffles before projecting.
The feature layer and select strategy come from the checkpoint's own config.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError, SpecError
from .base import LayerInfo
from .checkpoint import CheckpointReader, load_into, training_details
from .hf_tower import HFTower, HFTowerEncoder, build_tower, load_config, preprocess_from_dir
from .sources import Source, read_config


@dataclass(frozen=True)
class Family:
    projector: str  # "module.Class" under transformers.models
    vision_prefixes: tuple[str, ...] = ("model.vision_tower.", "vision_tower.")
    projector_prefixes: tuple[str, ...] = ("model.multi_modal_projector.", "multi_modal_projector.")
    pixel_shuffle: bool = False


FAMILIES = {
    "llava": Family("llava.modeling_llava.LlavaMultiModalProjector"),
    "llava_next": Family("llava_next.modeling_llava_next.LlavaNextMultiModalProjector"),
    "llava_onevision": Family("llava_onevision.modeling_llava_onevision.LlavaOnevisionMultiModalProjector"),
    "internvl": Family("internvl.modeling_internvl.InternVLMultiModalProjector", pixel_shuffle=True),
}


NEWLINE_KEYS = ("model.image_newline", "image_newline")


def detect(config: dict) -> bool:
    if "InternVLChatModel" in (config.get("architectures") or []):
        return True  # recognised, refused with a clear message in load()
    return config.get("model_type") in FAMILIES


def _projector_class(path: str):
    module, cls = path.rsplit(".", 1)
    return getattr(importlib.import_module(f"transformers.models.{module}"), cls)


def load(directory: str, weights=None, *, spec: str, layer=None, with_projector=False, view="base"):
    path = Path(directory)
    raw = read_config(path)
    if "InternVLChatModel" in (raw.get("architectures") or []):
        raise CheckpointError(f"{path / 'config.json'}: original InternVL remote-code layout is not supported; "
                              "convert it with transformers' convert_internvl_weights_to_hf.py")
    config = load_config(path)
    family = FAMILIES[config.model_type]
    reader = CheckpointReader(path)

    vision_prefix = reader.first_prefix(family.vision_prefixes)
    if vision_prefix is None:
        raise CheckpointError(f"{path}: missing vision keys (none under {' or '.join(family.vision_prefixes)})")
    tower_model = build_tower(config.vision_config)
    load_into(tower_model, reader.load_prefix(vision_prefix), source=path)

    projector = None
    projector_prefix = reader.first_prefix(family.projector_prefixes)
    if projector_prefix is not None:
        projector = _projector_class(family.projector)(config)
        load_into(projector, reader.load_prefix(projector_prefix), source=path)

    feature_layer = config.vision_feature_layer
    if not isinstance(feature_layer, int):
        raise CheckpointError(f"{path / 'config.json'}: vision_feature_layer {feature_layer} (several layers "
                              "concatenated) is not supported yet; pass layer= to pick one")
    strategy = config.vision_feature_select_strategy
    tower = HFTower(tower_model)
    # InternVL reads last_hidden_state for -1; the LLaVA family always indexes hidden_states
    default = "final" if family.pixel_shuffle and feature_layer == -1 else feature_layer
    note = f"vision_feature_layer={feature_layer}, select strategy {strategy!r}"
    if family.pixel_shuffle:
        note += f", pixel shuffle {config.downsample_ratio}"
    preprocess, preprocess_from = preprocess_from_dir(path, config.vision_config)
    details = {"architecture": f"{config.model_type} (tower {type(tower_model).__name__})",
               "vision_keys": vision_prefix + "*", "vision_shards": len(reader.files_for(
                   k for k in reader.keys() if k.startswith(vision_prefix))),
               "preprocess_from": preprocess_from, **training_details(path)}
    full = _full_view(path, config, family, tower, reader, strategy) if view == "full" else {}
    if full:
        details["preprocess_from"] = full.pop("preprocess_from")
    return HFTowerEncoder(
        tower=tower, source="hf-mllm", projector_takes_prefix=strategy == "full",
        shuffle=config.downsample_ratio if family.pixel_shuffle else None,
        spec=spec, module=tower_model, preprocess=preprocess, projector=projector,
        layers=LayerInfo(default, tower.depth, tower.depth, note=note), layer=layer, with_projector=with_projector,
        details=details, view=view, **full)


SOURCE = Source(name="hf-mllm", load=load, detect_order=20,
                description="HF multimodal dirs: LlavaOnevision, LLaVA, LLaVA-NeXT, InternVL "
                "(single-file or sharded; transformers 5 and 4.x key layouts)", detect=detect)


def _full_view(path: Path, config, family: Family, tower: HFTower, reader, strategy: str) -> dict:
    """The full view's processor, geometry and newline vector, or a one-line error where there is none."""
    from .multiview import AnyresViews, TileViews
    from .processors import image_processor
    kind = config.model_type
    if kind == "llava":
        raise SpecError(f"{path}: LLaVA ({kind}) reads one view of the image; view 'full' is for anyres "
                        "(LLaVA-NeXT / OneVision), InternVL and Qwen2-VL checkpoints")
    preprocess, source = image_processor(path, kind, config)
    if family.pixel_shuffle:
        vision = config.vision_config
        tile = vision.image_size[0] if isinstance(vision.image_size, (list, tuple)) else vision.image_size
        side = tile // tower.patch[0]
        views = TileViews(preprocess.options, tile, int(side * config.downsample_ratio), side * tower.patch[0] / tile)
        return {"full_preprocess": preprocess, "views": views, "preprocess_from": source}
    if strategy == "full" and tower.num_prefix:
        raise SpecError(f"{path / 'config.json'}: select strategy 'full' keeps the CLS token of every tile; the "
                        "model cannot unpad such tiles, nor can view 'full'")
    aspect = getattr(config, "vision_aspect_ratio", None)
    max_tiles = int(aspect.removeprefix("anyres_max_")) if isinstance(aspect, str) and aspect.startswith("anyres_max_") \
        else None
    return {"full_preprocess": preprocess, "views": AnyresViews(config, max_tiles=max_tiles),
            "newline": reader.first_tensor(NEWLINE_KEYS), "preprocess_from": source}
