"""MLLM loaders: tokens equal what the reference model's own image-feature path feeds its projector."""
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from encoder_probe import load_encoder, toy
from encoder_probe.errors import CheckpointError, LayerError

PIXELS = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


class _Stop(Exception):
    pass


def projector_io(model, call):
    """(input, output) of ``model``'s multi_modal_projector during ``call()``, stopping right after it."""
    seen = {}

    def hook(module, args, output):
        seen["in"], seen["out"] = args[0].detach(), output.detach()
        raise _Stop

    handle = model.model.multi_modal_projector.register_forward_hook(hook)
    try:
        with torch.no_grad():
            call()
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen["in"], seen["out"]


# -- LlavaOnevision -----------------------------------------------------------------------------

def onevision(toy_dir):
    return toy_dir("onevision", lambda d: toy.write_hf_mllm(d, "llava_onevision"))


def test_onevision_tokens_equal_projector_input(toy_dir):
    path = onevision(toy_dir)
    ref = toy.hf_mllm("llava_onevision").eval()
    ref_in, ref_out = projector_io(ref, lambda: ref.model.get_image_features(
        PIXELS, image_sizes=torch.tensor([[32, 32]] * 2), vision_feature_layer=-2, vision_feature_select_strategy="full"))
    enc = load_encoder(str(path))
    with torch.no_grad():
        tokens = enc.forward_tokens(PIXELS)
        projected = load_encoder(str(path), with_projector=True).forward_tokens(PIXELS)
    assert enc.layer == 2 and tokens.grid == (4, 4) and tokens.num_prefix == 0
    assert torch.equal(tokens.patches, ref_in)
    assert torch.equal(projected.patches, ref_out)


def _v4_layout(key):
    """transformers 4.x published layout: SigLIP nested under vision_model, LM under language_model.model."""
    key = re.sub(r"^vision_tower\.", "vision_tower.vision_model.", key)
    return re.sub(r"^language_model\.(?!lm_head)", "language_model.model.", key)


