"""View "full" through the pipeline: ragged extraction equal to the encoder, its cache entry, resume,
`probe run --view full` and `probe inspect --view full`, bad --view input as one line.

A LLaVA-OneVision checkpoint with the real tile geometry (SigLIP/14 at 384 px: 27x27 tokens per tile)
but small pinpoints and a 32-wide, 2-block tower, so a handful of images run in seconds.
"""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_one_line_error, run_cli, write_ade20k
from encoder_probe import load_encoder
from encoder_probe.assets import photo
from encoder_probe.data import ADE20K, ImageFolder
from encoder_probe.errors import DataError
from encoder_probe.features import FeatureSet, extract

PINPOINTS = [[384, 384], [384, 768], [768, 384], [768, 768]]
SIZES = {"a": [(300, 500), (500, 300)], "b": [(384, 384), (200, 700)]}  # (H, W): 1x2, 2x1, 1x1, 1x2 tiles


def _write_onevision(out):
    import transformers as T
    from transformers.utils import logging
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    torch.manual_seed(0)
    text = dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128)
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=384, patch_size=14, vision_use_head=False)
    config = T.LlavaOnevisionConfig(vision_config=vision, text_config=text, vision_feature_layer=-1,
                                    vision_feature_select_strategy="full", image_grid_pinpoints=PINPOINTS,
                                    vision_aspect_ratio="anyres_max_9")
    T.LlavaOnevisionForConditionalGeneration(config).eval().save_pretrained(out)
    return out


def _write_images(root, split="train", seed=0):
    """Two classes of random photos-sized images, each class with its own sizes (different tile grids)."""
    rng = np.random.default_rng(seed)
    for name, sizes in SIZES.items():
        (root / split / name).mkdir(parents=True, exist_ok=True)
        for i, (h, w) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / split / name / f"{name}_{i}.png")
    return root


def _files(directory):
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return _write_onevision(tmp_path_factory.mktemp("onevision"))


@pytest.fixture(scope="module")
def full(checkpoint):
    return load_encoder(str(checkpoint), view="full")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    _write_images(root, "train", seed=0)
    return _write_images(root, "val", seed=1)


def _encode(encoder, path, layers=None):
    with torch.inference_mode():
        return encoder.encode(Image.open(path).convert("RGB"), layers)


