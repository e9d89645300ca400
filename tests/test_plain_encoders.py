"""Plain (non-MLLM) encoders against the reference libraries' own forward passes.

Every model here is randomly initialised (seeded) and tiny or small; nothing is downloaded.
Tokens are compared with torch.equal on CPU fp32 in eval mode.
"""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import json  # noqa: E402
import shutil  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from encoder_probe import load_encoder  # noqa: E402
from encoder_probe.errors import CheckpointError, LayerError, SpecError  # noqa: E402


VIT = "vit_tiny_patch16_224"
# load_encoder seeds random-init towers with 0; references use another seed, so a loader that
# silently skipped the weights would be caught by every equality below.
REF_SEED = 7


def _save(state, path):
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(path))
    return path


def _cat(tokens):
    return torch.cat([tokens.prefix, tokens.patches], dim=1)


def _pixels(seed, b=2, size=224):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, size, size, generator=g)


# --------------------------------------------------------------------------------------------
# timm
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def timm_vit(tmp_path_factory):
    import timm

    torch.manual_seed(REF_SEED)
    ref = timm.create_model(VIT, pretrained=False).eval()
    d = tmp_path_factory.mktemp("timm_vit")
    st = _save(ref.state_dict(), d / "w.safetensors")
    pth = d / "w.pth"
    torch.save(ref.state_dict(), pth)
    enc = load_encoder(f"timm:{VIT}@{st}")
    return ref, enc, st, pth


def test_timm_vit_final_layer_and_head_match_timm(timm_vit):
    ref, enc, _, _ = timm_vit
    x = _pixels(0)
    with torch.no_grad():
        feats = ref.forward_features(x)
        p = ref.num_prefix_tokens
        final = enc.forward_tokens(x)
        assert final.layer == "final" and enc.layer == "final"
        assert final.grid == (14, 14) and final.num_prefix == p == 1
        assert torch.equal(final.patches, feats[:, p:])
        assert torch.equal(final.prefix, feats[:, :p])

        # layer 3 (output of block 3, HF numbering) == timm's forward_intermediates(indices=[2])
        (patches3, prefix3), = ref.forward_intermediates(x, indices=[2], output_fmt="NLC", return_prefix_tokens=True,
                                                         norm=False, intermediates_only=True)
        t3 = enc.forward_tokens(x, layers=3)
        assert t3.layer == 3
        assert torch.equal(t3.patches, patches3) and torch.equal(t3.prefix, prefix3)
        # ... and == running the first three blocks by hand
        h = ref.norm_pre(ref.patch_drop(ref._pos_embed(ref.patch_embed(x))))
        for blk in ref.blocks[:3]:
            h = blk(h)
        assert torch.equal(_cat(t3), h)

        # several layers at once; -1 is the last block (before the final norm)
        many = enc.forward_tokens(x, layers=[3, "final", -1])
        assert [t.layer for t in many] == [3, "final", 12]
        assert torch.equal(many[0].patches, t3.patches) and torch.equal(many[1].patches, final.patches)
        last = enc.forward_tokens(x, layers=12)
        assert torch.equal(many[2].patches, last.patches)
        assert torch.equal(ref.norm(_cat(last)), feats)

        # pooling
        assert torch.equal(enc.pool(final, "head"), ref.forward_head(feats, pre_logits=True))
        assert torch.equal(enc.pool(final, "cls"), feats[:, 0])
        assert torch.equal(enc.pool(final, "mean"), feats[:, 1:].mean(1))
        assert torch.equal(enc.pool(final, "cls+mean"), torch.cat([feats[:, 0], feats[:, 1:].mean(1)], -1))
        with pytest.raises(SpecError):
            enc.pool(t3, "head")


def test_timm_pth_loads_like_safetensors(timm_vit):
    ref, enc, _, pth = timm_vit
    enc_pth = load_encoder(f"timm:{VIT}@{pth}")
    sd = enc_pth.module.state_dict()
    for k, v in ref.state_dict().items():
        assert torch.equal(sd[k], v), k
    assert enc_pth.fingerprint == enc.fingerprint
    x = _pixels(1, b=1)
    with torch.no_grad():
        assert torch.equal(enc_pth.forward_tokens(x).patches, enc.forward_tokens(x).patches)


