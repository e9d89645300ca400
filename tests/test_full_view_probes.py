"""Dense probes and gradient maps on view "full": tokens painted back onto the photo through their boxes.

One small real-geometry LLaVA-OneVision checkpoint (SigLIP/14 at 384 px, hidden 32, small
pinpoints) and real photos: token boxes against transformers' own tiling, gradient maps that
light up the box their target reads, and segmentation painted through the boxes.
"""
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from encoder_probe.assets import photo
from encoder_probe.attribution import GradCAM, GradientNorm, GradientXActivation, sequence_gradients
from encoder_probe.encoders.views import TokenLayout, View
from encoder_probe.localization import energy_in_mask, pointing_game
from encoder_probe.segmentation import confusion_matrix, layout_union_targets, paint_logits, pixel_scores
from encoder_probe.targets import HeadTarget

PINPOINTS = [[384, 384], [384, 768], [768, 384], [768, 768]]
PHOTOS = ("astronaut", "chelsea", "coffee")


@pytest.fixture(scope="module")
def ov(tmp_path_factory):
    from encoder_probe import load_encoder
    from encoder_probe.toy import write_hf_mllm
    d = write_hf_mllm(tmp_path_factory.mktemp("ov") / "ov", "llava_onevision", geometry="published",
                      pinpoints=PINPOINTS)
    return load_encoder(str(d), view="full")


@pytest.fixture(scope="module")
def photos():
    return {name: photo(name) for name in PHOTOS}


@pytest.fixture(scope="module")
def encoded(ov, photos):
    with torch.no_grad():
        return dict(zip(PHOTOS, ov.encode([photos[n] for n in PHOTOS])))


def test_paint_operators_are_the_layouts_own_painting(encoded):
    from encoder_probe.segmentation import paint_operators
    for t in encoded.values():
        z = torch.randn(t.layout.num_tokens, 3)
        for size in (t.layout.image_size, (61, 97)):
            torch.testing.assert_close(paint_logits(z, t.layout, size, paint_operators(t.layout, size)),
                                       paint_logits(z, t.layout, size), atol=1e-4, rtol=1e-4)