def test_full_view_features_equal_the_encoder_per_image(tmp_path, full, images):
    ds = ImageFolder(images, "train")
    fs = extract(full, ds, out=tmp_path / "cache", layers=[1, 2], pool=["mean"], tokens=True, batch_size=3,
                 num_workers=0, progress=False)
    assert fs.ragged and fs.view == "full" and fs.grid is None and len(fs) == 4
    counts = []
    for i, sample in enumerate(ds.samples):
        mid, last = _encode(full, sample.path, [1, 2])
        np.testing.assert_allclose(fs.pooled("mean", 2)[i], full.pool(last, "mean")[0].numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(fs.pooled("mean", 1)[i], full.pool(mid, "mean")[0].numpy(), rtol=1e-5, atol=1e-5)
        assert fs.layout(i) == last.layout  # every token's box on the original image, round-tripped
        assert fs.token_rows(i, 2).dtype == np.float16
        np.testing.assert_array_equal(fs.token_rows(i, 2), last.patches[0].half().numpy())
        np.testing.assert_array_equal(fs.token_rows(i, 1), mid.patches[0].half().numpy())
        assert fs.prefix(2)[i].shape == tuple(last.prefix[0].shape)
        counts.append((last.layout.num_tokens, last.layout.lm_tokens))
    visual, lm = (np.array(c) for c in zip(*counts))
    assert len(set(visual)) > 1  # the images really have different token counts
    assert fs.token_offsets.tolist() == [0, *np.cumsum(visual).tolist()]
    assert fs.tokens(2).shape == (visual.sum(), 32)
    assert fs.token_counts()["visual"].tolist() == visual.tolist() and fs.token_counts()["lm"].tolist() == lm.tolist()
    assert fs.meta["tokens_per_image"] == {
        "visual": {"min": int(visual.min()), "mean": round(float(visual.mean()), 2), "max": int(visual.max())},
        "lm": {"min": int(lm.min()), "mean": round(float(lm.mean()), 2), "max": int(lm.max())}}
    assert fs.labels.tolist() == [0, 0, 1, 1] and fs.index.tolist() == [0, 1, 2, 3]


def test_base_and_full_views_are_separate_entries(tmp_path, checkpoint, full, images):
    base = load_encoder(str(checkpoint))
    run = lambda enc: extract(enc, ImageFolder(images, "val"), out=tmp_path / "cache", num_workers=0, progress=False)
    b, f = run(base), run(full)
    assert b.path != f.path and b.key != f.key
    assert "view" not in b.meta["key"] and "view" not in b.meta and not b.ragged  # base entries as before
    assert f.meta["key"]["view"] == "full" and f.meta["view"] == "full"
    assert f.meta["key"]["transform"]["preprocess"]["processor"] == "LlavaOnevisionImageProcessor"
    assert b.pooled("mean").shape == f.pooled("mean").shape == (4, 32)
    assert not np.allclose(b.pooled("mean"), f.pooled("mean"))
    assert run(full).path == f.path  # a hit
    assert b.token_counts()["visual"].tolist() == [27 * 27] * 4


def test_full_view_masks_stay_at_original_size_and_an_interrupted_run_resumes_to_the_same_bytes(
        tmp_path, full, monkeypatch, capsys):
    write_ade20k(tmp_path / "ade", n=4, size=(96, 160))
    ds = ADE20K(tmp_path / "ade", "train").with_transform(full.preprocess)
    run = lambda out: extract(full, ADE20K(tmp_path / "ade", "train"), out=out, tokens=True, batch_size=1,
                              chunk_size=1, num_workers=0, progress=True)
    import encoder_probe.features as features
    original, calls = features._Extraction.forward, []

    def interrupted(self, batch):  # Ctrl-C during the 3rd image: chunks 0 and 1 are on disk
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(features._Extraction, "forward", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed")
    monkeypatch.setattr(features._Extraction, "forward", original)
    [partial] = (tmp_path / "killed").glob(".*.partial")
    assert len(list(partial.glob("chunk-*"))) == 2
    capsys.readouterr()
    resumed = run(tmp_path / "killed")
    assert "2 of 4 chunks already done" in capsys.readouterr().err
    clean = run(tmp_path / "clean")
    assert resumed.path.name == clean.path.name and _files(resumed.path) == _files(clean.path)
    assert not list((tmp_path / "killed").glob(".*.partial"))

    for i in range(4):
        mask = resumed.mask(i)
        assert mask.dtype == np.uint8 and mask.shape == (96, 160)  # the original image's size
        np.testing.assert_array_equal(mask, ds[i]["mask"].numpy())
        assert resumed.layout(i).image_size == (96, 160)
    with pytest.raises(DataError, match="mask\\(i\\)"):
        resumed.masks
    assert resumed.meta["key"]["transform"]["masks"] == "original"


def test_probe_run_full_view_records_the_view_and_token_counts(tmp_path, checkpoint, full, images, cache_env):
    proc, out = run_cli(tmp_path, "--encoder", str(checkpoint), "--view", "full", "--suite", "imagenet,knn",
                        "--data", f"imagenet={images}")
    assert proc.returncode == 0, proc.stderr
    [results] = out.glob("*/results.json")
    record = json.loads(results.read_text())
    assert record["encoder"]["view"] == "full" and record["encoder"]["fingerprint"] == full.fingerprint
    layouts = [_encode(full, p).layout for split in ("train", "val") for p in sorted((images / split).rglob("*.png"))]
    visual = [layout.num_tokens for layout in layouts]
    lm = [layout.lm_tokens for layout in layouts]
    counts = record["encoder"]["tokens_per_image"]
    assert counts["images"] == 8
    assert counts["visual"] == {"min": min(visual), "mean": round(float(np.mean(visual)), 2), "max": max(visual)}
    assert counts["lm"] == {"min": min(lm), "mean": round(float(np.mean(lm)), 2), "max": max(lm)}
    for probe in ("imagenet", "knn"):
        result = record["probes"][probe]
        assert result["status"] == "ok" and result["view"] == "full" and result["config"]["view"] == "full"
        assert result["data"]["train"] == 4 and result["data"]["val"] == 4

    from encoder_probe.report.schema import validate
    bad = json.loads(results.read_text())
    bad["encoder"]["tokens_per_image"]["lm"]["min"] = 10 ** 9
    with pytest.raises(DataError, match="encoder.tokens_per_image.lm"):
        validate(bad)
    bad["encoder"]["view"] = "wide"
    with pytest.raises(DataError, match="encoder.view"):
        validate(bad)


def test_probe_inspect_full_view_shows_every_view_of_the_example_photos(checkpoint, full, capsys):
    from encoder_probe.cli import main
    assert main(["inspect", str(checkpoint), "--view", "full"]) == 0
    out = capsys.readouterr().out
    assert full.preprocess.describe() in out and full.details["preprocess_from"] in out
    for name in ("astronaut", "chelsea"):
        counts = _encode_photo(full, name)
        block = out.split(f"example photo {name!r}")[1].split("example photo")[0]
        w, h = photo(name).size
        assert block.startswith(f" ({w}x{h}): tile grid ")
        for view in counts["views"]:
            assert f"{view['name']:<12}{view['grid']:<9}{view['tokens']:>8}{view['newlines']:>10}" in block
        assert f"= {counts['lm_tokens']} LM tokens" in block and f"{counts['visual_tokens']:>8}" in block

    assert main(["inspect", str(checkpoint), "--view", "full", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["view"] == "full" and [e["photo"] for e in info["examples"]] == ["astronaut", "chelsea"]
    rows, cols = full.views.tile_grid((512, 512))
    assert info["examples"][0]["tile_grid"].startswith(f"tile grid {rows}x{cols} ")
    for example in info["examples"]:
        counts = _encode_photo(full, example["photo"])
        assert {k: example[k] for k in counts} == counts

    assert main(["inspect", str(checkpoint)]) == 0  # base view: its own count
    lines = {line[:18].strip(): line[18:].strip() for line in capsys.readouterr().out.splitlines()}
    assert lines["view"].startswith("base") and "grid 27x27" in lines["tokens"]
    assert lines["token count"] == "base view 27x27: 729 visual tokens, 729 LM tokens per image"


def _encode_photo(encoder, name):
    with torch.inference_mode():
        return encoder.encode(photo(name)).layout.counts()


@pytest.mark.parametrize("command", ["run", "extract", "inspect"])
@pytest.mark.parametrize("view,spec,message", [
    ("bogus", "timm:test_vit", "--view: unknown view 'bogus'; choose base or full"),
    ("full", "timm:test_vit", "--view full: timm:test_vit: source 'timm' reads one view of an image"),
])
def test_bad_view_is_one_line_and_refused_before_loading(tmp_path, monkeypatch, command, view, spec, message):
    import encoder_probe.encoders as encoders
    import encoder_probe.runner as runner

    def refuse(*args, **kwargs):
        raise AssertionError("loaded an encoder before checking --view")
    monkeypatch.setattr(encoders, "load_encoder", refuse)
    monkeypatch.setattr(runner, "load_encoder", refuse)
    argv = {"run": ["run", "--encoder", spec, "--suite", "imagenet", "--out", str(tmp_path / "out")],
            "extract": ["extract", "--encoder", spec, "--out", str(tmp_path / "out")],
            "inspect": ["inspect", spec]}[command]
    import contextlib
    import io
    import types

    from encoder_probe.cli import main
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        code = main([*argv, "--view", view])
    proc = types.SimpleNamespace(returncode=code, stderr=stderr.getvalue())
    assert_one_line_error(proc, message)
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_probe_extract_full_view_reports_the_token_counts(tmp_path, checkpoint, full, images):
    proc, out = run_cli(tmp_path, "--encoder", str(checkpoint), "--view", "full", "--data", f"imagenet={images}",
                        "--split", "val", "--tokens", "--workers", "0", command="extract")
    assert proc.returncode == 0, proc.stderr
    fs = FeatureSet(proc.stdout.split(" -> ")[1].split(" (view full")[0])
    visual, lm = fs.token_counts()["visual"], fs.token_counts()["lm"]
    assert f"(view full: {visual.min()}..{visual.max()} visual, {lm.min()}..{lm.max()} LM tokens per image)" \
        in proc.stdout
    assert fs.meta["key"]["encoder"] == full.fingerprint
    assert fs.meta["plan"] == {"batch_size": 8, "chunk_size": 32}  # loader batches of 8 images in view full
