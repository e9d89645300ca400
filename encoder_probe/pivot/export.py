"""Export a trainer checkpoint to the LLaVA-NeXT / PIVOT on-disk layout (``--export llava``).

The layout the original code base saves and ``encoders/llava.py`` reads: the SigLIP tower under
``model.vision_tower.vision_tower.vision_model.*`` truncated after the block the LM reads (LLaVA-
NeXT deletes the last block and feeds the last remaining hidden state, before post_layernorm),
the projector under ``model.mm_projector.*``, the LM as ``model.*`` / ``lm_head.*`` (LLaVA-Qwen).
A CLIP tower keeps its blocks and names the layer in ``mm_vision_select_layer``. The tower's own
config and preprocessing go to ``vision_tower/`` so the loader needs nothing from a hub:
``load_encoder(OUT, vision_config=OUT/vision_tower)`` gives back the trainer's tokens exactly.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..cache import atomic_dir, atomic_write_json
from ..encoders.hf_tower import HFTowerEncoder
from ..errors import SpecError
from .model import WEIGHTS, _save_tensors, load_mllm

VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
TOWER_DIR = "vision_tower"
_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


def _preprocessor_config(preprocess) -> dict:
    h, w = preprocess.size
    config = {"image_mean": list(preprocess.mean), "image_std": list(preprocess.std),
              "resample": _RESAMPLE[preprocess.interpolation], "do_resize": True, "do_normalize": True}
    if preprocess.resize == "exact":
        return {**config, "size": {"height": h, "width": w}, "do_center_crop": False}
    return {**config, "size": {"shortest_edge": preprocess.resize_to or min(h, w)},
            "crop_size": {"height": h, "width": w}, "do_center_crop": True}


def check_exportable(encoder, where) -> None:
    """The LLaVA layout holds an HF SigLIP/CLIP tower whose LM reads patch tokens of one block."""
    kind = getattr(getattr(encoder, "tower", None), "kind", None)
    if not isinstance(encoder, HFTowerEncoder) or kind not in ("siglip_vision_model", "clip_vision_model") \
            or encoder.shuffle or encoder.projector_takes_prefix:
        raise SpecError(f"{where}: --export llava needs an HF SigLIP or CLIP tower feeding patch tokens; "
                        f"this one is {encoder.spec} ({kind or type(encoder).__name__})")
    if not isinstance(encoder.layer, int):
        raise SpecError(f"{where}: the LM reads tower layer {encoder.layer!r}; the LLaVA layout can only name a "
                        "block output (train with an integer layer, e.g. --encoder-layer -2)")


def export_llava(checkpoint, out) -> Path:
    """Write ``checkpoint`` (a trainer dir) as a LLaVA/PIVOT dir at ``out`` (built atomically)."""
    out = Path(out)
    if out.exists():
        raise SpecError(f"{out}: already exists; export writes a new directory")
    mllm = load_mllm(checkpoint)
    encoder = mllm.encoder
    check_exportable(encoder, checkpoint)
    layer, kind = encoder.layer, encoder.tower.kind
    siglip = kind == "siglip_vision_model"
    state = {k.removeprefix("vision_model."): v for k, v in mllm.vision.state_dict().items()}
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    if siglip:  # keep the blocks up to the one read; LLaVA's "last block removed" then means the same layer
        state = {k: v for k, v in state.items()
                 if not (k.startswith("encoder.layers.") and int(k.split(".")[2]) >= layer)}
    tensors = {VISION_PREFIX + k: v for k, v in state.items()}
    tensors.update({f"model.mm_projector.{k}": v for k, v in mllm.projector.state_dict().items()})
    tensors.update(mllm.lm.state_dict())  # Qwen2/Llama causal LMs already use model.* / lm_head.*

    tower_config = mllm.vision.config.to_dict()
    tower_config.update(num_hidden_layers=layer + 1 if siglip else tower_config["num_hidden_layers"],
                        model_type=kind)
    tower_config.pop("vision_use_head", None)
    tower_id = encoder.details.get("mm_vision_tower") or f"local/{Path(mllm.vision_spec['spec']).name}"
    lm_config = mllm.lm.config.to_dict()
    config = {**lm_config, "architectures": [f"Llava{type(mllm.lm).__name__.removesuffix('ForCausalLM')}ForCausalLM"],
              "model_type": f"llava_{lm_config['model_type']}", "mm_vision_tower": tower_id,
              "mm_hidden_size": state["embeddings.patch_embedding.weight"].shape[0],
              "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2 if siglip else layer,
              "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad",
              "exported_from": str(Path(checkpoint).resolve())}
    with atomic_dir(out) as tmp:
        _save_tensors(tmp / WEIGHTS, tensors)
        (tmp / TOWER_DIR).mkdir()
        (tmp / TOWER_DIR / "config.json").write_text(json.dumps(tower_config, indent=2))
        atomic_write_json(tmp / TOWER_DIR / "preprocessor_config.json", _preprocessor_config(encoder.preprocess))
        mllm.tokenizer.save(tmp)
        atomic_write_json(tmp / "config.json", config)
    return out
