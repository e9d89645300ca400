"""`--export llava`: a transformers LLaVA / LLaVA-OneVision dir in the LLaVA-NeXT / PIVOT layout,
checked against the transformers model (the reference) through convert_pivot, the export's inverse."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from encoder_probe import toy
from encoder_probe.errors import CheckpointError, EncoderProbeError, SpecError
from encoder_probe.mllm.convert import convert_pivot, save_converted
from encoder_probe.mllm.model import MLLM, load_mllm
from encoder_probe.pivot.export import TOWER_DIR, VISION_PREFIX, _plan, check_exportable, export_llava
from conftest import assert_one_line

QUESTION, ANSWER = "What is in the image?", "A red square."
IMAGE = Image.fromarray((np.random.default_rng(0).random((300, 500, 3)) * 255).astype("uint8"))  # wide: 500x300


def edit_json(path, **changes):
    data = json.loads(path.read_text())
    for key, value in changes.items():
        target = data
        *parents, last = key.split("__")
        for parent in parents:
            target = target[parent]
        target[last] = value
    path.write_text(json.dumps(data))


def variant(base, out, config=None, processor=None):
    """A copy of an HF dir with config.json / processor_config.json fields changed (a__b: nested)."""
    shutil.copytree(base, out)
    edit_json(out / "config.json", **(config or {}))
    if processor:
        edit_json(out / "processor_config.json", **processor)
    return out


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """HF dirs at the published geometry, tiny widths: OneVision (layer -1; layer -2; (w, h)-asymmetric
    pinpoints) and LLaVA-1.5 CLIP (strategy default; strategy full; tied embeddings)."""
    root = tmp_path_factory.mktemp("export")
    ov = toy.write_hf_mllm(root / "onevision", "llava_onevision", geometry="published", processor=True)
    flat = toy.write_hf_mllm(root / "llava", "llava", geometry="published", processor=True)
    return {
        "onevision": ov,
        "onevision_layer-2": variant(ov, root / "ov2", {"vision_feature_layer": -2}),
        "onevision_wide_pinpoints": toy.write_hf_mllm(root / "ovwide", "llava_onevision", geometry="published",
                                                      processor=True, pinpoints=[[384, 384], [384, 768]]),
        "llava": flat,
        "llava_cls_patch": variant(flat, root / "cls", {"vision_feature_select_strategy": "full"},
                                   {"vision_feature_select_strategy": "full"}),
        "llava_tied": tied(variant(flat, root / "tied", {"tie_word_embeddings": True,
                                                        "text_config__tie_word_embeddings": True})),
    }


def tied(path):
    """Saved as transformers saves a tied model: no lm_head weight (it is embed_tokens)."""
    state = load_file(path / "model.safetensors")
    del state[next(k for k in state if k.endswith("lm_head.weight"))]
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def exported(dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("exported")
    return {name: export_llava(path, root / name) for name, path in dirs.items()}


def load_export(path):
    """load_mllm's conversion branch, with the export's tower config (``--vision-config OUT/vision_tower``)."""
    model, processor = convert_pivot(path, vision_config=path / TOWER_DIR)
    return MLLM(model, processor, family=model.config.model_type, path=path, template_from="checkpoint")


NAMES = ["onevision", "onevision_layer-2", "onevision_wide_pinpoints", "llava", "llava_cls_patch", "llava_tied"]


@pytest.mark.parametrize("name", NAMES)
def test_export_reproduces_the_transformers_model(dirs, exported, name):
    hf, back = load_mllm(dirs[name]), load_export(exported[name])
    assert type(back.model) is type(hf.model)
    text = [hf.conversation(QUESTION, ANSWER)]
    ref = hf.processor(text=text, images=[IMAGE], return_tensors="pt")
    ours = back.processor(text=text, images=[IMAGE], return_tensors="pt")  # the export's: PIL-exact pixels
    assert torch.equal(ours["input_ids"], ref["input_ids"])
    # the HF dir's processor is the torchvision backend: up to 2 grey levels off LLaVA-NeXT's PIL one
    assert torch.allclose(ours["pixel_values"], ref["pixel_values"], atol=2.5 / 255 / 0.26)
    with torch.no_grad():
        logits_hf = hf.model(**ref).logits
        logits_back = back.model(**ref).logits
    torch.testing.assert_close(logits_back, logits_hf, atol=1e-5, rtol=0)
    if name != "llava_cls_patch":  # mllm.layouts has no place for CLIP's CLS token: example() refuses it
        example = hf.example(IMAGE, QUESTION, ANSWER)
        assert back.example(IMAGE, QUESTION, ANSWER).layout.lm_tokens == example.layout.lm_tokens
        assert back.answer_logprob(example) == pytest.approx(hf.answer_logprob(example), abs=1e-5)


def test_export_loads_with_no_flags(dirs, exported):
    """The tower's own config in OUT/vision_tower: no --vision-config and no guessing from weight shapes."""
    hf, back = load_mllm(dirs["onevision"]), load_mllm(exported["onevision"])
    ref = hf.example(IMAGE, QUESTION, ANSWER)
    assert back.answer_logprob(ref) == pytest.approx(hf.answer_logprob(ref), abs=1e-5)


