"""LLaVA-NeXT / PIVOT training directories (the original LLaVA code base's layout).

config.json: ``mm_vision_tower`` (a hub id, rarely on disk), ``mm_hidden_size``,
``mm_projector_type``, ``mm_vision_select_layer``. Weights: the tower under
``model.vision_tower.vision_tower.vision_model.*``, projector ``model.mm_projector.{0,2}``.
LLaVA-NeXT's SigLIP tower deletes its last block and head and feeds the LLM the last remaining
hidden state before post_layernorm; its CLIP tower keeps every block and feeds
``hidden_states[mm_vision_select_layer]`` without CLS.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..errors import CheckpointError, SpecError
from .base import LayerInfo
from .checkpoint import CheckpointReader, load_into
from .hf_tower import HFTower, HFTowerEncoder, build_tower, default_preprocess, load_config, preprocess_from_dir, vision_config_of
from .known_towers import lookup, vision_config as config_from_params
from .sources import Source, read_config

VISION_PREFIXES = ("model.vision_tower.vision_tower.", "vision_tower.vision_tower.", "model.vision_tower.")
PROJECTOR_PREFIXES = ("model.mm_projector.", "mm_projector.")
_LAYER = re.compile(r"encoder\.layers\.(\d+)\.")


def detect(config: dict) -> bool:
    return "mm_vision_tower" in config


def build_projector(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """LLaVA's projector builder: ``linear`` or ``mlp{N}x_gelu`` (Linear, GELU, ..., Linear)."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    match = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if not match:
        raise CheckpointError(f"mm_projector_type {kind!r} is not supported (linear, mlpNx_gelu)")
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(int(match.group(1)) - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)


