"""The PIVOT trainer on TRL: the DPO objective against the paper's formula, what trains, resume, real dirs."""
import csv
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from encoder_probe import load_encoder, toy
from encoder_probe.cli import main as cli
from encoder_probe.mllm.model import load_mllm
from encoder_probe.pivot.train import TrainConfig, build_trainer, latest_checkpoint, part_of, train
from pivot_common import KILL_SCRIPT, QUESTIONS, pairs, parts, qwen  # noqa: F401 (fixtures)

@pytest.fixture(scope="module")
def onevision(tmp_path_factory):
    return toy.write_hf_mllm(tmp_path_factory.mktemp("ov") / "ov", "llava_onevision", geometry="published",
                             processor=True)


def _config(init, pairs, out, **kw):
    values = dict(stage="dpo", init=str(init), out=str(out), data=str(pairs), batch_size=4, max_steps=2, lr=1e-3,
                  vision_lr=2e-3, warmup_ratio=0.0, device="cpu", save_every=0, progress=False)
    return TrainConfig(**{**values, **kw})


def _weights(path) -> dict:
    return load_file(os.path.join(path, "model.safetensors"))


def _rows(run) -> list[dict]:
    with open(os.path.join(run, "log.csv")) as f:
        return list(csv.DictReader(f))


# -- the objective ----------------------------------------------------------------------------------
@pytest.mark.parametrize("sft_weight", [0.0, 0.5])
def test_trl_dpo_loss_is_the_pivot_formula_from_summed_response_logprobs(qwen, pairs, tmp_path, sft_weight):
    """The loss TRL optimises on one batch = mean -logsigmoid(beta((pi_c - ref_c) - (pi_r - ref_r))) (+ w * the
    chosen answers' token-mean NLL), with every log-prob summed over the response and computed apart, one
    conversation at a time, by our own MLLM interface (prompt from the chat template, answer appended)."""
    from encoder_probe.mllm.model import MLLM
    from encoder_probe.pivot.data import read_pairs
    config = _config(qwen, pairs, tmp_path / "run", batch_size=8, sft_weight=sft_weight, trainable=("vision", "projector", "lm"))
    trainer, mllm = build_trainer(config, "dpo", str(qwen), tmp_path / "run", phase="dpo")
    torch.manual_seed(1)
    with torch.no_grad():  # a policy away from the reference, so the margins are not all zero
        for p in trainer.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.eval()
    with torch.no_grad():
        loss = float(trainer.compute_loss(trainer.model, batch))
    policy = MLLM(trainer.model, mllm.processor, family=mllm.family, path=qwen, template_from="checkpoint")
    reference = load_mllm(qwen)
    terms, nll, tokens = [], 0.0, 0
    for r in read_pairs(pairs):
        image = Image.open(r["image"]).convert("RGB")
        c, rj = policy.example(image, r["question"], r["chosen"]), policy.example(image, r["question"], r["rejected"])
        margin = (policy.answer_logprob(c) - reference.answer_logprob(c)) - \
                 (policy.answer_logprob(rj) - reference.answer_logprob(rj))
        terms.append(-torch.nn.functional.logsigmoid(torch.tensor(0.1 * margin, dtype=torch.float64)))
        nll, tokens = nll - policy.answer_logprob(c), tokens + c.answer_tokens
    expected = float(torch.stack(terms).mean()) + sft_weight * nll / tokens
    assert abs(loss - expected) < 1e-4 * max(1.0, abs(expected)), (loss, expected)
    assert abs(loss - np.log(2)) > 1e-3  # the perturbation made the check non-trivial


def test_sft_loss_is_the_chosen_answers_token_mean_nll(qwen, pairs, tmp_path):
    """SFT (the paper's control): TRL's loss = token-mean NLL of the chosen answers only (prompt and image masked)."""
    from encoder_probe.pivot.data import read_pairs
    config = _config(qwen, pairs, tmp_path / "run", stage="sft", batch_size=8, trainable=("vision", "projector", "lm"))
    trainer, mllm = build_trainer(config, "sft", str(qwen), tmp_path / "run", phase="sft")
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.eval()
    with torch.no_grad():
        loss = float(trainer.compute_loss(trainer.model, batch))
    nll, tokens = 0.0, 0
    for r in read_pairs(pairs):
        example = mllm.example(Image.open(r["image"]).convert("RGB"), r["question"], r["chosen"])
        nll, tokens = nll - mllm.answer_logprob(example), tokens + example.answer_tokens
    assert abs(loss - nll / tokens) < 1e-4 * abs(loss), (loss, nll / tokens)


