"""PIVOT trainer: DPO maths, masking, gradient flow, a short run, checkpoints, export, resume, DDP."""
import json
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from encoder_probe import load_encoder, toy
from encoder_probe.cli import main as cli
from encoder_probe.errors import DataError, SpecError
from encoder_probe.pivot import dpo_loss, is_mllm_checkpoint, load_mllm, save_mllm, tiny_mllm
from encoder_probe.pivot.data import read_pairs, texts_of
from encoder_probe.pivot.export import export_llava
from encoder_probe.pivot.train import Objective, TrainConfig, train

QUESTIONS = ["What colour is the square?", "How many dots are in the image?", "Is the star large or small?",
             "What colour is the ring?"]
ANSWERS = [("red", "orange"), ("3", "4"), ("large", "small"), ("blue", "cyan")]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """8 preference records over random 32x32 images, relative paths as MMPR ships them."""
    root = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    lines = []
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        chosen, rejected = ANSWERS[i % 4]
        lines.append(json.dumps({"image": f"images/{i}.png", "question": QUESTIONS[i % 4], "chosen": chosen,
                                 "rejected": rejected}))
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return root / "pairs.jsonl"


@pytest.fixture(scope="module")
def base(tmp_path_factory, pairs):
    """A tiny base MLLM around a PIVOT-layout SigLIP tower (last block removed), saved by the trainer."""
    root = tmp_path_factory.mktemp("base")
    tower = toy.write_pivot(root / "tower")
    mllm = tiny_mllm(texts_of(read_pairs(pairs)), encoder=str(tower))
    return save_mllm(mllm, root / "ckpt", extra={"stage": "pretrain"})


def _first_batch(mllm, pairs, n=4):
    from encoder_probe.pivot.data import PreferenceDataset, collate
    dataset = PreferenceDataset(read_pairs(pairs), mllm.encoder.transform)
    return collate([dataset[i] for i in range(n)])


# -- losses ---------------------------------------------------------------------------------------
def test_dpo_loss_equals_hand_computation():
    pc, pr = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0])
    rc, rr = torch.tensor([-1.5, -2.0]), torch.tensor([-1.5, -2.0])
    out = dpo_loss(pc, pr, rc, rr, beta=0.1)
    # rewards 0.1 * (policy - reference): chosen (0.05, -0.1), rejected (-0.05, 0.1); margins (0.1, -0.2)
    assert torch.allclose(out["chosen_rewards"], torch.tensor([0.05, -0.1]))
    assert torch.allclose(out["rejected_rewards"], torch.tensor([-0.05, 0.1]))
    expected = (math.log1p(math.exp(-0.1)) + math.log1p(math.exp(0.2))) / 2
    assert out["loss"].item() == pytest.approx(expected, abs=1e-6)
    assert out["reward_accuracy"].item() == 0.5 and out["margin"].item() == pytest.approx(-0.05, abs=1e-6)
    # sft_weight 0 (the default): an SFT loss handed in changes nothing
    assert dpo_loss(pc, pr, rc, rr, sft_loss=torch.tensor(7.0))["loss"].item() == out["loss"].item()
    assert dpo_loss(pc, pr, rc, rr, sft_loss=torch.tensor(2.0), sft_weight=0.5)["loss"].item() == \
        pytest.approx(expected + 1.0, abs=1e-6)
    with pytest.raises(ValueError):
        dpo_loss(pc, pr, rc, rr, sft_weight=1.0)


def test_sft_loss_is_hf_causal_lm_loss_with_prompt_and_image_masked(base, pairs):
    mllm = load_mllm(base).eval()
    batch = _first_batch(mllm, pairs, 2)
    tokens = mllm.image_tokens(batch["pixels"])
    questions, answers = batch["question"], batch["chosen"]
    ours = mllm.sft_loss(tokens, questions, answers)
    embeds, attention, ids, answer = mllm._sequences(tokens, questions, answers)
    labels = torch.cat([torch.full((2, tokens.shape[1]), -100), ids.masked_fill(~answer, -100)], dim=1)
    reference = mllm.lm(inputs_embeds=embeds, attention_mask=attention, labels=labels).loss
    assert torch.allclose(ours, reference, atol=1e-6)
    # answer tokens + eos only; padding does not change a record's log-prob
    logp, count = mllm.answer_logprobs(tokens, questions, answers)
    assert count.tolist() == [len(mllm.tokenizer.encode(a)) + 1 for a in answers]
    alone = mllm.response_logprob(tokens[1:], questions[1:], answers[1:])
    assert torch.allclose(logp[1:], alone, atol=1e-5)


