"""View `full` at the published geometry: every token the MLLM's LM reads, equal to the model's own
get_image_features on real photos of three aspect ratios (tiny widths, real patch / tile / merge /
pinpoint geometry, real on-disk layouts)."""
import pytest
import torch

from encoder_probe.assets import photo
from encoder_probe.encoders import load_encoder
from encoder_probe.errors import SpecError
from encoder_probe.toy import published_mllm

PHOTOS = ("astronaut", "chelsea", "coffee")  # 512x512, 451x300, 600x400
KINDS = ("llava_onevision", "llava_next", "qwen2_vl", "qwen2_5_vl", "internvl")


@pytest.fixture(scope="module")
def images():
    return {name: photo(name) for name in PHOTOS}


@pytest.fixture(scope="module", params=KINDS)
def mllm(request, tmp_path_factory, images):
    """(kind, model, dir, its projected full-view tokens per photo): one encode per photo for all tests."""
    model = published_mllm(request.param).eval()
    out = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(out)
    projected = load_encoder(str(out), view="full", with_projector=True)
    with torch.no_grad():
        encoded = {name: projected.encode(image) for name, image in images.items()}
    return request.param, model, out, projected, encoded


def _reference(kind, model, processor, image):
    """(projector input in LM order, get_image_features output) of the model itself, for one image."""
    inputs = processor(images=image, return_tensors="pt")
    cfg = model.config
    with torch.no_grad():
        if kind.startswith("qwen"):
            pv, thw = inputs["pixel_values"], inputs["image_grid_thw"]
            visual = model.model.visual
            hidden = visual(pv, grid_thw=thw, output_hidden_states=True).hidden_states[-1]
            if kind == "qwen2_5_vl":  # blocks run in attention-window order: undo it
                from transformers.vision_utils import get_vision_window_index
                order, _ = get_vision_window_index(thw, 2, visual.window_size, 14)
                hidden = hidden.reshape(-1, 4, hidden.shape[-1])[torch.argsort(order)].reshape(hidden.shape)
            _, h, w = thw[0].tolist()  # merge-block order (2x2 neighbours adjacent) -> row-major
            hidden = hidden.reshape(h // 2, w // 2, 2, 2, -1).permute(0, 2, 1, 3, 4).reshape(h * w, -1)
            out = model.model.get_image_features(pixel_values=pv, image_grid_thw=thw).pooler_output[0]
            return hidden, out, thw[0]
        if kind == "internvl":
            pv = inputs["pixel_values"]
            feats = model.model.vision_tower(pixel_values=pv).last_hidden_state[:, 1:]
            side = int(feats.shape[1] ** 0.5)
            shuffled = model.model.pixel_shuffle(feats.reshape(len(pv), side, side, -1), cfg.downsample_ratio)
            out = model.model.get_image_features(pixel_values=pv, vision_feature_layer=cfg.vision_feature_layer,
                                                 vision_feature_select_strategy="default").pooler_output
            return shuffled.reshape(-1, shuffled.shape[-1]), out.reshape(-1, out.shape[-1]), None
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image
        pv, sizes = inputs["pixel_values"][0], inputs["image_sizes"]
        hidden = model.model.vision_tower(pv, output_hidden_states=True).hidden_states[cfg.vision_feature_layer]
        if cfg.vision_feature_select_strategy == "default":
            hidden = hidden[:, 1:]
        g = cfg.vision_config.image_size // cfg.vision_config.patch_size
        rows, cols = get_anyres_image_grid_shape(sizes[0], cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        tiles = hidden[1:].reshape(rows, cols, g, g, -1).permute(4, 0, 2, 1, 3).reshape(-1, rows * g, cols * g)
        tiles = unpad_image(tiles, sizes[0])
        projector_input = torch.cat([hidden[0], tiles.flatten(1).T])
        kwargs = {"vision_aspect_ratio": cfg.vision_aspect_ratio} if kind == "llava_onevision" else {}
        out = model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=sizes,
                                             vision_feature_layer=cfg.vision_feature_layer,
                                             vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                                             **kwargs).pooler_output[0]
        return projector_input, out, hidden[0]


def test_full_view_equals_the_models_own_image_features(mllm, images):
    kind, model, path, projected, encoded = mllm
    tower = load_encoder(str(path), view="full")
    processor = tower.preprocess.build()
    assert tower.details["preprocess_from"].startswith("published")  # no preprocessor_config.json in the dir
    for name, image in images.items():
        projector_input, features, extra = _reference(kind, model, processor, image)
        with torch.no_grad():
            tokens = tower.encode(image)
        lm = encoded[name]
        assert tokens.layout.image_size == (image.height, image.width)
        torch.testing.assert_close(tokens.patches[0], projector_input, atol=1e-5, rtol=1e-5, msg=f"{kind} {name}")
        torch.testing.assert_close(projected.lm_sequence(lm)[0], features, atol=1e-5, rtol=1e-5, msg=f"{kind} {name}")
        # the LM reads exactly as many tokens as our layout counts (newlines included), projected or not
        assert lm.layout.lm_tokens == features.shape[0]
        assert tower.token_counts(tokens.layout)["lm_tokens"] == features.shape[0]
        if kind.startswith("qwen"):
            assert tokens.grid == (int(extra[1]), int(extra[2]))  # smart_resize's grid, not a squashed square
            assert lm.grid == (tokens.grid[0] // 2, tokens.grid[1] // 2)
        elif kind != "internvl":  # the base view is the model's base view, in either view of ours
            torch.testing.assert_close(tokens.view("base").patches[0], extra, atol=1e-5, rtol=1e-5)
            base_tile = processor(images=image, return_tensors="pt")["pixel_values"][0, :1]
            with torch.no_grad():
                base = load_encoder(str(path)).forward_tokens(base_tile)
            torch.testing.assert_close(base.patches[0], extra, atol=1e-5, rtol=1e-5)


def test_published_token_counts(tmp_path, images):
    """The counts a researcher reads in papers: OneVision 729 + tiles (+ newlines), InternVL 256 a tile."""
    model = published_mllm("llava_onevision")
    model.save_pretrained(tmp_path / "ov")
    ov = load_encoder(str(tmp_path / "ov"), view="full", with_projector=True)
    counts = {name: ov.encode(im).layout.lm_tokens for name, im in images.items()}
    assert counts == {"astronaut": 729 + 54 * 55, "chelsea": 729 + 27 * 41, "coffee": 729 + 36 * 55}
    base = load_encoder(str(tmp_path / "ov"))
    assert base.encode(images["chelsea"]).grid == (27, 27)  # SigLIP/14 at 384 floors to 27x27


def test_anyres_max_shrinks_big_grids_as_the_model_does(tmp_path):
    """A 2000x1900 photo: 6x6 tiles, unpadded 162 x 154 > 9 x 729 tokens: OneVision shrinks it."""
    model = published_mllm("llava_onevision").eval()
    model.save_pretrained(tmp_path)
    enc = load_encoder(str(tmp_path), view="full", with_projector=True)
    image = photo("astronaut").resize((1900, 2000))
    inputs = enc.preprocess.build()(images=image, return_tensors="pt")
    with torch.no_grad():
        ref = model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                                             vision_feature_layer=-1, vision_feature_select_strategy="full",
                                             vision_aspect_ratio="anyres_max_9").pooler_output[0]
        tokens = enc.encode(image)
    tiles = tokens.layout.views[1]
    assert tiles.grid[0] * tiles.grid[1] < 9 * 729 * 1.3
    torch.testing.assert_close(enc.lm_sequence(tokens)[0], ref, atol=1e-5, rtol=1e-5)
    # the shrunk grid still spans the same part of the photo
    tower = load_encoder(str(tmp_path), view="full")
    layout = tower.encode(image).layout
    assert tiles.box == pytest.approx(layout.views[1].box)
    assert layout.lm_tokens > ref.shape[0] == tower.token_counts(layout)["lm_tokens"]  # the LM reads the shrunk grid


def test_processor_from_the_checkpoint_dir(tmp_path, images):
    """A preprocessor_config.json in the dir wins over the published settings (Qwen: its max_pixels)."""
    import transformers as T
    model = published_mllm("qwen2_vl")
    model.save_pretrained(tmp_path)
    T.Qwen2VLImageProcessor(min_pixels=3136, max_pixels=100_000, patch_size=14, merge_size=2).save_pretrained(tmp_path)
    enc = load_encoder(str(tmp_path), view="full")
    assert enc.details["preprocess_from"].startswith("preprocessor_config.json")
    tokens = enc.encode(images["coffee"])
    h, w = tokens.grid
    assert h * w * 14 * 14 <= 100_000 and abs(w / h - 600 / 400) < 0.1
    assert "smart_resize" in enc.describe()["preprocess"]
    assert load_encoder(str(tmp_path)).fingerprint != enc.fingerprint


def test_full_view_pools_whole_sequence_or_one_view(tmp_path, images):
    model = published_mllm("llava_next")
    model.save_pretrained(tmp_path)
    enc = load_encoder(str(tmp_path), view="full")
    tokens = enc.encode(images["chelsea"])
    torch.testing.assert_close(enc.pool(tokens, "mean"), tokens.patches.mean(1))
    base = tokens.patches[:, tokens.layout.span("base")]
    torch.testing.assert_close(enc.pool(tokens, "mean", view="base"), base.mean(1))
    torch.testing.assert_close(enc.pool(tokens, "cls"), tokens.prefix[:, 0])  # the base tile's CLS
    with pytest.raises(KeyError, match="no view 'thumbnail'"):
        enc.pool(tokens, "mean", view="thumbnail")
    with pytest.raises(ValueError, match="no single grid"):
        tokens.to_map()


def test_full_view_refusals(tmp_path):
    from encoder_probe.toy import write_hf_mllm
    model = published_mllm("qwen2_5_vl")
    model.save_pretrained(tmp_path / "qwen")
    with pytest.raises(SpecError, match="native resolution"):
        load_encoder(str(tmp_path / "qwen"), view="full", image_size=448)
    with pytest.raises(SpecError, match="unknown view"):
        load_encoder(str(tmp_path / "qwen"), view="tiles")
    with pytest.raises(SpecError, match="one view"):
        load_encoder("timm:test_vit", view="full")
    enc = load_encoder(str(tmp_path / "qwen"), view="full")
    with pytest.raises(ValueError, match="processed images"):
        enc.forward_tokens(torch.zeros(1, 3, 56, 56))
    write_hf_mllm(tmp_path / "ov", "llava_onevision")  # toy geometry still loads in both views
    assert load_encoder(str(tmp_path / "ov"), view="full").view == "full"


def test_pivot_dir_full_view_equals_transformers_onevision(tmp_path, images):
    """A LLaVA-NeXT / PIVOT training dir (anyres_max_9, "(1x1),...,(6x6)", spatial_unpad), read in view
    full, equals transformers' LlavaOnevision holding the same tower, projector and newline."""
    import transformers as T
    from safetensors.torch import load_file
    from encoder_probe.toy import TEXT, write_pivot, write_siglip_dir
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=384,
                  patch_size=14)
    write_siglip_dir(tmp_path / "tower", **vision)
    path = write_pivot(tmp_path / "pivot", vision=vision)
    enc = load_encoder(str(path), view="full", with_projector=True, vision_config=str(tmp_path / "tower"))
    # the same weights in transformers' own class: truncated tower (2 blocks), layer -1 before post_layernorm
    config = T.LlavaOnevisionConfig(vision_config=dict(vision, model_type="siglip_vision_model", num_hidden_layers=2,
                                                       vision_use_head=False),
                                    text_config=dict(TEXT, num_hidden_layers=1), vision_feature_layer=-1,
                                    vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
                                    image_grid_pinpoints=[[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)],
                                    projector_hidden_act="gelu")
    model = T.LlavaOnevisionForConditionalGeneration(config).eval()
    state = load_file(path / "model.safetensors")
    own = {k.replace("model.vision_tower.vision_tower.vision_model.", "model.vision_tower."): v
           for k, v in state.items() if k.startswith("model.vision_tower.")}
    own |= {f"model.multi_modal_projector.linear_{1 if i == '0' else 2}.{p}": state[f"model.mm_projector.{i}.{p}"]
            for i in "02" for p in ("weight", "bias")}
    own["model.image_newline"] = state["model.image_newline"]
    missing = model.load_state_dict(own, strict=False)
    assert not [k for k in missing.missing_keys if "vision" in k or "projector" in k or "newline" in k]
    processor = enc.preprocess.build()
    for name in ("chelsea", "coffee"):
        inputs = processor(images=images[name], return_tensors="pt")
        with torch.no_grad():
            ref = model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                                                 vision_feature_layer=-1, vision_feature_select_strategy="full",
                                                 vision_aspect_ratio="anyres_max_9").pooler_output[0]
            tokens = enc.encode(images[name])
        torch.testing.assert_close(enc.lm_sequence(tokens)[0], ref, atol=1e-5, rtol=1e-5)
    assert "pinpoints" in enc.describe()["preprocess"]


