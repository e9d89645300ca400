"""`gradcam` with target mllm on real-layout MLLM dirs: VQA records from JSONL, views, DPO reference."""
import json

import numpy as np
import pytest
from PIL import Image

from encoder_probe.encoders import load_encoder
from encoder_probe.errors import DataError
from encoder_probe.runner import run_probe
from encoder_probe.toy import write_hf_mllm


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return write_hf_mllm(tmp_path_factory.mktemp("qwen") / "ckpt", "qwen2_vl", geometry="published", processor=True)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """Two photos (one with a mask of its left half), three records; a JSONL beside them."""
    root = tmp_path_factory.mktemp("vqa")
    rng = np.random.default_rng(0)
    for name, size in (("a.png", (112, 84)), ("b.png", (140, 140))):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / name)
    mask = np.zeros((84, 112), np.uint8)
    mask[:, :56] = 1
    mask[0, :] = 255
    Image.fromarray(mask).save(root / "a_mask.png")
    lines = [{"image": "a.png", "mask": "a_mask.png", "question": "What is on the left?", "chosen": "a square",
              "rejected": "a circle"},
             {"image": "b.png", "question": "What colour is it?", "chosen": "red", "rejected": "blue"},
             {"image": "a.png", "mask": "a_mask.png", "question": "Is it large?", "chosen": "yes", "rejected": "no"}]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return root / "pairs.jsonl"


def _run(spec, data, options, out, view="base"):
    """The gradcam entry of a run as results.json holds it (CIs left out: they are the runner's)."""
    enc = load_encoder(str(spec), view=view)
    return enc, run_probe("gradcam", enc, data=data, options={"target": "mllm", **options}, out=out, bootstrap=0)


def test_records_from_jsonl_are_mapped_and_scored_where_they_have_masks(qwen, records, tmp_path):
    from encoder_probe.mllm import load_mllm, loss_gradient
    enc, result = _run(qwen, {"vqa": str(records)}, {"loss": "sft"}, tmp_path)
    assert result["target"]["kind"] == "mllm" and result["target"]["family"] == "qwen2_vl"
    assert result["data"]["images"] == 3 and result["target"]["records"] == str(records)
    saved = np.load(tmp_path / enc.fingerprint[:16] / "gradcam" / "maps.npz")
    scores = saved["energy_in_mask/gradient-norm"]
    assert np.isfinite(scores[[0, 2]]).all() and np.isnan(scores[1])  # record 2 has no mask: not scored
    assert result["metrics"]["energy_in_mask@gradient-norm"]["value"] == pytest.approx(float(np.nanmean(scores)))
    from encoder_probe.items import Items
    items = Items.load(tmp_path / enc.fingerprint[:16] / result["items"]["file"])
    assert items.ids.tolist() == ["record:0", "record:1", "record:2"]
    np.testing.assert_array_equal(items.columns["energy_in_mask@gradient-norm"][0], scores)  # NaN: not scored
    # the stored raw map of record 1 is the PIVOT map of the MLLM's own SFT loss on it
    m = load_mllm(qwen)
    first = json.loads(records.read_text().splitlines()[0])
    g = loss_gradient(m, Image.open(records.parent / "a.png").convert("RGB"), first, "sft")
    offsets = saved["map_offsets"]
    np.testing.assert_allclose(saved["map/gradient-norm"][offsets[0]:offsets[1]], g.grad.abs().sum(-1).numpy(),
                               rtol=1e-5, atol=1e-9)
    layout = json.loads(str(saved["layouts"][0]))
    assert layout["image_size"] == [84, 112]


def test_records_without_any_mask_are_mapped_not_scored(qwen, records, tmp_path):
    only = tmp_path / "nomask.jsonl"
    line = json.loads(records.read_text().splitlines()[1])
    line["image"] = str(records.parent / line["image"])
    only.write_text(json.dumps(line) + "\n")
    _, result = _run(qwen, {"vqa": str(only)}, {"loss": "logprob"}, tmp_path)
    assert result["metrics"] == {} and "no masks" in result["baseline"]["note"] and "items" not in result
    assert result["target"]["loss_value_mean"] < 0  # a summed log-likelihood


@pytest.mark.parametrize("line, message", [
    ('{"image": "a.png", "question": "q"}', r"pairs\.jsonl:1: missing or empty field\(s\) chosen, rejected"),
    ("not json", r"pairs\.jsonl:1: not valid JSON"),
    ('{"image": "missing.png", "question": "q", "chosen": "a", "rejected": "b"}',
     r"pairs\.jsonl: record 1: image .*missing\.png does not exist"),
    ('{"image": "a.png", "mask": "nope.png", "question": "q", "chosen": "a", "rejected": "b"}',
     r"pairs\.jsonl: record 1: mask .*nope\.png does not exist"),
])
def test_bad_records_are_one_line_errors_naming_file_and_line(qwen, records, tmp_path, line, message):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text(line + "\n")
    (tmp_path / "a.png").write_bytes((records.parent / "a.png").read_bytes())
    with pytest.raises(DataError, match=message):
        _run(qwen, {"vqa": str(bad)}, {}, tmp_path / "out")


