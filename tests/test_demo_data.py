"""The procedural demo data: deterministic, labels agree with pixels, real layouts, built once."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from encoder_probe.data import demo
from encoder_probe.data.demo import DEMO_CLASSES, PALETTE, SIZES, demo_data, generate_demo, render_scene

SMALL = dict(train_per_class=3, val_per_class=2, size=96, seed=0)
ADE = "ade20k/ADEChallengeData2016"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return generate_demo(tmp_path_factory.mktemp("demo") / "root", **SMALL)


@pytest.fixture(scope="module")
def manifest(root):
    return json.loads((root / "manifest.json").read_text())


@pytest.fixture(scope="module")
def scenes(manifest):
    return [s for split in ("train", "val") for s in manifest["scenes"][split]]


def _mask(root, scene):
    return np.asarray(Image.open(root / scene["ade_annotation"]))


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_two_generations_are_byte_identical(tmp_path):
    a, b = (generate_demo(tmp_path / name, **SMALL) for name in "ab")
    files_a, files_b = _files(a), _files(b)
    assert sorted(files_a) == sorted(files_b)
    assert len(files_a) == 3 * 30 + 5  # per scene: imagenet png, ade jpg + mask; 5 text files
    assert all(files_a[k] == files_b[k] for k in files_a)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no temp dirs left behind


def test_other_seed_gives_other_data(tmp_path):
    a = render_scene(0, 0, 3)[0]
    b = render_scene(1, 0, 3)[0]
    assert np.abs(np.asarray(a, float) - np.asarray(b, float)).mean() > 5


def test_masks_agree_with_classes_and_geometry(root, scenes):
    for s in scenes:
        mask = _mask(root, s)
        assert mask.shape == (96, 96) and mask.dtype == np.uint8
        assert Image.open(root / s["image"]).size == (96, 96)
        assert set(np.unique(mask)) <= set(range(8)) and (mask == 1).any()
        label = DEMO_CLASSES.index(s["class"]) + 2
        shapes = mask[mask >= 2]
        assert set(np.unique(shapes)) == {label}, s["stem"]
        assert np.bincount(shapes).argmax() == label
        assert shapes.size / mask.size > 0.01, s["stem"]
        ys, xs = np.nonzero(mask == label)
        assert np.allclose([xs.mean() / 96, ys.mean() / 96], s["position"], atol=0.03), s["stem"]
        lo, hi = SIZES[s["size"]]
        assert lo <= s["extent"] <= hi
        span = max(np.ptp(xs), np.ptp(ys)) / 96
        assert 0.65 * s["extent"] - 0.03 <= span <= s["extent"] + 0.03, s["stem"]


def test_ring_footprint_excludes_its_hole(root, scenes):
    rings = [s for s in scenes if s["class"] == "ring"]
    assert rings
    for s in rings:
        cx, cy = (round(v * 96) for v in s["position"])
        assert _mask(root, s)[cy, cx] != DEMO_CLASSES.index("ring") + 2


def test_solid_objects_show_their_palette_colour(root, scenes):
    solid = [s for s in scenes if s["fill"] == "solid"]
    assert solid
    for s in solid:
        inside = _mask(root, s) == DEMO_CLASSES.index(s["class"]) + 2
        inner = inside[1:-1, 1:-1] & inside[:-2, 1:-1] & inside[2:, 1:-1] & inside[1:-1, :-2] & inside[1:-1, 2:]
        pixels = np.asarray(Image.open(root / s["image"]))[1:-1, 1:-1][inner]
        assert np.abs(np.median(pixels, 0) - PALETTE[s["colour"]]).max() <= 12, s["stem"]


def test_png_and_jpeg_are_the_same_scene(root, manifest):
    train = manifest["scenes"]["train"]
    for s, other in zip(train, train[1:] + train[:1]):
        png = np.asarray(Image.open(root / s["image"]), float)
        jpg = Image.open(root / s["ade_image"])
        assert jpg.format == "JPEG" and jpg.size == (96, 96)
        assert np.abs(png - np.asarray(jpg, float)).mean() < 3, s["stem"]
        assert np.abs(np.asarray(Image.open(root / other["ade_image"]), float) - png).mean() > 10


def test_dots_are_visible_and_counted(root, scenes):
    assert sum(s["n_dots"] for s in scenes) > 0
    for s in scenes:
        mask = _mask(root, s)
        assert s["n_dots"] == len(s["dots"]) <= 5
        yy, xx = np.mgrid[0:96, 0:96] / 96
        discs = [np.hypot(xx - x, yy - y) < 0.6 * r for x, y, r in s["dots"]]
        for disc in discs:
            assert (mask[disc] == 0).mean() >= 0.9, s["stem"]  # drawn, and not covered by the object
        assert not discs or np.sum(discs, axis=0).max() <= 1  # separate dots, countable


def test_vqa_records_are_true(root, manifest):
    by_image = {s["image"]: s for split in manifest["scenes"].values() for s in split}
    kinds = set()
    for split in ("train", "val"):
        records = [json.loads(line) for line in (root / "vqa" / f"{split}.jsonl").read_text().splitlines()]
        assert len(records) == 2 * manifest["counts"][split]
        for r in records:
            s = by_image[r["image"]]
            assert (root / r["image"]).is_file() and r["image"].startswith(f"imagenet/{split}/")
            assert r["chosen"] != r["rejected"]
            kinds.add(r["kind"])
            if r["kind"] == "colour":
                assert r["chosen"] == s["colour"] and r["rejected"] in PALETTE
            elif r["kind"] == "count":
                assert r["chosen"] == str(s["n_dots"])
                assert abs(int(r["rejected"]) - s["n_dots"]) == 1 and int(r["rejected"]) >= 0
            elif r["kind"] == "size":
                assert r["chosen"] == s["size"] and r["rejected"] in SIZES
            else:
                assert r["kind"] == "position"
                axis = 0 if "left" in r["question"] else 1
                c = s["position"][axis]
                assert abs(c - 0.5) > 0.1
                assert r["chosen"] == (("left", "right"), ("top", "bottom"))[axis][c > 0.5]
            if r["kind"] != "count":
                assert s["class"] in r["question"]
    assert kinds == {"colour", "position", "count", "size"}


def test_vqa_edge_cases():
    meta = {"image": "x.png", "class": "star", "colour": "white", "size": "small", "n_dots": 0}
    records = [r for k in range(40)
               for r in demo.vqa_records({**meta, "position": [0.45, 0.9]}, np.random.default_rng(k))]
    count = [r for r in records if r["kind"] == "count"]
    position = [r for r in records if r["kind"] == "position"]
    assert count and all(r["chosen"] == "0" and r["rejected"] == "1" for r in count)
    assert position and all(r["chosen"] == "bottom" and "top or the bottom" in r["question"] for r in position)
    centred = [r for k in range(40) for r in demo.vqa_records({**meta, "position": [0.55, 0.42]},
                                                               np.random.default_rng(k))]
    assert {r["kind"] for r in centred} == {"colour", "count", "size"}  # no position question when unclear


def test_layout_is_balanced_and_object_info_matches_masks(root, manifest):
    per_class = {"train": SMALL["train_per_class"], "val": SMALL["val_per_class"]}
    for split, n in per_class.items():
        dirs = sorted(p.name for p in (root / "imagenet" / split).iterdir())
        assert dirs == sorted(DEMO_CLASSES)
        assert all(len(list((root / "imagenet" / split / c).glob("*.png"))) == n for c in DEMO_CLASSES)
    mapping = (root / "imagenet/LOC_synset_mapping.txt").read_text().splitlines()
    assert mapping == [f"{c} {c}" for c in DEMO_CLASSES]

    masks = {split: [_mask(root, s) for s in manifest["scenes"][split]] for split in per_class}
    assert len(list((root / ADE / "images/training").glob("*.jpg"))) == len(masks["train"]) == 18
    assert len(list((root / ADE / "annotations/validation").glob("*.png"))) == len(masks["val"]) == 12
    total = sum(m.size for ms in masks.values() for m in ms)
    rows = [line.split("\t") for line in (root / ADE / "objectInfo150.txt").read_text().splitlines()]
    assert rows[0] == ["Idx", "Ratio", "Train", "Val", "Name"]
    assert [r[4] for r in rows[1:]] == ["background", *DEMO_CLASSES]
    for idx, ratio, train, val, _ in rows[1:]:
        idx = int(idx)
        assert int(train) == sum((m == idx).any() for m in masks["train"])
        assert int(val) == sum((m == idx).any() for m in masks["val"])
        pixels = sum((m == idx).sum() for ms in masks.values() for m in ms)
        assert float(ratio) == pytest.approx(pixels / total, abs=1e-4)
    assert [int(r[2]) for r in rows[2:]] == [3] * 6  # each shape is in exactly its own scenes


def test_a_scene_does_not_depend_on_how_many_were_made(root, manifest):
    s = manifest["scenes"]["train"][7]
    image, label, meta = render_scene(0, 0, 7, 96)
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(root / s["image"])))
    assert np.array_equal(label, _mask(root, s))
    assert meta.items() <= s.items()
    assert render_scene(0, 1, 7, 96)[2] != meta  # the split is part of the seed


def test_generate_demo_refuses_an_existing_root(root):
    with pytest.raises(FileExistsError):
        generate_demo(root, **SMALL)


def test_demo_data_is_built_once_and_reused(tmp_path, monkeypatch):
    params = dict(train_per_class=1, val_per_class=1)
    first = demo_data(tmp_path, **params)
    assert first.parent == tmp_path and first.name.startswith(f"demo-v{demo.DEMO_VERSION}-")
    stamp = (first / "manifest.json").stat().st_mtime_ns

    def no_rebuild(*args, **kwargs):
        raise AssertionError("regenerated")

    monkeypatch.setattr(demo, "render_scene", no_rebuild)
    assert demo_data(tmp_path, **params) == first
    assert demo_data(tmp_path, size=96, **params) == first  # defaults spelled out: same data
    assert (first / "manifest.json").stat().st_mtime_ns == stamp
    assert sorted(tmp_path.iterdir()) == [first]
    with pytest.raises(AssertionError, match="regenerated"):
        demo_data(tmp_path, seed=1, **params)
    assert sorted(tmp_path.iterdir()) == [first]  # a failed build leaves nothing behind
    with pytest.raises(TypeError, match="colour"):
        demo_data(tmp_path, colour="red")


def test_demo_data_defaults_to_the_cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("ENCODER_PROBE_CACHE", str(tmp_path / "cache"))
    got = demo_data(train_per_class=1, val_per_class=0)
    assert got.parent == tmp_path / "cache" and (got / "manifest.json").is_file()
    assert isinstance(got, Path)