def _tokenizer(specials, **named):
    """A tiny offline tokenizer that knows the MLLM's image placeholder tokens."""
    import transformers as T
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(["[UNK]", *specials])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(specials))
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", extra_special_tokens=named or None)


def _mllm_processor(kind, image_processor):
    """The model's full processor (image + text): (processor, prompt, placeholder token)."""
    import transformers as T
    if kind == "llava_onevision":
        return T.LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=_tokenizer(["<image>", "<video>"]),
                                         video_processor=T.LlavaOnevisionVideoProcessor(), num_image_tokens=729,
                                         vision_feature_select_strategy="full"), "<image>", "<image>"
    if kind == "llava_next":  # published processor_config: one additional (CLS) token, strategy default
        return T.LlavaNextProcessor(image_processor=image_processor, tokenizer=_tokenizer(["<image>"]), patch_size=14,
                                    vision_feature_select_strategy="default", num_additional_image_tokens=1), \
            "<image>", "<image>"
    if kind.startswith("qwen"):
        cls = T.Qwen2VLProcessor if kind == "qwen2_vl" else T.Qwen2_5_VLProcessor
        tokens = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
        return cls(image_processor=image_processor, tokenizer=_tokenizer(tokens), video_processor=T.Qwen2VLVideoProcessor()), \
            "<|vision_start|><|image_pad|><|vision_end|>", "<|image_pad|>"
    tokens = dict(start_image_token="<img>", end_image_token="</img>", context_image_token="<IMG_CONTEXT>",
                  video_token="<video>")
    return T.InternVLProcessor(image_processor=image_processor, tokenizer=_tokenizer(list(tokens.values()), **tokens),
                               video_processor=T.InternVLVideoProcessor(), image_seq_length=256), \
        "<IMG_CONTEXT>", "<IMG_CONTEXT>"


