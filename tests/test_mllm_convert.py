"""LLaVA-NeXT / PIVOT training dirs -> LlavaForConditionalGeneration: same logits as LLaVA-NeXT's forward.

The reference below is written from the LLaVA-NeXT code (llava_arch.prepare_inputs_labels_for_multimodal,
mm_utils.expand2square / process_images / tokenizer_image_token, SigLipVisionTower): it reads the dir's raw
safetensors itself, runs the truncated SigLIP tower block by block (its last remaining block's output,
no post_layernorm), the mlp2x_gelu projector, splits the prompt at "<image>" with IMAGE_TOKEN_INDEX -200
and splices the features there, then the Qwen2 LM (LlavaQwenForCausalLM is a Qwen2ForCausalLM).
Geometry: PIVOT's tower, SigLIP2 so400m-patch16-384 (24x24 = 576 tokens), at tiny widths; a real
non-square photo (chelsea, 451x300), so the pad matters.
"""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from encoder_probe import load_encoder, toy
from encoder_probe.assets import photo
from encoder_probe.cli import main
from encoder_probe.errors import CheckpointError, SpecError
from encoder_probe.mllm.convert import convert_pivot, is_pivot_dir, load_processor, save_converted

IMAGE_TOKEN_INDEX = -200
TOWER = "model.vision_tower.vision_tower.vision_model."
TOL = 1e-5
QUESTION = "What colour is the square?"


# -- the reference: LLaVA-NeXT's semantics, from the raw weights ---------------------------------------
def raw_state(directory):
    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}


