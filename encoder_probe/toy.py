"""Tiny random checkpoints in the real on-disk layouts, for tests, the demo and benchmarks.

Every writer builds the real model class from a small config (random weights, seeded) and saves
it exactly as the original code base would, so loaders are exercised on true layouts.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

TEXT = dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=128, bos_token_id=0, eos_token_id=1)
SIGLIP = dict(model_type="siglip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
              num_attention_heads=4, image_size=32, patch_size=8)


def _quiet():
    from transformers.utils import logging
    logging.set_verbosity_error()
    logging.disable_progress_bar()


def write_siglip_dir(out: str | Path, *, seed: int = 0, **overrides) -> Path:
    """A save_pretrained SiglipVisionModel dir (what --vision-config points at)."""
    from transformers import SiglipVisionConfig, SiglipVisionModel
    _quiet()
    torch.manual_seed(seed)
    params = {k: v for k, v in {**SIGLIP, **overrides}.items() if k != "model_type"}
    SiglipVisionModel(SiglipVisionConfig(**params)).save_pretrained(out)
    return Path(out)


def write_pivot(out: str | Path, *, tower: str = "local/tiny-siglip", vision: dict | None = None, seed: int = 0,
                keep_post_layernorm: bool = True, hidden_size: int = 64) -> Path:
    """A LLaVA-NeXT / PIVOT training dir: truncated SigLIP tower, mlp2x_gelu projector, a tiny LM.

    Keys as LLaVA-NeXT saves them: ``model.vision_tower.vision_tower.vision_model.*`` (last block
    and head removed), ``model.mm_projector.{0,2}.*``, ``model.layers.*``, ``lm_head.weight``.
    """
    from transformers import SiglipVisionConfig, SiglipVisionModel
    _quiet()
    torch.manual_seed(seed)
    params = {k: v for k, v in {**SIGLIP, **(vision or {})}.items() if k != "model_type"}
    full = SiglipVisionModel(SiglipVisionConfig(**params, vision_use_head=False))
    del full.encoder.layers[-1:]
    state = {f"model.vision_tower.vision_tower.vision_model.{k}": v for k, v in full.state_dict().items()
             if keep_post_layernorm or not k.startswith("post_layernorm.")}
    d = params["hidden_size"]
    projector = torch.nn.Sequential(torch.nn.Linear(d, hidden_size), torch.nn.GELU(),
                                    torch.nn.Linear(hidden_size, hidden_size))
    state.update({f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()})
    state["model.image_newline"] = torch.randn(hidden_size)
    state["model.embed_tokens.weight"] = torch.randn(128, hidden_size)
    state["model.layers.0.mlp.down_proj.weight"] = torch.randn(hidden_size, hidden_size)
    state["lm_head.weight"] = torch.randn(128, hidden_size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors", metadata={"format": "pt"})
    config = {"architectures": ["LlavaQwenForCausalLM"], "model_type": "llava_qwen", "hidden_size": hidden_size,
              "mm_vision_tower": tower, "mm_hidden_size": d, "mm_projector_type": "mlp2x_gelu",
              "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "image_aspect_ratio": "anyres_max_9",
              "image_grid_pinpoints": "(1x1),...,(6x6)", "mm_patch_merge_type": "spatial_unpad"}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


# (vision config, extra MLLM config) of the friendly-size toys
_TOY_MLLMS = {
    "llava_onevision": (SIGLIP, dict(vision_feature_layer=-2, image_grid_pinpoints=[[32, 32]])),
    "internvl": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      image_size=[32, 32], patch_size=[4, 4]), {}),
    "qwen2_vl": (dict(depth=3, embed_dim=64, hidden_size=64, num_heads=4, patch_size=4, spatial_merge_size=2), {}),
    "qwen2_5_vl": (dict(depth=3, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=64, patch_size=4,
                        spatial_merge_size=2, window_size=16, fullatt_block_indexes=[2]), {}),
}
_MLLM_CLASSES = {"llava": "Llava", "llava_onevision": "LlavaOnevision", "llava_next": "LlavaNext", "internvl": "InternVL",
                 "qwen2_vl": "Qwen2VL", "qwen2_5_vl": "Qwen2_5_VL"}
ANYRES_MAX_9 = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]  # LLaVA-OneVision's pinpoints
LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


# -- a real offline tokenizer and chat template --------------------------------------------------
# The special tokens each family's processor expands (same names as the published checkpoints' tokenizers).
IMAGE_TOKENS = {
    "llava": (["<image>"], {}),
    "llava_next": (["<image>"], {}),
    "llava_onevision": (["<image>", "<video>"], {}),
    "qwen2_vl": (["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"], {}),
    "internvl": (["<img>", "</img>", "<IMG_CONTEXT>", "<video>"],
                 dict(start_image_token="<img>", end_image_token="</img>", context_image_token="<IMG_CONTEXT>",
                      video_token="<video>")),
}
IMAGE_TOKENS["qwen2_5_vl"] = IMAGE_TOKENS["qwen2_vl"]
CHAT_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB = 512  # the toy LMs' embedding rows (the tokenizer has fewer, as real Qwen2 checkpoints do)


def chat_tokenizer(kind: str = "llava_onevision"):
    """A byte-level BPE tokenizer built offline with ``tokenizers`` (any text encodes), ChatML specials
    and the family's image tokens, eos ``<|im_end|>``, pad ``<|endoftext|>``, and its chat template
    (Qwen2's ChatML with the family's image placeholder)."""
    import transformers as T
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from .mllm.model import chatml_template
    image_specials, named = IMAGE_TOKENS[kind]
    specials = CHAT_SPECIALS + image_specials
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["system user assistant You are a helpful assistant.", "What colour is the square? What is in the image?",
              "Is the circle in the top or the bottom half, left or right? large or small red green blue cyan"]
    tok.train_from_iterator(corpus * 4, trainer)
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                     extra_special_tokens=named or None, chat_template=chatml_template(kind))


def token_config(kind: str, tokenizer) -> dict:
    """The MLLM config's special token ids, as the tokenizer numbers them."""
    ids = tokenizer.convert_tokens_to_ids
    if kind.startswith("qwen"):
        return dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                    vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    if kind == "internvl":
        return dict(image_token_id=ids("<IMG_CONTEXT>"))
    out = dict(image_token_id=ids("<image>"))
    return out | (dict(video_token_id=ids("<video>")) if kind == "llava_onevision" else {})