# -- gradient flow ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_gradients_reach_the_tower_and_never_the_reference(base, pairs, kind):
    policy = load_mllm(base).train()
    reference = load_mllm(base).eval().requires_grad_(False) if kind == "dpo" else None
    before = {k: v.clone() for k, v in reference.state_dict().items()} if reference else None
    batch = _first_batch(policy, pairs)
    objective = Objective(policy, kind, reference)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    for _ in range(2):  # the first DPO step has zero margin but a non-zero gradient
        out = objective(batch["pixels"], batch["question"], batch["chosen"], batch["rejected"])
        out["loss"].backward()
        # every block and the patch embedding get gradients (post_layernorm is not on the path: LLaVA reads before it)
        grads = [p.grad for n, p in policy.vision.named_parameters() if not n.startswith("post_layernorm")]
        assert all(g is not None for g in grads) and all(g.abs().sum() > 0 for g in grads)
        optimizer.step()
        optimizer.zero_grad()
    assert "reference" not in dict(objective.named_children())
    if reference is not None:
        assert all(p.grad is None for p in reference.parameters())
        assert all(torch.equal(before[k], v) for k, v in reference.state_dict().items())


def test_gradient_checkpointing_keeps_gradients(base, pairs):
    grads = []
    for checkpointing in (False, True):
        policy = load_mllm(base).train()
        if checkpointing:
            policy.enable_gradient_checkpointing()
        batch = _first_batch(policy, pairs)
        policy.sft_loss(policy.image_tokens(batch["pixels"]), batch["question"], batch["chosen"]).backward()
        grads.append(torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


# -- a short run ----------------------------------------------------------------------------------
def _dpo_eval(checkpoint, reference, pairs):
    policy, ref = load_mllm(checkpoint).eval(), load_mllm(reference).eval()
    batch = _first_batch(policy, pairs, 8)
    with torch.no_grad():
        return Objective(policy, "dpo", ref)(batch["pixels"], batch["question"], batch["chosen"], batch["rejected"])


def test_short_dpo_run_lowers_loss_and_raises_reward_accuracy(base, pairs, tmp_path):
    before = _dpo_eval(base, base, pairs)
    assert before["loss"].item() == pytest.approx(math.log(2), abs=1e-6) and before["reward_accuracy"] == 0
    out = train(TrainConfig(stage="dpo", out=str(tmp_path / "dpo"), init=str(base), data=str(pairs), epochs=4,
                            batch_size=4, lr=3e-3, snapshot_every=4, progress=False))
    after = _dpo_eval(out, base, pairs)
    assert after["loss"].item() < before["loss"].item() - 0.05
    assert after["reward_accuracy"].item() >= 0.75 and after["margin"].item() > 0
    with open(out / "log.csv") as f:
        header, *rows = f.read().splitlines()
    assert header.split(",")[:6] == ["step", "epoch", "phase", "lr", "loss", "reward_accuracy"] and len(rows) == 8
    snapshot = np.load(out / "snapshots" / "step-0000008.npz")
    assert snapshot["maps"].shape == (4, 4, 4) and (snapshot["maps"] > 0).all()
    assert json.loads((out / "config.json").read_text())["stage"] == "dpo"


# -- checkpoints and export -------------------------------------------------------------------------
def test_checkpoint_load_encoder_and_llava_export_round_trip(base, pairs, tmp_path):
    out = tmp_path / "sft"
    assert cli(["train", "sft", "--init", str(base), "--data", str(pairs), "--batch-size", "4", "--lr", "1e-3",
                "--out", str(out), "--export", "llava"]) == 0
    mllm = load_mllm(out).eval()
    pixels = _first_batch(mllm, pairs)["pixels"]
    with torch.no_grad():
        tower = mllm.encoder.forward_tokens(pixels).patches
        projected = mllm.image_tokens(pixels)
        loaded = load_encoder(str(out))
        assert loaded.source == "pivot" and is_mllm_checkpoint(out)
        assert torch.equal(loaded.forward_tokens(pixels).patches, tower)
        assert torch.equal(load_encoder(str(out), with_projector=True).forward_tokens(pixels).patches, projected)
        assert not torch.equal(tower, load_encoder(str(base)).forward_tokens(pixels).patches)  # SFT moved the tower

        llava = out / "llava"  # written by --export llava; `probe train export` is the same call
        keys = load_file(llava / "model.safetensors").keys()
        assert any(k.startswith("model.vision_tower.vision_tower.vision_model.encoder.layers.") for k in keys)
        assert {"model.mm_projector.0.weight", "model.mm_projector.2.bias", "lm_head.weight"} <= set(keys)
        exported = load_encoder(str(llava), vision_config=str(llava / "vision_tower"),
                                with_projector=True)
        assert exported.source == "llava" and exported.preprocess == mllm.encoder.preprocess
        assert torch.equal(exported.forward_tokens(pixels).patches, projected)
    with pytest.raises(SpecError, match="already exists"):
        export_llava(out, llava)
    assert cli(["train", "export", str(out), "--out", str(tmp_path / "again")]) == 0
    again = load_file(tmp_path / "again" / "model.safetensors")
    assert all(torch.equal(v, again[k]) for k, v in load_file(llava / "model.safetensors").items())


def test_killed_run_resumes_to_the_same_weights(base, pairs, tmp_path):
    config = dict(stage="sft", init=str(base), data=str(pairs), epochs=1, batch_size=2, lr=1e-3, save_every=2,
                  progress=False)
    straight = train(TrainConfig(out=str(tmp_path / "straight"), **config))

    def kill(step, metrics):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(out=str(tmp_path / "killed"), **config), on_step=kill)
    assert not (tmp_path / "killed" / "config.json").exists()  # no final model from a killed run
    assert (tmp_path / "killed" / "checkpoints" / "latest").read_text() == "step-0000002"
    resumed = train(TrainConfig(out=str(tmp_path / "killed"), **config))
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = (resumed / "log.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, 5))


def test_transplant_keeps_the_refined_tower_frozen(base, pairs, tmp_path):
    out = train(TrainConfig(stage="transplant", out=str(tmp_path / "t"), vision_from=str(base), data=str(pairs),
                            batch_size=4, projector_epochs=1, epochs=1, lr=1e-3, progress=False))
    new, old = load_file(out / "model.safetensors"), load_file(base / "model.safetensors")
    vision = [k for k in new if k.startswith("vision.")]
    assert vision and all(torch.equal(new[k], old[k]) for k in vision)
    assert not torch.equal(new["projector.0.weight"], old["projector.0.weight"])  # a new projector
    assert load_mllm(out).vision_spec["spec"] == str(base)


def test_pretrain_trains_the_projector_alone_first(pairs, tmp_path, toy_dir):
    tower = toy_dir("pivot", toy.write_pivot)
    config = dict(stage="pretrain", encoder=str(tower), data=str(pairs), batch_size=4, lr=1e-3, progress=False)
    phase1 = train(TrainConfig(out=str(tmp_path / "p1"), projector_epochs=1, epochs=0, **config))
    fresh = tiny_mllm(texts_of(read_pairs(pairs)), encoder=str(tower))
    after = load_file(phase1 / "model.safetensors")
    for name, value in fresh.state_dict().items():
        assert torch.equal(after[name], value) != name.startswith("projector."), name
    both = train(TrainConfig(out=str(tmp_path / "p2"), projector_epochs=1, epochs=1, **config))
    rows = (both / "log.csv").read_text().splitlines()[1:]
    assert [r.split(",")[2] for r in rows] == ["projector"] * 2 + ["full"] * 2


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ('{"image": "images/0.png", "question": "q", "chosen": "a"}', "missing or empty field(s) rejected"),
    ('{"image": "images/nope.png", "question": "q", "chosen": "a", "rejected": "b"}', "does not exist"),
])
def test_bad_records_fail_in_one_line(pairs, tmp_path, line, message, capsys, base):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(pairs.read_text().splitlines()[0] + "\n" + line + "\n")
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_pairs(bad, image_root=pairs.parent)
    assert cli(["train", "dpo", "--init", str(base), "--data", str(bad), "--image-root", str(pairs.parent),
                "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(bad) in err and not (tmp_path / "o").exists()


def test_stage_arguments_are_checked(tmp_path, pairs):
    with pytest.raises(SpecError, match="not a PIVOT trainer checkpoint"):
        train(TrainConfig(stage="dpo", out=str(tmp_path / "o"), init=str(tmp_path), data=str(pairs)))
    with pytest.raises(SpecError, match="needs --vision-from"):
        train(TrainConfig(stage="transplant", out=str(tmp_path / "o"), data=str(pairs)))
    with pytest.raises(DataError, match="8 records, fewer than one batch"):
        train(TrainConfig(stage="pretrain", out=str(tmp_path / "o"), data=str(pairs), batch_size=16))
    assert not (tmp_path / "o").exists()


# -- scale-out -------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_matches_one_process(base, pairs, tmp_path):
    args = ["train", "dpo", "--init", str(base), "--data", str(pairs), "--batch-size", "4", "--max-steps", "2",
            "--lr", "1e-3", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                          "-m", "encoder_probe.cli", *args, "--out", str(tmp_path / "ddp")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    single = train(TrainConfig(stage="dpo", out=str(tmp_path / "one"), init=str(base), data=str(pairs), batch_size=4,
                               max_steps=2, lr=1e-3, device="cpu", progress=False))
    a, b = load_file(tmp_path / "ddp" / "model.safetensors"), load_file(single / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    base_state = load_file(base / "model.safetensors")
    assert any(not torch.equal(a[k], base_state[k]) for k in a if k.startswith("vision."))


def test_bf16_autocast_step_runs(base, pairs, tmp_path):
    out = train(TrainConfig(stage="dpo", out=str(tmp_path / "bf16"), init=str(base), data=str(pairs), batch_size=4,
                            max_steps=1, bf16=True, progress=False))
    loss = float((out / "log.csv").read_text().splitlines()[1].split(",")[4])
    assert math.isfinite(loss) and loss == pytest.approx(math.log(2), abs=0.05)
    assert load_file(out / "model.safetensors")["projector.0.weight"].dtype == torch.float32


def test_recorded_tower_specs_survive_a_change_of_directory(tmp_path, monkeypatch):
    from encoder_probe.pivot.model import _vision_info
    (tmp_path / "tower").mkdir()
    (tmp_path / "w.safetensors").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    info = _vision_info("hf:tower", -2, {"vision_config": "tower"})
    assert info == {"spec": f"hf:{tmp_path / 'tower'}", "layer": -2, "options": {"vision_config": str(tmp_path / "tower")}}
    assert _vision_info("timm:vit_tiny_patch16_224@w.safetensors", None, {})["spec"] == \
        f"timm:vit_tiny_patch16_224@{tmp_path / 'w.safetensors'}"
    assert _vision_info("timm:test_vit", None, {})["spec"] == "timm:test_vit"


def test_paper_config_is_the_papers_recipe(monkeypatch):
    import importlib.util
    from pathlib import Path
    root = Path(__file__).resolve().parents[1] / "experiments" / "pivot"
    spec = importlib.util.spec_from_file_location("pivot_run", root / "run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    for var in ("MMPR_JSONL", "MMPR_IMAGES", "RUNS"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(SpecError, match="MMPR_IMAGES, MMPR_JSONL, RUNS"):
        run.stage_config(root / "paper.json", "dpo")
    monkeypatch.setenv("MMPR_JSONL", "/d/mmpr.jsonl")
    monkeypatch.setenv("MMPR_IMAGES", "/d/images")
    monkeypatch.setenv("RUNS", "/r")
    dpo, sft = run.stage_config(root / "paper.json", "dpo"), run.stage_config(root / "paper.json", "sft")
    assert (dpo.lr, sft.lr, dpo.epochs, dpo.batch_size, dpo.limit) == (1e-6, 5e-6, 3, 256, 20000)
    assert (dpo.beta, dpo.sft_weight, dpo.init, dpo.data) == (0.1, 0.0, "/r/base", "/d/mmpr.jsonl")
    base = run.stage_config(root / "paper.json", "pretrain", strict=False)
    assert base.encoder == "hf:${SIGLIP2_DIR}" and base.encoder_layer == -2


def test_a_local_hf_causal_lm_dir_with_its_tokenizer(base, pairs, tmp_path, toy_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    from encoder_probe.pivot.model import build_mllm
    words = sorted({w for t in texts_of(read_pairs(pairs)) for w in t.replace("?", " ?").split()})
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", "\n", *words])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(r"\s+|\?|\n", behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    lm_dir = tmp_path / "lm"
    tokenizer.save_pretrained(lm_dir)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(lm_dir)
    mllm = build_mllm(str(toy_dir("pivot", toy.write_pivot)), lm=str(lm_dir))
    assert mllm.tokenizer.kind == "hf" and mllm.tokenizer.eos_id == vocab["<eos>"]
    batch = _first_batch(mllm, pairs, 2)
    with torch.no_grad():
        loss = mllm.sft_loss(mllm.image_tokens(batch["pixels"]), batch["question"], batch["chosen"])
        again = load_mllm(save_mllm(mllm, tmp_path / "ckpt"))
        assert torch.equal(again.sft_loss(again.image_tokens(batch["pixels"]), batch["question"], batch["chosen"]), loss)
    assert (tmp_path / "ckpt" / "tokenizer" / "tokenizer.json").is_file()