def reference_pixels(image, aspect, size=384, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
    """process_images: 'pad' = expand2square(image, int(m * 255) per channel), then SigLipImageProcessor:
    resize to size x size (PIL bicubic), rescale 1/255 (float64 -> float32), normalise."""
    if aspect == "pad":
        w, h = image.size
        if w != h:
            side = max(w, h)
            square = Image.new(image.mode, (side, side), tuple(int(m * 255) for m in mean))
            square.paste(image, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
            image = square
    image = image.convert("RGB").resize((size, size), resample=Image.BICUBIC)
    x = (np.asarray(image).astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())[None]


def reference_ids(prompt, tokenizer):
    """tokenizer_image_token: the chunks between "<image>" tokenised apart, IMAGE_TOKEN_INDEX between them."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    ids = list(chunks[0])
    for chunk in chunks[1:]:
        ids += [IMAGE_TOKEN_INDEX] + list(chunk)
    return torch.tensor(ids)


def siglip_features(state, pixels, heads, *, blocks=None, post_layernorm=False):
    """The SigLIP tower as stored (last block already deleted): patch conv + positions, pre-LN blocks;
    the output of the last block (``blocks``: of the first that many), before post_layernorm."""
    w = {k[len(TOWER):]: v for k, v in state.items() if k.startswith(TOWER)}
    patch = w["embeddings.patch_embedding.weight"]
    x = F.conv2d(pixels, patch, w["embeddings.patch_embedding.bias"], stride=patch.shape[-1])
    x = x.flatten(2).transpose(1, 2) + w["embeddings.position_embedding.weight"][None]
    d = x.shape[-1]
    present = 1 + max(int(k.split(".")[2]) for k in w if k.startswith("encoder.layers."))
    for i in range(present if blocks is None else blocks):
        p = f"encoder.layers.{i}."
        h = F.layer_norm(x, (d,), w[p + "layer_norm1.weight"], w[p + "layer_norm1.bias"], 1e-6)
        q, k, v = (F.linear(h, w[p + f"self_attn.{n}_proj.weight"], w[p + f"self_attn.{n}_proj.bias"])
                   .view(*h.shape[:2], heads, d // heads).transpose(1, 2) for n in "qkv")
        a = torch.softmax(q @ k.transpose(-1, -2) * (d // heads) ** -0.5, dim=-1) @ v
        a = a.transpose(1, 2).reshape(h.shape)
        x = x + F.linear(a, w[p + "self_attn.out_proj.weight"], w[p + "self_attn.out_proj.bias"])
        h = F.layer_norm(x, (d,), w[p + "layer_norm2.weight"], w[p + "layer_norm2.bias"], 1e-6)
        h = F.linear(F.gelu(F.linear(h, w[p + "mlp.fc1.weight"], w[p + "mlp.fc1.bias"]), approximate="tanh"),
                     w[p + "mlp.fc2.weight"], w[p + "mlp.fc2.bias"])
        x = x + h
    if post_layernorm:
        x = F.layer_norm(x, (d,), w["post_layernorm.weight"], w["post_layernorm.bias"], 1e-6)
    return x


def projector(state, features):
    """mlp2x_gelu: Linear, GELU (erf), Linear."""
    x = F.linear(features, state["model.mm_projector.0.weight"], state["model.mm_projector.0.bias"])
    return F.linear(F.gelu(x), state["model.mm_projector.2.weight"], state["model.mm_projector.2.bias"])


def reference_lm(directory, state):
    """LlavaQwenForCausalLM's LM: a Qwen2ForCausalLM with the dir's config fields and model.* / lm_head."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = json.loads((directory / "config.json").read_text())
    fields = {k: cfg[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                  "num_key_value_heads", "vocab_size", "rms_norm_eps", "tie_word_embeddings",
                                  "max_position_embeddings", "rope_theta")}
    lm = Qwen2ForCausalLM(Qwen2Config(**fields)).eval()
    weights = {k: v for k, v in state.items() if k.startswith(("model.embed_tokens", "model.layers", "model.norm",
                                                                  "lm_head"))}
    lm.load_state_dict(weights, strict=not cfg["tie_word_embeddings"])
    if cfg["tie_word_embeddings"]:
        lm.tie_weights()
    return lm


def splice(lm, ids, image_features, shift=0):
    """prepare_inputs_labels_for_multimodal for one image: text embeddings with the features at -200."""
    at = int((ids == IMAGE_TOKEN_INDEX).nonzero()) + shift
    text = lm.get_input_embeddings()(ids[ids != IMAGE_TOKEN_INDEX])
    return torch.cat([text[:at], image_features, text[at:]])[None]


def reference_logits(directory, image, prompt, *, heads=2, **variant):
    """LLaVA-NeXT's logits for one image and prompt; ``variant`` breaks one step (for the failing checks)."""
    from transformers import AutoTokenizer
    state = raw_state(directory)
    cfg = json.loads((directory / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    pixels = reference_pixels(image, cfg.get("image_aspect_ratio"))
    ids = reference_ids(prompt, tokenizer)
    feats = projector(state, siglip_features(state, pixels, heads, blocks=variant.get("blocks"),
                                             post_layernorm=variant.get("post_layernorm", False)))[0]
    lm = reference_lm(directory, state)
    with torch.no_grad():
        return lm(inputs_embeds=splice(lm, ids, feats, variant.get("shift", 0))).logits[0], ids, pixels


def prompt_of(processor):
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True)


def converted_logits(model, processor, image, prompt):
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits[0], inputs


@pytest.fixture(scope="module")
def pivot(tmp_path_factory):
    return toy.write_pivot_mllm(tmp_path_factory.mktemp("convert") / "pivot")


@pytest.fixture(scope="module")
def converted(pivot):
    return convert_pivot(pivot)


# -- the forward -----------------------------------------------------------------------------------------
def test_logits_equal_llava_next_reference(pivot, converted):
    model, processor = converted
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    image = photo("chelsea")
    assert image.size == (451, 300)
    prompt = prompt_of(processor)
    assert "<image>" in prompt and prompt.index("<image>") > 0  # the image sits inside the text, not first
    reference, ids, pixels = reference_logits(pivot, image, prompt)
    logits, inputs = converted_logits(model, processor, image, prompt)

    assert torch.equal(inputs["pixel_values"], pixels)  # expand2square + resize + normalise, pixel-exact
    # the same text ids, the placeholder expanded to the tower's 576 tokens at the same place
    image_id = model.config.image_token_id
    at = int((ids == IMAGE_TOKEN_INDEX).nonzero())
    expected = torch.cat([ids[:at], torch.full((576,), image_id), ids[at + 1:]])
    assert torch.equal(inputs["input_ids"][0], expected)
    vocab = reference.shape[-1]
    assert logits.shape == (len(expected), max(vocab, len(processor.tokenizer)))
    assert (logits[:, :vocab] - reference).abs().max() < TOL

    # the check can fail: each of these LLaVA-NeXT-wrong forwards is far from the converted logits
    for wrong in (dict(shift=1), dict(post_layernorm=True), dict(blocks=1)):
        bad = reference_logits(pivot, image, prompt, **wrong)[0]
        assert (logits[:, :vocab] - bad).abs().max() > 1e3 * TOL, wrong
    unpadded = reference_pixels(image, "square")  # without the pad the pixels (so the logits) differ
    assert (unpadded - pixels).abs().max() > 0.5


def test_config_and_weights_as_llava_next_reads_them(pivot, converted):
    model, processor = converted
    config = model.config
    assert config.vision_feature_layer == -1 and config.vision_feature_select_strategy == "full"
    assert config.vision_config.num_hidden_layers == 2  # 3-block architecture, last block deleted, as stored
    assert config.image_seq_length == 576 and config.vision_config.patch_size == 16
    assert not any(p.is_meta for p in model.parameters()) and not model.training
    assert getattr(model.model.vision_tower, "head", None) is None
    # <image>: added to the dir's tokenizer (it has none) inside the 512 embedding rows: no row added
    assert "<image>" not in toy.pivot_tokenizer().get_vocab()
    assert processor.tokenizer.convert_ids_to_tokens(config.image_token_id) == "<image>"
    assert config.text_config.vocab_size == toy.VOCAB
    assert processor.chat_template == toy.pivot_tokenizer().chat_template  # the tokenizer's own template
    state = raw_state(pivot)
    assert torch.equal(model.model.multi_modal_projector.linear_2.weight, state["model.mm_projector.2.weight"])
    assert torch.equal(model.lm_head.weight, state["lm_head.weight"])
    assert type(processor.image_processor).__name__ == "LlavaImageProcessorPil"


def test_weights_are_read_once_and_become_the_parameters(pivot, monkeypatch):
    """One copy in memory: every parameter is a tensor CheckpointReader read (no clone, no second load),
    and every stored tensor is read once."""
    from encoder_probe.encoders.checkpoint import CheckpointReader
    read, pointers = [], set()
    original = CheckpointReader.load

    def load(self, keys):
        out = original(self, keys)
        read.extend(out)
        pointers.update(v.data_ptr() for v in out.values())
        return out

    monkeypatch.setattr(CheckpointReader, "load", load)
    model, _ = convert_pivot(pivot)
    assert sorted(read) == sorted(raw_state(pivot))  # each key once
    assert all(p.data_ptr() in pointers for p in model.parameters())


def test_tied_sharded_and_outgrown_vocab(tmp_path):
    """Tied embeddings (no lm_head.weight stored), 3 shards, embedding rows == the tokenizer's: <image>
    outgrows them, a row is added; the logits over the original vocab still equal LLaVA-NeXT's."""
    directory = toy.write_pivot_mllm(tmp_path / "tied", tie_word_embeddings=True, vocab_rows=None, shards=3, seed=1)
    assert "lm_head.weight" not in raw_state(directory)
    model, processor = convert_pivot(directory)
    rows = len(toy.pivot_tokenizer())
    assert model.config.image_token_id == rows and model.config.text_config.vocab_size == rows + 1
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    image = photo("chelsea")
    prompt = prompt_of(processor)
    reference = reference_logits(directory, image, prompt)[0]
    logits = converted_logits(model, processor, image, prompt)[0]
    assert logits.shape[-1] == rows + 1 and (logits[:, :rows] - reference).abs().max() < TOL


def test_square_setting_resizes_without_pad_and_dtype(tmp_path):
    directory = toy.write_pivot_mllm(tmp_path / "square", image_aspect_ratio="square")
    model, processor = convert_pivot(directory, dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and not processor.image_processor.do_pad
    pixels = processor.image_processor(photo("chelsea"), return_tensors="pt")["pixel_values"]
    assert torch.equal(pixels, reference_pixels(photo("chelsea"), "square"))
    absent = toy.write_pivot_mllm(tmp_path / "absent", image_aspect_ratio=None)
    assert not convert_pivot(absent)[1].image_processor.do_pad


def test_pil_backend_is_the_exact_one():
    """transformers' torchvision-backend LlavaImageProcessor(do_pad=True) is close, not exact (its bicubic
    differs by up to a grey level); the PIL backend reproduces LLaVA-NeXT's pixels exactly."""
    import transformers as T
    image = photo("chelsea")
    options = dict(do_pad=True, size={"height": 384, "width": 384}, do_center_crop=False, image_mean=[0.5] * 3,
                   image_std=[0.5] * 3, resample=3)
    reference = reference_pixels(image, "pad")
    pil = T.LlavaImageProcessorPil(**options)(image, return_tensors="pt")["pixel_values"]
    fast = T.LlavaImageProcessor(**options)(image, return_tensors="pt")["pixel_values"]
    assert torch.equal(pil, reference)
    assert (fast - reference).abs().max() <= 2 / 255 + 1e-6


# -- to disk and the CLI ---------------------------------------------------------------------------------
def test_probe_convert_round_trip(pivot, converted, tmp_path, capsys):
    import transformers as T
    out = tmp_path / "hf"
    assert main(["convert", str(pivot), "--out", str(out)]) == 0
    assert "LlavaForConditionalGeneration" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["model_type"] == "llava"
    assert not list(tmp_path.glob(".hf.*"))  # no temporary left

    original, again = load_encoder(str(pivot)), load_encoder(str(out))
    assert (original.source, again.source) == ("llava", "hf-mllm")
    pixels = original.transform(photo("chelsea"))[None]
    assert torch.equal(again.transform(photo("chelsea"))[None], pixels)
    with torch.no_grad():
        a, b = original.forward_tokens(pixels), again.forward_tokens(pixels)
        assert a.patches.shape == (1, 576, 128) and torch.equal(a.patches, b.patches)
        assert torch.equal(original.project(a).patches, again.project(b).patches)

    model = T.LlavaForConditionalGeneration.from_pretrained(out, local_files_only=True)
    processor = load_processor(out)  # the PIL image backend (AutoProcessor alone: torchvision)
    image = photo("chelsea")
    logits, inputs = converted_logits(model, processor, image, prompt_of(processor))
    assert torch.equal(inputs["pixel_values"], reference_pixels(image, "pad"))
    assert torch.equal(logits, converted_logits(*converted, image, prompt_of(converted[1]))[0])


def test_vision_config_for_a_hub_tower_id(tmp_path, capsys):
    """The real tower id's table entry (1152 wide) does not fit tiny weights: --vision-config names the dir
    that does; without it, one line and no out dir."""
    from transformers import SiglipVisionConfig
    directory = toy.write_pivot_mllm(tmp_path / "hub", tower="google/siglip2-so400m-patch16-384")
    vision = tmp_path / "tower"
    SiglipVisionConfig(**toy.PIVOT_SIGLIP).save_pretrained(vision)
    assert main(["convert", str(directory), "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(directory / "config.json") in err
    assert "built-in table (google/siglip2-so400m-patch16-384)" in err and "hold 2 blocks" in err
    assert not (tmp_path / "bad").exists()
    assert main(["convert", str(directory), "--out", str(tmp_path / "ok"), "--vision-config", str(vision)]) == 0
    assert json.loads((tmp_path / "ok" / "config.json").read_text())["vision_config"]["num_hidden_layers"] == 2


def _one_line_error(capsys, *argv):
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("probe: error: ")
    return err


def test_bad_inputs_are_one_line_and_leave_no_out(pivot, tmp_path, capsys):
    # an existing --out is refused before any work, and left as it was
    existing = tmp_path / "existing"
    existing.mkdir()
    assert "already exists" in _one_line_error(capsys, "convert", str(pivot), "--out", str(existing))
    assert list(existing.iterdir()) == []
    with pytest.raises(SpecError, match="already exists"):
        save_converted(pivot, existing)

    # no weights
    empty = tmp_path / "no-weights"
    empty.mkdir()
    (empty / "config.json").write_text((pivot / "config.json").read_text())
    err = _one_line_error(capsys, "convert", str(empty), "--out", str(tmp_path / "o1"))
    assert str(empty) in err and "no weights" in err
    # missing LM keys
    lm_less = toy.write_pivot_mllm(tmp_path / "lm-less")
    state = load_file(lm_less / "model.safetensors")
    save_file({k: v for k, v in state.items() if not k.startswith("model.layers.1.")}, lm_less / "model.safetensors")
    err = _one_line_error(capsys, "convert", str(lm_less), "--out", str(tmp_path / "o2"))
    assert str(lm_less) in err and "missing keys: model.layers.1." in err
    with pytest.raises(CheckpointError, match="missing keys"):
        convert_pivot(lm_less)
    # plain anyres (LlavaNext) is not converted yet; anyres_max without unpad has no HF class: one line
    # naming config.json and the setting
    anyres = toy.write_pivot_mllm(tmp_path / "anyres", image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad",
                                  config={"image_grid_pinpoints": "(1x1),...,(2x2)"})
    err = _one_line_error(capsys, "convert", str(anyres), "--out", str(tmp_path / "o3"))
    assert str(anyres / "config.json") in err and "'anyres'" in err
    cfg = json.loads((anyres / "config.json").read_text())
    (anyres / "config.json").write_text(json.dumps(dict(cfg, image_aspect_ratio="anyres_max_9",
                                                        mm_patch_merge_type="spatial")))
    err = _one_line_error(capsys, "convert", str(anyres), "--out", str(tmp_path / "o3"))
    assert str(anyres / "config.json") in err and "anyres_max_9" in err and "'spatial'" in err
    # a transformers MLLM dir is no training dir
    hf = toy.write_hf_mllm(tmp_path / "hf", "llava_onevision")
    assert not is_pivot_dir(hf) and is_pivot_dir(pivot)
    assert "mm_vision_tower" in _one_line_error(capsys, "convert", str(hf), "--out", str(tmp_path / "o4"))
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))
    assert not list(tmp_path.glob(".o*"))


def test_conversion_writes_nothing_into_the_source(pivot, tmp_path):
    before = {p.name: p.stat().st_mtime_ns for p in pivot.iterdir()}
    convert_pivot(pivot)
    assert {p.name: p.stat().st_mtime_ns for p in pivot.iterdir()} == before


# -- anyres_max_N -> LlavaOnevisionForConditionalGeneration ------------------------------------------------
def pinpoints_wh(value, tile=384):
    """LLaVA-NeXT's image_grid_pinpoints as it reads them: (width, height) pairs; the range form
    "(AxB),...,(CxD)" is (i * tile, j * tile) for i in A..C, j in B..D."""
    import re
    if isinstance(value, str):
        found = re.findall(r"\((\d+)x(\d+)\)", value)
        (a, b), (c, d) = [tuple(map(int, pair)) for pair in (found[0], found[-1])]
        return [(i * tile, j * tile) for i in range(a, c + 1) for j in range(b, d + 1)]
    return [tuple(pair) for pair in value]


def best_resolution(size, resolutions):
    """select_best_resolution, on (width, height)."""
    width, height = size
    best, most, least = None, 0, float("inf")
    for w, h in resolutions:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = w * h - effective
        if effective > most or (effective == most and wasted < least):
            best, most, least = (w, h), effective, wasted
    return best


def reference_anyres_pixels(image, resolutions, tile=384):
    """process_anyres_image: the image resized to tile x tile, then the best resolution's resize (aspect
    kept, ceil) + black pad, cut into tiles row by row; each through the SigLIP preprocessing."""
    import math
    image = image.convert("RGB")
    bw, bh = best_resolution(image.size, resolutions)
    width, height = image.size
    if bw / width < bh / height:
        nw, nh = bw, min(math.ceil(height * bw / width), bh)
    else:
        nw, nh = min(math.ceil(width * bh / height), bw), bh
    padded = Image.new("RGB", (bw, bh), (0, 0, 0))
    padded.paste(image.resize((nw, nh)), ((bw - nw) // 2, (bh - nh) // 2))
    tiles = [padded.crop((j, i, j + tile, i + tile)) for i in range(0, bh, tile) for j in range(0, bw, tile)]
    return torch.cat([reference_pixels(view, "square", size=tile) for view in [image.resize((tile, tile))] + tiles])


def unpad(tensor, size):
    """llava_arch.unpad_image on (C, H, W) with the original (width, height); int(), as LLaVA-NeXT has it."""
    width, height = size
    ch, cw = tensor.shape[1:]
    if width / height > cw / ch:
        keep = int(height * (cw / width))
        pad = (ch - keep) // 2
        return tensor[:, pad:ch - pad, :]
    keep = int(width * (ch / height))
    pad = (cw - keep) // 2
    return tensor[:, :, pad:cw - pad]


def pack_anyres(features, size, resolutions, max_tiles, newline, tile=384, *, column_major=False, mode="bilinear"):
    """The anyres_max_N + spatial_unpad branch: base view's tokens, then the tiles' grid unpadded, shrunk
    when over max_tiles (times > 1.1), a newline after each row."""
    import math
    grid = int(features.shape[1] ** 0.5)
    bw, bh = best_resolution(size, resolutions)
    cols, rows = bw // tile, bh // tile
    x = features[1:].view(rows, cols, grid, grid, -1)
    if column_major:  # the wrong tile order (for the failing check)
        x = features[1:].view(cols, rows, grid, grid, -1).transpose(0, 1)
    x = x.permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)
    x = unpad(x, size)
    c, h, w = x.shape
    times = math.sqrt(h * w / (max_tiles * grid ** 2))
    if times > 1.1:
        x = F.interpolate(x[None], [int(h // times), int(w // times)], mode=mode)[0]
    x = torch.cat([x, newline[:, None, None].expand(c, x.shape[1], 1)], dim=-1)
    return torch.cat([features[0], x.flatten(1, 2).transpose(0, 1)])


def reference_anyres_logits(directory, image, prompt, **variant):
    from transformers import AutoTokenizer
    state = raw_state(directory)
    cfg = json.loads((directory / "config.json").read_text())
    resolutions = pinpoints_wh(cfg["image_grid_pinpoints"])
    pixels = reference_anyres_pixels(image, resolutions)
    feats = projector(state, siglip_features(state, pixels, heads=2))
    max_tiles = int(cfg["image_aspect_ratio"].removeprefix("anyres_max_"))
    newline = state["model.image_newline"] * (0 if variant.pop("no_newline", False) else 1)
    packed = pack_anyres(feats, image.size, resolutions, max_tiles, newline, **variant)
    ids = reference_ids(prompt, AutoTokenizer.from_pretrained(directory, local_files_only=True))
    lm = reference_lm(directory, state)
    with torch.no_grad():
        return lm(inputs_embeds=splice(lm, ids, packed)).logits[0], ids, pixels, packed.shape[0]


ASYMMETRIC = [[384, 384], [768, 384], [384, 1152]]  # (width, height) as LLaVA-NeXT reads them


@pytest.mark.parametrize("aspect,pinpoints,name,tiles", [
    ("anyres_max_9", "(1x1),...,(6x6)", "chelsea", 2),  # 1x2 tiles, unpadded, 24 + 888 newline'd tokens
    ("anyres_max_2", "(1x1),...,(6x6)", "astronaut", 4),  # 2x2 tiles over 2 tiles' budget: shrunk (bilinear)
    ("anyres_max_9", ASYMMETRIC, "chelsea", 2),  # (w, h) pairs: read the other way round it would be 1x3
])
def test_anyres_max_logits_equal_llava_next_reference(tmp_path, aspect, pinpoints, name, tiles):
    directory = toy.write_pivot_mllm(tmp_path / "anyres", image_aspect_ratio=aspect,
                                     mm_patch_merge_type="spatial_unpad", config={"image_grid_pinpoints": pinpoints})
    model, processor = convert_pivot(directory)
    assert type(model).__name__ == "LlavaOnevisionForConditionalGeneration"
    assert model.config.vision_aspect_ratio == aspect and model.config.vision_feature_layer == -1
    image = photo(name)
    prompt = prompt_of(processor)
    reference, ids, pixels, visual = reference_anyres_logits(directory, image, prompt)
    logits, inputs = converted_logits(model, processor, image, prompt)
    assert pixels.shape[0] == 1 + tiles and torch.equal(inputs["pixel_values"][0], pixels)
    image_id = model.config.image_token_id
    at = int((ids == IMAGE_TOKEN_INDEX).nonzero())
    assert torch.equal(inputs["input_ids"][0], torch.cat([ids[:at], torch.full((visual,), image_id), ids[at + 1:]]))
    vocab = reference.shape[-1]
    assert (logits[:, :vocab] - reference).abs().max() < TOL
    wrongs = [dict(no_newline=True), dict(column_major=True)] if tiles == 4 else [dict(no_newline=True)]
    if aspect == "anyres_max_2":
        wrongs.append(dict(mode="nearest"))
    for wrong in wrongs:  # the same token count, the wrong tokens: far off
        bad = reference_anyres_logits(directory, image, prompt, **wrong)[0]
        assert (logits[:, :vocab] - bad).abs().max() > 1e3 * TOL, wrong


def test_anyres_round_trip_and_the_encoders_full_view(tmp_path, capsys):
    """probe convert of an anyres_max_9 dir reloads as LlavaOnevision with the same logits; its image
    features are what load_encoder(dir, view="full", with_projector=True) + lm_sequence give."""
    import transformers as T
    from encoder_probe.encoders.processors import ProcessedImage
    directory = toy.write_pivot_mllm(tmp_path / "anyres", image_aspect_ratio="anyres_max_9",
                                     mm_patch_merge_type="spatial_unpad",
                                     config={"image_grid_pinpoints": "(1x1),...,(6x6)"})
    out = tmp_path / "hf"
    assert main(["convert", str(directory), "--out", str(out)]) == 0
    assert "LlavaOnevisionForConditionalGeneration" in capsys.readouterr().out
    model = T.LlavaOnevisionForConditionalGeneration.from_pretrained(out, local_files_only=True)
    processor = load_processor(out)  # the PIL image backend (AutoProcessor alone: torchvision)
    image = photo("coffee")
    prompt = prompt_of(processor)
    logits, inputs = converted_logits(model, processor, image, prompt)
    reference = reference_anyres_logits(directory, image, prompt)[0]
    assert (logits[:, :reference.shape[-1]] - reference).abs().max() < TOL

    encoder = load_encoder(str(directory), view="full", with_projector=True)
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                                  image_sizes=inputs["image_sizes"]).pooler_output[0]
        processed = ProcessedImage(inputs["pixel_values"][0], (image.height, image.width))
        tokens = encoder.forward_tokens([processed])[0]
        assert (encoder.lm_sequence(tokens)[0] - features).abs().max() < 1e-5


def test_unpad_float_edge_is_the_one_anyres_difference():
    """transformers' unpad_image rounds (int(round(x, 7))) where LLaVA-NeXT truncates (int(x)): for a few
    sizes (23 of 516,800 tried, e.g. 352x220) LLaVA-NeXT cuts two more rows (or columns) of tokens."""
    import transformers as T
    from transformers.models.llava_onevision.modeling_llava_onevision import unpad_image
    grid = torch.zeros(1, 24, 24)  # one 384 tile of 24x24 tokens, as anyres picks for a 352x220 image
    assert best_resolution((352, 220), pinpoints_wh("(1x1),...,(6x6)")) == (384, 384)
    ours, theirs = unpad(grid, (352, 220)), unpad_image(grid, (220, 352))
    assert ours.shape[1:] == (14, 24) and theirs.shape[1:] == (16, 24)
    assert T.LlavaOnevisionImageProcessorPil  # the pixels agree; only this token count differs
