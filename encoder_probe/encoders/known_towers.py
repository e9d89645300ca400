"""Architectures of the vision towers MLLM checkpoints name by hub id.

LLaVA-style configs say ``mm_vision_tower: google/siglip2-so400m-patch16-384``; nothing can be
fetched offline, so the tower's config comes from this table (published model cards).
"""
from __future__ import annotations

_SIGLIP_SIZES = {  # hidden, intermediate, layers, heads
    "base": (768, 3072, 12, 12),
    "large": (1024, 4096, 24, 16),
    "so400m": (1152, 4304, 27, 16),
    "giant-opt": (1536, 6144, 40, 16),
}
_SIGLIP_VARIANTS = {
    "siglip": [("base", 16, r) for r in (224, 256, 384, 512)] + [("large", 16, r) for r in (256, 384)]
    + [("so400m", 14, r) for r in (224, 384)],
    "siglip2": [("base", 16, r) for r in (224, 256, 384, 512)] + [("large", 16, r) for r in (256, 384, 512)]
    + [("so400m", 14, r) for r in (224, 384)] + [("so400m", 16, r) for r in (256, 384, 512)]
    + [("giant-opt", 16, r) for r in (256, 384)],
}


def _build() -> dict[str, dict]:
    table = {}
    for family, variants in _SIGLIP_VARIANTS.items():
        for size, patch, res in variants:
            hidden, inter, layers, heads = _SIGLIP_SIZES[size]
            table[f"google/{family}-{size}-patch{patch}-{res}"] = dict(
                model_type="siglip_vision_model", hidden_size=hidden, intermediate_size=inter,
                num_hidden_layers=layers, num_attention_heads=heads, patch_size=patch, image_size=res,
                hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    for res in (224, 336):
        table[f"openai/clip-vit-large-patch14{'-336' if res == 336 else ''}"] = dict(
            model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
            num_attention_heads=16, patch_size=14, image_size=res, projection_dim=768,
            hidden_act="quick_gelu", layer_norm_eps=1e-5)
    return table


KNOWN_TOWERS: dict[str, dict] = _build()


def lookup(hub_id: str) -> dict | None:
    """The tower config for a hub id or a local path ending in one (``/ckpts/siglip-so400m-...``)."""
    if hub_id in KNOWN_TOWERS:
        return dict(KNOWN_TOWERS[hub_id])
    tail = hub_id.rstrip("/").split("/")[-1]
    matches = [k for k in KNOWN_TOWERS if k.split("/")[-1] == tail]
    return dict(KNOWN_TOWERS[matches[0]]) if len(matches) == 1 else None


def vision_config(params: dict):
    """A transformers config object from a table entry or inferred parameters."""
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    params = dict(params)
    kind = params.pop("model_type")
    return {"clip_vision_model": CLIPVisionConfig, "siglip_vision_model": SiglipVisionConfig}[kind](**params)
