"""The whole MLLM as a probe target (encoder_probe.mllm): answer log-likelihoods, SFT / DPO and their
gradients at the visual tokens the LM reads, against the naive path a user would write.

Every family is a tiny ``save_pretrained`` checkpoint at its PUBLISHED vision geometry (patch, tile,
merge, pinpoints; real BPE tokenizer and chat template), written once per module, on real photos
(chelsea 451x300, astronaut 512x512). "Naive" = the model class loaded on its own with every
parameter trainable, its own loss (``labels`` = -100 but the answer, a token mean), a forward hook
on the projector (Qwen: the merger) with ``retain_grad``, ``backward()``; its gradient is put in LM
order with the model's own functions (Qwen2.5-VL's window index; LLaVA-NeXT / OneVision: base + the
unpadded stitched tiles, ``AnyresViews.split`` over transformers' ``unpad_image``). Token boxes are
checked against the pixels each token reads: paint a square on the photo, see which of the processor's
pixels change, map them to tokens with the model's own code (``pack_image_features``, ``pixel_shuffle``).
"""
import json
import math

import pytest
import torch
import transformers

from encoder_probe import toy
from encoder_probe.assets import photo
from encoder_probe.cli import main
from encoder_probe.encoders.multiview import AnyresViews
from encoder_probe.errors import CheckpointError
from encoder_probe.mllm import FAMILIES, base_view, keep_view, load_mllm, loss_gradient, reference_logprobs

KINDS = ["llava", "llava_onevision", "llava_next", "qwen2_vl", "qwen2_5_vl", "internvl"]
PHOTOS = ["chelsea", "astronaut"]
QUESTION, ANSWER, REJECTED = "What is in the image?", "a cat on a mat", "a large blue square"
LOGP_TOL, GRAD_TOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def photos():
    return {name: photo(name) for name in PHOTOS}


class Checkpoint:
    """One written dir, its MLLM (our path) and, on demand, the naive model and naive results."""

    def __init__(self, kind, path):
        self.kind, self.path = kind, path
        self.mllm = load_mllm(path)
        self._naive = None
        self.results = {}
        self._examples = {}

    def example(self, image, answer=ANSWER):
        """mllm.example, once per (photo, answer): tests read it, none changes it."""
        key = (id(image), answer)
        if key not in self._examples:
            self._examples[key] = self.mllm.example(image, QUESTION, answer)
        return self._examples[key]

    def gradient(self, image, answer=ANSWER):
        """mllm.logprob_gradient of that example, once."""
        key = ("gradient", id(image), answer)
        if key not in self._examples:
            self._examples[key] = self.mllm.logprob_gradient(self.example(image, answer))
        return self._examples[key]

    @property
    def naive_model(self):
        if self._naive is None:  # the class on its own, as a user loads it: every parameter trainable
            cls = getattr(transformers, FAMILIES[self.kind])
            self._naive = cls.from_pretrained(self.path, local_files_only=True).eval().requires_grad_(True)
        return self._naive


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("mllm")
    made = {}

    def get(kind, **options):
        key = (kind, json.dumps(options, sort_keys=True))
        if key not in made:
            path = root / f"{kind}-{len(made)}"
            made[key] = Checkpoint(kind, toy.write_hf_mllm(path, kind, geometry="published", processor=True,
                                                           **options))
        return made[key]

    return get


# -- the naive path -------------------------------------------------------------------------------
def naive_forward(ckpt, example, where="projector"):
    """(summed answer log-prob from the model's own loss, the hooked tensor with retained grad, loss).

    ``where``: "projector" (its output; Qwen: the merger's) or "inputs_embeds" (the LM's input)."""
    model = ckpt.naive_model
    captured = {}
    if where == "projector":
        module = model.model.visual.merger if ckpt.kind.startswith("qwen") else model.model.multi_modal_projector

        def hook(mod, args, output):
            output.retain_grad()
            captured["x"] = output

        handle = module.register_forward_hook(hook)
    else:
        def hook(mod, args, kwargs):
            kwargs["inputs_embeds"].retain_grad()
            captured["x"] = kwargs["inputs_embeds"]

        handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    labels = example.inputs["input_ids"].clone()
    labels[:, :example.answer_start] = -100
    try:
        out = model(**example.inputs, labels=labels, use_cache=False)
    finally:
        handle.remove()
    return -out.loss * example.answer_tokens, captured["x"], out.loss


