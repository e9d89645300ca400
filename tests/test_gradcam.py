"""The `gradcam` probe: maps against pytorch-grad-cam, captum and hand-written autograd; token
layouts (CLS, no CLS, registers, non-square grids); localisation on a planted case; the head it
explains is the imagenet probe's, whatever the suite order."""
import json

import numpy as np
import pytest
import torch

from encoder_probe import load_encoder
from encoder_probe.attribution import (GradCAM, GradientXActivation, TokenLayer, attribute_all,
                                       score_through, token_gradients)
from encoder_probe.errors import SpecError
from encoder_probe.runner import run_probe, run_suite
from encoder_probe.localization import chance, energy_in_mask, object_masks, pointing_game
from encoder_probe.targets import HeadTarget, TextTarget



def _timm_logit_target(spec):
    """The timm model's own logits as a head target on its final tokens (pool "head" + model.head)."""
    enc = load_encoder(spec)
    head = enc.module.head
    return enc, HeadTarget(enc, head.weight.detach(), head.bias.detach(), pool="head")


# -- equality with the peers ------------------------------------------------------------------
@pytest.mark.parametrize("name", ["test_vit2", "test_vit3"])  # avg pool; attention-pool (MAP) head
def test_gradcam_equals_pytorch_grad_cam_and_captum(name):
    from captum.attr import LayerGradCam, LayerGradientXActivation
    from pytorch_grad_cam import GradCAM as PGCGradCAM
    from pytorch_grad_cam.utils.image import scale_cam_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    enc, target = _timm_logit_target(f"timm:{name}")
    model = enc.module
    x = torch.randn(4, 3, 160, 160, generator=torch.Generator().manual_seed(0))
    classes = [0, 3, 7, 9]
    ours = GradCAM(target).attribute(x, classes)
    assert ours.shape == (4, 10, 10) and ours.abs().sum() > 0

    def reshape(a):  # the ViT recipe, with this model's prefix count and grid instead of 1 + 14x14
        return a[:, model.num_prefix_tokens:].reshape(a.shape[0], 10, 10, -1).permute(0, 3, 1, 2)

    with PGCGradCAM(model=model, target_layers=[model.norm], reshape_transform=reshape) as cam:
        ref = cam(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in classes])
    # pytorch-grad-cam min-max normalises per image, resizes (cv2), then normalises again
    np.testing.assert_allclose(scale_cam_image(scale_cam_image(ours.numpy(), (160, 160))), ref, atol=1e-5)

    layer = TokenLayer()
    forward = lambda p: score_through(layer, target, p, classes)  # noqa: E731
    cap = LayerGradCam(forward, layer).attribute(x, relu_attributions=True)[:, 0]
    torch.testing.assert_close(ours, cap.detach())
    maps = attribute_all(target, x, classes)
    gxa = LayerGradientXActivation(forward, layer).attribute(x).sum(1)
    grad = LayerGradientXActivation(forward, layer, multiply_by_inputs=False).attribute(x)
    torch.testing.assert_close(maps["grad-x-act"], gxa.detach())
    torch.testing.assert_close(maps["gradient-norm"], grad.abs().sum(1).detach())
    torch.testing.assert_close(maps["gradcam"], ours)


def test_batched_maps_equal_one_image_at_a_time():
    enc, target = _timm_logit_target("timm:test_vit3")
    x = torch.randn(3, 3, 160, 160, generator=torch.Generator().manual_seed(1))
    batched = attribute_all(target, x, [1, 2, 3])
    for i, c in enumerate([1, 2, 3]):
        single = attribute_all(target, x[i:i + 1], [c])
        for m in batched:
            torch.testing.assert_close(batched[m][i:i + 1], single[m], rtol=1e-4, atol=1e-6)


# -- token layouts ----------------------------------------------------------------------------
V = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)