def test_timm_preprocess_matches_timm_eval_transform(timm_vit):
    import timm
    from PIL import Image

    ref, enc, _, _ = timm_vit
    cfg = timm.data.resolve_data_config({}, model=ref)
    pp = enc.preprocess
    assert pp.size == (224, 224) and pp.resize == "shortest"
    assert pp.resize_to == int(224 / cfg["crop_pct"])
    assert pp.mean == tuple(cfg["mean"]) and pp.std == tuple(cfg["std"])
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    ours = enc.transform(img)
    theirs = timm.data.create_transform(**cfg, is_training=False)(img)
    assert ours.shape == theirs.shape == (3, 224, 224)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_timm_cnn_tokens_are_the_feature_map(tmp_path):
    import timm

    torch.manual_seed(REF_SEED)
    ref = timm.create_model("resnet18", pretrained=False).eval()
    with torch.no_grad():  # non-trivial BN statistics, so loading buffers matters too
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    w = _save(ref.state_dict(), tmp_path / "r18.safetensors")
    enc = load_encoder(f"timm:resnet18@{w}")
    x = _pixels(2)
    with torch.no_grad():
        feats = ref.forward_features(x)
        t = enc.forward_tokens(x)
        assert t.grid == (7, 7) and t.num_prefix == 0 and t.prefix.shape == (2, 0, 512)
        assert t.patches.shape == (2, 49, 512)
        b, n, d = t.patches.shape
        assert torch.equal(t.patches.transpose(1, 2).reshape(b, d, *t.grid), feats)
        assert torch.equal(t.to_map(), feats)
        # the last feature stage is the same map; an earlier stage is timm's own intermediate
        assert torch.equal(enc.forward_tokens(x, layers=-1).to_map(), feats)
        s3, = ref.forward_intermediates(x, indices=[2], intermediates_only=True)
        t3 = enc.forward_tokens(x, layers=3)
        assert t3.grid == tuple(s3.shape[-2:]) and torch.equal(t3.to_map(), s3)
        assert torch.equal(enc.pool(t, "head"), ref.forward_head(feats, pre_logits=True))
        with pytest.raises(SpecError):
            enc.pool(t, "cls")


# --------------------------------------------------------------------------------------------
# open_clip
# --------------------------------------------------------------------------------------------
def test_open_clip_vit_tokens_and_head(tmp_path):
    import open_clip

    torch.manual_seed(REF_SEED)
    ref = open_clip.create_model("ViT-S-32", pretrained=None).eval()
    w = _save(ref.state_dict(), tmp_path / "oc.safetensors")
    enc = load_encoder(f"open_clip:ViT-S-32@{w}")
    assert enc.preprocess.size == (224, 224) and enc.preprocess.mean == tuple(ref.visual.preprocess_cfg["mean"])
    visual = ref.visual
    visual.output_tokens = True
    x = _pixels(3)
    with torch.no_grad():
        pooled, tokens = visual(x)
        t = enc.forward_tokens(x)
        assert t.grid == (7, 7) and t.num_prefix == 1
        assert torch.equal(t.patches, tokens)
        head = enc.pool(t, "head")
        assert head.shape == pooled.shape
        assert torch.equal(head, pooled), (head - pooled).abs().max()
        visual.output_tokens = False
        assert torch.equal(head, ref.encode_image(x))
        # integer layer k = output of resblock k (before ln_post); -1 = the last block
        h = visual._embeds(x)
        for blk in visual.transformer.resblocks[:2]:
            h = blk(h)
        t2, last = enc.forward_tokens(x, layers=[2, -1])
        assert t2.layer == 2 and last.layer == len(visual.transformer.resblocks)
        assert torch.equal(_cat(t2), h)
        assert torch.equal(visual.ln_post(_cat(last)), _cat(t))


# --------------------------------------------------------------------------------------------
# hf
# --------------------------------------------------------------------------------------------
V = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8)
T = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=100,
         max_position_embeddings=16)