def _pixels_in(box, size):
    """(H, W) bool: pixels whose centre lies in the half-open box [x0, x1) x [y0, y1)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    ys, xs = np.arange(size[0]) + 0.5, np.arange(size[1]) + 0.5
    return ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]


def _one_hot_paint(layout, k, view):
    values = torch.zeros(layout.num_tokens)
    values[k] = 1
    return layout.paint(values, mode="nearest", views=[view]).numpy()


# -- token boxes ---------------------------------------------------------------------------------
def test_one_hot_tokens_paint_exactly_their_boxes(encoded):
    layout = encoded["chelsea"].layout  # 300 x 451: 1x2 tiles, unpadded left and right
    base, tiles = layout.views
    assert tiles.newline and layout.view_ids().bincount().tolist() == [base.size, tiles.size]
    boxes = layout.boxes()
    g = 27
    width = tiles.grid[1]
    seam_row = 5
    # the stitched grid before unpadding has 2*27 columns; unpadding cut the same number on both sides
    cut = (2 * g - width) // 2
    seam_col = g - 1 - cut  # the last column of the first tile, next to the tile seam
    picks = {"base": (0, 5 * g + 7), "seam": (1, base.size + seam_row * width + seam_col),
             "seam+1": (1, base.size + seam_row * width + seam_col + 1),
             "unpadded edge": (1, base.size + 3 * width + 0), "last": (1, layout.num_tokens - 1)}
    H, W = layout.image_size
    in_tiles = np.zeros((H, W), bool)  # pixels whose centre lies in some tile token's box
    for box in boxes[layout.span("tiles")]:
        in_tiles |= _pixels_in(box, (H, W))
    for what, (view, k) in picks.items():
        painted = _one_hot_paint(layout, k, view)
        expected = _pixels_in(boxes[k], layout.image_size)
        assert expected.any(), what
        assert set(np.unique(painted)) <= {0.0, 1.0}
        # exactly the box's pixels; the only others are seam pixels (in no token's box), which nearest
        # painting gives to a neighbour of the seam
        lit = painted > 0.5
        np.testing.assert_array_equal(lit & expected, expected, err_msg=what)
        if view == 0:
            np.testing.assert_array_equal(lit, expected, err_msg=what)
        else:
            assert not (lit & ~expected & in_tiles).any(), what
    seam_pixels = ~in_tiles & (np.arange(W)[None, :] > 10) & (np.arange(W)[None, :] < W - 10) & \
        (np.arange(H)[:, None] > 10) & (np.arange(H)[:, None] < H - 10)
    assert seam_pixels.any()  # the tile seam is a real gap on the image
    # the seam: the two tokens' boxes do not touch (SigLIP/14 covers 378 of each 384 px tile)
    a, b = boxes[picks["seam"][1]], boxes[picks["seam+1"][1]]
    assert b[0] > a[2]
    # the unpadded edge token starts within one token of the image's left edge, reaching past it at most that
    edge = boxes[picks["unpadded edge"][1]]
    assert abs(edge[0]) < edge[2] - edge[0]  # unpadding cut the padded columns up to the image's left edge
    # every view together: a one-hot token still paints only its box's pixels (averaged with the other view)
    values = torch.zeros(layout.num_tokens)
    values[picks["seam"][1]] = 1
    both = layout.paint(values, mode="nearest").numpy()
    np.testing.assert_array_equal(both > 0, _pixels_in(boxes[picks["seam"][1]], layout.image_size))


@pytest.mark.parametrize("name", ["chelsea", "coffee"])
def test_tile_boxes_match_the_processors_own_tiles(ov, encoded, photos, name):
    """Tile k as transformers cuts it (select_best_resolution, get_patch_output_size, pad, divide_to_patches)
    holds exactly the tokens the model reads from it (unpad_image), on the original image."""
    from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
    from transformers.image_transforms import PaddingMode, pad
    from transformers.image_utils import ChannelDimension
    from transformers.models.llava_next.modeling_llava_next import unpad_image
    from transformers.models.llava_onevision.image_processing_llava_onevision import divide_to_patches
    layout = encoded[name].layout
    H, W = layout.image_size
    assert (W, H) == photos[name].size
    bh, bw = select_best_resolution((H, W), PINPOINTS)
    nh, nw = get_patch_output_size(np.empty((H, W, 1), np.uint8), (bh, bw), ChannelDimension.LAST)
    # where every canvas pixel comes from: its (y, x) on the resized image, padded as the processor pads
    yy, xx = np.meshgrid(np.arange(nh, dtype=np.float32), np.arange(nw, dtype=np.float32), indexing="ij")
    coords = np.stack([yy, xx, np.zeros_like(yy)], -1)
    py, px = (bh - nh) // 2, (bw - nw) // 2
    canvas = pad(coords, ((py, bh - nh - py), (px, bw - nw - px)), mode=PaddingMode.CONSTANT, constant_values=-1,
                 data_format=ChannelDimension.LAST, input_data_format=ChannelDimension.LAST)
    tiles = [np.moveaxis(t, 0, -1) for t in divide_to_patches(np.moveaxis(canvas, -1, 0), 384)]
    processed = ov.transform(photos[name])
    assert processed.pixel_values.shape[0] == 1 + len(tiles)  # base + the processor's tiles
    rows, cols = bh // 384, bw // 384
    g = 27
    kept = unpad_image(torch.arange(rows * g * cols * g).reshape(1, rows * g, cols * g), [H, W])[0]
    stitched_to_token = {int(v): i for i, v in enumerate(kept.flatten())}
    boxes = layout.boxes()[layout.span("tiles")]
    for k, tile in enumerate(tiles):
        assert tile.shape[:2] == (384, 384)
        r, c = divmod(k, cols)
        real = tile[..., 0] >= 0  # canvas pixels of this tile that hold image, not padding
        if not real.any():
            continue
        # the tile's first real canvas pixel, back on the original image
        ty, tx = np.argwhere(real)[0]
        y_img, x_img = tile[ty, tx, 0] * H / nh, tile[ty, tx, 1] * W / nw
        tile_y0, tile_x0 = y_img - ty * H / nh, x_img - tx * W / nw  # the tile's corner, padding included
        region = (tile_x0, tile_y0, tile_x0 + 384 * W / nw, tile_y0 + 384 * H / nh)
        mine = [stitched_to_token[(r * g + i) * cols * g + c * g + j] for i in range(g) for j in range(g)
                if (r * g + i) * cols * g + c * g + j in stitched_to_token]
        assert mine, f"tile {k} has real pixels but no tokens"
        b = boxes[mine].numpy()
        eps = 1e-6
        assert (b[:, 0] >= region[0] - eps).all() and (b[:, 2] <= region[2] + eps).all()
        assert (b[:, 1] >= region[1] - eps).all() and (b[:, 3] <= region[3] + eps).all()
        # token (i, j) of the tile covers canvas pixels [14 j, 14 j + 14) of it
        for t, idx in zip(b, mine):
            flat = int(kept.flatten()[idx])
            i, j = flat // (cols * g) - r * g, flat % (cols * g) - c * g
            np.testing.assert_allclose(t, [region[0] + 14 * j * W / nw, region[1] + 14 * i * H / nh,
                                           region[0] + 14 * (j + 1) * W / nw, region[1] + 14 * (i + 1) * H / nh],
                                       atol=1e-6)


# -- gradient maps ---------------------------------------------------------------------------------
class BoxTarget:
    """A score reading only the tokens (of every view) whose box centre lies in one image region."""

    def __init__(self, encoder, region, seed=0):
        self.encoder, self.region = encoder, region
        self.weight = torch.randn(encoder.module.config.hidden_size, generator=torch.Generator().manual_seed(seed))

    def tokens(self, images):
        with torch.no_grad():
            return self.encoder.forward_tokens(images)

    def selected(self, layout):
        b = layout.boxes()
        cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
        x0, y0, x1, y1 = self.region
        return (cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)

    def score(self, tokens, rows):
        sel = self.selected(tokens.layout)
        return (tokens.patches[:, sel] @ self.weight).sum(1)


def test_gradient_maps_light_up_the_box_their_target_reads(ov, photos):
    image = photos["coffee"]  # 400 x 600: base + 1x2 tiles, unpadded
    region = (330.0, 120.0, 420.0, 200.0)
    target = BoxTarget(ov, region)
    (g,) = sequence_gradients(target, [ov.transform(image)])
    sel = target.selected(g.layout)
    assert sel[g.layout.span("base")].any() and sel[g.layout.span("tiles")].any()
    norm = GradientNorm.from_sequence(g.act, g.grad, g.layout)
    assert (norm[~sel] == 0).all() and (norm[sel] > 0).all()
    torch.testing.assert_close(norm[sel], torch.full((int(sel.sum()),), float(target.weight.abs().sum())))
    gxa = GradientXActivation.from_sequence(g.act, g.grad, g.layout)
    assert (gxa[~sel] == 0).all()
    size = g.layout.image_size
    inside = torch.zeros(size, dtype=torch.bool)
    inside[120:200, 330:420] = True
    painted = g.paint(norm)
    assert painted.shape == size
    assert float(pointing_game(painted[None], inside[None])) == 1.0
    # all the painted mass sits within a token of the region (bilinear spreads half a token)
    near = torch.zeros(size, dtype=torch.bool)
    near[120 - 23:200 + 23, 330 - 23:420 + 23] = True  # a base-view token is 22 x 15 px here
    assert float(energy_in_mask(painted[None], near[None])) == pytest.approx(1.0)
    assert float(energy_in_mask(painted[None], inside[None])) > 0.6


def test_gradcam_is_per_view_and_equals_the_grid_gradcam_on_one_view():
    torch.manual_seed(0)
    act, grad = torch.randn(2, 8, 3, 4), torch.randn(2, 8, 3, 4)
    layout = TokenLayout((30, 40), (View.uniform("base", (3, 4), (0, 0, 40, 30)),))
    for i in range(2):
        seq = GradCAM.from_sequence(act[i].flatten(1).T, grad[i].flatten(1).T, layout)
        torch.testing.assert_close(seq, GradCAM.from_gradients(act, grad)[i].flatten())
    # two views: each view's channel weights are its own mean gradient
    two = TokenLayout((30, 40), (View.uniform("a", (3, 4), (0, 0, 40, 30)), View.uniform("b", (2, 2), (0, 0, 40, 30))))
    a, gr = torch.randn(16, 8), torch.randn(16, 8)
    out = GradCAM.from_sequence(a, gr, two)
    torch.testing.assert_close(out[:12], torch.relu(a[:12] @ gr[:12].mean(0)))
    torch.testing.assert_close(out[12:], torch.relu(a[12:] @ gr[12:].mean(0)))


def test_head_target_pools_the_whole_sequence(ov, photos, encoded):
    d = ov.module.config.hidden_size
    rng = np.random.default_rng(0)
    weight, bias = rng.normal(size=(3, d)).astype(np.float32), np.zeros(3, np.float32)
    std = rng.uniform(0.5, 2, d).astype(np.float32)
    head = HeadTarget(ov, weight, bias, std=std)
    images = [ov.transform(photos[n]) for n in ("chelsea", "coffee")]
    logits = head.logits(head.tokens(images))
    for i, n in enumerate(("chelsea", "coffee")):
        z = encoded[n].patches[0].mean(0)
        torch.testing.assert_close(logits[i], (z / torch.from_numpy(std)) @ torch.from_numpy(weight).T)
    grads = sequence_gradients(head, images, torch.tensor([2, 0]))
    for g, row in zip(grads, (2, 0)):
        n = g.layout.num_tokens
        expected = torch.from_numpy(weight[row] / std) / n
        torch.testing.assert_close(g.grad, expected.expand(n, -1))  # every token of every view alike


class _MaskData:
    """The reader side of a segmentation dataset, in memory: photos with masks (train ids)."""

    class _Sample:
        def __init__(self, i):
            self.path, self.mask, self.label = f"photo{i}.jpg", f"photo{i}.png", 0

    def __init__(self, images, masks, class_names):
        self.images, self.masks, self.class_names = images, masks, class_names
        self.samples = [self._Sample(i) for i in range(len(images))]
        self.root = "in-memory"

    def __len__(self):
        return len(self.images)

    def read_image(self, sample):
        return self.images[self.samples.index(sample)]

    def read_mask(self, sample):
        return self.masks[self.samples.index(sample)]

    def map_labels(self, raw):
        return raw


def _blob_masks(images, classes=3, radius=20):
    """Smooth masks from real photos: blurred brightness in ``classes`` quantile bands, a strip ignored."""
    out = []
    for im in images:
        grey = np.asarray(im.convert("L").filter(ImageFilter.GaussianBlur(radius)), np.float32)
        edges = np.quantile(grey, np.linspace(0, 1, classes + 1)[1:-1])
        mask = np.digitize(grey, edges).astype(np.uint8)
        mask[:4] = 255
        out.append(mask)
    return out


def test_gradcam_probe_maps_full_view_images(ov, photos, tmp_path):
    from encoder_probe.options import build_config
    from probes.gradcam import GradCAMConfig, _map_all_full, _write_full_artifacts
    images = [photos[n] for n in PHOTOS]
    data = _MaskData(images, _blob_masks(images), ["dark", "mid", "bright"])
    d = ov.module.config.hidden_size
    head = HeadTarget(ov, np.random.default_rng(1).normal(size=(3, d)), np.zeros(3), class_names=data.class_names)
    config = build_config("gradcam", GradCAMConfig, {"batch_size": 2, "overlay_rows": 2})
    result = _map_all_full(ov, data, list(range(3)), head, "head", config)
    offsets = result["offsets"]
    layouts = [TokenLayout.from_dict(json.loads(s)) for s in result["layouts"]]
    assert [lay.num_tokens for lay in layouts] == list(np.diff(offsets))
    for m in config.methods:
        assert result["maps"][m].shape == (offsets[-1],)
        assert result["painted"][m].shape == (2, 256, 256)
        assert np.isfinite(result["scores"][m]["pointing_game"]).all()
        raw = result["maps"][m][offsets[1]:offsets[2]]
        np.testing.assert_allclose(result["magnitude"][m][1], [np.abs(raw).sum(), np.abs(raw).max()], rtol=1e-5)
    arts = _write_full_artifacts(tmp_path, result, data, config)
    saved = np.load(tmp_path / "maps.npz")
    assert str(saved["view"]) == "full" and saved["images"].shape == (2, 256, 256, 3)
    np.testing.assert_array_equal(saved["map_offsets"], offsets)
    assert arts == {"maps": tmp_path / "maps.npz", "overlay": tmp_path / "overlay.png"}
    assert arts["overlay"].is_file()


# -- segmentation ------------------------------------------------------------------------------------
def _centre_class(layout, mask):
    """Per token, the mask's class at the pixel under its box centre (clamped onto the image)."""
    b = layout.boxes()
    H, W = mask.shape
    cx = ((b[:, 0] + b[:, 2]) / 2).floor().long().clamp(0, W - 1)
    cy = ((b[:, 1] + b[:, 3]) / 2).floor().long().clamp(0, H - 1)
    return torch.from_numpy(mask.astype(np.int64))[cy, cx]