@pytest.mark.parametrize("layout", ["v4", "in-memory"])
def test_onevision_older_and_sharded_layouts_load_identically(toy_dir, tmp_path, layout):
    reference = load_encoder(str(onevision(toy_dir))).forward_tokens(PIXELS)
    path = toy.write_hf_mllm(tmp_path / "ckpt", "llava_onevision", max_shard_size="40KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    rename = _v4_layout if layout == "v4" else (lambda k: k if k.startswith("lm_head") else "model." + k)
    toy.relayout(path, rename)
    # shards that hold no vision or projector keys are never opened: make them unreadable
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    shards = {}
    for key, shard in weight_map.items():
        shards.setdefault(shard, []).append(key)
    lm_only = [s for s, keys in shards.items() if not any("vision_tower" in k or "projector" in k for k in keys)]
    assert lm_only
    for shard in lm_only:
        (path / shard).write_bytes(b"not a safetensors file")
    enc = load_encoder(str(path))
    assert torch.equal(enc.forward_tokens(PIXELS).patches, reference.patches)


# -- InternVL -----------------------------------------------------------------------------------

def test_internvl_tokens_equal_projector_input(toy_dir):
    path = toy_dir("internvl", lambda d: toy.write_hf_mllm(d, "internvl"))
    ref = toy.hf_mllm("internvl").eval()
    ref_in, ref_out = projector_io(ref, lambda: ref.model.get_image_features(
        PIXELS, vision_feature_layer=-1, vision_feature_select_strategy="default"))
    enc = load_encoder(str(path))
    with torch.no_grad():
        tokens = enc.forward_tokens(PIXELS)
        projected = enc.project(tokens)
    assert tokens.grid == (4, 4) and tokens.patches.shape == (2, 16, 256)  # 8x8 patches, pixel-shuffled
    assert torch.equal(tokens.patches, ref_in)
    assert torch.equal(projected.patches, ref_out)


def test_internvl_pixel_shuffle_keeps_row_major_geometry():
    from encoder_probe.encoders.base import Tokens
    from encoder_probe.encoders.hf_tower import pixel_shuffle

    h, w = 4, 6  # non-square: rows and columns must not swap
    rows = torch.arange(h).repeat_interleave(w).float()
    cols = torch.arange(w).repeat(h).float()
    tokens = Tokens(torch.stack([rows, cols], -1)[None], torch.zeros(1, 0, 2), (h, w), 1)
    out = pixel_shuffle(tokens, 0.5)
    assert out.grid == (2, 3)
    cells = out.patches[0].reshape(2, 3, -1)
    for i in range(2):
        for j in range(3):
            # every channel group of cell (i, j) comes from the 2x2 block at rows 2i..2i+1, cols 2j..2j+1
            assert set(cells[i, j, 0::2].tolist()) == {2 * i, 2 * i + 1}
            assert set(cells[i, j, 1::2].tolist()) == {2 * j, 2 * j + 1}


# -- Qwen2-VL / Qwen2.5-VL ----------------------------------------------------------------------

def _processor_positions(kind, size=32):
    """(row, col) of each patch in the Qwen2-VL image processor's own output order."""
    from transformers import Qwen2VLImageProcessor

    gh = gw = size // 4
    rows = torch.arange(gh).repeat_interleave(4).repeat(size, 1).T.float()  # pixel (y, x) -> patch row
    cols = torch.arange(gw).repeat_interleave(4).repeat(size, 1).float()
    image = torch.stack([rows, cols, torch.zeros_like(rows)])
    proc = Qwen2VLImageProcessor(patch_size=4, merge_size=2, do_resize=False, do_rescale=False, do_normalize=False)
    flat = proc(images=[image], return_tensors="pt")["pixel_values"]  # (N, C*T*P*P)
    per_patch = flat.reshape(flat.shape[0], 3, -1)
    return per_patch[:, 0, 0].long(), per_patch[:, 1, 0].long()


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_tower_before_and_after_merger(toy_dir, kind):
    from transformers import Qwen2VLImageProcessor

    path = toy_dir(kind, lambda d: toy.write_hf_mllm(d, kind))
    ref = toy.hf_mllm(kind).eval()
    enc = load_encoder(str(path), image_size=32)
    proc = Qwen2VLImageProcessor(patch_size=4, merge_size=2, do_resize=False, do_rescale=False, do_normalize=False)
    inputs = proc(images=list(PIXELS), return_tensors="pt")
    with torch.no_grad():
        out = ref.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
        tokens = enc.forward_tokens(PIXELS)
        merged = load_encoder(str(path), image_size=32, with_projector=True).forward_tokens(PIXELS)
    # after the merger: exactly what the LLM receives, in the reference's order
    assert merged.grid == (4, 4)
    assert torch.equal(merged.patches.reshape(-1, merged.patches.shape[-1]), out.pooler_output)
    # before the merger: the reference's last block output, placed by the processor's own patch order
    hidden = out.last_hidden_state
    if kind == "qwen2_5_vl":  # 2.5-VL keeps block outputs in attention-window order
        from transformers.vision_utils import get_vision_window_index
        window_index, _ = get_vision_window_index(inputs["image_grid_thw"], 2, ref.config.vision_config.window_size, 4)
        hidden = hidden.reshape(-1, 4, hidden.shape[-1])[torch.argsort(window_index)].reshape(hidden.shape)
    rows, cols = _processor_positions(kind)
    expected = torch.empty(2, 8, 8, hidden.shape[-1])
    per_image = hidden.reshape(2, 64, -1)
    expected[:, rows, cols] = per_image
    assert tokens.grid == (8, 8)
    assert torch.equal(tokens.patches, expected.reshape(2, 64, -1))


def test_qwen_layout_with_model_prefix_loads_identically(toy_dir, tmp_path):
    reference = load_encoder(str(toy_dir("qwen2_vl", lambda d: toy.write_hf_mllm(d, "qwen2_vl"))), image_size=32)
    path = toy.write_hf_mllm(tmp_path / "q", "qwen2_vl")
    toy.relayout(path, lambda k: "model." + k if k.startswith("visual.") else k)
    enc = load_encoder(str(path), image_size=32)
    assert enc.details["vision_keys"] == "model.visual.*"
    assert torch.equal(enc.forward_tokens(PIXELS).patches, reference.forward_tokens(PIXELS).patches)


# -- LLaVA-NeXT / PIVOT layout ------------------------------------------------------------------

def _truncated_reference(path, vision_params):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    state = load_file(path / "model.safetensors")
    prefix = "model.vision_tower.vision_tower.vision_model."
    tower = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    depth = 1 + max(int(k.split(".")[2]) for k in tower if k.startswith("encoder.layers."))
    params = {k: v for k, v in vision_params.items() if k != "num_hidden_layers"}
    ref = SiglipVisionModel(SiglipVisionConfig(**params, num_hidden_layers=depth, vision_use_head=False)).eval()
    ref.load_state_dict(tower)
    projector = {k[len("model.mm_projector."):]: v for k, v in state.items() if k.startswith("model.mm_projector.")}
    return ref, projector


def test_pivot_tokens_equal_truncated_siglip_before_post_layernorm(toy_dir):
    path = toy_dir("pivot", lambda d: toy.write_pivot(d))
    params = dict(hidden_size=64, intermediate_size=128, num_attention_heads=1, image_size=32, patch_size=8)
    ref, projector = _truncated_reference(path, params)  # shape inference guesses 64 // 64 = 1 head
    enc = load_encoder(str(path))
    assert "weight shapes" in enc.details["architecture"]
    with torch.no_grad():
        expected = ref(pixel_values=PIXELS, output_hidden_states=True).hidden_states[-1]
        tokens = enc.forward_tokens(PIXELS)
        projected = load_encoder(str(path), with_projector=True).forward_tokens(PIXELS)
        expected_proj = torch.nn.functional.linear(torch.nn.functional.gelu(torch.nn.functional.linear(
            expected, projector["0.weight"], projector["0.bias"])), projector["2.weight"], projector["2.bias"])
    assert (enc.layer, enc.layers.depth, enc.layers.available) == (2, 3, 2)
    assert torch.equal(tokens.patches, expected)
    assert not torch.equal(tokens.patches, ref.post_layernorm(expected))
    assert torch.equal(projected.patches, expected_proj)


def test_pivot_vision_config_dir_sets_the_architecture(toy_dir, tmp_path):
    vision = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, image_size=32, patch_size=8)
    path = toy.write_pivot(tmp_path / "pivot", vision=vision)
    config_dir = toy.write_siglip_dir(tmp_path / "siglip", **vision, num_hidden_layers=3)
    ref, _ = _truncated_reference(path, vision)
    enc = load_encoder(str(path), vision_config=str(config_dir))
    with torch.no_grad():
        expected = ref(pixel_values=PIXELS, output_hidden_states=True).hidden_states[-1]
        assert torch.equal(enc.forward_tokens(PIXELS).patches, expected)
        # without the config the head count is guessed (1), and the tokens differ
        guessed = load_encoder(str(path)).forward_tokens(PIXELS).patches
    assert not torch.equal(guessed, expected)


