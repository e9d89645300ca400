"""Patch geometry as each tower's own patch embedding computes it (issue 16).

Published patch and image sizes at small widths (random weights, seeded), compared with the
transformers model's own forward: conv patch embeddings floor (SigLIP so400m/14 at 384 -> 27x27,
the last 6 px dropped), and where the model itself cannot take a size the error is one clear line.
"""
import json

import pytest
import torch

from encoder_probe import load_encoder, toy
from encoder_probe.assets import photo
from encoder_probe.cli import main
from encoder_probe.errors import SpecError

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=100,
            max_position_embeddings=16)
PHOTOS = ("astronaut", "chelsea", "coffee")
# load_encoder seeds random-init towers with 0: references use another seed, so a loader that
# skipped the weights cannot match
SEED = 5


def _quiet():
    from transformers.utils import logging
    logging.set_verbosity_error()


def _photos(encoder):
    """The real photos, preprocessed by the encoder's own transform."""
    return torch.stack([encoder.transform(photo(name)) for name in PHOTOS])


def _cat(tokens):
    return torch.cat([tokens.prefix, tokens.patches], dim=1)


def _close(a, b):
    return a.shape == b.shape and torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def _one_line(error, *needles):
    message = str(error.value)
    assert "\n" not in message and all(n in message for n in needles), message


def _save(model, path):
    model.eval().save_pretrained(path)
    return path


# -- SigLIP so400m/14-384 (LLaVA-OneVision's tower) ---------------------------------------------

@pytest.fixture(scope="module")
def so400m_384(tmp_path_factory):
    from transformers import SiglipVisionModel
    _quiet()
    path = toy.write_siglip_dir(tmp_path_factory.mktemp("so400m") / "tower", seed=SEED, **SMALL,
                                image_size=384, patch_size=14)
    return path, SiglipVisionModel.from_pretrained(path).eval()


def test_siglip_so400m_14_384_floors_to_27x27_like_the_model(so400m_384):
    path, ref = so400m_384
    enc = load_encoder(str(path))
    assert enc.preprocess.size == (384, 384)
    x = _photos(enc)
    assert x.shape == (3, 3, 384, 384)
    assert ref.embeddings.position_embedding.num_embeddings == 729  # 27x27: the native grid
    with torch.no_grad():
        out = ref(pixel_values=x, output_hidden_states=True)  # native size: no interpolation
        tokens = enc.forward_tokens(x, layers=[0, 1, 2, "final"])
    assert out.last_hidden_state.shape == (3, 729, 32)
    for t, want in zip(tokens, [*out.hidden_states, out.last_hidden_state]):
        assert t.grid == (27, 27) and t.num_prefix == 0 and _close(t.patches, want)
    # the conv drops the last 384 - 27*14 = 6 rows and columns: changing them changes nothing
    y = x.clone()
    y[..., 378:, :] = 3.0
    y[..., :, 378:] = -3.0
    with torch.no_grad():
        assert torch.equal(enc.forward_tokens(y).patches, tokens[-1].patches)


def test_inspect_shows_the_27x27_grid(so400m_384, capsys):
    path, _ = so400m_384
    assert main(["inspect", str(path)]) == 0
    lines = {line[:18].strip(): line[18:].strip() for line in capsys.readouterr().out.splitlines()}
    assert "grid 27x27" in lines["tokens"] and "729, 32)" in lines["tokens"]
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["grid"] == "27x27" and info["patches"][1:] == [729, 32] and info["prefix"][1] == 0


# -- SigLIP2 so400m/16-384 and /14-224: published as model_type "siglip" (fixed resolution) ------

@pytest.mark.parametrize("patch,size,side", [(16, 384, 24), (14, 224, 16)])
def test_siglip2_fixed_resolution_dual_tower_grid_equals_the_model(tmp_path, patch, size, side):
    import transformers as T
    _quiet()
    torch.manual_seed(SEED)
    cfg = T.SiglipConfig(text_config=TEXT, vision_config=dict(SMALL, image_size=size, patch_size=patch))
    ref = T.SiglipModel(cfg).eval()
    path = _save(ref, tmp_path / "siglip2")
    assert json.loads((path / "config.json").read_text())["model_type"] == "siglip"
    enc = load_encoder(str(path))
    x = _photos(enc)
    assert x.shape[-2:] == (size, size)
    with torch.no_grad():
        out = ref.vision_model(pixel_values=x, output_hidden_states=True)
        tokens = enc.forward_tokens(x, layers=[1, "final"])
    assert out.last_hidden_state.shape[1] == side * side
    for t, want in zip(tokens, [out.hidden_states[1], out.last_hidden_state]):
        assert t.grid == (side, side) and t.num_prefix == 0 and _close(t.patches, want)