@pytest.fixture(scope="module")
def hf_towers(tmp_path_factory):
    import transformers as tr
    from encoder_probe.toy import _quiet
    _quiet()
    torch.manual_seed(0)
    out = {}
    for kind, model, prefix in [
        ("siglip", tr.SiglipVisionModel(tr.SiglipVisionConfig(**V, intermediate_size=64)), 0),
        ("dinov2_reg", tr.Dinov2WithRegistersModel(tr.Dinov2WithRegistersConfig(**V, mlp_ratio=2,
                                                                                   num_register_tokens=2)), 3),
    ]:
        d = tmp_path_factory.mktemp(kind)
        model.eval().save_pretrained(d)
        out[kind] = (model, prefix, d)
    return out


@pytest.mark.parametrize("kind", ["siglip", "dinov2_reg"])
@pytest.mark.parametrize("size", [(32, 32), (32, 48)])
def test_token_layouts_match_hand_autograd(hf_towers, kind, size):
    """No CLS (SigLIP), CLS + 2 registers (DINOv2), square and non-square grids: our map equals
    Grad-CAM written by hand on the HF model's own hidden state, prefix counted by hand."""
    model, n_prefix, d = hf_towers[kind]
    enc = load_encoder(f"hf:{d}")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, *size, generator=g)
    w, b = torch.randn(5, 32, generator=g), torch.randn(5, generator=g)
    classes = [1, 4]
    for pool in ["mean", "head"] if kind == "siglip" else ["mean"]:  # SigLIP's head: attention pooling
        ours = attribute_all(HeadTarget(enc, w, b, pool=pool), x, classes)
        kwargs = {"interpolate_pos_encoding": True} if kind == "siglip" else {}
        hidden = model(pixel_values=x, **kwargs).last_hidden_state.detach().requires_grad_()
        patches = hidden[:, n_prefix:]
        pooled = patches.mean(1) if pool == "mean" else model.head(hidden)
        logit = (pooled @ w.T + b)[torch.arange(2), classes].sum()
        grad = torch.autograd.grad(logit, hidden)[0][:, n_prefix:]
        h, wd = size[0] // 8, size[1] // 8
        cam = torch.relu((patches * grad.mean(1, keepdim=True)).sum(-1)).reshape(2, h, wd)
        assert ours["gradcam"].shape == (2, h, wd)
        torch.testing.assert_close(ours["gradcam"], cam.detach(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ours["gradient-norm"], grad.abs().sum(-1).reshape(2, h, wd), rtol=1e-4, atol=1e-6)


# -- localisation -----------------------------------------------------------------------------
def test_localisation_scores_by_hand():
    inside = torch.zeros(1, 4, 4, dtype=torch.bool)
    inside[0, :2, :2] = True
    valid = torch.ones_like(inside)
    m = torch.tensor([[[4.0, 0.0], [0.0, 1.0]]])  # (1, 2, 2) grid -> 4x4: top-left quarter holds 4 of 5
    assert pointing_game(m, inside, valid).item() == 1.0
    assert pointing_game(-m, inside, valid).item() == 0.0
    flat = torch.ones(1, 2, 2)  # no location: scores chance in both
    assert pointing_game(flat, inside, valid).item() == pytest.approx(0.25)
    assert energy_in_mask(flat, inside, valid).item() == pytest.approx(chance(inside, valid).item())
    step = torch.zeros(1, 4, 4)
    step[0, :2, :2] = 3.0  # already at mask resolution: all energy inside
    assert energy_in_mask(step, inside, valid).item() == pytest.approx(1.0)
    valid[0, 0, 0] = False  # an ignored pixel is neither in nor out, and is never the peak
    peak = torch.zeros(1, 4, 4)
    peak[0, 0, 0], peak[0, 3, 3] = 9.0, 1.0
    assert pointing_game(peak, inside, valid).item() == 0.0
    assert pointing_game(peak, inside, valid, tolerance=1).item() == 0.0
    assert pointing_game(peak, inside, valid, tolerance=2).item() == 1.0  # (3, 3) is 2 px from the mask
    assert pointing_game(peak, inside.roll((2, 2), dims=(1, 2)), valid).item() == 1.0
    masks = torch.tensor([[[0, 2], [255, 3]]], dtype=torch.uint8)
    own, ok = object_masks(masks, torch.tensor([3]))
    assert own.tolist() == [[[False, False], [False, True]]] and ok.tolist() == [[[True, True], [False, True]]]
    assert object_masks(masks, torch.tensor([-1]))[0].tolist() == [[[False, True], [False, True]]]


COLOURS = {"red": (230, 30, 30), "green": (30, 200, 40), "blue": (40, 60, 230)}


def _scene(rng, colour, size=64, side=20):
    """A coloured square (the class evidence) at a random place on noisy grey; mask: the square."""
    from PIL import Image
    img = np.full((size, size, 3), rng.integers(90, 160), np.float64) + rng.normal(0, 6, (size, size, 3))
    y, x = rng.integers(0, size - side, 2)
    img[y:y + side, x:x + side] = COLOURS[colour]
    mask = np.ones((size, size), np.uint8)
    mask[y:y + side, x:x + side] = 2 + list(COLOURS).index(colour)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)), mask