def _hf_make(kind):
    import transformers as tr

    if kind == "clip":
        return tr.CLIPVisionModel(tr.CLIPVisionConfig(**V)), 1
    if kind == "clip_dual":
        cfg = tr.CLIPConfig(text_config=dict(T, bos_token_id=0, eos_token_id=1, pad_token_id=1), vision_config=V,
                            projection_dim=32)
        return tr.CLIPModel(cfg), 1
    if kind == "siglip":
        return tr.SiglipVisionModel(tr.SiglipVisionConfig(**V)), 0
    if kind == "siglip_dual":
        return tr.SiglipModel(tr.SiglipConfig(text_config=T, vision_config=V)), 0
    if kind == "siglip2":
        cfg = dict(V)
        cfg.pop("image_size")
        return tr.Siglip2VisionModel(tr.Siglip2VisionConfig(**cfg, num_patches=16)), 0
    if kind == "dinov2":
        return tr.Dinov2Model(tr.Dinov2Config(**{k: v for k, v in V.items() if k != "intermediate_size"},
                                              mlp_ratio=2)), 1
    if kind == "dinov2_reg":
        return tr.Dinov2WithRegistersModel(tr.Dinov2WithRegistersConfig(
            **{k: v for k, v in V.items() if k != "intermediate_size"}, mlp_ratio=2, num_register_tokens=2)), 3
    raise KeyError(kind)


def _siglip2_inputs(x, patch=8):
    from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches

    patches = torch.stack([convert_image_to_patches(img, patch) for img in x])
    b, n = patches.shape[:2]
    side = x.shape[-1] // patch
    return dict(pixel_values=patches, pixel_attention_mask=torch.ones(b, n, dtype=torch.long),
                spatial_shapes=torch.tensor([[side, side]] * b))


def _hf_reference(kind, model, x):
    """(vision output with hidden states, the model's own pooled embedding)."""
    if kind == "siglip2":
        out = model(**_siglip2_inputs(x), output_hidden_states=True)
        return out, out.pooler_output
    if kind == "clip_dual":
        out = model.vision_model(pixel_values=x, output_hidden_states=True)
        feats = model.get_image_features(pixel_values=x)
        feats = feats if isinstance(feats, torch.Tensor) else feats.pooler_output
        assert torch.allclose(feats, model.visual_projection(out.pooler_output))
        return out, feats
    if kind == "siglip_dual":
        out = model.vision_model(pixel_values=x, output_hidden_states=True)
        return out, out.pooler_output
    out = model(pixel_values=x, output_hidden_states=True)
    return out, out.pooler_output


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """kind -> (seeded reference model, expected prefix tokens, save_pretrained dir).

    ``KIND+native``: the same model, but model.safetensors holds the module's own state_dict keys
    (what save_pretrained writes for models without a key-conversion mapping).
    """
    cache = {}

    def get(kind):
        if kind not in cache:
            base, native = kind.removesuffix("+native"), kind.endswith("+native")
            torch.manual_seed(REF_SEED)
            model, n_prefix = _hf_make(base)
            model.eval()
            d = tmp_path_factory.mktemp(kind.replace("+", "_"))
            model.save_pretrained(d)
            if native:
                _save(model.state_dict(), d / "model.safetensors")
            cache[kind] = (model, n_prefix, d)
        return cache[kind]

    return get


# transformers 5 renamed DINOv2's attention modules (q_proj/...) but save_pretrained and published
# checkpoints still write attention.attention.query/...: "dinov2" reads those, "+native" the new names.
HF_KINDS = ["clip", "clip_dual", "siglip", "siglip_dual", "siglip2",
            "dinov2", "dinov2_reg",
            "dinov2+native", "dinov2_reg+native"]