# -- what trains ------------------------------------------------------------------------------------
def test_dpo_moves_the_tower_and_never_the_reference(qwen, pairs, tmp_path):
    config = _config(qwen, pairs, tmp_path / "run", trainable=("vision", "projector", "lm"))
    trainer, _ = build_trainer(config, "dpo", str(qwen), tmp_path / "run", phase="dpo")
    before = {k: v.clone() for k, v in trainer.ref_model.state_dict().items()}
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    after = trainer.ref_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-identical, tower included
    assert any(k.startswith("model.visual.blocks") for k in before)
    moved = {k for k, v in trainer.model.state_dict().items() if not torch.equal(v, start[k])}
    assert any(part_of(k) == "vision" and ".blocks." in k for k in moved)
    assert any(part_of(k) == "projector" for k in moved) and any(part_of(k) == "lm" for k in moved)


def test_freeze_and_the_vision_learning_rate(qwen, pairs, tmp_path):
    run = train(_config(qwen, pairs, tmp_path / "run", freeze=("lm",), vision_lr=5e-3, lr=1e-3))
    start, end = _weights(qwen), _weights(run)
    lm = [k for k in start if part_of(k) == "lm"]
    assert lm and all(torch.equal(start[k], end[k]) for k in lm)  # frozen: bit-identical
    assert not all(torch.equal(start[k], end[k]) for k in start if part_of(k) == "vision")
    rows = _rows(run)
    assert [float(r["lr/vision"]) / float(r["lr/projector"]) for r in rows] == pytest.approx([5.0] * len(rows))
    assert all(r["lr/lm"] == "" for r in rows)  # no optimizer group for a frozen part
    for key in ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected"):
        assert all(r[key] != "" for r in rows), key
    recorded = json.loads((run / "pivot_train.json").read_text())
    assert recorded["finished"] and recorded["config"]["sft_weight"] == 0.0 and recorded["config"]["beta"] == 0.1