def write_planted(root, n_train=8, n_val=4, seed=0):
    """ImageNet layout (train/val) for the head, ADE20K layout (val, masks) for the maps."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in COLOURS:
            d = root / "imagenet" / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                _scene(rng, c)[0].save(d / f"{c}_{i}.png")
    ade = root / "ade" / "ADEChallengeData2016"
    for sub in ("images/validation", "annotations/validation"):
        (ade / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n_val * len(COLOURS)):
        img, mask = _scene(rng, list(COLOURS)[i % len(COLOURS)])
        img.save(ade / "images/validation" / f"v_{i:03d}.png")
        Image.fromarray(mask).save(ade / "annotations/validation" / f"v_{i:03d}.png")
    names = ["background", *COLOURS]
    (ade / "objectInfo150.txt").write_text("Idx\tRatio\tTrain\tVal\tName\n" +
                                           "".join(f"{i}\t0\t0\t0\t{n}\n" for i, n in enumerate(names, 1)))
    return {"imagenet": str(root / "imagenet"), "ade20k": str(root / "ade")}


def test_planted_evidence_is_found(tmp_path):
    """Class = the colour of a square: Grad-CAM of the imagenet probe's head's class logit points into
    the square and puts most of its energy there; a random map scores chance. Per-image outcomes
    give every metric back (the bootstrap's statistic) and its CI."""
    from encoder_probe.bootstrap import statistic_value
    from encoder_probe.items import Items
    data = write_planted(tmp_path / "planted")
    enc = load_encoder("timm:test_vit2", layer=1)
    result = run_probe("gradcam", enc, data=data, options={"target": "head"}, out=tmp_path / "run",
                       cache=tmp_path / "cache", bootstrap=200)
    metrics = {k: v["value"] for k, v in result["metrics"].items()}
    base = result["baseline"]["mask_fraction"]
    assert result["target"]["head"]["val_top1"] == 1.0 and 0.05 < base < 0.2
    assert metrics["pointing_game@gradcam"] >= 0.9
    assert metrics["energy_in_mask@gradcam"] > 4 * base
    # a mean-pooled linear head has the same gradient at every token: the gradient norm is flat
    assert metrics["energy_in_mask@gradient-norm"] == pytest.approx(base, abs=1e-4)

    saved = np.load(tmp_path / "run" / enc.fingerprint[:16] / result["artifacts"]["maps"])
    assert saved["map/gradcam"].shape == (12, 10, 10) and saved["magnitude/gradcam"].shape == (12, 2)
    rng = torch.Generator().manual_seed(0)
    from encoder_probe.data import open_dataset
    ade = open_dataset("ade20k", data["ade20k"], "val").with_transform(enc.preprocess)
    masks = torch.stack([ade[i]["mask"] for i in range(len(ade))])
    inside, valid = object_masks(masks, torch.as_tensor(saved["classes"]))
    random_energy = energy_in_mask(torch.rand(12, 10, 10, generator=rng), inside, valid).mean().item()
    assert random_energy < 2 * base < metrics["energy_in_mask@gradcam"] / 2
    assert np.allclose(saved["energy_in_mask/gradcam"].mean(), metrics["energy_in_mask@gradcam"])
    items = Items.load(tmp_path / "run" / enc.fingerprint[:16] / result["items"]["file"])
    assert len(items) == 12 and items.ids[0] == "images/validation/v_000.png"
    for name, m in result["metrics"].items():
        assert m["statistic"] == {"name": "mean", "column": name} and items.columns[name].shape == (1, 12)
        assert statistic_value(m["statistic"], items) == pytest.approx(m["value"], abs=1e-9)
        assert m["ci95"][0] <= m["value"] <= m["ci95"][1] and m["ci"]["B"] == 200
    assert (tmp_path / "run" / enc.fingerprint[:16] / result["artifacts"]["overlay"]).stat().st_size > 1000

    from encoder_probe.errors import DataError
    from encoder_probe.overlay import compare_overlays
    npz = tmp_path / "run" / enc.fingerprint[:16] / result["artifacts"]["maps"]
    png = compare_overlays({"layer 1": npz, "again": npz}, tmp_path / "cmp.png", rows=3)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    other = dict(np.load(npz))
    other["index"] = other["index"][::-1]
    np.savez(tmp_path / "other.npz", **other)
    with pytest.raises(DataError, match="different images"):
        compare_overlays({"a": npz, "b": tmp_path / "other.npz"}, tmp_path / "bad.png")


# -- text target --------------------------------------------------------------------------------
def test_text_target_open_clip_matches_hand_similarity():
    import open_clip
    enc = load_encoder("open_clip:ViT-S-32")
    texts = ["a photo of a red square.", "a photo of a cat."]
    target = TextTarget(enc, texts)
    tokenizer = open_clip.get_tokenizer("ViT-S-32")
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = torch.nn.functional.cosine_similarity(enc.clip_model.encode_image(x),
                                                    enc.clip_model.encode_text(tokenizer(texts))[[1, 0]])
        torch.testing.assert_close(target.score(target.tokens(x), [1, 0]), ref, rtol=1e-4, atol=1e-5)
    # open_clip's ViT pools the CLS token: its final patch tokens get no gradient at all
    assert not token_gradients(target, x, [1, 0])[1].any()


def _dual_tower_dir(root, kind):
    """A tiny HF dual-tower dir with a word-level tokenizer saved beside it (as a processor would be)."""
    import transformers as tr
    from tokenizers import Tokenizer, models, pre_tokenizers
    from encoder_probe.toy import _quiet
    _quiet()
    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=40,
                max_position_embeddings=16)
    vision = dict(V, intermediate_size=64)
    if kind == "siglip":
        model = tr.SiglipModel(tr.SiglipConfig(text_config=text, vision_config=vision))
    else:
        model = tr.CLIPModel(tr.CLIPConfig(text_config=dict(text, bos_token_id=0, eos_token_id=1, pad_token_id=1),
                                           vision_config=vision, projection_dim=16))
    words = ["[PAD]", "[UNK]", "a", "photo", "of", "the", "."] + list(COLOURS) + ["circle", "square", "background"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = tr.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", model_max_length=16)
    model.eval().save_pretrained(root)
    fast.save_pretrained(root)
    return model, fast


def test_text_target_hf_siglip_dual_tower(tmp_path):
    model, tokenizer = _dual_tower_dir(tmp_path, "siglip")
    enc = load_encoder(f"hf:{tmp_path}")
    texts = ["a photo of a red square .", "a photo of a circle ."]
    target = TextTarget(enc, texts)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        batch = tokenizer(texts, padding="max_length", return_tensors="pt")
        out = model(pixel_values=x, **batch)
        ref = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds[[1, 0]])
        torch.testing.assert_close(target.score(target.tokens(x), [1, 0]), ref, rtol=1e-4, atol=1e-5)
    maps = attribute_all(target, x, [1, 0])  # SigLIP's attention-pool head reads every patch token
    assert maps["gradcam"].shape == (2, 4, 4) and maps["gradient-norm"].min() > 0