def test_one_hot_logits_painted_through_the_boxes_reproduce_the_mask(encoded, photos):
    names = ("chelsea", "coffee", "astronaut")
    masks = _blob_masks([photos[n] for n in names])
    conf = torch.zeros(3, 3, dtype=torch.long)
    for n, mask in zip(names, masks):
        layout = encoded[n].layout
        cls = _centre_class(layout, mask).clamp(max=2)  # ignore (255) under a centre: any class
        logits = torch.nn.functional.one_hot(cls, 3).float()
        painted = paint_logits(logits, layout, mask.shape)
        assert painted.shape == (3, *mask.shape)
        conf += confusion_matrix(torch.from_numpy(mask), painted.argmax(0), 3)
    scores = pixel_scores(conf)
    assert scores["mIoU"] > 0.9 and scores["pixel_accuracy"] > 0.95


def test_patch_labels_are_the_classes_inside_each_box(encoded, photos):
    layout = encoded["chelsea"].layout
    mask = _blob_masks([photos["chelsea"]])[0]
    mask = np.array(Image.fromarray(mask).resize((113, 75), Image.NEAREST))  # a mask smaller than the image
    got = layout_union_targets(torch.from_numpy(mask), layout, 3)
    H, W = mask.shape
    sy, sx = layout.image_size[0] / H, layout.image_size[1] / W
    ys, xs = (np.arange(H) + 0.5) * sy, (np.arange(W) + 0.5) * sx
    for k, (x0, y0, x1, y1) in enumerate(layout.boxes().numpy()):
        inside = ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]
        present = set(np.unique(mask[inside]).tolist()) - {255}
        assert set(np.flatnonzero(got[k].numpy()).tolist()) == present, k