def test_token_counts_equal_the_placeholders_the_processor_inserts(mllm, images):
    """What the model's own processor writes into the LM's input_ids for each photo = our lm_tokens."""
    kind, _, _, enc, encoded = mllm
    processor, prompt, placeholder = _mllm_processor(kind, enc.preprocess.build())
    token_id = processor.tokenizer.convert_tokens_to_ids(placeholder)
    for name, image in images.items():
        ids = processor(images=image, text=prompt, return_tensors="pt")["input_ids"]
        assert int((ids == token_id).sum()) == encoded[name].layout.lm_tokens, f"{kind} {name}"


def test_an_image_the_processor_refuses_names_its_file(tmp_path):
    """Qwen2-VL's smart_resize refuses aspect ratios over 200: a one-line error naming the file, or
    skipped and counted under on_bad_image='skip'."""
    from PIL import Image
    from encoder_probe.data.imagefolder import ImageFolder
    from encoder_probe.errors import DataError
    from encoder_probe.features import extract
    published_mllm("qwen2_vl").save_pretrained(tmp_path / "qwen")
    for name, size in (("ok", (64, 48)), ("strip", (600, 2))):
        (tmp_path / "data" / "train" / name).mkdir(parents=True)
        Image.new("RGB", size, (90, 120, 30)).save(tmp_path / "data" / "train" / name / "a.png")
    enc = load_encoder(str(tmp_path / "qwen"), view="full")
    data = ImageFolder(tmp_path / "data", "train")
    with pytest.raises(DataError, match=r"strip/a\.png: a 600x2 image: Qwen2VLImageProcessor refuses it"):
        extract(enc, data, out=tmp_path / "cache", num_workers=0, progress=False)
    assert not any((tmp_path / "cache").glob("*/meta.json"))
    features = extract(enc, data, out=tmp_path / "cache", num_workers=0, progress=False, on_bad_image="skip")
    assert len(features) == 1 and features.meta["skipped"][0]["path"].endswith("strip/a.png")