def test_keys_and_config_are_llava_next_names(dirs, exported):
    for name, blocks in (("onevision", 2), ("onevision_layer-2", 1), ("llava", 2)):
        out = exported[name]
        state = load_file(out / "model.safetensors")
        vision = [k.removeprefix(VISION_PREFIX) for k in state if k.startswith(VISION_PREFIX)]
        assert not any(k.startswith("head.") for k in vision)
        assert {int(k.split(".")[2]) for k in vision if k.startswith("encoder.layers.")} == set(range(blocks))
        projector = {k for k in state if k.startswith("model.mm_projector.")}
        assert projector == {f"model.mm_projector.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
        rest = set(state) - projector - {VISION_PREFIX + k for k in vision}
        assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= rest
        assert all(k.startswith(("model.layers.", "model.embed_tokens.", "model.norm.", "lm_head.",
                                 "model.image_newline")) for k in rest)
        assert ("model.image_newline" in rest) == name.startswith("onevision")
        config = json.loads((out / "config.json").read_text())
        assert config["architectures"] == ["LlavaQwenForCausalLM"] and config["model_type"] == "llava_qwen"
        assert config["mm_projector_type"] == "mlp2x_gelu" and config["mm_hidden_size"] == 32
        tower = json.loads((out / TOWER_DIR / "config.json").read_text())
        hf = json.loads((dirs[name] / "config.json").read_text())
        if name.startswith("onevision"):  # SigLIP: the architecture is one block deeper than what is kept
            assert tower["num_hidden_layers"] == blocks + 1 and config["mm_vision_select_layer"] == -2
            assert config["image_aspect_ratio"] == "anyres_max_9" and config["mm_patch_merge_type"] == "spatial_unpad"
            assert config["image_grid_pinpoints"] == [[w, h] for h, w in hf["image_grid_pinpoints"]]
        else:
            assert tower["num_hidden_layers"] == 2 and config["mm_vision_select_layer"] == -2
            assert config["image_aspect_ratio"] == "square" and config["mm_patch_merge_type"] == "flat"
    wide = json.loads((exported["onevision_wide_pinpoints"] / "config.json").read_text())
    assert wide["image_grid_pinpoints"] == [[384, 384], [768, 384]]  # (w, h): 768 wide, 384 high
    tied = load_file(exported["llava_tied"] / "model.safetensors")
    assert "lm_head.weight" not in tied
    assert json.loads((exported["llava_tied"] / "config.json").read_text())["tie_word_embeddings"] is True
    cls = json.loads((exported["llava_cls_patch"] / "config.json").read_text())
    assert cls["mm_vision_select_feature"] == "cls_patch"
    tokenizer = exported["onevision"] / "tokenizer_config.json"
    assert tokenizer.is_file() and (exported["onevision"] / "chat_template.jinja").is_file()


@pytest.mark.parametrize("name", ["onevision", "onevision_layer-2", "llava", "llava_tied"])
def test_probe_convert_of_the_export_is_the_hf_state_dict(dirs, exported, name, tmp_path):
    converted = save_converted(exported[name], tmp_path / "converted", vision_config=exported[name] / TOWER_DIR)
    hf, back = load_mllm(dirs[name]), load_mllm(converted)
    ours, ref = back.model.state_dict(), hf.model.state_dict()
    assert set(ours) <= set(ref)
    for key, value in ours.items():
        assert torch.equal(value, ref[key]), key
    # what the export leaves out is never read: the SigLIP head, and the blocks past the one the LM reads
    blocks = 1 if name == "onevision_layer-2" else 2
    left = {k for k in set(ref) - set(ours) if not k.startswith("model.vision_tower.head.")}
    assert left == {k for k in ref if k.startswith("model.vision_tower.encoder.layers.")
                    and int(k.split(".")[4]) >= blocks}
    tied = back.model.lm_head.weight.data_ptr() == back.model.model.language_model.embed_tokens.weight.data_ptr()
    assert tied == (name == "llava_tied")
    a, b = json.loads((converted / "config.json").read_text()), json.loads((dirs[name] / "config.json").read_text())
    for key in ("model_type", "image_token_index", "vision_feature_select_strategy", "image_grid_pinpoints",
                "vision_aspect_ratio", "image_seq_length", "tie_word_embeddings"):
        assert a.get(key) == b.get(key), key
    example = hf.example(IMAGE, QUESTION, ANSWER)
    assert back.answer_logprob(example) == pytest.approx(hf.answer_logprob(example), abs=1e-5)


@pytest.mark.parametrize("aspect", ["pad", "anyres_max_9"])
def test_a_pivot_dir_exports_back_to_itself(tmp_path, aspect):
    """A LLaVA-NeXT dir load_mllm converts exports as the same model (its tower's shapes name its
    architecture, so this one loads with no flags)."""
    anyres = dict(mm_patch_merge_type="spatial_unpad", config={"image_grid_pinpoints": "(1x1),...,(3x3)"})
    source = toy.write_pivot_mllm(tmp_path / "pivot", image_aspect_ratio=aspect, **(anyres if aspect != "pad" else {}))
    check_exportable(source)
    out = export_llava(source, tmp_path / "out")
    a, b = load_mllm(source), load_mllm(out)
    example = a.example(IMAGE, QUESTION, ANSWER)
    assert torch.equal(b.example(IMAGE, QUESTION, ANSWER).inputs["input_ids"], example.inputs["input_ids"])
    assert b.answer_logprob(example) == pytest.approx(a.answer_logprob(example), abs=1e-5)
    config = json.loads((out / "config.json").read_text())
    assert config["image_aspect_ratio"] == aspect and config["tokenizer_model_max_length"] == 32768


def test_known_towers_are_named_by_hub_id():
    import transformers as T
    text = dict(toy.TEXT)
    so400m = dict(hidden_size=1152, intermediate_size=4304, num_attention_heads=16, patch_size=14, image_size=384)
    # llava-onevision-hf: 26 blocks stored, layer -1 -> LLaVA-NeXT's 27-block so400m minus its last block
    ov = T.LlavaOnevisionConfig(vision_config=dict(so400m, model_type="siglip_vision_model", num_hidden_layers=26),
                                text_config=text, vision_feature_layer=-1, vision_feature_select_strategy="full")
    assert _plan(Path("x"), ov)["tower_id"] == "google/siglip-so400m-patch14-384"
    ov.vision_config._name_or_path = "/ckpts/siglip2-so400m-patch14-384"
    assert _plan(Path("x"), ov)["tower_id"] == "google/siglip2-so400m-patch14-384"
    clip = T.LlavaConfig(vision_config=dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                                            num_hidden_layers=24, num_attention_heads=16, patch_size=14,
                                            image_size=336, projection_dim=768), text_config=text)
    plan = _plan(Path("x"), clip)
    assert plan["tower_id"] == "openai/clip-vit-large-patch14-336" and plan["select_layer"] == -2