def to_lm_order(ckpt, grad, example):
    """The hooked projector output's gradient -> (N, D) visual tokens in LM order (newlines left out)."""
    kind, config = ckpt.kind, ckpt.naive_model.config
    if kind in ("llava", "internvl", "qwen2_vl"):  # flat: (1 or tiles, tokens, D) / (tokens, D) in LM order
        return grad.reshape(-1, grad.shape[-1])
    if kind == "qwen2_5_vl":  # the merger runs in window order; the vision model undoes it with argsort
        from transformers.vision_utils import get_vision_window_index
        v = config.vision_config
        window_index, _ = get_vision_window_index(example.inputs["image_grid_thw"], v.spatial_merge_size,
                                                  v.window_size, v.patch_size)
        return grad[torch.argsort(window_index)]
    image_size = tuple(int(s) for s in example.inputs["image_sizes"][0])
    return AnyresViews(config, max_tiles=9 if kind == "llava_onevision" else None).split(grad, image_size)


def naive_logprob(ckpt, image_name, image, answer=ANSWER):
    """Cached per (photo, answer): (logp, the model's own loss, the gradient of logp at the projector in LM
    order, the raw hooked gradient, the projector's output in LM order)."""
    key = (image_name, answer)
    if key not in ckpt.results:
        example = ckpt.example(image, answer)
        logp, out, loss = naive_forward(ckpt, example)
        logp.backward()
        ckpt.naive_model.zero_grad(set_to_none=True)
        ckpt.results[key] = (float(logp.detach()), float(loss.detach()), to_lm_order(ckpt, out.grad, example),
                             out.grad.clone(), to_lm_order(ckpt, out.detach(), example))
    return ckpt.results[key]


def close(ours, ref, tol=GRAD_TOL):
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref.to(ours.dtype), rtol=tol, atol=tol)


# -- log-likelihood and its gradient ---------------------------------------------------------------
@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("kind", KINDS)
def test_answer_logprob_is_the_models_own_loss(checkpoint, photos, kind, name):
    ckpt = checkpoint(kind)
    example = ckpt.example(photos[name])
    logp, loss, *_ = naive_logprob(ckpt, name, photos[name])
    assert example.answer_tokens > 3 and logp == pytest.approx(-loss * example.answer_tokens, rel=1e-6)
    assert ckpt.mllm.answer_logprob(example) == pytest.approx(logp, abs=LOGP_TOL)
    assert ckpt.gradient(photos[name]).value == pytest.approx(logp, abs=LOGP_TOL)


@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("kind", KINDS)
def test_gradient_is_autograd_at_the_projector(checkpoint, photos, kind, name):
    ckpt = checkpoint(kind)
    example = ckpt.example(photos[name])
    g = ckpt.gradient(photos[name])
    _, _, ref, raw, act = naive_logprob(ckpt, name, photos[name])
    assert g.grad.shape == (example.layout.num_tokens, ckpt.mllm.config.text_config.hidden_size)
    assert ref.abs().max() > 1e-4  # a real signal, not zeros against zeros
    close(g.grad, ref)
    close(g.act, act, 1e-5)  # and act is the projector's output, token for token
    if kind == "qwen2_5_vl":  # the window order matters: without the model's un-permutation it would not match
        assert not torch.allclose(g.grad, raw.to(g.grad.dtype), atol=1e-4)
    if kind in ("llava_onevision", "llava_next"):  # newline vectors are apart, one per row of the tiles view
        assert g.newline_grad.shape == (example.layout.views[1].grid[0], g.grad.shape[1])