def _build_mllm(kind: str, vision: dict, text: dict, seed: int, **config):
    """``<Family>ForConditionalGeneration(<Family>Config(...))`` with seeded random weights, its LM
    sized for :func:`chat_tokenizer` and its special token ids set from it."""
    import transformers as T
    _quiet()
    torch.manual_seed(seed)
    tokenizer = chat_tokenizer(kind)
    ids = tokenizer.convert_tokens_to_ids
    text = dict(text, vocab_size=VOCAB, bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
                pad_token_id=ids("<|endoftext|>"))
    if kind.startswith("qwen"):
        text = {k: v for k, v in text.items() if k != "model_type"} | dict(
            rope_parameters=dict(rope_type="default", mrope_section=[2, 2, 4]))
    family = _MLLM_CLASSES[kind]
    return getattr(T, f"{family}ForConditionalGeneration")(
        getattr(T, f"{family}Config")(vision_config=vision, text_config=text, **token_config(kind, tokenizer), **config))


def hf_mllm(kind: str, *, seed: int = 0):
    """A tiny random transformers MLLM: llava_onevision | internvl | qwen2_vl | qwen2_5_vl."""
    if kind not in _TOY_MLLMS:
        raise ValueError(f"unknown toy MLLM {kind!r}")
    vision, config = _TOY_MLLMS[kind]
    return _build_mllm(kind, vision, TEXT, seed, **config)


def published_mllm(kind: str, *, seed: int = 0, pinpoints: list | None = None):
    """A transformers MLLM at the PUBLISHED vision geometry with tiny widths and depths.

    llava_onevision: SigLIP so400m/14-384 (27x27 per view, floored), anyres_max_9 pinpoints,
    layer -1, strategy full. llava (1.5) and llava_next: CLIP-L/14-336 (24x24 per view), layer -2,
    strategy default; llava_next with its five pinpoints. qwen2_vl / qwen2_5_vl: 14 px patches, 2x2 merge (2.5: 112 px windows). internvl:
    InternViT 448 px tiles, patch 14, pixel shuffle 0.5 (256 tokens a tile).
    """
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    published = {
        "llava_onevision": (dict(small, model_type="siglip_vision_model", image_size=384, patch_size=14), dict(
            vision_feature_layer=-1, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
            image_grid_pinpoints=pinpoints or ANYRES_MAX_9)),
        "llava": (dict(small, model_type="clip_vision_model", image_size=336, patch_size=14, projection_dim=32),
                  dict(vision_feature_layer=-2, vision_feature_select_strategy="default")),
        "llava_next": (dict(small, model_type="clip_vision_model", image_size=336, patch_size=14, projection_dim=32),
                       dict(vision_feature_layer=-2, vision_feature_select_strategy="default",
                            image_grid_pinpoints=pinpoints or LLAVA_NEXT_PINPOINTS)),
        "internvl": (dict(small, image_size=[448, 448], patch_size=[14, 14], attention_bias=True,
                          layer_scale_init_value=0.1), dict(downsample_ratio=0.5)),
        "qwen2_vl": (dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                          spatial_merge_size=2), {}),
        "qwen2_5_vl": (dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                            patch_size=14, spatial_merge_size=2, window_size=112, fullatt_block_indexes=[1]), {}),
    }
    if kind not in published:
        raise ValueError(f"unknown MLLM {kind!r}")
    vision, config = published[kind]
    return _build_mllm(kind, vision, dict(TEXT, num_hidden_layers=1), seed, **config)