# -- refusals: one line naming the path, nothing written --------------------------------------------
def test_existing_out_is_refused_before_any_work(dirs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(SpecError) as e:
        export_llava(tmp_path / "no-such-dir", out)  # out is checked first: the source is never read
    assert_one_line(e, out, "already exists")


def test_refusals(dirs, tmp_path):
    qwen = toy.write_hf_mllm(tmp_path / "qwen2vl", "qwen2_vl")
    tower = toy.write_siglip_dir(tmp_path / "siglip")
    next_dir = tmp_path / "next"
    next_dir.mkdir()
    (next_dir / "config.json").write_text(json.dumps({"model_type": "llava_next"}))
    siglip_default = variant(dirs["onevision"], tmp_path / "ovdefault", {"vision_feature_select_strategy": "default"})
    layers = variant(dirs["onevision"], tmp_path / "ovlayers", {"vision_feature_layer": [-2, -1]})
    cases = [(qwen, SpecError, "Qwen2-VL"), (tower, SpecError, "not an MLLM"), (next_dir, SpecError, "LLaVA-NeXT"),
             (siglip_default, SpecError, "drops a patch token"), (layers, SpecError, "names one layer"),
             (tmp_path / "missing", CheckpointError, "no such directory")]
    for i, (path, error, what) in enumerate(cases):
        with pytest.raises(error) as e:
            check_exportable(path)
        assert_one_line(e, path, what)
        out = tmp_path / f"out{i}"
        with pytest.raises(EncoderProbeError) as e:
            export_llava(path, out)
        assert_one_line(e, path, what)
        assert not out.exists() and not list(tmp_path.glob(f".out{i}.*"))
    for path in dirs.values():
        check_exportable(path)
