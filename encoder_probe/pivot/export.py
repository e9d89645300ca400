"""A transformers LLaVA / LLaVA-OneVision dir in the LLaVA-NeXT / PIVOT training-dir layout (``--export llava``).

The inverse of :func:`encoder_probe.mllm.convert.convert_pivot`: what it reads, written so that
converting the export back gives the same model (same weights, same forward):

- ``LlavaOnevisionForConditionalGeneration`` -> ``image_aspect_ratio`` anyres_max_N,
  ``mm_patch_merge_type`` spatial_unpad, ``image_grid_pinpoints`` in LLaVA-NeXT's (width, height)
  order, ``model.image_newline``. ``LlavaForConditionalGeneration`` -> flat: "pad" when its image
  processor pads to a square (expand2square), else "square".
- tower: ``model.vision_tower.vision_tower.vision_model.*``, no head. SigLIP: LLaVA-NeXT deletes the
  architecture's last block and feeds the last remaining hidden state (before post_layernorm, every
  token), so the blocks after the one the HF model reads are dropped and the architecture written is
  one block deeper than what is kept (``mm_vision_select_layer`` -2, as LLaVA-NeXT writes it; SigLIP
  ignores it). CLIP: every block, ``mm_vision_select_layer`` = the HF layer, select_feature "patch"
  (strategy default: CLS dropped) or "cls_patch" (strategy full; flat only).
- projector ``model.mm_projector.{0,2}.*`` (mlp2x_gelu), LM ``model.*`` / ``lm_head.weight`` (absent
  when tied, as LLaVA-NeXT saves it), LM config fields at the top of config.json as LLaVA-NeXT's
  ``LlavaQwenConfig`` (Llama, Mistral) holds them, with the 4.x ``rope_theta`` / ``rope_scaling``.
- ``mm_vision_tower``: the hub id of the built-in table of known towers when the tower's shapes are
  one of them (LLaVA-NeXT fetches that tower, then takes the weights from the dir), else a local name.
  The tower's own config and preprocessing go to ``vision_tower/`` (config.json +
  preprocessor_config.json): nothing on a hub is needed, ``--vision-config OUT/vision_tower``.
- tokenizer (with the processor's chat template) as the HF dir has it: ``<image>`` keeps its id.

Not expressible, refused before any work (:func:`check_exportable`): Qwen2-VL / Qwen2.5-VL / InternVL
(no LLaVA layout), LLaVA-NeXT (anyres without max: convert cannot read it back), towers other than
fixed-resolution SigLIP / CLIP, a list of feature layers, SigLIP with strategy "default" (it would drop
a patch token), CLIP strategy "full" with anyres, a projector other than GELU (erf) with biases, LMs
other than Qwen2 / Llama / Mistral.
"""
from __future__ import annotations

import re
from pathlib import Path

from ..cache import atomic_dir, atomic_write_json
from ..encoders.known_towers import KNOWN_TOWERS
from ..encoders.registry import read_config
from ..errors import CheckpointError, SpecError
from ..mllm.convert import LM_TYPES, is_pivot_dir

TOWER_DIR = "vision_tower"  # the tower's config + preprocessor_config, beside the weights
VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
LLAVA_CLASSES = {lm: arch for arch, lm in LM_TYPES.items()}  # qwen2 -> LlavaQwenForCausalLM
TOWERS = ("siglip_vision_model", "clip_vision_model")
ANYRES_MAX = re.compile(r"anyres_max_\d+")
NO_LAYOUT = {"qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2.5-VL", "internvl": "InternVL"}
# PretrainedConfig's generic fields: no LLaVA-NeXT config carries them
GENERIC = {"architectures", "transformers_version", "dtype", "torch_dtype", "output_hidden_states",
           "output_attentions", "return_dict", "chunk_size_feed_forward", "is_encoder_decoder", "id2label",
           "label2id", "problem_type", "_name_or_path", "model_type"}
# what the table of known towers is matched on
TOWER_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "patch_size", "image_size", "hidden_act", "layer_norm_eps")


def check_exportable(hf_dir) -> None:
    """A one-line SpecError (CheckpointError for a missing dir) when ``hf_dir``'s family, tower, layer,
    projector, LM or image processor has no LLaVA-NeXT layout that convert reads back; reads configs
    and the processor only, so ``probe train --export llava`` refuses before training."""
    path = _source(hf_dir)
    if is_pivot_dir(path):  # converts to llava / llava_onevision, which export back as they came
        return
    from ..encoders.hf_tower import load_config
    from ..mllm.model import _processor
    where = path / "config.json"
    kind = _kind(where, read_config(path))
    config = load_config(path)
    plan = _plan(where, config)
    _tower_preprocessor(path, _processor(path, kind).image_processor, config, plan)