def infer_tower_params(state: dict, present_layers: int) -> dict:
    """A tower config from weight shapes alone; the head count is not in the weights and is guessed."""
    patch = state["embeddings.patch_embedding.weight"]
    hidden, side = patch.shape[0], patch.shape[-1]
    clip = "embeddings.class_embedding" in state
    positions = state["embeddings.position_embedding.weight"].shape[0] - (1 if clip else 0)
    grid = round(positions ** 0.5)
    params = dict(hidden_size=hidden, intermediate_size=state["encoder.layers.0.mlp.fc1.weight"].shape[0],
                  num_attention_heads=16 if hidden >= 1024 else max(1, hidden // 64),
                  patch_size=side, image_size=grid * side)
    if clip:
        return dict(params, model_type="clip_vision_model", num_hidden_layers=present_layers,
                    hidden_act="quick_gelu", layer_norm_eps=1e-5)
    return dict(params, model_type="siglip_vision_model", num_hidden_layers=present_layers + 1,
                hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)


@dataclass
class TowerArch:
    """A LLaVA dir's vision tower as stored: its weights and the architecture they belong to."""

    prefix: str  # where the tower's keys live in the checkpoint
    state: dict  # its tensors, keys relative to the vision model (no ``vision_model.`` infix)
    present: int  # encoder blocks in the weights (SigLIP: one fewer than the architecture's)
    config: object  # transformers vision config of the whole (untruncated) tower
    preprocess: object  # base.Preprocess of the tower (size, mean, std, resize)
    arch_from: str  # where the architecture came from, for messages and details


def resolve_tower(path: Path, config: dict, reader: CheckpointReader, vision_config=None) -> TowerArch:
    """The tower's weights and architecture: ``vision_config`` (a local dir), else ``DIR/vision_tower``
    when the dir ships its tower's config, else the built-in table of known towers by ``mm_vision_tower``,
    else the weights' shapes. One-line CheckpointError when the
    tower is not in the weights or has more blocks than its architecture."""
    prefix = reader.first_prefix(VISION_PREFIXES)
    if prefix is None:
        raise CheckpointError(f"{path}: missing vision keys (none under {VISION_PREFIXES[0]}); the tower was "
                              f"probably frozen and not saved: load {config['mm_vision_tower']} itself with hf:DIR")
    state = reader.load_prefix(prefix)
    state = {k.removeprefix("vision_model."): v for k, v in state.items()}
    present = 1 + max((int(m.group(1)) for k in state if (m := _LAYER.match(k))), default=-1)
    if present == 0 or "embeddings.patch_embedding.weight" not in state:
        raise CheckpointError(f"{path}: missing vision keys (no encoder layers or patch embedding under {prefix})")

    tower_id = config["mm_vision_tower"]
    if vision_config is None and (path / "vision_tower" / "config.json").is_file():
        vision_config = path / "vision_tower"  # the tower's own config beside the weights (`probe train --export llava`)
    if vision_config is not None:
        vcfg = vision_config_of(load_config(Path(vision_config)), vision_config)
        preprocess, _ = preprocess_from_dir(Path(vision_config), vcfg)
        arch_from = f"--vision-config {vision_config}"
    elif (params := lookup(tower_id)) is not None:
        vcfg = config_from_params(params)
        preprocess = default_preprocess(vcfg)
        arch_from = f"built-in table ({tower_id})"
    else:
        vcfg = config_from_params(infer_tower_params(state, present))
        preprocess = default_preprocess(vcfg)
        arch_from = f"weight shapes ({tower_id} unknown; num_attention_heads={vcfg.num_attention_heads} guessed)"

    if present > vcfg.num_hidden_layers:
        raise CheckpointError(f"{path}: {present} tower blocks in the weights, but the architecture "
                              f"({arch_from}) has {vcfg.num_hidden_layers}")
    return TowerArch(prefix, state, present, vcfg, preprocess, arch_from)


def lm_feature_layer(vision_config, config: dict) -> tuple[int, str]:
    """The tower layer the LM reads (hidden_states index of the full tower; negatives count from its end)
    and why: SigLIP (LLaVA-NeXT deletes its last block) the last remaining block, before post_layernorm;
    CLIP ``mm_vision_select_layer`` (CLS dropped for select_feature "patch")."""
    select = int(config.get("mm_vision_select_layer", -2))
    if vision_config.model_type.startswith("siglip"):
        return (vision_config.num_hidden_layers - 1,
                "SigLIP tower, last block removed: last remaining hidden state before post_layernorm")
    return select, f"mm_vision_select_layer={select}, CLS dropped ({config.get('mm_vision_select_feature', 'patch')})"


def load(directory: str, weights=None, *, spec: str, layer=None, with_projector=False, vision_config=None,
         view="base"):
    path = Path(directory)
    config = read_config(path)
    reader = CheckpointReader(path)
    arch = resolve_tower(path, config, reader, vision_config)
    prefix, state, present, vcfg, preprocess, arch_from = (arch.prefix, arch.state, arch.present, arch.config,
                                                           arch.preprocess, arch.arch_from)
    tower_id = config["mm_vision_tower"]
    depth = vcfg.num_hidden_layers
    model = build_tower(vcfg, num_layers=present, use_head=False)
    missing = load_into(model, state, source=path, optional=lambda k: k.startswith("post_layernorm."))
    tower = HFTower(model)
    default, note = lm_feature_layer(vcfg, config)

    projector = None
    projector_prefix = reader.first_prefix(PROJECTOR_PREFIXES)
    if projector_prefix is not None:
        projector = build_projector(config.get("mm_projector_type", "linear"),
                                    config.get("mm_hidden_size", vcfg.hidden_size), config["hidden_size"])
        load_into(projector, reader.load_prefix(projector_prefix), source=path)
    full = _full_view(path, config, vcfg, preprocess, reader) if view == "full" else {}
    return HFTowerEncoder(
        tower=tower, source="llava", view=view, **full,
        projector_takes_prefix=config.get("mm_vision_select_feature", "patch") == "cls_patch",
        spec=spec, module=model, preprocess=preprocess, projector=projector,
        layers=LayerInfo(default, depth, present, has_final=present == depth and not missing, note=note),
        layer=layer, with_projector=with_projector,
        details={"architecture": f"{tower.kind} from {arch_from}", "mm_vision_tower": tower_id,
                 "vision_keys": prefix + "*", "blocks_in_weights": present,
                 **({"preprocess_from": "LlavaOnevisionImageProcessor with the dir's image_grid_pinpoints and the "
                                        "tower's mean/std (as transformers' conversion of these checkpoints)"}
                    if view == "full" else {})},
    )


SOURCE = Source(name="llava", load=load, detect_order=10,
                description="LLaVA-NeXT / PIVOT MLLM dir (mm_vision_tower, model.mm_projector)",
                detect=detect)


def grid_pinpoints(value, tile: int) -> list[list[int]]:
    """LLaVA-NeXT's ``image_grid_pinpoints`` in transformers' [height, width] order.

    LLaVA-NeXT reads each pair as (width, height) (its select_best_resolution and
    get_anyres_image_grid_shape); the range form "(AxB),...,(CxD)" expands to (i * tile, j * tile)
    for i in A..C, j in B..D, as its code does. A JSON string of pairs is read as the list."""
    if isinstance(value, str) and "x" in value:
        found = re.findall(r"\((\d+)x(\d+)\)", value)
        if len(found) < 2:
            raise ValueError(f"image_grid_pinpoints {value!r}: expected a list or '(AxB),...,(CxD)'")
        (a, b), (c, d) = [(int(x), int(y)) for x, y in (found[0], found[-1])]
        pairs = [(i * tile, j * tile) for i in range(a, c + 1) for j in range(b, d + 1)]
    else:
        pairs = [(int(w), int(h)) for w, h in (json.loads(value) if isinstance(value, str) else value)]
    if not pairs:
        raise ValueError("image_grid_pinpoints is empty")
    return [[h, w] for w, h in pairs]


def _full_view(path: Path, config: dict, vcfg, preprocess, reader) -> dict:
    """Anyres as LLaVA-OneVision's transformers conversion reproduces it: the OneVision image processor
    with the dir's pinpoints and the tower's mean/std, the model's newline vector and anyres_max."""
    from types import SimpleNamespace

    import transformers

    from .multiview import AnyresViews
    from .processors import ProcessorPreprocess
    aspect = str(config.get("image_aspect_ratio", "square"))
    merge = config.get("mm_patch_merge_type", "spatial_unpad")
    where = path / "config.json"
    if not aspect.startswith("anyres"):
        raise SpecError(f"{where}: image_aspect_ratio {aspect!r} reads one view of the image; view 'full' needs anyres")
    if "unpad" not in merge:
        raise SpecError(f"{where}: mm_patch_merge_type {merge!r} is not supported by view 'full' (spatial_unpad is)")
    if "image_grid_pinpoints" not in config:
        raise SpecError(f"{where}: anyres without image_grid_pinpoints")
    tile = vcfg.image_size
    try:
        points = grid_pinpoints(config["image_grid_pinpoints"], tile)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: {e}") from None
    geometry = SimpleNamespace(image_grid_pinpoints=points, vision_config=vcfg)
    max_tiles = int(aspect.removeprefix("anyres_max_")) if aspect.startswith("anyres_max_") else None
    processor = transformers.LlavaOnevisionImageProcessor(
        size={"height": tile, "width": tile}, image_mean=list(preprocess.mean), image_std=list(preprocess.std),
        image_grid_pinpoints=points, do_pad=True)
    return {"full_preprocess": ProcessorPreprocess.of(processor), "views": AnyresViews(geometry, max_tiles=max_tiles),
            "newline": reader.first_tensor(("model.image_newline", "image_newline"))}