# -- real checkpoints in, real checkpoints out ------------------------------------------------------
@pytest.mark.parametrize("kind", ["qwen2_vl", "llava_onevision", "pivot"])
def test_probe_train_dpo_on_real_layouts_loads_everywhere(kind, qwen, onevision, pairs, tmp_path, capsys):
    init = {"qwen2_vl": qwen, "llava_onevision": onevision}.get(kind) or toy.write_pivot_mllm(tmp_path / "pivot")
    out = tmp_path / "dpo"
    code = cli(["train", "dpo", "--init", str(init), "--out", str(out), "--data", str(pairs), "--batch-size", "4",
                "--max-steps", "2", "--device", "cpu", "--lr", "1e-3", "--save-every", "1"])
    assert code == 0, capsys.readouterr().err
    assert len(_rows(out)) == 2 and not (out / "checkpoints").exists()
    mllm = load_mllm(out)
    reference = load_mllm(init)
    assert type(mllm.model) is type(reference.model)
    assert mllm.processor.chat_template == reference.processor.chat_template
    image = Image.new("RGB", (56, 40), (90, 30, 200))
    example = mllm.example(image, QUESTIONS[0], "red")
    assert example.inputs["input_ids"].tolist() == reference.example(image, QUESTIONS[0], "red").inputs["input_ids"].tolist()
    encoder, before = load_encoder(str(out)), load_encoder(str(init))
    pixels = encoder.transform(image)[None]
    trained, start = encoder.forward_tokens(pixels).patches, before.forward_tokens(pixels).patches
    assert trained.shape == start.shape and not torch.equal(trained, start)  # the tower moved


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_weights(qwen, pairs, tmp_path):
    """kill -9 after step 3 (checkpoint at step 2), rerun: the weights equal an uninterrupted 6-step run's."""
    script = KILL_SCRIPT
    settings = [f"init={str(qwen)!r}", f"data={str(pairs)!r}", "batch_size=4", "max_steps=6", "save_every=2"]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    killed = subprocess.run([sys.executable, "-c", script, str(tmp_path / "a"), "3", *settings], env=env, capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert latest_checkpoint(tmp_path / "a").name == "checkpoint-2" and not (tmp_path / "a" / "model.safetensors").exists()
    for out in ("a", "b"):
        done = subprocess.run([sys.executable, "-c", script, str(tmp_path / out), "0", *settings], env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    assert [r["step"] for r in _rows(tmp_path / "a")] == [str(i) for i in range(1, 7)]  # rows past step 2 rewritten
    assert [r["loss"] for r in _rows(tmp_path / "a")] == [r["loss"] for r in _rows(tmp_path / "b")]


def test_an_incomplete_checkpoint_is_not_resumed(tmp_path):
    for step, complete in ((2, True), (4, False)):
        (tmp_path / "checkpoints" / f"checkpoint-{step}").mkdir(parents=True)
        if complete:
            (tmp_path / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert latest_checkpoint(tmp_path, clean=True).name == "checkpoint-2"
    assert not (tmp_path / "checkpoints" / "checkpoint-4").exists()


def test_gradient_map_snapshots(qwen, pairs, tmp_path):
    run = train(_config(qwen, pairs, tmp_path / "run", snapshot_every=1, snapshot_records=2))
    snaps = sorted((run / "snapshots").glob("*.npz"))
    assert [s.name for s in snaps] == ["step-0000000.npz", "step-0000001.npz", "step-0000002.npz"]
    first, last = np.load(snaps[0]), np.load(snaps[-1])
    grid = tuple(first["grids"][0])  # Qwen2-VL: 40x56 px -> resized to 56x56 -> 4x4 patches of 14 -> 2x2 merged
    assert first["map_0"].shape == grid and np.isfinite(first["map_0"]).all() and (first["map_0"] > 0).any()
    assert not np.allclose(first["map_0"], last["map_0"])  # the tower and LM moved between the snapshots


# -- bad input --------------------------------------------------------------------------------------
@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ('{"image": "images/0.png", "question": "q", "chosen": "a"}', "missing or empty field(s) rejected"),
    ('{"image": "images/none.png", "question": "q", "chosen": "a", "rejected": "b"}', "does not exist"),
])
def test_bad_records_fail_in_one_line_before_training(qwen, pairs, tmp_path, line, message, capsys):
    bad = pairs.parent / f"bad-{abs(hash(line))}.jsonl"
    bad.write_text(pairs.read_text() + line + "\n")
    code = cli(["train", "dpo", "--init", str(qwen), "--out", str(tmp_path / "o"), "--data", str(bad), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and str(bad) in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_unreadable_image_fails_before_training(qwen, pairs, tmp_path, capsys):
    (pairs.parent / "images" / "broken.png").write_bytes(b"not a png")
    bad = pairs.parent / "broken.jsonl"
    bad.write_text(json.dumps({"image": "images/broken.png", "question": "q", "chosen": "a", "rejected": "b"}) + "\n")
    code = cli(["train", "sft", "--init", str(qwen), "--out", str(tmp_path / "o"), "--data", str(bad), "--batch-size", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "unreadable" in err and "broken.png" in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv, message", [
    (["dpo", "--init", "/nonexistent/ckpt"], "--init /nonexistent/ckpt: no such file or directory"),
    (["dpo", "--init", "QWEN", "--freeze", "vision,projector,lm"], "leaves nothing to train"),
    (["dpo", "--init", "QWEN", "--freeze", "tower"], "--freeze tower: unknown part"),
    (["dpo", "--init", "QWEN", "--beta", "0"], "--beta must be > 0"),
    (["dpo", "--init", "QWEN", "--batch-size", "6", "--micro-batch-size", "4"], "does not divide"),
    (["dpo", "--init", "NOTMLLM"], "is not an MLLM"),
    (["dpo", "--init", "QWEN", "--export", "llava"], "LLaVA"),
])
def test_stage_arguments_are_checked(qwen, pairs, tmp_path, argv, message, capsys):
    notmllm = toy.write_siglip_dir(tmp_path / "siglip")
    argv = [{"QWEN": str(qwen), "NOTMLLM": str(notmllm)}.get(a, a) for a in argv]
    code = cli(["train", *argv, "--out", str(tmp_path / "o"), "--data", str(pairs), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o" / "config.json").exists()


# -- the LLaVA recipe and PIVOT's evaluation setting ------------------------------------------------
def _by_part(path) -> dict[str, dict]:
    from encoder_probe.mllm.model import load_mllm as load
    state = load(path).model.state_dict()
    out = {"vision": {}, "projector": {}, "lm": {}}
    for k, v in state.items():
        out[part_of(k)][k] = v
    return out


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pretrain_trains_the_projector_alone_then_everything(parts, pairs, tmp_path):
    tower, lm = parts
    run = train(TrainConfig(stage="pretrain", vision=str(tower), lm=str(lm), out=str(tmp_path / "base"),
                            data=str(pairs), batch_size=4, max_steps=2, lr=1e-3, warmup_ratio=0.0, device="cpu",
                            save_every=0, progress=False))
    fresh, first, final = (_by_part(p) for p in (run / "phases" / "fresh", run / "phases" / "projector", run))
    assert _same(fresh["vision"], first["vision"]) and _same(fresh["lm"], first["lm"])  # phase 1: projector only
    assert not _same(fresh["projector"], first["projector"])
    assert not _same(first["vision"], final["vision"]) and not _same(first["lm"], final["lm"])  # then everything
    assert [r["phase"] for r in _rows(run)] == ["full", "full"]
    assert [r["phase"] for r in _rows(run / "phases" / "projector")] == ["projector", "projector"]
    assert load_mllm(run).config.model_type == "llava_onevision" and load_encoder(str(run)).source == "hf-mllm"


def test_transplant_keeps_the_refined_tower_frozen(parts, onevision, pairs, tmp_path):
    """PIVOT's evaluation setting: the refined tower, frozen, in a fresh MLLM with a new projector."""
    _, lm = parts
    run = train(TrainConfig(stage="transplant", vision_from=str(onevision), lm=str(lm), out=str(tmp_path / "t"),
                            data=str(pairs), batch_size=4, max_steps=1, lr=1e-3, warmup_ratio=0.0, device="cpu",
                            save_every=0, progress=False))
    source, final = _by_part(onevision), _by_part(run)
    tower = {k.replace("model.vision_tower.", ""): v for k, v in final["vision"].items()}
    refined = {k.replace("model.vision_tower.", ""): v for k, v in source["vision"].items()}
    assert all(torch.equal(tower[k], refined[k]) for k in tower)  # bit-identical after both phases
    assert not _same(_by_part(run / "phases" / "fresh")["lm"], final["lm"])  # the LM did train in phase 2
    assert load_mllm(run).config.vision_feature_layer == load_mllm(onevision).config.vision_feature_layer


def test_export_llava_writes_the_pivot_layout_of_the_trained_model(onevision, pairs, tmp_path):
    from encoder_probe.mllm.model import MLLM
    run = train(_config(onevision, pairs, tmp_path / "dpo", max_steps=1, export="llava"))
    assert json.loads((run / "llava" / "config.json").read_text())["mm_vision_tower"]
    trained, exported = load_mllm(run), load_mllm(run / "llava")  # the export converts back in memory
    assert isinstance(exported, MLLM) and exported.details.get("converted_from")
    image = Image.new("RGB", (56, 40), (200, 120, 10))
    example = trained.example(image, QUESTIONS[1], "3")
    assert exported.answer_logprob(example) == pytest.approx(trained.answer_logprob(example), abs=1e-4)


@pytest.mark.parametrize("kind", ["llava", "llava_next", "qwen2_5_vl", "internvl"])
def test_every_family_trains_its_tower_with_its_own_processor(kind, pairs, tmp_path):
    """One DPO step on each remaining family at its published geometry (CLIP-L/14-336 LLaVA, NeXT anyres
    pinpoints, Qwen2.5-VL windows, InternVL 448 px tiles + pixel shuffle): the tower moves, the reference not."""
    init = toy.write_hf_mllm(tmp_path / kind, kind, geometry="published", processor=True)
    config = _config(init, pairs, tmp_path / "run", max_steps=1, batch_size=2, limit=2,
                     trainable=("vision", "projector", "lm"))
    trainer, _ = build_trainer(config, "dpo", str(init), tmp_path / "run", phase="dpo")
    start = {k: v.clone() for k, v in trainer.model.state_dict().items() if part_of(k) == "vision"}
    reference = {k: v.clone() for k, v in trainer.ref_model.state_dict().items()}
    trainer.train()
    assert any(not torch.equal(v, start[k]) for k, v in trainer.model.state_dict().items() if k in start)
    assert all(torch.equal(v, reference[k]) for k, v in trainer.ref_model.state_dict().items())


@pytest.mark.parametrize("flags", [dict(bf16=True), dict(gradient_checkpointing=True)])
def test_bf16_checkpointing_and_accumulation_paths_run(qwen, pairs, tmp_path, flags):
    """The paper's settings (bf16 autocast, gradient checkpointing, accumulation to the effective batch) on CPU."""
    run = train(_config(qwen, pairs, tmp_path / "run", max_steps=1, **flags))
    [row] = _rows(run)
    assert np.isfinite(float(row["loss"])) and float(row["grad_norm"]) > 0
    args = json.loads((run / "pivot_train.json").read_text())["config"]
    assert all(args[k] == v for k, v in flags.items())


def test_gradient_accumulation_gives_the_effective_batch(qwen, pairs, tmp_path):
    """--micro-batch-size 2 with 2 accumulated = one forward of the whole 4-pair batch (DPO's per-pair mean)."""
    whole = train(_config(qwen, pairs, tmp_path / "whole", max_steps=2))
    micro = train(_config(qwen, pairs, tmp_path / "micro", max_steps=2, micro_batch_size=2))
    a, b = _weights(whole), _weights(micro)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert [r["loss"][:6] for r in _rows(whole)] == [r["loss"][:6] for r in _rows(micro)]