def export_llava(hf_dir, out) -> Path:
    """``hf_dir`` (a transformers LLaVA / LLaVA-OneVision dir, or any dir load_mllm reads as one)
    written at ``out`` in the LLaVA-NeXT / PIVOT layout, atomically (whole or not at all).
    An existing ``out`` is refused before any work."""
    from ..mllm.model import load_mllm
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise SpecError(f"{out}: already exists; --export llava writes a new directory")
    path = _source(hf_dir)
    where = path / "config.json"
    check_exportable(path)  # before the weights are read
    mllm = load_mllm(path)
    model, config = mllm.model, mllm.model.config
    plan = _plan(where, config)
    preprocessor = _tower_preprocessor(path, mllm.processor.image_processor, config, plan)
    state, tied = _state(path, model, plan)
    fields = _llava_config(config, plan, tied, mllm.tokenizer, state)
    fields["exported_from"] = str(path.resolve())
    tokenizer = mllm.tokenizer
    if getattr(mllm.processor, "chat_template", None):  # the template the HF dir's processor applies
        tokenizer.chat_template = mllm.processor.chat_template

    from huggingface_hub import save_torch_state_dict
    from ..mllm.convert import quiet
    with atomic_dir(out) as tmp, quiet():
        save_torch_state_dict(state, tmp, metadata={"format": "pt"})  # model.safetensors, sharded past 5GB
        tokenizer.save_pretrained(tmp)
        (tmp / TOWER_DIR).mkdir()
        atomic_write_json(tmp / TOWER_DIR / "config.json", plan["tower_config"])
        atomic_write_json(tmp / TOWER_DIR / "preprocessor_config.json", preprocessor)
        atomic_write_json(tmp / "config.json", fields)
    return out


# -- what the layout can say --------------------------------------------------------------------
def _source(hf_dir) -> Path:
    path = Path(hf_dir)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such directory")
    return path


def _kind(where: Path, config: dict) -> str:
    """The family from config.json alone: llava / llava_onevision, or a one-line SpecError."""
    kind = config.get("model_type")
    if kind in ("llava", "llava_onevision"):
        return kind
    if kind in NO_LAYOUT:
        raise SpecError(f"{where}: {NO_LAYOUT[kind]} has no LLaVA-NeXT / PIVOT layout; --export llava takes "
                        "llava and llava_onevision dirs")
    if kind == "llava_next":
        raise SpecError(f"{where}: LLaVA-NeXT (anyres without max) cannot be read back by probe convert; "
                        "--export llava takes llava and llava_onevision dirs")
    raise SpecError(f"{where}: model_type {kind!r} is not an MLLM with a LLaVA-NeXT layout; --export llava "
                    "takes llava and llava_onevision dirs")