def test_siglip2_naflex_needs_whole_patches_as_the_model_does(tmp_path):
    """siglip2_vision_model takes flattened whole patches (its processor resizes to multiples of the
    patch); at a multiple the tokens are the model's own, elsewhere one clear line."""
    import transformers as T
    from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches
    _quiet()
    torch.manual_seed(SEED)
    ref = T.Siglip2VisionModel(T.Siglip2VisionConfig(**SMALL, patch_size=16, num_patches=256)).eval()
    enc = load_encoder(str(_save(ref, tmp_path / "naflex")))
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = ref(pixel_values=convert_image_to_patches(x[0], 16)[None], spatial_shapes=torch.tensor([[16, 16]]),
                  pixel_attention_mask=torch.ones(1, 256, dtype=torch.long))
        tokens = enc.forward_tokens(x)
    assert tokens.grid == (16, 16) and _close(tokens.patches, out.last_hidden_state)
    odd = torch.randn(1, 3, 256, 250)
    with pytest.raises(SpecError) as info:
        enc.forward_tokens(odd)
    _one_line(info, "256x250", "patch size 16", "resizes to multiples of 16")
    with pytest.raises(RuntimeError):  # the processor's own patchify cannot either
        convert_image_to_patches(odd[0], 16)


# -- CLIP-L/14-336 ------------------------------------------------------------------------------

def test_clip_l14_336_gives_24x24_and_a_cls_equal_to_the_model(tmp_path):
    import transformers as T
    _quiet()
    torch.manual_seed(SEED)
    ref = T.CLIPVisionModel(T.CLIPVisionConfig(**SMALL, image_size=336, patch_size=14)).eval()
    enc = load_encoder(str(_save(ref, tmp_path / "clip")))
    x = _photos(enc)
    assert x.shape[-2:] == (336, 336)
    with torch.no_grad():
        out = ref(pixel_values=x, output_hidden_states=True)
        tokens = enc.forward_tokens(x, layers=[0, 2, "final"])
    assert out.last_hidden_state.shape[1] == 24 * 24 + 1
    for t, want in zip(tokens, [out.hidden_states[0], out.hidden_states[2], out.last_hidden_state]):
        assert t.grid == (24, 24) and t.num_prefix == 1 and _close(_cat(t), want)


# -- InternViT-300M at 448 inside InternVL ------------------------------------------------------

@pytest.fixture(scope="module")
def internvl_448(tmp_path_factory):
    import transformers as T
    _quiet()
    torch.manual_seed(SEED)
    vision = dict(SMALL, image_size=[448, 448], patch_size=[14, 14])
    text = dict(TEXT, model_type="qwen2", num_key_value_heads=1, bos_token_id=0, eos_token_id=1)
    ref = T.InternVLForConditionalGeneration(T.InternVLConfig(vision_config=vision, text_config=text,
                                                              downsample_ratio=0.5)).eval()
    return _save(ref, tmp_path_factory.mktemp("internvl") / "ckpt"), ref


def test_internvit_448_grid_shuffle_and_projector_equal_the_model(internvl_448):
    path, ref = internvl_448
    enc = load_encoder(str(path))
    projected = load_encoder(str(path), with_projector=True)
    x = _photos(enc)
    assert x.shape[-2:] == (448, 448) and enc.tower.grid(x) == (32, 32)
    with torch.no_grad():
        own = ref.model.get_image_features(x, output_hidden_states=True)
        tokens = enc.forward_tokens(x)
        llm = projected.forward_tokens(x)
    assert own.last_hidden_state.shape[1] == 32 * 32 + 1  # the tower: a 32x32 grid and its CLS
    assert tokens.grid == (16, 16) and tokens.patches.shape == (3, 256, 4 * 32)
    assert llm.grid == (16, 16) and _close(llm.patches, own.pooler_output)


def test_internvl_floors_square_grids_and_refuses_what_the_model_refuses(internvl_448):
    path, ref = internvl_448
    enc = load_encoder(str(path), with_projector=True)
    g = torch.Generator().manual_seed(3)
    floored = torch.randn(1, 3, 450, 455, generator=g)  # 32x32 patches: the model takes it
    with torch.no_grad():
        assert _close(enc.forward_tokens(floored).patches, ref.model.get_image_features(floored).pooler_output)
    for size, needles in [((448, 672), ("448x672", "non-square 32x48", "tiles are square", "448x448")),
                          ((434, 434), ("434x434", "31x31", "multiples of 2"))]:
        pixels = torch.randn(1, 3, *size, generator=g)
        with pytest.raises(SpecError) as info:
            enc.forward_tokens(pixels)
        _one_line(info, *needles)
        with pytest.raises(RuntimeError), torch.no_grad():  # the model's own reshape fails too
            ref.model.get_image_features(pixels)


