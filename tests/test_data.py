"""Dataset readers: layouts, labels, subsampling, image modes, ADE20K label mapping, bad input."""
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_ade20k, write_imagefolder
from encoder_probe.data import ADE20K, ImageFolder, open_dataset
from encoder_probe.data.images import load_rgb
from encoder_probe.encoders.base import Preprocess
from encoder_probe.errors import DataError

PRE = Preprocess((32, 32), (0.5,) * 3, (0.5,) * 3, "bicubic", "exact")


def test_imagefolder_counts_labels_and_synset_names(tmp_path):
    write_imagefolder(tmp_path, classes=("n02", "n01", "n03"), per_class=3)
    (tmp_path / "LOC_synset_mapping.txt").write_text("n01 tench, Tinca tinca\nn02 goldfish, Carassius auratus\n")
    ds = ImageFolder(tmp_path, "train")
    assert len(ds) == 9 and ds.wnids == ["n01", "n02", "n03"]  # sorted dirs, as torchvision's ImageFolder
    assert ds.class_names == ["tench", "goldfish", "n03"]  # unmapped wnid keeps its dir name
    from torchvision.datasets import ImageFolder as Reference
    ref = Reference(tmp_path / "train")
    assert [(str(s.path), s.label) for s in ds.samples] == [(p, y) for p, y in ref.samples]


def test_per_class_subsample_is_seeded_and_balanced(tmp_path):
    write_imagefolder(tmp_path, per_class=10, size=(8, 8))
    a = ImageFolder(tmp_path, "train", per_class=4, seed=1)
    b = ImageFolder(tmp_path, "train", per_class=4, seed=1)
    c = ImageFolder(tmp_path, "train", per_class=4, seed=2)
    assert [s.path for s in a.samples] == [s.path for s in b.samples]
    assert [s.path for s in a.samples] != [s.path for s in c.samples]
    assert np.bincount([s.label for s in a.samples]).tolist() == [4, 4, 4]
    assert a.describe()["per_class"] == {"min": 4, "max": 4}
    assert len(ImageFolder(tmp_path, "train", per_class=50)) == 30  # fewer than K: all of them


@pytest.mark.parametrize("problem, message", [
    ("missing_split", "split 'val'"),
    ("no_classes", "no class directories"),
    ("empty_class", "class directory has no images"),
])
def test_imagefolder_bad_layouts_name_the_directory(tmp_path, problem, message):
    write_imagefolder(tmp_path, per_class=1, size=(8, 8))
    split = "train"
    if problem == "missing_split":
        split = "val"
    elif problem == "no_classes":
        (tmp_path / "empty").mkdir()
        split = "empty"
    else:
        (tmp_path / "train" / "zebra").mkdir()
        (tmp_path / "train" / "zebra" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=message) as e:
        ImageFolder(tmp_path, split)
    assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)


def test_odd_image_modes_become_rgb(tmp_path):
    gray = tmp_path / "gray.png"
    Image.fromarray(np.full((4, 4), 77, np.uint8)).save(gray)
    assert load_rgb(gray).getpixel((0, 0)) == (77, 77, 77)

    wide = tmp_path / "sixteen.png"  # 16-bit: scaled, not clipped at 255
    Image.fromarray(np.array([[0, 32896, 65535, 257]], np.uint16)).save(wide)
    assert Image.open(wide).mode.startswith("I")
    assert [load_rgb(wide).getpixel((x, 0))[0] for x in range(4)] == [0, 128, 255, 1]

    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(cmyk)  # pure red in CMYK
    r, g, b = load_rgb(cmyk).getpixel((4, 4))
    assert r > 200 and g < 60 and b < 60

    alpha = tmp_path / "alpha.png"
    Image.new("RGBA", (4, 4), (10, 20, 30, 0)).save(alpha)
    assert load_rgb(alpha).getpixel((0, 0)) == (10, 20, 30)  # as torchvision's loader: alpha dropped

    palette = tmp_path / "palette.png"
    Image.new("RGB", (4, 4), (200, 100, 50)).convert("P").save(palette)
    assert load_rgb(palette).mode == "RGB"


def test_ade20k_label_mapping_and_joint_geometry(tmp_path):
    write_ade20k(tmp_path, n=2, size=(64, 64))
    ds = ADE20K(tmp_path, "train").with_transform(PRE)
    assert len(ds) == 2 and ds.num_classes == 150 and ds.split == "train"
    item = ds[0]
    raw = np.asarray(Image.open(ds.samples[0].mask))
    expected = np.where(raw == 0, 255, raw.astype(int) - 1)[1::2, 1::2]  # 16px label blocks -> 8px at 32
    assert item["mask"].dtype == torch.uint8 and item["mask"].shape == (32, 32)
    assert np.array_equal(item["mask"].numpy(), expected)
    assert torch.equal(item["pixels"], PRE.transform(Image.open(ds.samples[0].path)))


def test_ade20k_crop_geometry_follows_the_encoder(tmp_path):
    write_ade20k(tmp_path, n=1, size=(48, 64))
    crop = Preprocess((32, 32), (0.5,) * 3, (0.5,) * 3, "bicubic", "shortest", 48)
    item = ADE20K(tmp_path, "train").with_transform(crop)[0]
    raw = np.asarray(Image.open(ADE20K(tmp_path, "train").samples[0].mask))
    expected = np.where(raw == 0, 255, raw.astype(int) - 1)[8:40, 16:48]  # short side 48 = no scale, centre crop
    assert np.array_equal(item["mask"].numpy(), expected)


@pytest.mark.parametrize("problem, message", [
    ("label", "mask has label 151; labels must be 0..150"),
    ("size", "mask is 32x32 but its image"),
    ("missing", "annotation missing"),
])
def test_ade20k_bad_masks(tmp_path, problem, message):
    write_ade20k(tmp_path, n=2, size=(64, 64))
    mask = tmp_path / "ADEChallengeData2016" / "annotations" / "training" / "ADE_training_00000001.png"
    if problem == "label":
        Image.fromarray(np.full((64, 64), 151, np.uint8)).save(mask)
    elif problem == "size":
        Image.fromarray(np.ones((32, 32), np.uint8)).save(mask)
    else:
        mask.unlink()
        with pytest.raises(DataError, match=message):
            ADE20K(tmp_path, "train")
        return
    bad = ADE20K(tmp_path, "train").with_transform(PRE)[1]
    assert bad.fatal and message in bad.reason and bad.path == str(mask)


def test_open_dataset_validates_name_and_options(tmp_path):
    write_imagefolder(tmp_path, per_class=1, size=(8, 8))
    with pytest.raises(DataError, match="unknown dataset 'imagenet1k'"):
        open_dataset("imagenet1k", tmp_path)
    with pytest.raises(DataError, match="takes no option per_class"):
        open_dataset("ade20k", tmp_path, per_class=3)
    assert len(open_dataset("imagenet", tmp_path, "train", per_class=1)) == 3