class _RaggedFeatures:
    """What a ragged FeatureSet answers (features.ragged, token_rows, layout, mask), in memory."""

    ragged = True

    def __init__(self, rows, layouts, masks, class_names):
        self._rows, self._layouts, self._masks = rows, layouts, masks
        self.token_offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
        self.layers = [-1]
        self.class_names = class_names
        self.index = np.arange(len(rows))
        self.num_classes, self.root, self.path = len(class_names), "in-memory", "in-memory"

    def __len__(self):
        return len(self._rows)

    def tokens(self, layer=None):
        return np.concatenate(self._rows)

    def token_rows(self, i, layer=None):
        return self._rows[i]

    def layout(self, i):
        return TokenLayout.from_dict(self._layouts[i].to_dict())

    def mask(self, i):
        return self._masks[i]


def _planted_features(encoded, photos, names, seed=0):
    """Real layouts and masks; tokens = the real tokens plus a strong one-hot of the class at the box centre."""
    rng = np.random.default_rng(seed)
    masks = _blob_masks([photos[n] for n in names])
    rows, layouts = [], []
    for n, mask in zip(names, masks):
        t = encoded[n]
        cls = _centre_class(t.layout, mask).clamp(max=2).numpy()
        x = t.patches[0].numpy().copy()
        x[:, :3] += 4 * np.eye(3, dtype=np.float32)[cls] + rng.normal(0, 0.1, (len(x), 3)).astype(np.float32)
        rows.append(x.astype(np.float16))
        layouts.append(t.layout)
    return _RaggedFeatures(rows, layouts, masks, ["dark", "mid", "bright"])