def _plan(where: Path, config) -> dict:
    """How the HF config is said in the LLaVA-NeXT layout (blocks kept, select layer / feature, merge,
    aspect ratio, pinpoints, LM class, tower config and id); a one-line SpecError for what it cannot say."""
    kind = config.model_type
    if kind not in ("llava", "llava_onevision"):
        _kind(where, {"model_type": kind})
    vision, text = config.vision_config, config.text_config
    tower = vision.model_type
    if tower not in TOWERS:
        raise SpecError(f"{where}: vision tower {tower}: the LLaVA-NeXT layout that convert reads holds a "
                        "fixed-resolution SigLIP or CLIP tower")
    layer, strategy = config.vision_feature_layer, config.vision_feature_select_strategy
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise SpecError(f"{where}: vision_feature_layer {layer!r}: the LLaVA-NeXT layout names one layer")
    depth = vision.num_hidden_layers
    absolute = layer + depth + 1 if layer < 0 else layer
    if not 0 <= absolute <= depth:
        raise SpecError(f"{where}: vision_feature_layer {layer} is not a layer of a {depth}-block tower")
    siglip = tower.startswith("siglip")
    if siglip:
        if strategy != "full":
            raise SpecError(f"{where}: vision_feature_select_strategy {strategy!r} with a SigLIP tower drops a patch "
                            "token; LLaVA-NeXT feeds every SigLIP token (strategy 'full')")
        if absolute == 0:
            raise SpecError(f"{where}: vision_feature_layer {layer} reads the SigLIP embeddings; LLaVA-NeXT reads "
                            "the output of a block (the last one kept)")
        kept, arch_layers, select_layer, select = absolute, absolute + 1, -2, "patch"
    else:
        if strategy not in ("default", "full"):
            raise SpecError(f"{where}: vision_feature_select_strategy {strategy!r} (default or full)")
        if strategy == "full" and kind == "llava_onevision":
            raise SpecError(f"{where}: strategy 'full' keeps the CLS token of every tile; the LLaVA-NeXT anyres "
                            "layout (cls_patch) cannot be converted back")
        kept, arch_layers, select_layer = depth, depth, layer
        select = "patch" if strategy == "default" else "cls_patch"
    act = getattr(config, "projector_hidden_act", "gelu")
    if act != "gelu" or not getattr(config, "multimodal_projector_bias", True):
        raise SpecError(f"{where}: projector {act} (bias {getattr(config, 'multimodal_projector_bias', True)}): "
                        "LLaVA-NeXT's mlp2x_gelu is Linear, GELU (erf), Linear, with biases")
    if text.model_type not in LLAVA_CLASSES:
        raise SpecError(f"{where}: LM {text.model_type}: LLaVA-NeXT LM classes are "
                        f"{', '.join(f'{a} ({m})' for m, a in LLAVA_CLASSES.items())}")
    plan = dict(kind=kind, siglip=siglip, kept=kept, select_layer=select_layer, select=select,
                architecture=LLAVA_CLASSES[text.model_type])
    if kind == "llava_onevision":
        aspect = getattr(config, "vision_aspect_ratio", None)
        if not (isinstance(aspect, str) and ANYRES_MAX.fullmatch(aspect)):
            raise SpecError(f"{where}: vision_aspect_ratio {aspect!r}: the LLaVA-NeXT layout that convert reads "
                            "is anyres_max_N")
        points = [[int(h), int(w)] for h, w in (config.image_grid_pinpoints or [])]
        if not points:
            raise SpecError(f"{where}: llava_onevision without image_grid_pinpoints")
        plan.update(aspect=aspect, merge="spatial_unpad", pinpoints=points)
    else:
        plan.update(merge="flat")
    tower_config = {k: v for k, v in vision.to_dict().items() if k not in GENERIC - {"model_type"}}
    tower_config.pop("vision_use_head", None)  # LLaVA-NeXT replaces the head with Identity
    tower_config.update(model_type=tower, num_hidden_layers=arch_layers,
                        architectures=["SiglipVisionModel" if siglip else "CLIPVisionModel"])
    plan.update(tower_config=tower_config, tower_id=_tower_id(tower_config, getattr(vision, "_name_or_path", "")))
    return plan


def _tower_id(tower_config: dict, name: str = "") -> str:
    """The known tower of these shapes (its name when it says which), else a local name saying the shapes."""
    same = [hub for hub, params in KNOWN_TOWERS.items()
            if all(params.get(k) == tower_config.get(k) for k in TOWER_FIELDS)]
    named = [hub for hub in same if name and hub.split("/")[-1] == str(name).rstrip("/").split("/")[-1]]
    if named or same:
        return (named or same)[0]
    c = tower_config
    family = "siglip" if c["model_type"].startswith("siglip") else "clip-vit"
    return (f"local/{family}-{c['hidden_size']}d-{c['num_hidden_layers']}l-patch{c['patch_size']}-"
            f"{c['image_size']}")


