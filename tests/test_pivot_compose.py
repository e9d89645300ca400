"""compose_mllm: a fresh LLaVA-style MLLM of a vision tower and a causal LM (`probe train pretrain` /
`transplant`): weights copied exactly, the image token added, a seeded projector, a dir load_mllm reads."""
import json

import numpy as np
import pytest
import torch
import transformers as T
from PIL import Image

from encoder_probe import toy
from encoder_probe.errors import CheckpointError, SpecError
from encoder_probe.mllm.model import MLLM, chatml_template, load_mllm
from encoder_probe.pivot.compose import compose_mllm
from conftest import assert_one_line

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
TEXT_ONLY = ("{% for m in messages %}<|im_start|>{{ m['role'] + '\\n' + m['content'] }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # Qwen2's: contents as strings


@pytest.fixture(scope="module")
def dirs(toy_dir):
    def clip(out):
        T.CLIPVisionModel(T.CLIPVisionConfig(**{k: v for k, v in toy.SIGLIP.items() if k != "model_type"})
                          ).save_pretrained(out)
        return out

    def text_lm(out):  # a text LM as published: no <image>, a template for string contents, rows = tokens
        tokenizer = toy.pivot_tokenizer()
        tokenizer.chat_template = TEXT_ONLY
        return toy.write_lm_dir(out, tokenizer=tokenizer, vocab_rows=None)

    return {"siglip": toy_dir("siglip", toy.write_siglip_dir), "clip": toy_dir("clip_vision", clip),
            "lm": toy_dir("lm", toy.write_lm_dir), "text_lm": toy_dir("text_lm", text_lm),
            "tied_lm": toy_dir("tied_lm", lambda out: toy.write_lm_dir(out, tie_word_embeddings=True))}


def photo(h=50, w=70, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def tower_outputs(tower, pixels):
    with torch.no_grad():
        return tower(pixel_values=pixels, output_hidden_states=True).hidden_states


def assert_same_tower(composed, source, size=32):
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    mine, theirs = tower_outputs(composed, pixels), tower_outputs(source, pixels)
    assert len(mine) == len(theirs)
    assert all(torch.equal(a, b) for a, b in zip(mine, theirs))


def text_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_onevision_copies_tower_and_lm_exactly(dirs):
    model, processor = compose_mllm(dirs["siglip"], dirs["lm"])
    assert isinstance(model, T.LlavaOnevisionForConditionalGeneration)
    assert model.dtype == torch.float32
    source = T.SiglipVisionModel.from_pretrained(dirs["siglip"])
    assert_same_tower(model.model.vision_tower, source)
    assert any(k.startswith("head.") for k in source.state_dict())  # the pooling head the MLLM never reads
    assert not any(k.startswith("model.vision_tower.head.") for k in model.state_dict())
    lm = T.Qwen2ForCausalLM.from_pretrained(dirs["lm"])
    ids = processor.tokenizer("What colour is the square?", return_tensors="pt")["input_ids"]
    assert torch.equal(text_logits(model, ids), text_logits(lm, ids))
    c = model.config  # OneVision's published settings, pinpoints in tiles of the tower's 32 px
    assert (c.vision_aspect_ratio, c.vision_feature_layer, c.vision_feature_select_strategy) == ("anyres_max_9", -2,
                                                                                                  "full")
    assert c.image_grid_pinpoints == [[32 * i, 32 * j] for i in range(1, 7) for j in range(1, 7)]
    assert c.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>")
    assert c.video_token_id == processor.tokenizer.convert_tokens_to_ids("<video>")
    assert processor.image_processor.image_grid_pinpoints == c.image_grid_pinpoints
    assert list(processor.image_processor.image_mean) == [0.5] * 3


def test_dual_tower_dir_gives_its_vision_half(tmp_path):
    vision = {k: v for k, v in toy.SIGLIP.items() if k != "model_type"}
    T.SiglipModel(T.SiglipConfig(vision_config=vision, text_config=dict(SMALL, vocab_size=64))).save_pretrained(
        tmp_path / "siglip")
    model, _ = compose_mllm(tmp_path / "siglip", toy.write_lm_dir(tmp_path / "lm"))
    assert_same_tower(model.model.vision_tower, T.SiglipModel.from_pretrained(tmp_path / "siglip").vision_model)


def test_published_onevision_geometry(tmp_path):
    tower = toy.write_siglip_dir(tmp_path / "so400m", **SMALL, image_size=384, patch_size=14)
    model, processor = compose_mllm(tower, toy.write_lm_dir(tmp_path / "lm"))
    assert model.config.image_grid_pinpoints == toy.ANYRES_MAX_9  # 384..2304, in transformers' order
    example = MLLM(model, processor, family="llava_onevision", path=tmp_path, template_from="-").example(
        photo(300, 451), "What is in the image?", "A cat.")
    assert example.layout.views[0].grid == (27, 27)  # so400m/14 at 384 floors to 27x27
    assert np.isfinite(MLLM(model, processor, family="llava_onevision", path=tmp_path, template_from="-")
                       .answer_logprob(example))  # the model reads as many image features as the processor wrote


def test_projector_is_seeded_and_leaves_the_callers_rng(dirs):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, _ = compose_mllm(dirs["siglip"], dirs["lm"], seed=3)
    assert torch.equal(torch.get_rng_state(), before)
    b, _ = compose_mllm(dirs["siglip"], dirs["lm"], seed=3)
    c, _ = compose_mllm(dirs["siglip"], dirs["lm"], seed=4)
    fresh = ("model.multi_modal_projector.", "model.image_newline")
    sa, sb, sc = ({k: v for k, v in m.state_dict().items() if k.startswith(fresh)} for m in (a, b, c))
    assert len(sa) == 5 and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not any(torch.equal(sa[k], sc[k]) for k in sa)
    torch.manual_seed(3)  # LLaVA-NeXT's init: a fresh nn.Linear
    assert torch.equal(sa["model.multi_modal_projector.linear_1.weight"], torch.nn.Linear(64, 64).weight.detach())


@pytest.mark.parametrize("kind", ["llava", "llava_onevision"])
def test_text_lm_gets_the_image_token_rows_and_chatml(dirs, kind):
    lm = T.Qwen2ForCausalLM.from_pretrained(dirs["text_lm"])
    rows = lm.config.vocab_size
    model, processor = compose_mllm(dirs["siglip"], dirs["text_lm"], kind=kind)
    tokenizer = processor.tokenizer
    added = ["<image>"] + (["<video>"] if kind == "llava_onevision" else [])
    assert len(tokenizer) == rows + len(added) == model.config.text_config.vocab_size
    assert tokenizer.convert_tokens_to_ids(added) == list(range(rows, rows + len(added)))
    for weight in (model.get_input_embeddings().weight, model.lm_head.weight):
        assert weight.shape[0] == len(tokenizer)
        assert torch.equal(weight[rows:], weight[:rows].mean(0).expand(len(added), -1))  # deterministic
    ids = tokenizer("Is the circle large or small?", return_tensors="pt")["input_ids"]
    assert torch.equal(text_logits(model, ids)[..., :rows], text_logits(lm, ids))
    assert processor.chat_template == chatml_template(kind)  # the LM's template cannot render an image


def test_tied_lm_and_an_lm_template_that_renders_images(dirs, tmp_path):
    model, processor = compose_mllm(dirs["siglip"], dirs["tied_lm"])
    assert model.lm_head.weight is model.get_input_embeddings().weight
    lm = T.Qwen2ForCausalLM.from_pretrained(dirs["tied_lm"])
    ids = torch.tensor([[3, 5, 7, 11]])
    assert torch.equal(text_logits(model, ids), text_logits(lm, ids))
    tokenizer = toy.chat_tokenizer()
    tokenizer.chat_template = "SYSTEM " + chatml_template("llava_onevision")
    _, processor = compose_mllm(dirs["siglip"], toy.write_lm_dir(tmp_path / "lm", tokenizer=tokenizer))
    assert processor.chat_template == tokenizer.chat_template


@pytest.mark.parametrize("kind, tower, layer, strategy", [("llava_onevision", "siglip", -2, "full"),
                                                          ("llava", "clip", -2, "default"),
                                                          ("llava", "siglip", -2, "full")])
def test_saved_dir_round_trips_through_load_mllm(dirs, tmp_path, kind, tower, layer, strategy):
    model, processor = compose_mllm(dirs[tower], dirs["lm"], kind=kind)
    assert (model.config.model_type, model.config.vision_feature_layer,
            model.config.vision_feature_select_strategy) == (kind, layer, strategy)
    model.save_pretrained(tmp_path / "out")
    processor.save_pretrained(tmp_path / "out")
    mllm = load_mllm(tmp_path / "out")
    assert mllm.template_from == "checkpoint"
    example = mllm.example(photo(), "What colour is the square?", "Red.")  # checks the image-token count
    mine = MLLM(model, processor, family=kind, path=tmp_path, template_from="-").example(
        photo(), "What colour is the square?", "Red.")
    assert all(torch.equal(example.inputs[k], mine.inputs[k]) for k in mine.inputs)  # same processor
    assert example.layout.lm_tokens == (120 if kind == "llava_onevision" else 16)
    with torch.no_grad():
        assert torch.equal(mllm.model(**example.inputs).logits, model(**example.inputs).logits)
    image = mllm.processor.image_processor
    if tower == "clip":  # CLIP's own normalisation, shortest edge + centre crop
        assert tuple(image.image_mean) == pytest.approx((0.4815, 0.4578, 0.4082), abs=1e-4)
        assert (dict(image.size), image.do_center_crop) == ({"shortest_edge": 32}, True)
    elif kind == "llava":  # SigLIP's: squashed to its size, mean = std = 0.5
        assert (dict(image.size), image.do_center_crop, tuple(image.image_std)) == (
            {"height": 32, "width": 32}, False, (0.5, 0.5, 0.5))


def test_transplant_takes_the_mllms_tower(dirs, tmp_path):
    first, processor = compose_mllm(dirs["siglip"], dirs["lm"], seed=1)
    with torch.no_grad():  # a "refined" tower: not the SigLIP dir's any more
        first.model.vision_tower.encoder.layers[0].mlp.fc1.weight.mul_(1.5)
    first.save_pretrained(tmp_path / "mllm")
    processor.save_pretrained(tmp_path / "mllm")
    second, _ = compose_mllm(tmp_path / "mllm", dirs["text_lm"], seed=2)
    assert_same_tower(second.model.vision_tower, first.model.vision_tower)
    assert not torch.equal(second.model.multi_modal_projector.linear_1.weight,
                           first.model.multi_modal_projector.linear_1.weight)


def test_transplant_from_a_pivot_training_dir(tmp_path):
    from encoder_probe.mllm.convert import convert_pivot
    pivot = toy.write_pivot_mllm(tmp_path / "pivot", vision=dict(image_size=32, patch_size=8))
    model, _ = compose_mllm(pivot, toy.write_lm_dir(tmp_path / "lm"))
    converted, _ = convert_pivot(pivot)  # the tower as the PIVOT MLLM runs it: last block removed
    assert model.config.vision_config.num_hidden_layers == 2
    assert_same_tower(model.model.vision_tower, converted.model.vision_tower)


def test_bad_inputs_are_one_line_errors(dirs, tmp_path):
    (tmp_path / "empty").mkdir()
    no_tokenizer = tmp_path / "no_tokenizer"
    T.Qwen2ForCausalLM.from_pretrained(dirs["lm"]).save_pretrained(no_tokenizer)
    qwen_vl = toy.write_hf_mllm(tmp_path / "qwen2_vl", "qwen2_vl")
    cases = [
        (CheckpointError, dict(vision=tmp_path / "nowhere"), (tmp_path / "nowhere", "no such directory")),
        (CheckpointError, dict(lm=tmp_path / "nowhere"), (tmp_path / "nowhere", "no such directory")),
        (CheckpointError, dict(vision=tmp_path / "empty"), (tmp_path / "empty", "no config.json")),
        (CheckpointError, dict(lm=tmp_path / "empty"), (tmp_path / "empty", "no config.json")),
        (CheckpointError, dict(vision=dirs["lm"]), (dirs["lm"], "'qwen2' is not a vision tower")),
        (CheckpointError, dict(vision=qwen_vl), (qwen_vl, "'qwen2_vl' is not a vision tower")),
        (CheckpointError, dict(lm=dirs["siglip"]), (dirs["siglip"], "not a causal LM")),
        (CheckpointError, dict(lm=no_tokenizer), (no_tokenizer, "no tokenizer files")),
        (SpecError, dict(kind="qwen2_vl"), ("'qwen2_vl'", "llava_onevision, llava")),
        (SpecError, dict(kind="internvl"), ("'internvl'",)),
        (SpecError, dict(kind="bogus"), ("'bogus'",)),
        (SpecError, dict(vision_feature_layer=7), (dirs["siglip"], "vision_feature_layer 7", "3-block")),
        (SpecError, dict(vision=dirs["clip"]), (dirs["clip"], "clip_vision_model", "kind llava")),
    ]
    for error, kwargs, needles in cases:
        kwargs = {"vision": dirs["siglip"], "lm": dirs["lm"], **kwargs}
        with pytest.raises(error) as excinfo:
            compose_mllm(**kwargs)
        assert_one_line(excinfo, *needles)
    assert json.loads((dirs["lm"] / "config.json").read_text())["model_type"] == "qwen2"  # nothing written


def test_dtype_applies_to_the_whole_model(dirs):
    model, _ = compose_mllm(dirs["siglip"], dirs["lm"], dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    source = T.SiglipVisionModel.from_pretrained(dirs["siglip"]).state_dict()
    tower = model.model.vision_tower.state_dict()
    assert all(torch.equal(tower[k], source[k].to(torch.bfloat16)) for k in tower)


def test_a_tower_from_an_mllm_keeps_the_layer_that_mllm_read(tmp_path):
    """Published OneVision reads -1 of its already shortened tower; a transplant must read the same layer."""
    from encoder_probe import toy
    source = toy.write_hf_mllm(tmp_path / "ov", "llava_onevision", geometry="published", processor=True)
    lm = toy.write_lm_dir(tmp_path / "lm")
    model, _ = compose_mllm(source, lm)
    assert model.config.vision_feature_layer == load_mllm(source).config.vision_feature_layer