def test_pixel_shuffle_error_names_the_grid():
    from encoder_probe.encoders.base import Tokens
    from encoder_probe.encoders.hf_tower import pixel_shuffle

    odd = Tokens(torch.zeros(1, 31 * 31, 8), torch.zeros(1, 0, 8), (31, 31), 1)
    with pytest.raises(SpecError) as info:
        pixel_shuffle(odd, 0.5)
    _one_line(info, "31x31", "0.5")
    assert pixel_shuffle(Tokens(torch.zeros(1, 32 * 32, 8), torch.zeros(1, 0, 8), (32, 32), 1), 0.5).grid == (16, 16)


# -- Qwen2.5-VL at published geometry -----------------------------------------------------------

def test_qwen2_5_vl_published_geometry_refuses_sizes_not_a_multiple_of_28(tmp_path):
    """The model takes flattened 14 px patches in 2x2 merge blocks: its processor resizes to
    multiples of 28 and cannot patchify anything else; neither can we, and we say so."""
    import transformers as T
    from transformers import Qwen2VLImageProcessor
    _quiet()
    torch.manual_seed(SEED)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1])
    text = dict(TEXT, num_key_value_heads=1, rope_parameters=dict(rope_type="default", mrope_section=[2, 2, 4]))
    text.pop("max_position_embeddings")
    ref = T.Qwen2_5_VLForConditionalGeneration(T.Qwen2_5_VLConfig(vision_config=vision, text_config=text))
    path = str(_save(ref, tmp_path / "qwen"))
    with pytest.raises(SpecError) as info:
        load_encoder(path, image_size="336x350")
    _one_line(info, "336x350", "multiple of 28")
    enc = load_encoder(path, image_size=336)
    pixels = torch.rand(1, 3, 336, 350)
    with pytest.raises(ValueError) as info:
        enc.forward_tokens(pixels)
    _one_line(info, "336x350", "multiple of 28")
    # the model's own processor: resizes to a multiple of 28, and cannot patchify 336x350 as it is
    resize = Qwen2VLImageProcessor(patch_size=14, merge_size=2, do_rescale=False, do_normalize=False)
    assert [d % 2 for d in resize(images=[pixels[0]], return_tensors="pt")["image_grid_thw"][0, 1:].tolist()] == [0, 0]
    with pytest.raises(RuntimeError):
        Qwen2VLImageProcessor(patch_size=14, merge_size=2, do_resize=False, do_rescale=False,
                              do_normalize=False)(images=[pixels[0]], return_tensors="pt")


# -- floor division, family by family -----------------------------------------------------------

def _vision_model(kind, patch, size):
    import transformers as T
    torch.manual_seed(SEED)
    no_mlp = {k: v for k, v in SMALL.items() if k != "intermediate_size"}
    if kind == "siglip":
        return T.SiglipVisionModel(T.SiglipVisionConfig(**SMALL, image_size=size, patch_size=patch)), 0
    if kind == "clip":
        return T.CLIPVisionModel(T.CLIPVisionConfig(**SMALL, image_size=size, patch_size=patch)), 1
    if kind == "dinov2":
        return T.Dinov2Model(T.Dinov2Config(**no_mlp, mlp_ratio=2, image_size=size, patch_size=patch)), 1
    if kind == "dinov2_reg":
        return T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(
            **no_mlp, mlp_ratio=2, image_size=size, patch_size=patch, num_register_tokens=4)), 5
    if kind == "internvit":
        return T.InternVLVisionModel(T.InternVLVisionConfig(**SMALL, image_size=[size, size],
                                                            patch_size=[patch, patch])), 1
    raise KeyError(kind)


def _own_forward(model, x):
    """The model's own forward at x's size: interpolating positions only where it refuses without."""
    try:
        return model(pixel_values=x, output_hidden_states=True)
    except (ValueError, RuntimeError):
        return model(pixel_values=x, output_hidden_states=True, interpolate_pos_encoding=True)


@pytest.mark.parametrize("kind,patch,native,size", [
    ("siglip", 14, 384, (383, 390)),  # 27x27: the native grid, non-square pixels
    ("siglip", 16, 384, (390, 400)),  # 24x25: interpolated positions
    ("clip", 14, 336, (335, 350)),  # 23x25 + CLS
    ("dinov2", 14, 518, (223, 237)),  # 15x16 + CLS
    ("dinov2_reg", 14, 518, (230, 237)),  # 16x16 + CLS + 4 registers
    ("internvit", 14, 448, (450, 462)),  # 32x33 + CLS
])
def test_grid_floors_like_the_models_own_patch_embedding(tmp_path, kind, patch, native, size):
    _quiet()
    ref, prefix = _vision_model(kind, patch, native)
    enc = load_encoder(str(_save(ref, tmp_path / kind)))
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = _own_forward(ref, x)
        tokens = enc.forward_tokens(x, layers=[0, "final"])
    grid = (size[0] // patch, size[1] // patch)
    assert out.hidden_states[0].shape[1] - prefix == grid[0] * grid[1]
    for t, want in zip(tokens, [out.hidden_states[0], out.last_hidden_state]):
        assert t.grid == grid and t.num_prefix == prefix and _close(_cat(t), want)