def test_pivot_builtin_table_so400m_gives_576_tokens_of_1152(tmp_path):
    """The paper's tower: siglip2-so400m-patch16-384, resolved from the built-in table (2 real-size blocks kept)."""
    from encoder_probe.encoders.known_towers import KNOWN_TOWERS

    params = {k: v for k, v in KNOWN_TOWERS["google/siglip2-so400m-patch16-384"].items() if k != "model_type"}
    params["num_hidden_layers"] = 3
    path = toy.write_pivot(tmp_path / "pivot", tower="google/siglip2-so400m-patch16-384", vision=params, hidden_size=64)
    enc = load_encoder(str(path), layer=2)
    assert "built-in table" in enc.details["architecture"]
    assert (enc.layers.depth, enc.layers.available) == (27, 2)
    assert enc.preprocess.size == (384, 384) and enc.preprocess.mean == (0.5, 0.5, 0.5)
    ref, _ = _truncated_reference(path, params)
    pixels = torch.randn(1, 3, 384, 384)
    with torch.no_grad():
        tokens = enc.forward_tokens(pixels)
        expected = ref(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
    assert tokens.patches.shape == (1, 576, 1152) and tokens.grid == (24, 24)
    assert torch.equal(tokens.patches, expected)
    with pytest.raises(LayerError, match="blocks 3..27 were removed"):
        load_encoder(str(path))  # the default (block 26) is not in these weights


# -- bad checkpoints ----------------------------------------------------------------------------

def test_missing_vision_keys_is_a_one_line_error(tmp_path, toy_dir):
    path = toy.write_pivot(tmp_path / "p")
    state = load_file(path / "model.safetensors")
    save_file({k: v for k, v in state.items() if "vision_tower" not in k}, path / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing vision keys") as err:
        load_encoder(str(path))
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_shard_and_truncated_shard_are_named(tmp_path):
    path = toy.write_hf_mllm(tmp_path / "ov", "llava_onevision", max_shard_size="40KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    vision_shard = index["weight_map"]["vision_tower.embeddings.patch_embedding.weight"]
    data = (path / vision_shard).read_bytes()
    (path / vision_shard).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as err:
        load_encoder(str(path))
    assert vision_shard in str(err.value)
    (path / vision_shard).unlink()
    with pytest.raises(CheckpointError, match="is missing"):
        load_encoder(str(path))


def test_original_internvl_layout_is_refused_clearly(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["InternVLChatModel"], "model_type": "internvl_chat"}))
    with pytest.raises(CheckpointError, match="remote-code layout"):
        load_encoder(str(tmp_path))


# -- fingerprint: everything that changes the tokens --------------------------------------------

def test_same_weights_under_two_tower_configs_are_two_encoders(tmp_path):
    """A PIVOT dir with and without --vision-config (head count from the config vs guessed from the
    weights' shapes): same weights, different tokens, so different fingerprints and cache entries."""
    from encoder_probe.data import open_dataset
    from encoder_probe.features import extract
    vision = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, image_size=32, patch_size=8)
    path = toy.write_pivot(tmp_path / "pivot", vision=vision)
    config_dir = toy.write_siglip_dir(tmp_path / "siglip", **vision, num_hidden_layers=3)
    guessed, configured = load_encoder(str(path)), load_encoder(str(path), vision_config=str(config_dir))
    weights = lambda enc: {k: v for k, v in enc.module.state_dict().items()}  # noqa: E731
    assert all(torch.equal(v, weights(configured)[k]) for k, v in weights(guessed).items())
    with torch.no_grad():
        assert not torch.allclose(guessed.forward_tokens(PIXELS).patches, configured.forward_tokens(PIXELS).patches)
    assert guessed.fingerprint != configured.fingerprint
    assert guessed.architecture()["tower"]["config"]["num_attention_heads"] == 1
    assert configured.architecture()["tower"]["config"]["num_attention_heads"] == 4
    dataset = open_dataset("imagenet", "demo", "val", per_class=1)
    entries = {extract(enc, dataset, out=tmp_path / "cache", batch_size=8, num_workers=0, progress=False).path
               for enc in (guessed, configured)}
    assert len(entries) == 2