def test_seg_head_trains_and_scores_through_the_boxes(encoded, photos, monkeypatch, tmp_path, ov):
    from probes import seg
    train = _planted_features(encoded, photos, ("chelsea", "coffee", "astronaut"))
    val = _planted_features(encoded, photos, ("coffee", "chelsea"), seed=1)
    source = seg.token_source(train, train.layers, torch.device("cpu"))
    assert isinstance(source, seg.RaggedTokens) and source.dim == ov.module.config.hidden_size
    x, batch = source.batch(np.array([2, 0]))
    assert x.shape == (1, train.token_offsets[1] + train.token_offsets[3] - train.token_offsets[2], source.dim)
    assert [tuple(m.shape) for m in batch.masks] == [train.mask(0).shape, train.mask(2).shape]
    # the probe end to end on the stand-in feature sets (the cache's ragged extraction is not needed here)
    from encoder_probe.bootstrap import statistic_value
    from encoder_probe.items import Items
    from encoder_probe.runner import run_probe
    images = {n: photos[n] for n in ("coffee", "chelsea")}
    val_data = _MaskData(list(images.values()), val._masks, val.class_names)
    for sample in val_data.samples:
        sample.item = None  # a whole file per sample, as the dataset readers' samples say
    monkeypatch.setattr(seg, "segmentation_features", lambda *a, **k: (train, val, val_data))
    out = run_probe(seg.SegProbe(), ov, options={"lrs": [3e-2], "epochs": 8, "head_batch": 2, "show": 2},
                    out=tmp_path, bootstrap=0)
    assert out["config"]["view"] == "full" and out["config"]["grid"] is None
    assert out["data"]["mask_size"] == "original"
    assert out["metrics"]["mIoU"]["value"] > 0.8, out["metrics"]
    assert out["metrics"]["patch_macro_recall"]["value"] > 0.7
    assert (tmp_path / ov.fingerprint[:16] / "seg" / "predictions.png").is_file()
    # per-image outcomes through the boxes: every valid pixel at the original size, the metrics recomputed
    items = Items.load(tmp_path / ov.fingerprint[:16] / out["items"]["file"])
    assert items.ids.tolist() == ["photo0.jpg", "photo1.jpg"] and items.columns["patch_counts"].shape == (1, 2, 3, 3)
    c = items.columns
    pixels = [np.bincount(c["conf_item"], weights=c["conf_count"], minlength=2)[i] for i in range(2)]
    assert pixels == [int((val.mask(i) != 255).sum()) for i in range(2)]
    for i in range(2):  # an image's patch positives: its tokens' class sets from the pixels in their boxes
        truth = layout_union_targets(torch.from_numpy(val.mask(i)), val.layout(i), 3)
        np.testing.assert_array_equal(c["patch_counts"][0, i, 1], truth.sum(0).numpy())
    for metric in out["metrics"].values():
        assert statistic_value(metric["statistic"], items) == pytest.approx(metric["value"], abs=1e-9)