def test_cls_pooled_text_target_fails_in_one_line(tmp_path):
    _dual_tower_dir(tmp_path / "clip", "clip")
    enc = load_encoder(f"hf:{tmp_path / 'clip'}")
    data = write_planted(tmp_path / "planted", n_train=1, n_val=1)
    with pytest.raises(SpecError, match="no gradient"):
        run_probe("gradcam", enc, data={"ade20k": data["ade20k"]}, options={"limit": 2}, out=tmp_path / "run",
                  bootstrap=0)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").rglob("*.npz"))


def test_text_target_needs_a_text_tower():
    with pytest.raises(SpecError, match="has no text tower"):
        TextTarget(load_encoder("timm:test_vit2"), ["a cat"])


# -- options and bad input ------------------------------------------------------------------------
@pytest.mark.parametrize("options, message", [
    ({"methods": "gradcam,saliency"}, "gradcam.methods must be one of gradcam, gradient-norm, grad-x-act, got 'saliency'"),
    ({"methods": []}, "methods: give at least one of"),
    ({"target": "logits"}, "gradcam.target must be one of auto, head, text, mllm"),
    ({"loss": "kl"}, "gradcam.loss must be one of logprob, sft, dpo"),
    ({"classifier": "svm"}, "gradcam.classifier must be one of fit, model"),
    ({"prompt": "a photo"}, "prompt must contain '{}'"),
    ({"limit": 0}, "gradcam.limit must be >= 1"),
    ({"tolerance": -1}, "gradcam.tolerance must be >= 0"),
    ({"gradcam.pool": "cls"}, "probe 'gradcam' takes no option 'pool'"),  # the head's is the imagenet probe's
    ({"gradcam.C": 1.0}, "probe 'gradcam' takes no option 'C'"),
])
def test_bad_options_are_one_line(options, message):
    from encoder_probe.runner import plan
    with pytest.raises(SpecError) as e:
        plan("gradcam", options)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_options_are_typed_and_split_into_protocol_and_runtime():
    from encoder_probe.probe import split_config
    from encoder_probe.runner import plan
    _, probes, configs = plan("gradcam", {"methods": "gradcam, grad-x-act", "batch_size": 4, "limit": "null",
                                          "pool": "cls"})
    assert list(probes) == ["gradcam", "imagenet"]  # the head's probe, validated with the rest
    assert configs["imagenet"].pool == "cls" and configs["imagenet"].batch_size == 4  # the head's pooling
    cfg = configs["gradcam"]
    assert cfg.methods == ["gradcam", "grad-x-act"] and cfg.limit is None
    proto, run = split_config(cfg)
    assert set(run) == {"batch_size", "overlay_rows", "device", "device_map", "mllm_dtype"}
    assert {"target", "methods", "limit", "classifier", "prompt", "loss", "beta", "dpo_reference",
            "tolerance"} == set(proto)