def _tower_preprocessor(path: Path, image, config, plan: dict) -> dict:
    """The tower's preprocessor_config.json (SigLIP / CLIP image processor) doing what ``image`` does,
    LLaVA-NeXT's process_images on top: pad to a square (flat "pad") or anyres tiles of the tower's size.
    Sets plan["aspect"] for flat dirs; a one-line SpecError for settings the layout cannot say."""
    where = path / "processor_config.json"
    name = type(image).__name__
    options = image.to_dict()
    for key in ("do_resize", "do_rescale", "do_normalize"):
        if options.get(key) is False:
            raise SpecError(f"{where}: {name} {key}=False; LLaVA-NeXT's preprocessing always does it")
    if abs(float(options.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
        raise SpecError(f"{where}: {name} rescale_factor {options['rescale_factor']}; LLaVA-NeXT rescales by 1/255")
    side = config.vision_config.image_size
    size = dict(options.get("size") or {})
    crop = dict(options.get("crop_size") or {})
    resample = int(options.get("resample", 3))
    if plan["kind"] == "llava_onevision":
        if size != {"height": side, "width": side}:
            raise SpecError(f"{where}: {name} size {size}; anyres tiles are the tower's {side}x{side}")
        points = [[int(h), int(w)] for h, w in options.get("image_grid_pinpoints") or []]
        if points != plan["pinpoints"]:
            raise SpecError(f"{where}: {name} image_grid_pinpoints differ from config.json's; the LLaVA-NeXT "
                            "layout has one list")
        geometry = {"size": size}
    else:
        plan["aspect"] = "pad" if options.get("do_pad") else "square"
        if "shortest_edge" in size:
            if not options.get("do_center_crop", True) or crop != {"height": side, "width": side}:
                raise SpecError(f"{where}: {name} resizes the shortest edge without a {side}x{side} centre crop; "
                                "the tower's processor takes a square")
            geometry = {"size": {"shortest_edge": int(size["shortest_edge"])}, "crop_size": crop,
                        "do_center_crop": True}
        elif size.get("height") == side and size.get("width") == side and not options.get("do_center_crop"):
            geometry = {"size": size, "do_center_crop": False}
        else:
            raise SpecError(f"{where}: {name} size {size} crop {crop or None}: the tower's processor takes "
                            f"{side}x{side}")
    return {"image_processor_type": "SiglipImageProcessor" if plan["siglip"] else "CLIPImageProcessor",
            "do_resize": True, **geometry, "resample": resample, "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": [float(v) for v in options["image_mean"]],
            "image_std": [float(v) for v in options["image_std"]], "do_convert_rgb": True}


# -- weights and config.json ------------------------------------------------------------------
def _state(path: Path, model, plan: dict) -> tuple[dict, bool]:
    """The model's tensors under the LLaVA-NeXT names (tower blocks past the one read and the head
    dropped; lm_head left out when tied) and whether it is tied."""
    lm = model.model.language_model
    tied = model.lm_head.weight.data_ptr() == lm.embed_tokens.weight.data_ptr()
    projector = {"linear_1": "0", "linear_2": "2"}
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("model.vision_tower."):
            rest = key.removeprefix("model.vision_tower.").removeprefix("vision_model.")
            block = re.match(r"encoder\.layers\.(\d+)\.", rest)
            if rest.startswith("head.") or (block and int(block.group(1)) >= plan["kept"]):
                continue
            out[VISION_PREFIX + rest] = value
        elif key.startswith("model.multi_modal_projector."):
            name, _, rest = key.removeprefix("model.multi_modal_projector.").partition(".")
            if name not in projector:
                raise CheckpointError(f"{path}: unexpected projector weight {key} for mlp2x_gelu")
            out[f"model.mm_projector.{projector[name]}.{rest}"] = value
        elif key.startswith("model.language_model."):
            out["model." + key.removeprefix("model.language_model.")] = value
        elif key == "lm_head.weight":
            if not tied:
                out[key] = value
        elif key == "model.image_newline" and plan["kind"] == "llava_onevision":
            out[key] = value
        else:
            raise CheckpointError(f"{path}: weight {key} has no place in the LLaVA-NeXT layout")
    return out, tied


def _llava_config(config, plan: dict, tied: bool, tokenizer, state: dict) -> dict:
    """config.json as LLaVA-NeXT's trainer writes it: the LM's fields (and the 4.x rope keys), then mm_*."""
    text = config.text_config
    fields = {k: v for k, v in text.to_dict().items() if k not in GENERIC}
    rope = dict(getattr(text, "rope_parameters", None) or {})
    if "rope_theta" in rope:  # transformers 4.x (LLaVA-NeXT's) reads rope_theta / rope_scaling
        fields["rope_theta"] = rope["rope_theta"]
        extra = {k: v for k, v in rope.items() if k != "rope_theta"}
        fields["rope_scaling"] = None if extra.get("rope_type", "default") == "default" else extra
    dtype = next(iter(state.values())).dtype
    vision = config.vision_config
    out = {"architectures": [plan["architecture"]],
           "model_type": "llava_" + plan["architecture"].removeprefix("Llava").removesuffix("ForCausalLM").lower(),
           **fields, "tie_word_embeddings": tied, "torch_dtype": str(dtype).removeprefix("torch."),
           "mm_vision_tower": plan["tower_id"], "mm_hidden_size": vision.hidden_size,
           "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": plan["select_layer"],
           "mm_vision_select_feature": plan["select"], "mm_patch_merge_type": plan["merge"],
           "image_aspect_ratio": plan["aspect"], "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
           "use_mm_proj": True, "tokenizer_padding_side": tokenizer.padding_side}
    if plan["kind"] == "llava_onevision":  # LLaVA-NeXT reads each pair as (width, height)
        out["image_grid_pinpoints"] = [[w, h] for h, w in plan["pinpoints"]]
    if tokenizer.model_max_length and tokenizer.model_max_length < 10 ** 9:
        out["tokenizer_model_max_length"] = int(tokenizer.model_max_length)
    return out