def test_passes_split_tiles_and_images_without_changing_a_token(mllm, images):
    """A batch of many-tile images runs in passes (memory of a base batch); the tokens are the same."""
    kind, _, path, _, encoded = mllm
    enc = load_encoder(str(path), view="full", with_projector=True)
    if kind.startswith("qwen"):
        enc.patches_per_pass = 1  # one image a pass
    else:
        enc.tiles_per_pass = 2  # astronaut's 5 anyres tiles in 3 passes
    with torch.no_grad():
        tokens = enc.encode(list(images.values()))
    for name, t in zip(images, tokens):
        torch.testing.assert_close(t.patches, encoded[name].patches, atol=1e-5, rtol=1e-5)
        assert t.layout == encoded[name].layout


def test_lm_counts_follow_the_projector_in_both_views(tmp_path, images, capsys):
    """Qwen's LM reads the 2x2-merged tokens: base 448x448 = 32x32 patches -> 256 LM tokens; full view
    chelsea 22x32 patches -> 176, in `probe inspect` and in results.json."""
    import json
    from conftest import run_cli
    published_mllm("qwen2_vl").save_pretrained(tmp_path / "qwen")
    base = load_encoder(str(tmp_path / "qwen"))
    grid = base.forward_tokens(torch.zeros(1, 3, 448, 448)).grid
    assert base.token_counts(base.base_layout((448, 448), grid)) | {"views": None} == {
        "views": None, "visual_tokens": 1024, "lm_tokens": 256}
    from encoder_probe.cli import main
    assert main(["inspect", str(tmp_path / "qwen"), "--view", "full"]) == 0
    assert "704         0  = 176 LM tokens" in capsys.readouterr().out
    proc, out = run_cli(tmp_path, "--encoder", str(tmp_path / "qwen"), "--suite", "knn", "--image-size", "56",
                        command="run")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(next(out.rglob("results.json")).read_text())
    assert record["encoder"]["tokens_per_image"]["visual"]["max"] == 16
    assert record["encoder"]["tokens_per_image"]["lm"]["max"] == 4
