"""A fresh LLaVA-style MLLM from a vision tower and a causal LM: `probe train pretrain` and `transplant`.

LLaVA's recipe: the tower and the LM as they are (weights copied exactly), a new mlp2x_gelu
projector (and, for OneVision, a new ``image_newline``), initialised as LLaVA-NeXT does (PyTorch's
``nn.Linear`` default; ``randn / sqrt(hidden)``) from ``seed``. The trainer then trains the projector
alone, then everything (pretrain), or the projector with the tower frozen (transplant).

- kind "llava_onevision" (PIVOT's family): LlavaOnevisionForConditionalGeneration with OneVision's
  published settings: anyres_max_9, its pinpoints ((1..6) x (1..6) tiles) in tiles of the tower's
  image size (384 for so400m: 384..2304), image_newline.
  kind "llava": LlavaForConditionalGeneration (one view).
  Feature layer (default): a tower dir is read at -2, the recipes' choice (LLaVA-NeXT / OneVision drop
  SigLIP's last block, LLaVA-1.5 reads CLIP's penultimate); a tower taken from an MLLM keeps the
  layer that MLLM read (published OneVision: -1 of its already shortened tower).
  Select strategy: "full" for SigLIP (no CLS), "default" for CLIP (CLS dropped).
- tower: any dir the encoder sources read whose tower is a fixed-resolution SigLIP or CLIP (vision
  or dual-tower save_pretrained dirs; LLaVA / NeXT / OneVision MLLM dirs and LLaVA-NeXT / PIVOT
  training dirs: their tower as the MLLM ran it). SigLIP's pooling head is left out: the MLLM never
  reads it (and an unused trainable head breaks DDP), as in the published OneVision / NeXT towers.
- tokenizer: the LM's, with ``<image>`` (and ``<video>``, which OneVision's processor needs) added
  where missing; new embedding rows are the mean of the others (deterministic; the ``<image>`` row is
  never read, masked_scatter replaces it). Chat template: the LM's when it renders an image part as
  the family's placeholder, else Qwen2's ChatML with it (a text LM's template cannot render images).
- image processor: the family's published class and geometry (:func:`published_processor` on the new
  config) with the tower's own normalisation (its preprocessor_config.json, else its family default);
  for "llava" also the tower's resize (SigLIP: squash to its size; CLIP: shortest edge + centre crop).
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from ..errors import CheckpointError, SpecError

KINDS = {"llava_onevision": "LlavaOnevision", "llava": "Llava"}
REFUSED = ("llava_next", "qwen2_vl", "qwen2_5_vl", "internvl")  # MLLM families compose does not build
TOWERS = ("siglip_vision_model", "clip_vision_model")  # what the LLaVA classes run (fixed resolution)
TOWER_LAYER = -2  # a plain tower dir: LLaVA-NeXT / OneVision's SigLIP without its last block, LLaVA-1.5's CLIP
TILES = range(1, 7)  # OneVision's anyres_max_9 pinpoints: (1..6) x (1..6) tiles


def compose_mllm(vision, lm, *, kind: str = "llava_onevision", vision_feature_layer: int | None = None,
                 seed: int = 0, dtype=None):
    """``(model, processor)``: a new ``kind`` MLLM of the tower in ``vision`` and the LM in ``lm``.

    ``dtype`` (torch dtype or name; None: float32, which holds bf16 / fp16 weights exactly) applies to
    the whole model. The caller's RNG is left as it was. One-line SpecError / CheckpointError naming
    the dir for what cannot be composed.
    """
    from ..encoders.registry import parse_dtype
    from ..mllm.convert import quiet
    if kind not in KINDS:
        why = " (compose builds LLaVA-style MLLMs only)" if kind in REFUSED else ""
        raise SpecError(f"MLLM kind {kind!r} is not one compose builds{why}; kinds: {', '.join(KINDS)}")
    vision, lm, dtype = Path(vision), Path(lm), parse_dtype(dtype) or torch.float32
    _directory(vision, "the vision tower")
    _directory(lm, "the LM")
    with quiet(), torch.random.fork_rng(devices=[]):
        return _compose(vision, lm, kind, vision_feature_layer, seed, dtype)


def _compose(vision: Path, lm: Path, kind: str, vision_feature_layer, seed: int, dtype):
    import transformers as T

    from ..mllm.convert import IMAGE_TOKEN, VIDEO_TOKEN, image_tokenizer
    from ..mllm.model import build_processor
    tower, preprocess, read = _tower(vision)
    vcfg = copy.deepcopy(tower.config)
    head = getattr(vcfg, "vision_use_head", False)
    if head:
        vcfg.vision_use_head = False
    siglip = vcfg.model_type.startswith("siglip")
    if kind == "llava_onevision" and not siglip:  # build_processor counts no CLS per OneVision tile
        raise SpecError(f"{vision}: a {vcfg.model_type} tower in llava_onevision is not supported (its processor "
                        "would miscount the CLS token each tile drops); use kind llava or a SigLIP tower")
    layer = (TOWER_LAYER if read is None else read) if vision_feature_layer is None else vision_feature_layer
    depth = vcfg.num_hidden_layers
    if not isinstance(layer, int) or not -depth - 1 <= layer <= depth:
        raise SpecError(f"{vision}: vision_feature_layer {layer!r} is not a layer of its {depth}-block tower "
                        f"(-{depth + 1}..{depth})")
    tokens = (IMAGE_TOKEN, VIDEO_TOKEN) if kind == "llava_onevision" else (IMAGE_TOKEN,)
    _lm_config(lm)
    tokenizer, ids = image_tokenizer(lm, {}, tokens)
    tokenizer.chat_template = _template(tokenizer, kind)
    causal = _causal_lm(lm, dtype)
    text = causal.config

    side, strategy = vcfg.image_size // vcfg.patch_size, "full" if siglip else "default"
    common = dict(vision_config=vcfg, text_config=text, image_token_id=ids[IMAGE_TOKEN], projector_hidden_act="gelu",
                  vision_feature_layer=layer, vision_feature_select_strategy=strategy, multimodal_projector_bias=True,
                  tie_word_embeddings=text.tie_word_embeddings)
    if kind == "llava":
        config = T.LlavaConfig(**common, image_seq_length=side * side)
    else:
        tile = vcfg.image_size
        config = T.LlavaOnevisionConfig(**common, video_token_id=ids[VIDEO_TOKEN], vision_aspect_ratio="anyres_max_9",
                                        image_grid_pinpoints=[[tile * i, tile * j] for i in TILES for j in TILES])

    state = {f"model.vision_tower.{k}": v for k, v in tower.state_dict().items()
             if not (head and k.startswith("head."))}
    state.update({f"model.language_model.{k}": v for k, v in causal.base_model.state_dict().items()})
    if not text.tie_word_embeddings:
        state.update({f"lm_head.{k}": v for k, v in causal.get_output_embeddings().state_dict().items()})
    state.update(_fresh(kind, vcfg.hidden_size, text.hidden_size, seed))
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    cls = getattr(T, f"{KINDS[kind]}ForConditionalGeneration")
    model, info = cls.from_pretrained(None, config=config, state_dict=state, dtype=dtype, output_loading_info=True)
    missing = sorted(set(info.get("missing_keys", ())) - ({"lm_head.weight"} if text.tie_word_embeddings else set()))
    if missing or info.get("unexpected_keys") or info.get("mismatched_keys"):
        raise CheckpointError(f"{lm}: the LM's weights do not fit {cls.__name__}'s language model (missing "
                              f"{', '.join(missing[:3]) or 'none'}; unexpected "
                              f"{', '.join(sorted(info.get('unexpected_keys', ()))[:3]) or 'none'})")
    _grow_vocab(model, len(tokenizer))
    image = _image_processor(kind, preprocess, config)
    return model, build_processor(kind, image, tokenizer, config)


def _directory(path: Path, what: str) -> None:
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such directory ({what})")


def _tower(path: Path):
    """The tower module (weights loaded), its preprocessing and, for a tower taken from an MLLM, the layer
    that MLLM read (a negative hidden_states index of the module; None for a plain tower dir)."""
    from ..encoders.hf_mllm import FAMILIES as HF_MLLMS
    from ..encoders.hf_tower import DUAL_TOWER
    from ..encoders.registry import load_encoder, read_config
    raw = read_config(path)
    kind = raw.get("model_type")
    source = ("llava" if "mm_vision_tower" in raw else "hf-mllm" if kind in HF_MLLMS
              else "hf" if kind in TOWERS or kind in DUAL_TOWER else None)
    if source is None:
        raise CheckpointError(f"{path / 'config.json'}: model_type {kind!r} is not a vision tower compose takes "
                              "(SigLIP / CLIP vision or dual-tower dirs, LLaVA / NeXT / OneVision or PIVOT MLLM dirs)")
    encoder = load_encoder(f"{source}:{path}")
    found = encoder.module.config.model_type
    if found not in TOWERS:
        raise SpecError(f"{path}: its tower is {found}; the LLaVA classes run a fixed-resolution SigLIP or CLIP "
                        "tower")
    depth = encoder.module.config.num_hidden_layers
    read = None if source == "hf" else encoder.layer - depth - 1 if isinstance(encoder.layer, int) else -1
    return encoder.module, encoder.preprocess, read


def _lm_config(path: Path):
    """The LM dir's config, or a one-line error when it is not a causal LM's."""
    import transformers as T

    from ..encoders.hf_tower import load_config
    from ..encoders.registry import read_config
    read_config(path)  # "no config.json" as the other loaders say it
    config = load_config(path)
    if type(config) not in T.AutoModelForCausalLM._model_mapping:
        raise CheckpointError(f"{path / 'config.json'}: model_type {config.model_type!r} is not a causal LM "
                              "(Qwen2ForCausalLM, LlamaForCausalLM, ...)")
    return config


def _causal_lm(path: Path, dtype):
    import transformers as T
    try:
        model, info = T.AutoModelForCausalLM.from_pretrained(path, local_files_only=True, use_safetensors=True,
                                                             dtype=dtype, output_loading_info=True)
    except Exception as e:  # noqa: BLE001 - transformers', safetensors' and torch's own errors: one line
        raise CheckpointError(f"{path}: not a causal LM transformers can load ({' '.join(str(e).split())[:200]})") \
            from None
    if info.get("missing_keys") or info.get("mismatched_keys"):
        raise CheckpointError(f"{path}: the weights do not match {type(model).__name__}'s config (missing "
                              f"{', '.join(sorted(info.get('missing_keys', ()))[:3]) or 'none'})")
    return model


def _template(tokenizer, kind: str) -> str:
    """The LM's chat template when it renders an image part as ``kind``'s placeholder, else ChatML with it."""
    from ..mllm.model import IMAGE_PLACEHOLDERS, chatml_template
    message = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}]
    try:
        text = tokenizer.apply_chat_template(message, tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - no template, or one for string contents only
        text = ""
    return tokenizer.chat_template if IMAGE_PLACEHOLDERS[kind] in text else chatml_template(kind)


def _fresh(kind: str, vision_width: int, width: int, seed: int) -> dict:
    """The new parts, as LLaVA-NeXT initialises them (build_vision_projector's nn.Linear; image_newline
    randn / sqrt(hidden)), from ``seed`` alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = {f"model.multi_modal_projector.linear_{i}.{k}": v
                 for i, shape in ((1, (vision_width, width)), (2, (width, width)))
                 for k, v in torch.nn.Linear(*shape).state_dict().items()}
        if kind == "llava_onevision":
            state["model.image_newline"] = torch.randn(width) / width ** 0.5
    return state


def _grow_vocab(model, size: int) -> None:
    """Embedding (and untied lm_head) rows for added tokens: the mean of the others, as mllm.convert does."""
    rows = model.get_input_embeddings().weight.shape[0]
    if size <= rows:
        return
    model.resize_token_embeddings(size, mean_resizing=False)  # its random rows are overwritten below
    weights = {id(m.weight): m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings())}
    with torch.no_grad():  # one weight when tied
        for weight in weights.values():
            weight[rows:] = weight[:rows].mean(0)


def _image_processor(kind: str, preprocess, config):
    """The family's published image processor for ``config`` with the tower's normalisation (and, for
    "llava", its resize)."""
    from ..encoders.processors import published_processor
    image = published_processor(kind, config)
    settings = {**image.to_dict(), "image_mean": list(preprocess.mean), "image_std": list(preprocess.std)}
    if kind == "llava":
        h, w = preprocess.size
        if preprocess.resize == "exact":
            settings.update(size={"height": h, "width": w}, do_center_crop=False)
        else:
            settings.update(size={"shortest_edge": preprocess.resize_to or min(h, w)},
                            crop_size={"height": h, "width": w})
    return type(image).from_dict(settings)