def test_gradient_x_activation_is_signed_and_gradcam_is_not():
    enc, target = _timm_logit_target("timm:test_vit3")
    x = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(5))
    maps = attribute_all(target, x, [0, 1])
    assert (maps["gradcam"] >= 0).all() and (maps["grad-x-act"] < 0).any()
    assert GradientXActivation.signed and not GradCAM.signed


def test_model_classifier_head_is_the_models_own_logits(hf_towers):
    from encoder_probe.targets import own_classifier
    enc = load_encoder("timm:test_vit3")
    head, info = own_classifier(enc)
    x = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(head.logits(head.tokens(x)), enc.module(x), rtol=1e-4, atol=1e-5)
    assert info["classes"] == enc.module.head.out_features
    with pytest.raises(SpecError, match="own linear classifier"):
        own_classifier(load_encoder(f"hf:{hf_towers['siglip'][2]}"))


def _maps(record, out):
    entry = record["probes"]["gradcam"]
    assert entry["status"] == "ok", entry
    with np.load(out / record["encoder"]["fingerprint"][:16] / entry["artifacts"]["maps"]) as f:
        return {k: f[k] for k in f.files}


def test_gradcam_explains_the_imagenet_probes_own_head_whatever_the_suite_order(tmp_path):
    """`imagenet,gradcam`, `gradcam,imagenet` and `gradcam` alone: the one head the imagenet probe
    refit and scored (the same weights, so the same maps and metrics); alone, the imagenet probe runs
    because gradcam needs it and is recorded as such."""
    data = write_planted(tmp_path / "planted", n_train=4, n_val=2)
    runs = {}
    for suite in ("imagenet,gradcam", "gradcam,imagenet", "gradcam"):
        out = tmp_path / suite.replace(",", "_")
        record, = run_suite(["timm:test_vit"], suite, out, data=data, options={"limit": 4, "target": "head"},
                            cache=tmp_path / "cache", progress=False, bootstrap=0)
        runs[suite] = record, _maps(record, out)
    first, first_maps = runs["imagenet,gradcam"]
    head = first["probes"]["gradcam"]["target"]["head"]
    assert head["from"] == "the imagenet probe's refit head" and head["classes"] == ["blue", "green", "red"]
    assert head["C"] == first["probes"]["imagenet"]["chosen_C"][0] and head["fitted_on"].endswith("imagenet")
    assert head["val_top1"] == first["probes"]["imagenet"]["metrics"]["top1"]["value"]
    for suite, (record, maps) in runs.items():
        assert list(record["probes"]) == suite.split(",") + (["imagenet"] if suite == "gradcam" else [])
        entry = record["probes"]["gradcam"]
        assert entry["target"]["head"] == head, suite  # digest: the same weights, bias and standardisation
        assert entry["metrics"] == first["probes"]["gradcam"]["metrics"]
        assert entry["config_hash"] == first["probes"]["gradcam"]["config_hash"]
        assert maps.keys() == first_maps.keys()
        for key, value in maps.items():
            np.testing.assert_array_equal(value, first_maps[key], err_msg=f"{suite}: {key}")
    alone = runs["gradcam"][0]["probes"]["imagenet"]
    assert alone["needed_by"] == ["gradcam"] and "needed_by" not in first["probes"]["imagenet"]
    assert alone["metrics"] == first["probes"]["imagenet"]["metrics"]


