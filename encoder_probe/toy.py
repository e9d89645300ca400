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
_MLLM_CLASSES = {"llava_onevision": "LlavaOnevision", "llava_next": "LlavaNext", "internvl": "InternVL",
                 "qwen2_vl": "Qwen2VL", "qwen2_5_vl": "Qwen2_5_VL"}
ANYRES_MAX_9 = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]  # LLaVA-OneVision's pinpoints
LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def _build_mllm(kind: str, vision: dict, text: dict, seed: int, **config):
    """``<Family>ForConditionalGeneration(<Family>Config(...))`` with seeded random weights."""
    import transformers as T
    _quiet()
    torch.manual_seed(seed)
    if kind.startswith("qwen"):
        text = {k: v for k, v in text.items() if k != "model_type"} | dict(
            rope_parameters=dict(rope_type="default", mrope_section=[2, 2, 4]))
    family = _MLLM_CLASSES[kind]
    return getattr(T, f"{family}ForConditionalGeneration")(
        getattr(T, f"{family}Config")(vision_config=vision, text_config=text, **config))


def hf_mllm(kind: str, *, seed: int = 0):
    """A tiny random transformers MLLM: llava_onevision | internvl | qwen2_vl | qwen2_5_vl."""
    if kind not in _TOY_MLLMS:
        raise ValueError(f"unknown toy MLLM {kind!r}")
    vision, config = _TOY_MLLMS[kind]
    return _build_mllm(kind, vision, TEXT, seed, **config)


def published_mllm(kind: str, *, seed: int = 0, pinpoints: list | None = None):
    """A transformers MLLM at the PUBLISHED vision geometry with tiny widths and depths.

    llava_onevision: SigLIP so400m/14-384 (27x27 per view, floored), anyres_max_9 pinpoints,
    layer -1, strategy full. llava_next: CLIP-L/14-336, its five pinpoints, layer -2, strategy
    default. qwen2_vl / qwen2_5_vl: 14 px patches, 2x2 merge (2.5: 112 px windows). internvl:
    InternViT 448 px tiles, patch 14, pixel shuffle 0.5 (256 tokens a tile).
    """
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    published = {
        "llava_onevision": (dict(small, model_type="siglip_vision_model", image_size=384, patch_size=14), dict(
            vision_feature_layer=-1, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
            image_grid_pinpoints=pinpoints or ANYRES_MAX_9)),
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
                  geometry: str = "toy", pinpoints: list | None = None) -> Path:
    """save_pretrained of a tiny MLLM (sharded with an index when max_shard_size is given).

    geometry "toy": friendly sizes (:func:`hf_mllm`); "published": the real patch, tile, merge and
    pinpoint geometry at tiny widths (:func:`published_mllm`).
    """
    model = published_mllm(kind, seed=seed, pinpoints=pinpoints) if geometry == "published" else hf_mllm(kind, seed=seed)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
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