@pytest.mark.parametrize("kind", HF_KINDS)
def test_hf_tokens_layers_and_head(hf_dirs, kind):
    model, n_prefix, d = hf_dirs(kind)
    enc = load_encoder(f"hf:{d}")
    assert enc.layer == "final"
    x = _pixels(4, size=32)
    with torch.no_grad():
        ref, pooled = _hf_reference(kind.removesuffix("+native"), model, x)
        t = enc.forward_tokens(x)
        assert t.grid == (4, 4) and t.num_prefix == n_prefix
        assert t.patches.shape == (2, 16, 64)
        assert torch.equal(_cat(t), ref.last_hidden_state)
        assert torch.equal(t.prefix, ref.last_hidden_state[:, :n_prefix])

        # integer layers follow hidden_states: 0 = embeddings, k = block k, negatives from the end
        layers = enc.forward_tokens(x, layers=[0, 2, -1])
        assert [u.layer for u in layers] == [0, 2, 3]
        for u, k in zip(layers, (0, 2, 3)):
            h = ref.hidden_states[k]
            assert u.num_prefix == n_prefix
            assert torch.equal(u.prefix, h[:, :n_prefix]) and torch.equal(u.patches, h[:, n_prefix:]), k

        head = enc.pool(t, "head")
        assert head.shape == pooled.shape
        assert torch.equal(head, pooled)


def test_hf_prefix_free_siglip_rejects_cls(hf_dirs):
    _, _, d = hf_dirs("siglip")
    enc = load_encoder(f"hf:{d}")
    t = enc.forward_tokens(_pixels(5, b=1, size=32))
    with pytest.raises(SpecError):
        enc.pool(t, "cls")
    with pytest.raises(SpecError):
        enc.pool(t, "cls+mean")
    assert torch.equal(enc.pool(t, "mean"), t.patches.mean(1))


def test_hf_preprocessor_config(hf_dirs, tmp_path):
    from PIL import Image
    from transformers import CLIPImageProcessor

    _, _, src = hf_dirs("clip")
    d = tmp_path / "clip_pp"
    shutil.copytree(src, d)
    proc = CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32})
    proc.save_pretrained(d)
    assert (d / "preprocessor_config.json").is_file()
    enc = load_encoder(f"hf:{d}")
    pp = enc.preprocess
    assert pp.resize == "shortest" and pp.resize_to == 40 and pp.size == (32, 32)
    assert pp.interpolation == "bicubic"
    assert np.allclose(pp.mean, proc.image_mean) and np.allclose(pp.std, proc.image_std)
    yy, xx = np.mgrid[0:60, 0:80]
    arr = np.stack([xx * 3, yy * 4, (xx + yy) * 2], -1).clip(0, 255).astype(np.uint8)  # smooth ramps
    img = Image.fromarray(arr)
    ours = enc.transform(img)
    theirs = torch.as_tensor(np.asarray(proc(images=img, return_tensors="pt")["pixel_values"]))[0]
    assert ours.shape == theirs.shape == (3, 32, 32)
    assert torch.allclose(ours, theirs, atol=0.02), (ours - theirs).abs().max()


# --------------------------------------------------------------------------------------------
# fingerprint
# --------------------------------------------------------------------------------------------
def test_fingerprint(timm_vit, tmp_path):
    ref, enc, st, _ = timm_vit
    loaded = enc.module.state_dict()
    for k, v in ref.state_dict().items():  # the loaded weights are the file's
        assert torch.equal(loaded[k], v), k
    again = load_encoder(f"timm:{VIT}@{st}")
    assert len(enc.fingerprint) == 64 and int(enc.fingerprint, 16) >= 0
    assert again.fingerprint == enc.fingerprint

    state = {k: v.clone() for k, v in ref.state_dict().items()}
    state["blocks.0.attn.qkv.weight"][0, 0] += 1e-3
    changed = load_encoder(f"timm:{VIT}@{_save(state, tmp_path / 'changed.safetensors')}")
    assert changed.fingerprint != enc.fingerprint

    other_layer = load_encoder(f"timm:{VIT}@{st}", layer=3)
    assert other_layer.layer == 3 and other_layer.fingerprint != enc.fingerprint
    assert load_encoder(f"timm:{VIT}@{st}", layer=-10).fingerprint == other_layer.fingerprint

    # random init: the same spec names the same weights on every load, and differs from the file's
    torch.manual_seed(1)
    state_before = torch.get_rng_state()
    rand_a = load_encoder(f"timm:{VIT}")
    assert torch.equal(torch.get_rng_state(), state_before)  # the caller's RNG stream is untouched
    torch.manual_seed(2)
    rand_b = load_encoder(f"timm:{VIT}")
    assert rand_a.fingerprint == rand_b.fingerprint != enc.fingerprint