def write_hf_mllm(out: str | Path, kind: str, *, seed: int = 0, max_shard_size: str | None = None,
                  geometry: str = "toy", pinpoints: list | None = None, processor: bool = False) -> Path:
    """save_pretrained of a tiny MLLM (sharded with an index when max_shard_size is given).

    processor: also save the family's full processor (image processor with the published settings,
    :func:`chat_tokenizer`, chat template), as a published checkpoint ships it.

    geometry "toy": friendly sizes (:func:`hf_mllm`); "published": the real patch, tile, merge and
    pinpoint geometry at tiny widths (:func:`published_mllm`).
    """
    model = published_mllm(kind, seed=seed, pinpoints=pinpoints) if geometry == "published" else hf_mllm(kind, seed=seed)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    if processor:
        from .encoders.processors import published_processor
        from .mllm.model import build_processor
        build_processor(kind, published_processor(kind, model.config), chat_tokenizer(kind),
                        model.config).save_pretrained(out)
    return Path(out)


def relayout(directory: str | Path, rename) -> None:
    """Rewrite every safetensors file of ``directory`` with keys mapped by ``rename`` (and its index)."""
    from safetensors.torch import load_file
    directory = Path(directory)
    for file in directory.glob("*.safetensors"):
        state = load_file(file)
        save_file({rename(k): v for k, v in state.items()}, file, metadata={"format": "pt"})
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {rename(k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data))



# -- a whole LLaVA-NeXT / PIVOT training dir (tower + projector + LM + tokenizer) ---------------------
# PIVOT's tower geometry: google/siglip2-so400m-patch16-384 (a fixed-resolution SigLIP, 24x24 = 576 tokens
# at 384 px) at tiny widths. hidden 128 with 2 heads: the weight-shape fallback (hidden // 64 heads) is right.
PIVOT_SIGLIP = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
                    image_size=384, patch_size=16)
PIVOT_TOWER = "local/tiny-siglip2-so400m-patch16-384"


def pivot_tokenizer():
    """:func:`chat_tokenizer` ("llava") without the ``<image>`` token, as LLaVA-NeXT dirs ship it: the
    LLaVA-NeXT code splits the prompt at the text "<image>" and puts IMAGE_TOKEN_INDEX (-200) there."""
    import transformers as T
    from tokenizers import Tokenizer
    base = chat_tokenizer("llava")
    gone = base.convert_tokens_to_ids("<image>")
    data = json.loads(base.backend_tokenizer.to_str())
    data["added_tokens"] = [dict(t, id=t["id"] - (t["id"] > gone)) for t in data["added_tokens"]
                            if t["content"] != "<image>"]
    vocab = {k: v for k, v in data["model"]["vocab"].items() if k != "<image>"}
    data["model"]["vocab"] = {k: v - (v > gone) for k, v in vocab.items()}
    return T.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)), eos_token="<|im_end|>",
                                     pad_token="<|endoftext|>", chat_template=base.chat_template)