def test_dpo_reference_is_computed_first_and_freed_before_the_policy_loads(qwen, records, tmp_path, monkeypatch):
    """Never two MLLMs in memory: the reference's log-probs, then free, then the policy; the maps equal
    loss_gradient with those log-probs."""
    import encoder_probe.mllm as mllm_pkg
    from encoder_probe.mllm import MLLM, load_mllm, loss_gradient, reference_logprobs
    reference_dir = write_hf_mllm(tmp_path / "ref", "qwen2_vl", geometry="published", processor=True, seed=1)
    events = []
    real_load, real_free = mllm_pkg.load_mllm, MLLM.free

    def load(path, **kw):
        assert all(e[0] != "load" or e[2] for e in events), "a second MLLM loaded while one is held"
        m = real_load(path, **kw)
        events.append(["load", str(path), False])
        m._event = events[-1]
        return m

    def free(self):
        self._event[2] = True
        real_free(self)

    monkeypatch.setattr(mllm_pkg, "load_mllm", load)
    monkeypatch.setattr(MLLM, "free", free)
    enc, result = _run(qwen, {"vqa": str(records)}, {"loss": "dpo", "dpo_reference": str(reference_dir), "limit": 2,
                                                    "beta": 0.5}, tmp_path / "run")
    assert [e[1] for e in events] == [str(reference_dir), str(qwen)] and events[0][2]
    monkeypatch.undo()
    items = [(Image.open(records.parent / json.loads(x)["image"]).convert("RGB"), json.loads(x))
             for x in records.read_text().splitlines()[:2]]
    refs = reference_logprobs(load_mllm(reference_dir), items)
    policy = load_mllm(qwen)
    expected = [loss_gradient(policy, im, r, "dpo", beta=0.5, reference=ref) for (im, r), ref in zip(items, refs)]
    saved = np.load(tmp_path / "run" / enc.fingerprint[:16] / "gradcam" / "maps.npz")
    got = np.split(saved["map/gradient-norm"], saved["map_offsets"][1:-1])
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e.grad.abs().sum(-1).numpy(), rtol=1e-5, atol=1e-10)
    assert result["target"]["loss_value_mean"] == pytest.approx(np.mean([e.value for e in expected]))
    assert all(abs(e.value - np.log(2)) > 1e-4 for e in expected)  # a real reference: the margin is not 0


def test_view_base_keeps_the_base_tile_and_full_every_view(tmp_path):
    """LLaVA-OneVision at the published geometry: base = the 27x27 base view, full = base + anyres tiles."""
    ov = write_hf_mllm(tmp_path / "ov", "llava_onevision", geometry="published", processor=True,
                       pinpoints=[[384, 384], [384, 768], [768, 384]])
    _, base = _run(ov, None, {"limit": 1, "loss": "logprob"}, tmp_path / "base")
    _, full = _run(ov, None, {"limit": 1, "loss": "logprob"}, tmp_path / "full", view="full")
    assert base["data"]["tokens_per_image"]["max"] == 729 and base["target"]["tokens"] == "base view"
    assert full["data"]["tokens_per_image"]["max"] > 729 and full["data"]["view"] == "full"
    assert base["target"]["loss_value_mean"] == pytest.approx(full["target"]["loss_value_mean"])  # one forward


def test_a_checkpoint_with_missing_or_corrupt_weights_is_refused_not_half_random(qwen, tmp_path):
    """transformers would initialise missing LM weights at random and go on: load_mllm refuses instead."""
    import shutil

    from safetensors.torch import load_file, save_file

    from encoder_probe.errors import CheckpointError
    from encoder_probe.mllm import load_mllm
    partial = shutil.copytree(qwen, tmp_path / "partial")
    state = load_file(partial / "model.safetensors")
    save_file({k: v for k, v in state.items() if ".layers.0.mlp." not in k}, partial / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"partial: the weights do not match .*missing .*layers\.0\.mlp"):
        load_mllm(partial)
    corrupt = shutil.copytree(qwen, tmp_path / "corrupt")
    with open(corrupt / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(CheckpointError, match=r"corrupt: Qwen2VLForConditionalGeneration cannot load it"):
        load_mllm(corrupt)


def test_bf16_and_device_map_load_the_same_model(qwen):
    """dtype and device_map (accelerate's placement) reach from_pretrained: the same log-likelihood and
    gradient (bf16 to its precision)."""
    import torch

    from encoder_probe.assets import photo
    from encoder_probe.mllm import load_mllm
    plain, mapped, half = load_mllm(qwen), load_mllm(qwen, device_map="cpu"), load_mllm(qwen, dtype="bf16")
    assert half.model.dtype == torch.bfloat16 and {p.device.type for p in mapped.model.parameters()} == {"cpu"}
    example = plain.example(photo("chelsea"), "What is it?", "a cat")
    a, b, c = (m.logprob_gradient(example) for m in (plain, mapped, half))
    assert a.value == b.value and torch.equal(a.grad, b.grad)
    assert abs(c.value - a.value) < 0.05 * abs(a.value) and c.grad.dtype == torch.float32
    assert float((c.grad - a.grad).abs().max()) < 0.05 * float(a.grad.abs().max())