# --------------------------------------------------------------------------------------------
# specs and sources
# --------------------------------------------------------------------------------------------
SOURCE_ORDER = ["llava", "hf-mllm", "qwen2-vl", "hf", "timm", "torchvision", "open_clip"]


def test_spec_is_parsed_once_and_stays_the_given_text(timm_vit, hf_dirs):
    import pickle

    from encoder_probe.encoders import Spec, parse_spec
    _, enc, st, _ = timm_vit
    spec = enc.spec
    assert isinstance(spec, Spec) and spec == f"timm:{VIT}@{st}" and json.dumps([spec]) == json.dumps([str(spec)])
    assert (spec.source.name, spec.target, spec.weights, spec.path) == ("timm", VIT, str(st), None)
    assert spec.parts == (spec.source, VIT, str(st)) and parse_spec(spec) is spec
    assert load_encoder(spec).spec is spec  # loading a parsed spec parses nothing again
    again = pickle.loads(pickle.dumps(spec))
    assert again == spec and (again.target, again.weights) == (VIT, str(st))
    assert Spec.parse("timm:x@~/w.safetensors").weights == os.path.expanduser("~/w.safetensors")
    _, _, d = hf_dirs("clip")
    for text in (f"hf:{d}", str(d)):  # a directory names itself, with or without its source
        parsed = load_encoder(text).spec
        assert parsed == text and parsed.source.name == "hf" and parsed.path == d and parsed.target == str(d)
    for bad, why in (("timm:", "nothing after 'timm:'"), ("timm:x@", "nothing after '@'"), ("", "empty")):
        with pytest.raises(SpecError, match=why):
            Spec.parse(bad)


def test_sources_are_entry_points_listed_in_detect_order():
    from importlib.metadata import entry_points

    from encoder_probe.encoders import list_sources
    from encoder_probe.encoders.sources import GROUP
    assert {ep.name for ep in entry_points(group=GROUP)} >= set(SOURCE_ORDER)
    listed = list_sources()
    assert [s.name for s in listed] == SOURCE_ORDER
    assert [s.detect_order for s in listed] == sorted(s.detect_order for s in listed)


@pytest.mark.parametrize("order,expected", [(5, "mine"), (45, "hf")])
def test_detection_follows_detect_order(hf_dirs, monkeypatch, order, expected):
    from encoder_probe.encoders import Spec, sources
    monkeypatch.setattr(sources, "_IN_PROCESS", {})
    sources.register_source("mine", description="claims every CLIP dir", detect_order=order,
                            detect=lambda config: "clip" in config.get("model_type", ""))(lambda *a, **k: None)
    _, _, d = hf_dirs("clip")
    assert Spec.parse(str(d)).source.name == expected


def test_a_broken_source_entry_point_is_one_line_naming_it(monkeypatch):
    from importlib.metadata import EntryPoint, entry_points

    from encoder_probe.encoders import Spec, list_sources, sources
    real = list(entry_points(group=sources.GROUP))
    for name, value, why in (("broken", "no_such_module_xyz:SOURCE", "failed to import: ModuleNotFoundError"),
                             ("notsource", "json:dumps", "expected an encoder_probe.encoders.sources.Source"),
                             ("renamed", "encoder_probe.encoders.timm_source:SOURCE", "named 'timm'")):
        extra = EntryPoint(name, value, sources.GROUP)
        monkeypatch.setattr(sources, "entry_points", lambda group, extra=extra: [*real, extra])
        for call in (lambda: Spec.parse(f"{name}:x"), list_sources):
            with pytest.raises(SpecError) as e:
                call()
            message = str(e.value)
            assert "\n" not in message and f"encoder source {name!r} ({value})" in message and why in message
        assert Spec.parse(f"timm:{VIT}").source.name == "timm"  # the others still load


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------
def test_unknown_timm_model_and_unknown_source():
    with pytest.raises(SpecError, match="no_such_model"):
        load_encoder("timm:no_such_model")
    with pytest.raises(SpecError, match="nosource"):
        load_encoder("nosource:foo")