def test_a_head_that_is_not_one_layers_linear_map_is_one_line(tmp_path):
    from conftest import assert_one_line_error, run_cli
    data = write_planted(tmp_path / "planted", n_train=2, n_val=1)
    proc, out = run_cli(tmp_path, "--encoder", "timm:test_vit", "--suite", "gradcam", "--data",
                        f"imagenet={data['imagenet']}", "--data", f"ade20k={data['ade20k']}", "--option",
                        "target=head", "--option", "last_layers=2", "--option", "limit=2", "--bootstrap", "0")
    assert_one_line_error(proc, "gradcam target head explains the imagenet probe's refit head, which is not a "
                                "linear map of one layer's standardised pooled tokens here: the head reads 2 layers")


def test_text_target_runs_no_linear_probe(tmp_path, monkeypatch):
    """A text target needs no head: `--suite gradcam` never runs (or reads data for) the imagenet probe."""
    import probes.linear
    _dual_tower_dir(tmp_path / "siglip", "siglip")
    monkeypatch.setattr(probes.linear.LinearProbe, "run", lambda *a: pytest.fail("the linear probe ran"))
    data = write_planted(tmp_path / "planted", n_train=1, n_val=1)
    out = tmp_path / "out"
    record, = run_suite([f"hf:{tmp_path / 'siglip'}"], "gradcam", out, data={"ade20k": data["ade20k"]},
                        options={"limit": 3, "methods": "gradcam"}, cache=tmp_path / "cache", progress=False,
                        bootstrap=0)
    assert list(record["probes"]) == ["gradcam"] and list(record["data"]) == ["ade20k"]
    entry = record["probes"]["gradcam"]
    assert entry["status"] == "ok" and entry["config"]["target"] == "text" and "head" not in entry["config"]
    assert entry["data"]["images"] == 3 and set(entry["metrics"]) <= {"pointing_game@gradcam", "energy_in_mask@gradcam"}
    saved = json.loads((out / record["encoder"]["fingerprint"][:16] / "results.json").read_text())
    assert saved["probes"]["gradcam"]["items"]["n"] == 3