def test_qwen_image_size_forms_and_sizes_it_cannot_take(toy_dir):
    from encoder_probe.errors import SpecError
    path = str(toy_dir("qwen2_5_vl", lambda d: toy.write_hf_mllm(d, "qwen2_5_vl")))
    square = [load_encoder(path, image_size=form) for form in (32, "32", "32x32", (32, 32))]
    assert len({enc.fingerprint for enc in square}) == 1 and square[0].preprocess.size == (32, 32)
    wide = load_encoder(path, image_size="32x48")
    assert wide.preprocess.size == (32, 48) and wide.fingerprint != square[0].fingerprint
    assert load_encoder(path, image_size=[32, 48]).fingerprint == wide.fingerprint
    for bad, message in [("30", "not a multiple of 8"), ("32x44", "not a multiple of 8"), ("0", "positive"),
                         ("32x", "expected N or HxW"), ((32, 48, 3), "expected N or HxW"), (32.5, "expected N or HxW")]:
        with pytest.raises(SpecError, match=message) as info:
            load_encoder(path, image_size=bad)
        assert "\n" not in str(info.value)
    with pytest.raises(SpecError, match="takes no option 'image_size'"):
        load_encoder("timm:test_vit", image_size=224)


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_non_square_input_equals_the_models_own_forward(toy_dir, kind):
    """32x48 (a 8x12 patch grid, 4x6 after the merger): the merger output equals the model's own
    visual forward on the image processor's patches, and the pre-merger tokens sit row-major."""
    from transformers import Qwen2VLImageProcessor
    path = toy_dir(kind, lambda d: toy.write_hf_mllm(d, kind))
    ref = toy.hf_mllm(kind).eval()
    pixels = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    proc = Qwen2VLImageProcessor(patch_size=4, merge_size=2, do_resize=False, do_rescale=False, do_normalize=False)
    inputs = proc(images=list(pixels), return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 12]] * 2
    with torch.no_grad():
        out = ref.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
        merged = load_encoder(str(path), image_size="32x48", with_projector=True).forward_tokens(pixels)
        tokens = load_encoder(str(path), image_size="32x48").forward_tokens(pixels)
    assert merged.grid == (4, 6) and tokens.grid == (8, 12)
    assert torch.equal(merged.patches.reshape(-1, merged.patches.shape[-1]), out.pooler_output)