def test_missing_weights_file(tmp_path, monkeypatch):
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(CheckpointError) as e:
        load_encoder(f"timm:{VIT}@{missing}")
    assert str(missing) in str(e.value)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="missing.safetensors"):
        load_encoder(f"timm:{VIT}@missing.safetensors")


def test_truncated_safetensors(timm_vit, tmp_path):
    _, _, st, _ = timm_vit
    data = st.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        load_encoder(f"timm:{VIT}@{cut}")
    assert str(cut) in str(e.value) and "truncated" in str(e.value)


def test_shape_mismatch(tmp_path):
    import timm

    torch.manual_seed(REF_SEED)
    small = timm.create_model("vit_small_patch16_224", pretrained=False)
    w = _save(small.state_dict(), tmp_path / "small.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_encoder(f"timm:{VIT}@{w}")
    assert str(w) in str(e.value) and "shape mismatch" in str(e.value)


def test_wrong_architecture_keys(timm_vit, tmp_path):
    _, _, st, _ = timm_vit
    with pytest.raises(CheckpointError) as e:
        load_encoder(f"timm:resnet18@{st}")
    msg = str(e.value)
    assert str(st) in msg and ("missing" in msg or "unexpected" in msg)


def test_directory_without_config(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    for spec in (f"hf:{d}", str(d)):
        with pytest.raises(CheckpointError) as e:
            load_encoder(spec)
        assert str(d) in str(e.value) and "config.json" in str(e.value)


def _config_dir(tmp_path, model_type):
    d = tmp_path / model_type
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": model_type}))
    return d


@pytest.mark.parametrize("model_type", ["no_such_model_type", "bert"])
def test_unknown_model_type_plain_dir(tmp_path, model_type):
    d = _config_dir(tmp_path, model_type)
    with pytest.raises(CheckpointError) as e:
        load_encoder(str(d))
    assert str(d / "config.json") in str(e.value) and model_type in str(e.value)


@pytest.mark.parametrize("model_type", ["no_such_model_type", "bert"])
def test_unknown_model_type_hf_prefix(tmp_path, model_type):
    d = _config_dir(tmp_path, model_type)
    with pytest.raises(CheckpointError) as e:
        load_encoder(f"hf:{d}")
    assert str(d) in str(e.value) and model_type in str(e.value), str(e.value)


def test_layer_out_of_range(timm_vit, hf_dirs):
    _, enc, st, _ = timm_vit
    with pytest.raises(LayerError):
        load_encoder(f"timm:{VIT}@{st}", layer=13)
    with pytest.raises(LayerError):
        load_encoder(f"timm:{VIT}@{st}", layer=-14)
    with pytest.raises(LayerError):
        load_encoder(f"timm:{VIT}@{st}", layer="penultimate")
    x = _pixels(6, b=1)
    with pytest.raises(LayerError):
        enc.forward_tokens(x, layers=[3, 13])
    with pytest.raises(LayerError):  # timm has no embedding-output layer
        enc.forward_tokens(x, layers=0)

    model, _, d = hf_dirs("clip")
    with pytest.raises(LayerError):
        load_encoder(f"hf:{d}", layer=4)
    hf = load_encoder(f"hf:{d}", layer=-4)  # -4 of a 3-block tower is layer 0, the embeddings
    assert hf.layer == 0
    x = _pixels(6, b=1, size=32)
    with torch.no_grad():
        assert torch.equal(_cat(hf.forward_tokens(x)), model(pixel_values=x, output_hidden_states=True).hidden_states[0])
    with pytest.raises(LayerError):
        hf.forward_tokens(x, layers=-5)