def write_pivot_mllm(out: str | Path, *, seed: int = 0, image_aspect_ratio: str | None = "pad",
                     mm_patch_merge_type: str = "flat", tower: str = PIVOT_TOWER, vision: dict | None = None,
                     text: dict | None = None, tie_word_embeddings: bool = False, vocab_rows: int | None = VOCAB,
                     keep_post_layernorm: bool = True, shards: int = 1, config: dict | None = None) -> Path:
    """A whole LLaVA-NeXT / PIVOT training dir as LLaVA-NeXT's trainer saves it (LlavaQwenForCausalLM).

    Keys: ``model.vision_tower.vision_tower.vision_model.*`` (SigLIP, last block and head removed),
    ``model.mm_projector.{0,2}.*`` (mlp2x_gelu), the Qwen2 LM as ``model.embed_tokens/layers/norm.*`` +
    ``lm_head.weight`` (absent when tied), ``model.image_newline`` only with an "unpad" merge.
    config.json: the LM's Qwen2 fields in the 4.x form (rope_theta, torch_dtype) + the ``mm_*`` fields.
    Tokenizer: :func:`pivot_tokenizer` (no ``<image>`` token). ``vocab_rows``: embedding rows (None: as
    many as the tokenizer has, so adding ``<image>`` outgrows them). ``image_aspect_ratio`` None: the
    key is left out. ``shards`` > 1: that many safetensors files and an index. ``config``: extra keys.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel
    _quiet()
    torch.manual_seed(seed)
    tokenizer = pivot_tokenizer()
    params = {k: v for k, v in {**PIVOT_SIGLIP, **(vision or {})}.items() if k != "model_type"}
    siglip = SiglipVisionModel(SiglipVisionConfig(**params, vision_use_head=False))
    del siglip.encoder.layers[-1:]
    state = {f"model.vision_tower.vision_tower.vision_model.{k}": v for k, v in siglip.state_dict().items()
             if keep_post_layernorm or not k.startswith("post_layernorm.")}
    ids = tokenizer.convert_tokens_to_ids
    lm_params = {k: v for k, v in {**TEXT, **(text or {})}.items() if k != "model_type"}
    lm_params.update(vocab_size=vocab_rows or len(tokenizer), bos_token_id=ids("<|endoftext|>"),
                     eos_token_id=ids("<|im_end|>"), tie_word_embeddings=tie_word_embeddings)
    lm = Qwen2ForCausalLM(Qwen2Config(**lm_params, rope_theta=1000000.0))
    hidden, d = lm.config.hidden_size, params["hidden_size"]
    projector = torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden))
    state.update({f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()})
    if "unpad" in mm_patch_merge_type:
        state["model.image_newline"] = torch.randn(hidden)
    state.update({k: v for k, v in lm.state_dict().items() if not (tie_word_embeddings and k == "lm_head.weight")})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in state.items()}
    if shards <= 1:
        save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    else:
        keys = list(state)
        parts = [keys[i::shards] for i in range(shards)]
        weight_map = {}
        for i, part in enumerate(parts):
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: state[k] for k in part}, out / name, metadata={"format": "pt"})
            weight_map.update({k: name for k in part})
        total = sum(v.numel() * v.element_size() for v in state.values())
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    lm_config = {k: lm_params[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                           "num_attention_heads", "num_key_value_heads", "vocab_size",
                                           "bos_token_id", "eos_token_id", "tie_word_embeddings")}
    fields = {"architectures": ["LlavaQwenForCausalLM"], "model_type": "llava_qwen", **lm_config,
              "attention_dropout": 0.0, "hidden_act": "silu", "initializer_range": 0.02,
              "max_position_embeddings": 32768, "max_window_layers": 28, "rms_norm_eps": 1e-6, "rope_scaling": None,
              "rope_theta": 1000000.0, "sliding_window": 32768, "use_sliding_window": False, "use_cache": True,
              "torch_dtype": "float32", "transformers_version": "4.40.0.dev0",
              "mm_vision_tower": tower, "mm_hidden_size": d, "mm_projector_type": "mlp2x_gelu",
              "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
              "mm_patch_merge_type": mm_patch_merge_type, "mm_use_im_start_end": False,
              "mm_use_im_patch_token": False, "mm_tunable_parts": "mm_vision_tower,mm_mlp_adapter,mm_language_model",
              "tokenizer_model_max_length": 32768, "tokenizer_padding_side": "right", "use_mm_proj": True}
    if image_aspect_ratio is not None:
        fields["image_aspect_ratio"] = image_aspect_ratio
    fields.update(config or {})
    tokenizer.save_pretrained(out)
    (out / "config.json").write_text(json.dumps(fields, indent=2))
    return out


def write_lm_dir(out: str | Path, *, seed: int = 0, tokenizer=None, vocab_rows: int | None = VOCAB,
                 tie_word_embeddings: bool = False) -> Path:
    """A save_pretrained Qwen2ForCausalLM dir (TEXT sizes) with its tokenizer: what `probe train pretrain
    --lm` takes. ``tokenizer``: default :func:`chat_tokenizer` (image tokens in, ChatML template);
    :func:`pivot_tokenizer` is a text LM's (no ``<image>``). ``vocab_rows`` None: as many rows as the
    tokenizer has tokens, so adding an image token outgrows them."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    _quiet()
    torch.manual_seed(seed)
    tokenizer = tokenizer if tokenizer is not None else chat_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    params = {k: v for k, v in TEXT.items() if k != "model_type"}
    params.update(vocab_size=vocab_rows or len(tokenizer), bos_token_id=ids("<|endoftext|>"),
                  eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
                  tie_word_embeddings=tie_word_embeddings)
    Qwen2ForCausalLM(Qwen2Config(**params)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return Path(out)