def test_onevision_anyres_max_shrink_gradient_at_the_lm_input(checkpoint, photos):
    """A 4x4 pinpoint on the 512 px astronaut: the 108x108 tile grid exceeds 9 tiles' tokens x 1.21, so the
    model shrinks it (bilinear, after the projector) to 81x81: the map is the gradient at the shrunk tokens."""
    ckpt = checkpoint("llava_onevision", pinpoints=[[1536, 1536]])
    example = ckpt.mllm.example(photos["astronaut"], QUESTION, ANSWER)
    base, tiles = example.layout.views
    ratio = math.sqrt(108 * 108 / (9 * 27 * 27))  # the model's pack_image_features formula, before the shrink
    assert ratio > 1.1 and tiles.grid == (int(108 // ratio), int(108 // ratio)) == (81, 81)
    positions = (example.inputs["input_ids"][0] == ckpt.mllm.image_token_id).nonzero()[:, 0]
    assert len(positions) == 729 + 81 * 82 == example.layout.lm_tokens
    g = ckpt.mllm.logprob_gradient(example)
    logp, x, _ = naive_forward(ckpt, example, where="inputs_embeds")
    logp.backward()
    ckpt.naive_model.zero_grad(set_to_none=True)
    assert g.value == pytest.approx(float(logp.detach()), abs=LOGP_TOL)
    at_image = x.grad[0, positions]
    newline = torch.zeros(len(positions), dtype=torch.bool)
    newline[729 + torch.arange(81) * 82 + 81] = True  # the image_newline after each shrunk row
    assert at_image.abs().max() > 1e-4
    close(g.grad, at_image[~newline])
    close(g.newline_grad, at_image[newline])
    close(g.act, x.detach()[0, positions][~newline], 1e-5)  # act: the shrunk tokens the LM reads


# -- the tokens and their boxes ---------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_example_is_the_checkpoints_own_tokenisation(checkpoint, photos, kind):
    """prompt + answer == the processor run on the whole rendered conversation; the answer tokens are the
    answer and the end of turn; one image token per position the layout counts (newlines included)."""
    ckpt = checkpoint(kind)
    mllm = ckpt.mllm
    for name, image in photos.items():
        example = ckpt.example(image)
        whole = mllm.processor(text=[mllm.conversation(QUESTION, ANSWER)], images=[image], return_tensors="pt")
        assert torch.equal(example.inputs["input_ids"], whole["input_ids"])
        assert torch.equal(example.inputs["pixel_values"], whole["pixel_values"])
        answer = mllm.tokenizer.decode(example.inputs["input_ids"][0, example.answer_start:])
        assert answer.startswith(ANSWER) and answer.strip().endswith("<|im_end|>")
        ids = example.inputs["input_ids"][0]
        assert int((ids == mllm.image_token_id).sum()) == example.layout.lm_tokens == len(example.image_positions)
        assert bool((ids[example.image_positions] == mllm.image_token_id).all())


def _painted(image, box):
    """The photo with ``box`` (x0, y0, x1, y1) shifted by half the colour range (every channel changes by 128)."""
    import numpy as np
    from PIL import Image
    pixels = np.array(image)
    x0, y0, x1, y1 = box
    pixels[y0:y1, x0:x1] = (pixels[y0:y1, x0:x1].astype(int) + 128) % 256
    return Image.fromarray(pixels)


def _read_tokens(ckpt, example, changed):
    """(N,) bool in LM order (newlines left out): the visual tokens whose input pixels include a changed one.
    ``changed``: the processor's pixel_values where they differ, mapped to tokens with the model's own code."""
    kind, model = ckpt.kind, ckpt.naive_model
    config = model.config
    if kind.startswith("qwen"):  # pixel_values rows are 14x14 patches, merge_size^2 consecutive rows a token
        merge = config.vision_config.spatial_merge_size
        return changed.reshape(-1, merge * merge, changed.shape[-1]).any(-1).any(-1)
    vision = config.vision_config
    side = vision.image_size[0] if isinstance(vision.image_size, (list, tuple)) else vision.image_size
    patch = vision.patch_size[0] if isinstance(vision.patch_size, (list, tuple)) else vision.patch_size
    g = side // patch
    pixels = changed.reshape(-1, *changed.shape[-3:]).any(1)[:, :g * patch, :g * patch]  # the conv floors
    per_patch = pixels.reshape(-1, g, patch, g, patch).any(4).any(2)  # (views, g, g)
    if kind == "llava":
        return per_patch.reshape(-1)
    if kind == "internvl":  # the model's own pixel shuffle of the patch grid
        shuffled = model.model.pixel_shuffle(per_patch[..., None].float(), scale_factor=config.downsample_ratio)
        return (shuffled > 0).any(-1).reshape(-1)
    features = [per_patch.reshape(per_patch.shape[0], g * g, 1).float()]  # the model's own unpad + packing
    sizes = example.inputs["image_sizes"]
    if kind == "llava_onevision":
        packed, _ = model.model.pack_image_features(features, sizes, image_newline=None,
                                                    vision_aspect_ratio=config.vision_aspect_ratio)
    else:
        packed, _ = model.model.pack_image_features(features, sizes, "default", image_newline=None)
    return packed[0][:, 0] > 0


SQUARES = [(0.37, 0.52), (0.71, 0.28)]  # where on the photo (fractions of W, H) an 8x8 px square is painted


@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("kind", KINDS)
def test_token_boxes_hold_the_pixels_each_token_reads(checkpoint, photos, kind, name):
    """Paint 8x8 px squares on the photo: the tokens whose input pixels change (the processor's output,
    mapped to LM order with the model's own code) are the tokens whose boxes hold the squares."""
    check_boxes(checkpoint(kind), photos[name])


def check_boxes(ckpt, image):
    example = ckpt.example(image)
    boxes = example.layout.boxes()
    assert boxes.shape == (example.layout.num_tokens, 4)
    size = boxes[:, 2:] - boxes[:, :2]
    squares = [(int(fx * image.width), int(fy * image.height)) for fx, fy in SQUARES]
    squares = torch.tensor([[x, y, x + 8, y + 8] for x, y in squares], dtype=torch.float64)
    painted = image
    for box in squares.int().tolist():
        painted = _painted(painted, box)
    painted = ckpt.mllm.example(painted, QUESTION, ANSWER)
    changed = (painted.inputs["pixel_values"] - example.inputs["pixel_values"]).abs() > 1e-6
    hit = _read_tokens(ckpt, example, changed)
    assert hit.shape == (example.layout.num_tokens,) and hit.any()
    # every token that reads a changed pixel has its box on a square (half a token of slack: the resize
    # kernel spreads a square by a few pixels, far less than a token)
    near = torch.zeros_like(hit)
    for square in squares:
        near |= ((boxes[:, :2] - size / 2 < square[2:]) & (boxes[:, 2:] + size / 2 > square[:2])).all(1)
    assert bool(near[hit].all()), f"tokens {hit.nonzero()[:, 0][~near[hit]].tolist()} read a square"
    for square in squares:  # and every token whose box holds a square's centre reads it
        centre = square[:2] + 4
        holds = ((boxes[:, :2] <= centre) & (boxes[:, 2:] >= centre)).all(1)
        assert holds.any() and bool(hit[holds].all())


def test_llava_expand2square_boxes(tmp_path, photos):
    """LLaVA with LlavaImageProcessor(do_pad=True) (expand2square, then resize: llava-hf's newer processors):
    the box reaches past the photo where the model padded it, and still holds the pixels each token reads."""
    from encoder_probe.mllm.model import build_processor
    model = toy.published_mllm("llava")
    model.save_pretrained(tmp_path)
    pad = transformers.LlavaImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                           do_pad=True)
    build_processor("llava", pad, toy.chat_tokenizer("llava"), model.config).save_pretrained(tmp_path)
    ckpt = Checkpoint("llava", tmp_path)
    assert ckpt.mllm.processor.image_processor.do_pad
    image = photos["chelsea"]  # 451x300 padded to 451x451: 75 px above and 76 below
    assert ckpt.example(image).layout.views[0].box == pytest.approx((0.0, -75.0, 451.0, 376.0))
    for image in photos.values():
        check_boxes(ckpt, image)


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_token_boxes_are_28px_cells_of_the_resized_photo(checkpoint, photos, kind):
    ckpt = checkpoint(kind)
    for image in photos.values():
        example = ckpt.example(image)
        _, h, w = (int(v) for v in example.inputs["image_grid_thw"][0])  # 14 px patches of the resized photo
        bw, bh = 28 * image.width / (w * 14), 28 * image.height / (h * 14)  # 2x2 patches = 28x28 px a token
        r, c = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
        r, c = r.reshape(-1).double(), c.reshape(-1).double()
        expected = torch.stack([c * bw, r * bh, (c + 1) * bw, (r + 1) * bh], 1)
        assert example.layout.views[0].grid == (h // 2, w // 2)
        torch.testing.assert_close(example.layout.boxes(), expected, rtol=0, atol=1e-9)


def test_onevision_base_covers_the_photo_and_tiles_tile_it(checkpoint, photos):
    ckpt = checkpoint("llava_onevision")
    mllm = ckpt.mllm
    for image in photos.values():
        W, H = image.width, image.height
        layout = ckpt.example(image).layout
        base, tiles = layout.views
        assert base.grid == (27, 27) and [v.name for v in layout.views] == ["base", "tiles"]
        assert base.box == pytest.approx((0.0, 0.0, W * 378 / 384, H * 378 / 384))  # 27 x 14 = 378 of 384 px
        views = AnyresViews(mllm.config, max_tiles=9)
        rows, cols = views.tile_grid((H, W))
        for spans, extent, n in ((tiles.rows, H, rows), (tiles.cols, W, cols)):
            lo, hi = torch.tensor([s[0] for s in spans]), torch.tensor([s[1] for s in spans])
            step = (hi - lo).median()
            assert bool((hi > lo).all()) and bool((lo[1:] >= hi[:-1] - 1e-9).all())  # in order, no overlap
            gaps = lo[1:] - hi[:-1]
            seam = 6 / 14 * step  # a tile's last 384 - 378 px: read by no token
            assert int((gaps > 1e-6).sum()) <= n - 1 and bool((gaps < seam + 1e-6).all())
            # edge to edge of the photo, to within a token: the model unpads in whole tokens (chelsea keeps
            # 40 of 54 columns, int(451 * 27 / 300); the column the photo's left edge cuts is dropped)
            assert -step < lo[0] < step and extent - step - seam < hi[-1] < extent + step
        covered = layout.paint(torch.ones(layout.num_tokens), views=["tiles"], mode="nearest")
        assert covered.shape == (H, W) and float(covered.mean()) > 0.95  # all but seams and edge slivers


@pytest.mark.parametrize("kind,name,view", [("llava_onevision", "chelsea", "tiles"), ("qwen2_5_vl", "chelsea", 0),
                                            ("internvl", "chelsea", "tile 5"), ("llava", "astronaut", 0)])
def test_painting_a_one_hot_gradient_lands_in_the_tokens_box(checkpoint, photos, kind, name, view):
    layout = checkpoint(kind).example(photos[name]).layout
    span = layout.span(view)
    rows, cols = layout.views[layout.index(view)].grid
    k = span.start + (rows // 2) * cols + cols // 3
    one_hot = torch.zeros(layout.num_tokens)
    one_hot[k] = 1.0
    x0, y0, x1, y1 = layout.boxes()[k].tolist()
    ys, xs = layout.pixel_centres()
    inside = ((ys >= y0) & (ys <= y1))[:, None] & ((xs >= x0) & (xs <= x1))[None, :]
    nearest = layout.paint(one_hot, views=[view], mode="nearest")
    assert nearest.shape == layout.image_size and bool(nearest[inside].gt(0).all())
    assert float(nearest[~inside].abs().max()) == 0.0  # nothing outside the box
    smooth = layout.paint(one_hot)  # bilinear, every view (overlapping views averaged)
    peak = int(smooth.argmax())
    assert bool(inside.reshape(-1)[peak])


def test_base_view_keeps_the_base_tokens(checkpoint, photos):
    g = checkpoint("llava_onevision").gradient(photos["chelsea"])
    base = keep_view(g, base_view(g.layout))
    assert base.grad.shape == (729, g.grad.shape[1]) and torch.equal(base.grad, g.grad[:729])
    assert base.layout.views[0].name == "base" and base.layout.lm_tokens == 729


# -- SFT and DPO -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_sft_is_the_models_token_mean_loss(checkpoint, photos, kind):
    ckpt = checkpoint(kind)
    image = photos["chelsea"]
    record = {"question": QUESTION, "chosen": ANSWER, "rejected": REJECTED}
    sft = loss_gradient(ckpt.mllm, image, record, "sft")
    example = ckpt.example(image)
    logp, loss, ref, *_ = naive_logprob(ckpt, "chelsea", image)
    n = example.answer_tokens
    assert sft.value == pytest.approx(loss, abs=LOGP_TOL) and sft.value == pytest.approx(-logp / n, abs=LOGP_TOL)
    close(sft.grad, -ref / n)


@pytest.mark.parametrize("kind", ["llava_onevision", "qwen2_vl"])
def test_dpo_without_reference_is_log2_and_half_the_difference(checkpoint, photos, kind):
    ckpt = checkpoint(kind)
    image, beta = photos["chelsea"], 0.1
    record = {"question": QUESTION, "chosen": ANSWER, "rejected": REJECTED}
    dpo = loss_gradient(ckpt.mllm, image, record, "dpo", beta=beta)
    g_c, g_r = ckpt.gradient(image), ckpt.gradient(image, REJECTED)
    assert (g_c.grad - g_r.grad).abs().max() > 1e-4
    assert dpo.value == pytest.approx(math.log(2), abs=1e-12)
    close(dpo.grad, -beta / 2 * (g_c.grad - g_r.grad))
    if g_c.newline_grad is not None:
        close(dpo.newline_grad, -beta / 2 * (g_c.newline_grad - g_r.newline_grad))


@pytest.mark.parametrize("kind", ["llava_onevision", "qwen2_5_vl"])
def test_dpo_with_a_reference_matches_autograd_of_the_naive_path(checkpoint, photos, kind):
    ckpt = checkpoint(kind)
    reference = checkpoint(kind, seed=1).mllm  # another model: the margin is not zero
    image, beta = photos["chelsea"], 1.0
    record = {"question": QUESTION, "chosen": ANSWER, "rejected": REJECTED}
    ((ref_c, ref_r),) = reference_logprobs(reference, [(image, record)])
    dpo = loss_gradient(ckpt.mllm, image, record, "dpo", beta=beta, reference=(ref_c, ref_r))
    chosen, rejected = ckpt.example(image), ckpt.example(image, REJECTED)
    pc, out_c, _ = naive_forward(ckpt, chosen)
    pr, out_r, _ = naive_forward(ckpt, rejected)
    loss = -torch.nn.functional.logsigmoid(beta * ((pc - ref_c) - (pr - ref_r)))
    loss.backward()
    ckpt.naive_model.zero_grad(set_to_none=True)
    # the same image feeds both sequences: its gradient is the sum over the two
    ref = to_lm_order(ckpt, out_c.grad, chosen) + to_lm_order(ckpt, out_r.grad, rejected)
    assert abs(float(loss.detach()) - math.log(2)) > 1e-3  # the reference moved the margin off zero
    assert dpo.value == pytest.approx(float(loss.detach()), abs=LOGP_TOL)
    assert ref.abs().max() > 1e-5
    close(dpo.grad, ref)


# -- bad inputs --------------------------------------------------------------------------------------
def test_dir_without_tokenizer_is_a_checkpoint_error_naming_it(tmp_path):
    toy.published_mllm("llava").save_pretrained(tmp_path / "weights-only")
    with pytest.raises(CheckpointError, match="no tokenizer") as error:
        load_mllm(tmp_path / "weights-only")
    assert str(error.value).startswith(str(tmp_path / "weights-only"))


def test_non_mllm_config_is_a_checkpoint_error(tmp_path):
    toy.write_siglip_dir(tmp_path / "siglip")
    with pytest.raises(CheckpointError, match="not an MLLM") as error:
        load_mllm(tmp_path / "siglip")
    assert str(tmp_path / "siglip" / "config.json") in str(error.value)
    with pytest.raises(CheckpointError, match="no config.json"):
        load_mllm(tmp_path / "nothing-here")


def test_empty_answer_is_a_value_error(checkpoint, photos):
    mllm = checkpoint("llava").mllm
    for answer in ("", None):
        with pytest.raises(ValueError, match="non-empty answer"):
            mllm.example(photos["chelsea"], QUESTION, answer)
    with pytest.raises(ValueError, match="non-empty answer"):
        loss_gradient(mllm, photos["chelsea"], {"question": QUESTION, "chosen": "", "rejected": "x"}, "sft")


# -- probe inspect --mllm ------------------------------------------------------------------------------
def test_inspect_mllm_prints_family_template_and_positions_per_view(checkpoint, capsys):
    path = checkpoint("llava_onevision").path
    assert main(["inspect", str(path), "--mllm"]) == 0
    out = capsys.readouterr().out
    lines = {line[:18].strip(): line[18:].strip() for line in out.splitlines() if not line.startswith(" ")}
    assert lines["family"] == "llava_onevision"
    assert lines["model class"] == "LlavaOnevisionForConditionalGeneration"
    assert lines["language model"].startswith("Qwen2Model") and "1 layers x 64" in lines["language model"]
    assert lines["chat template"] == "the checkpoint's own" and lines["image token"].startswith("<image> (id ")
    # astronaut 512x512: base 27x27 + tiles 54x54 with 54 newlines; chelsea 451x300: tiles unpadded to 27x40
    assert "photo 'astronaut' (512x512): 3699 LM positions" in out and "photo 'chelsea' (451x300): 1836" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("  tiles") or line.startswith("  base ")]
    assert rows == [["base", "27x27", "729", "0", "729"], ["tiles", "54x54", "2916", "54", "2970"],
                    ["base", "27x27", "729", "0", "729"], ["tiles", "27x40", "1080", "27", "1107"]]
    assert main(["inspect", str(path), "--mllm", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [e["photo"] for e in info["examples"]] == ["astronaut", "chelsea"]
    assert [e["lm_tokens"] for e in info["examples"]] == [3699, 1836]
    assert all(e["base_view"] == "base" for e in info["examples"])


def test_inspect_mllm_without_a_template_says_the_fallback(tmp_path, capsys):
    path = tmp_path / "no-template"
    model = toy.published_mllm("qwen2_vl")
    model.save_pretrained(path)
    tokenizer = toy.chat_tokenizer("qwen2_vl")
    tokenizer.chat_template = None
    tokenizer.save_pretrained(path)  # a tokenizer but no processor files and no chat template
    assert main(["inspect", str(path), "--mllm"]) == 0
    out = capsys.readouterr().out
    assert "chat template     none in the checkpoint: Qwen2 ChatML" in out
    assert "photo 'chelsea' (451x300): 176 LM positions" in out


@pytest.mark.parametrize("case", ["no tokenizer", "not an MLLM", "missing", "--layer"])
def test_inspect_mllm_bad_dir_is_one_line_exit_2(tmp_path, capsys, case):
    path = tmp_path / "dir"
    extra = []
    if case == "no tokenizer":
        toy.published_mllm("llava").save_pretrained(path)
    elif case == "not an MLLM":
        toy.write_siglip_dir(path)
    elif case == "--layer":
        toy.published_mllm("llava").save_pretrained(path)
        extra = ["--layer", "2"]
    needle = {"no tokenizer": f"{path}: no tokenizer", "not an MLLM": "is not an MLLM", "missing": f"{path}: no such",
              "--layer": "--mllm: --layer does not apply"}[case]
    assert main(["inspect", str(path), "--mllm", *extra]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("probe: error: ") and needle in lines[0], captured.err
    assert captured.out == ""