@pytest.mark.slow
def test_an_unchanged_spec_keeps_its_fingerprint_across_processes(toy_dir, tmp_path):
    import os
    import subprocess
    import sys
    specs = [str(toy_dir("qwen2_5_vl", lambda d: toy.write_hf_mllm(d, "qwen2_5_vl"))),
             str(onevision(toy_dir)), str(toy.write_pivot(tmp_path / "pivot")), "timm:test_vit",
             "torchvision:mobilenet_v2"]
    here = [load_encoder(spec).fingerprint for spec in specs]
    script = ("import json, sys\nfrom encoder_probe import load_encoder\n"
              "print(json.dumps([load_encoder(s).fingerprint for s in sys.argv[1:]]))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # set and dict orders differ from this process's
    proc = subprocess.run([sys.executable, "-c", script, *specs], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == here
    assert len(set(here)) == len(here)


def test_qwen2_5_vl_at_published_geometry_non_square(tmp_path):
    """Qwen2.5-VL's published vision geometry (14 px patches, 2x2 merge, 112 px attention windows,
    full-attention blocks between windowed ones) at small width, on a 336x504 input (24x36 patches,
    windows that do not tile it evenly): the merger output equals the model's own visual forward."""
    import transformers as T
    from transformers import Qwen2VLImageProcessor
    torch.manual_seed(0)
    vision = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=48, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1, 3])
    text = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=128, rope_parameters=dict(rope_type="default", mrope_section=[2, 2, 4]))
    ref = T.Qwen2_5_VLForConditionalGeneration(T.Qwen2_5_VLConfig(vision_config=vision, text_config=text)).eval()
    ref.save_pretrained(tmp_path / "qwen")
    pixels = torch.randn(1, 3, 336, 504, generator=torch.Generator().manual_seed(2))
    proc = Qwen2VLImageProcessor(patch_size=14, merge_size=2, do_resize=False, do_rescale=False, do_normalize=False)
    inputs = proc(images=list(pixels), return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 24, 36]]
    with torch.no_grad():
        out = ref.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
        merged = load_encoder(str(tmp_path / "qwen"), image_size="336x504", with_projector=True).forward_tokens(pixels)
    assert merged.grid == (12, 18) and merged.patches.shape == (1, 216, 48)
    assert torch.allclose(merged.patches[0], out.pooler_output, atol=1e-5, rtol=1e-5)
