"""The trainer scaled out (torchrun / accelerate launch: DDP, FSDP2, DeepSpeed) and the paper's 8-GPU runs.

Multi-process runs here are CPU processes on gloo, launched exactly as on a GPU node; each is compared with one
process at the same global batch (the accumulation makes up the difference), weights and log alike.
"""
import csv
import importlib.util
import json
import os
import re
import shlex
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from encoder_probe import toy
from encoder_probe.cli import main as cli
from encoder_probe.errors import SpecError
from encoder_probe.pivot.train import TrainConfig, _batches, build_trainer
from pivot_common import KILL_SCRIPT, pairs, parts, qwen  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[1]
PIVOT = REPO / "experiments" / "pivot"
def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(argv, killed=False, **env) -> str:
    """Run a launcher from the repo root; its stdout (the failure's tail on a non-zero exit, unless ``killed``)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **env}
    done = subprocess.run([str(a) for a in argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if killed:
        assert done.returncode != 0
    elif done.returncode:  # the log without the warnings
        lines = (done.stdout + done.stderr).splitlines()
        pytest.fail("\n".join(line for line in lines if "Warning" not in line and "warn(" not in line)[-6000:])
    return done.stdout


def _torchrun(nproc: int, *args) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", nproc, "--master_addr", "127.0.0.1",
            "--master_port", _port(), *args]


def _weights(run) -> dict:
    return load_file(os.path.join(run, "model.safetensors"))


def _max_diff(a, b) -> float:
    a, b = _weights(a), _weights(b)
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _rows(run) -> list[dict]:
    with open(os.path.join(run, "log.csv")) as f:
        return list(csv.DictReader(f))


LOGGED = ("loss", "grad_norm", "rewards/margins", "logps/chosen", "lr/vision", "lr/lm", "num_tokens")


def _same_log(one, two, keys=LOGGED, tol=1e-5) -> None:
    a, b = _rows(one), _rows(two)
    assert [(r["step"], r["epoch"], r["phase"]) for r in a] == [(r["step"], r["epoch"], r["phase"]) for r in b]
    for ra, rb in zip(a, b):
        for key in keys:
            if ra[key] or rb[key]:
                assert float(ra[key]) == pytest.approx(float(rb[key]), rel=tol, abs=tol), (key, ra, rb)


def _finished(run, steps) -> None:
    done = json.loads((Path(run) / "pivot_train.json").read_text())
    assert done["finished"] and done["step"] == steps
    assert not (Path(run) / "checkpoints").exists() and not (Path(run) / ".final").exists()


# -- DDP ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("objective", ["dpo", "sft"])
@pytest.mark.slow
def test_ddp_on_two_processes_trains_the_weights_of_one(objective, qwen, pairs, tmp_path):
    """`torchrun --nproc_per_node 2 -m encoder_probe train ...` (gloo) = one process at the same 4 pairs per step
    (1 pair per forward: 2 x 2 accumulated vs 1 x 4), weights and log.csv; checkpoints on."""
    args = ["train", objective, "--init", qwen, "--data", pairs, "--batch-size", "4", "--micro-batch-size", "1",
            "--max-steps", "2", "--lr", "1e-3", "--vision-lr", "2e-3", "--warmup-ratio", "0", "--save-every", "1",
            "--device", "cpu"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli([str(a) for a in args] + ["--out", str(one)]) == 0
    out = _launch(_torchrun(2, "-m", "encoder_probe", *args, "--out", two))
    assert out.count("4 pairs per step (1 x 2 accumulated per process)") == 1  # the main process says it, once
    assert _max_diff(one, qwen) > 1e-4  # it trained
    assert _max_diff(one, two) <= 1e-5
    _same_log(one, two)
    for run in (one, two):
        _finished(run, 2)


@pytest.mark.slow
def test_a_killed_ddp_run_resumes_to_the_weights_of_one_process(qwen, pairs, tmp_path):
    """Both processes killed after step 3 (checkpoint at 2), relaunched: the weights, log and gradient-map
    snapshots of one uninterrupted process (each rank's data order and RNG come back from the checkpoint)."""
    script = tmp_path / "killed.py"
    script.write_text(KILL_SCRIPT)
    settings = [f"init={str(qwen)!r}", f"data={str(pairs)!r}", "batch_size=4", "micro_batch_size=1", "max_steps=4",
                "save_every=2", "snapshot_every=1", "snapshot_records=2"]
    one, two = tmp_path / "one", tmp_path / "two"
    _launch([sys.executable, script, one, 0, *settings])
    _launch(_torchrun(2, script, two, 3, *settings), killed=True)
    assert sorted(p.name for p in (two / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2"]
    out = _launch(_torchrun(2, script, two, 0, *settings))
    assert out.count("resuming from") == 1 and "checkpoint-2" in out
    assert _max_diff(one, two) <= 1e-5
    _same_log(one, two, keys=LOGGED[:-1])  # TRL's running num_tokens restarts from 0 on resume (not checkpointed)
    _finished(two, 4)
    snaps = sorted(p.name for p in (two / "snapshots").glob("*.npz"))
    assert snaps == sorted(p.name for p in (one / "snapshots").glob("*.npz")) and len(snaps) == 5
    for name in snaps:
        a, b = np.load(one / "snapshots" / name), np.load(two / "snapshots" / name)
        for i in range(2):
            np.testing.assert_allclose(a[f"map_{i}"], b[f"map_{i}"], rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_pretrain_on_two_processes_composes_once_and_trains_the_weights_of_one(parts, pairs, tmp_path):
    """The fresh MLLM is composed by the main process first (the others wait, then read it); both phases then run
    as DDP and end where one process ends (two Adam steps a phase: the second depends on the gradients' values,
    not only their signs)."""
    tower, lm = parts
    args = ["train", "pretrain", "--vision", tower, "--lm", lm, "--data", pairs, "--batch-size", "4",
            "--micro-batch-size", "2", "--projector-epochs", "1", "--max-steps", "2", "--lr", "1e-3",
            "--warmup-ratio", "0", "--save-every", "0", "--device", "cpu"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli([str(a) for a in args] + ["--out", str(one)]) == 0
    _launch(_torchrun(2, "-m", "encoder_probe", *args, "--out", two))
    for phase in ("phases/fresh", "phases/projector", "."):
        assert _max_diff(one / phase, two / phase) <= (0 if phase == "phases/fresh" else 1e-5), phase
    _same_log(one, two)
    _same_log(one / "phases" / "projector", two / "phases" / "projector")
    _finished(two, 2)
    assert _max_diff(two / "phases" / "fresh", two) > 1e-4
    assert not list((two / "phases").glob(".*"))  # no half-written compose left by a second writer


# -- FSDP2 -------------------------------------------------------------------------------------------
FSDP_ON_CPU = ("FSDP2 runs only on >= 2 CUDA GPUs here: accelerate 1.15 turns FSDP on only for GPU-class "
               "distributed types (AcceleratorState keeps DistributedType.MULTI_CPU on gloo and ignores "
               "ACCELERATE_USE_FSDP), so a CPU launch of fsdp2.yaml silently trains plain DDP")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason=FSDP_ON_CPU)
def test_fsdp2_on_two_gpus_shards_and_trains_the_weights_of_one(tmp_path, pairs):
    """experiments/pivot/fsdp2.yaml as it is (2 processes, fp32) on a tiny LLaVA-OneVision (SigLIP + Qwen2, the
    classes it wraps): every wrapped layer is an FSDP2 unit with sharded (DTensor) parameters, and the run ends
    with the weights and log of one process."""
    ov = toy.write_hf_mllm(tmp_path / "ov", "llava_onevision", geometry="published", processor=True)
    script = tmp_path / "run.py"
    script.write_text(
        "import json, os, sys\n"
        "from transformers import TrainerCallback\n"
        "from encoder_probe.pivot.train import TrainConfig, train\n"
        "class Record(TrainerCallback):\n"
        "    def on_step_end(self, args, state, control, model=None, **kw):\n"
        "        from torch.distributed.fsdp import FSDPModule\n"
        "        from torch.distributed.tensor import DTensor\n"
        "        units = sorted({type(m).__name__ for m in model.modules() if isinstance(m, FSDPModule)})\n"
        "        sharded = all(isinstance(p, DTensor) for p in model.parameters())\n"
        "        if state.is_world_process_zero:\n"
        "            open(sys.argv[2], 'w').write(json.dumps({'units': units, 'sharded': sharded}))\n"
        f"train(TrainConfig(stage='dpo', init={str(ov)!r}, out=sys.argv[1], data={str(pairs)!r}, batch_size=4, "
        "micro_batch_size=1, max_steps=2, lr=1e-3, warmup_ratio=0.0, save_every=0, progress=False), "
        "callbacks=[Record()])\n")
    env = {"NVIDIA_TF32_OVERRIDE": "0", "CUDA_VISIBLE_DEVICES": "0,1"}
    one, two = tmp_path / "one", tmp_path / "two"
    _launch([sys.executable, script, one, tmp_path / "one.json"], **env)
    _launch([sys.executable, "-m", "accelerate.commands.launch", "--config_file", PIVOT / "fsdp2.yaml",
             "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", _port(), script, two,
             tmp_path / "two.json"], **env)
    record = json.loads((tmp_path / "two.json").read_text())
    assert record["sharded"] and {"Qwen2DecoderLayer", "SiglipEncoderLayer"} <= {
        u.removeprefix("FSDP") for u in record["units"]}
    assert _max_diff(one, two) <= 1e-5
    _same_log(one, two)
    _finished(two, 2)


# -- the paper's configs -----------------------------------------------------------------------------
def _accelerate_config(path):
    from accelerate.commands.config.config_args import load_config_from_file
    return load_config_from_file(str(path))


def test_accelerate_configs_are_what_the_paper_ran(parts):
    """8 GPUs on one node; FSDP2 wraps the layer classes PIVOT's composed model (SigLIP + Qwen2 in OneVision) has
    and gathers a full state dict (the final save_pretrained needs it); the ZeRO yamls point at the JSONs and
    leave mixed precision to them (accelerate refuses it next to a deepspeed_config_file)."""
    from accelerate.utils import DistributedType

    from encoder_probe.pivot.compose import compose_mllm
    configs = {name: _accelerate_config(PIVOT / f"{name}.yaml") for name in ("ddp", "fsdp2", "zero2", "zero3")}
    assert {c.num_processes for c in configs.values()} == {8} and {c.num_machines for c in configs.values()} == {1}
    assert configs["ddp"].distributed_type == DistributedType.MULTI_GPU and configs["ddp"].mixed_precision == "bf16"
    fsdp = configs["fsdp2"]
    assert fsdp.distributed_type == DistributedType.FSDP and fsdp.mixed_precision == "bf16"
    assert fsdp.fsdp_config["fsdp_version"] == 2
    assert fsdp.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    assert fsdp.fsdp_config["fsdp_activation_checkpointing"] is False  # --gradient-checkpointing does it
    model, _ = compose_mllm(parts[0], parts[1])
    classes = {type(m).__name__ for m in model.modules()}
    wrapped = fsdp.fsdp_config["fsdp_transformer_layer_cls_to_wrap"].split(",")
    assert set(wrapped) == {"Qwen2DecoderLayer", "SiglipEncoderLayer"} <= classes
    for stage in (2, 3):
        ds = configs[f"zero{stage}"]
        assert ds.distributed_type == DistributedType.DEEPSPEED and ds.mixed_precision is None
        target = REPO / ds.deepspeed_config["deepspeed_config_file"]
        assert target == PIVOT / f"zero{stage}.json"
        assert json.loads(target.read_text())["zero_optimization"]["stage"] == stage
        assert ds.deepspeed_config["zero3_init_flag"] is (stage == 3)


def _cli_config(argv, monkeypatch) -> TrainConfig:
    """The TrainConfig `probe train ARGV` runs (the stage itself not run)."""
    seen = []
    with monkeypatch.context() as m:
        m.setattr("encoder_probe.pivot.train.train", lambda config, **kw: seen.append(config) or Path(config.out))
        assert cli(argv) == 0
    return seen[0]


def _autos(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _autos(value, f"{prefix}{key}.")
        elif value == "auto":
            yield prefix + key


# the "auto" values transformers' HfTrainerDeepSpeedConfig fills (from TrainingArguments and the model's width)
FILLED = {"bf16.enabled", "fp16.enabled", "train_batch_size", "train_micro_batch_size_per_gpu",
          "gradient_accumulation_steps", "gradient_clipping", "zero_optimization.reduce_bucket_size",
          "zero_optimization.stage3_prefetch_bucket_size", "zero_optimization.stage3_param_persistence_threshold"}


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_configs(stage):
    """Valid JSON, the stage in its name, bf16 and the batch arithmetic left "auto" to the Trainer, and no optimizer
    or scheduler section: DeepSpeed would then build its own AdamW over one group and drop the per-part learning
    rates (the tower's own) that the trainer's AdamW groups carry; ZeRO-3 gathers 16-bit weights on save (else
    save_model writes no weights into OUT)."""
    config = json.loads((PIVOT / f"zero{stage}.json").read_text())
    zero = config["zero_optimization"]
    assert zero["stage"] == stage and config["bf16"] == {"enabled": "auto"}
    assert {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
            "gradient_clipping"} <= set(_autos(config)) <= FILLED
    assert "optimizer" not in config and "scheduler" not in config
    assert zero["offload_optimizer"]["device"] == "none"
    if stage == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True


def test_the_deepspeed_flag_reaches_the_training_arguments(qwen, pairs, tmp_path, monkeypatch):
    """`probe train --deepspeed FILE` -> TrainConfig.deepspeed -> TrainingArguments(deepspeed=FILE), next to the
    per-process batch over the world; without DeepSpeed installed the run stops in one line before any weights."""
    import trl
    seen = {}

    class Stop(Exception):
        pass

    def config(**kwargs):
        seen.update(kwargs)
        raise Stop

    zero3 = str(PIVOT / "zero3.json")
    parsed = _cli_config(["train", "dpo", "--init", str(qwen), "--data", str(pairs), "--out", str(tmp_path / "r"),
                          "--deepspeed", zero3, "--batch-size", "8", "--micro-batch-size", "2", "--bf16",
                          "--gradient-checkpointing"], monkeypatch)
    assert parsed.deepspeed == zero3
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(trl, "DPOConfig", config)
    with pytest.raises(Stop):
        build_trainer(replace(parsed, trainable=("vision", "projector", "lm")), "dpo",
                      str(qwen), tmp_path / "r", phase="dpo")
    assert seen["deepspeed"] == zero3 and seen["bf16"] and seen["activation_checkpointing"]
    assert (seen["per_device_train_batch_size"], seen["gradient_accumulation_steps"]) == (2, 2)
    monkeypatch.delenv("WORLD_SIZE")
    if importlib.util.find_spec("deepspeed") is None:
        with pytest.raises(SpecError, match=r"^--deepspeed .*zero3.json: DeepSpeed is not installed \(pip install"):
            parsed.check()
    bad = tmp_path / "bad.json"
    bad.write_text("{stage: 3")
    with pytest.raises(SpecError, match=r"^--deepspeed .*bad.json: not a readable JSON file"):
        replace(parsed, deepspeed=str(bad)).check()


# -- paper.json and run.py ---------------------------------------------------------------------------
def _paper() -> dict:
    return json.loads((PIVOT / "paper.json").read_text())


def _placeholders(root: Path) -> dict:
    """A path for every variable paper.json names (dirs; JSONLs as files), as the paper's machine would have."""
    values = {}
    for name in _paper()["env"]:
        path = root / name.lower()
        if name.endswith("JSONL"):
            path.write_text("")
        else:
            path.mkdir()
        values[name] = str(path)
    (Path(values["RUNS"]) / "base").mkdir()
    for run in ("sft", "dpo"):
        (Path(values["RUNS"]) / run).mkdir()
    return values


def _parsed(line: str, monkeypatch) -> tuple:
    """(accelerate's parsed launch args, its config, the TrainConfig `probe train` builds from the rest)."""
    from accelerate.commands.launch import launch_command_parser
    argv = shlex.split(line)
    assert argv[:2] == ["accelerate", "launch"]
    launch = launch_command_parser().parse_args(argv[2:])
    assert launch.module and launch.training_script == "encoder_probe"
    return launch, _accelerate_config(REPO / launch.config_file), _cli_config(launch.training_script_args, monkeypatch)


def test_paper_commands_parse_and_carry_the_paper_numbers(tmp_path, monkeypatch, capsys):
    paper = _paper()
    values = _placeholders(tmp_path)
    assert paper["order"] == list(paper["stages"]) and paper["gpus"] == 8
    used = set(re.findall(r"\$\{(\w+)\}", " ".join(paper["stages"].values())))
    assert used == set(paper["env"])  # every variable is described, every described one is used
    configs = {}
    for stage, line in paper["stages"].items():
        line = re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], line)
        launch, accelerate, config = _parsed(line, monkeypatch)
        config.check()
        configs[stage] = config
        assert accelerate.num_processes == paper["gpus"]
        monkeypatch.setenv("WORLD_SIZE", str(accelerate.num_processes))
        assert _batches(config) == (8, 4)  # 256 pairs per step = 8 GPUs x 8 per forward x 4 accumulated
        monkeypatch.delenv("WORLD_SIZE")
        assert (config.batch_size, config.micro_batch_size) == (256, 8)
        assert config.bf16 and config.gradient_checkpointing
        assert config.warmup_ratio == 0.03 and config.weight_decay == 0 and config.vision_lr is None
        assert config.freeze == () and config.deepspeed is None  # the tower trains; DeepSpeed from the yaml
        zero = "zero2" if config.stage in ("pretrain", "transplant") else "zero3"  # stage 1: ZeRO-2, stage 2: ZeRO-3
        assert launch.config_file == f"experiments/pivot/{zero}.yaml"
    runs = values["RUNS"]
    for stage, lr in (("sft", 5e-6), ("dpo", 1e-6)):
        c = configs[stage]
        assert (c.stage, c.init, c.out) == (stage, f"{runs}/base", f"{runs}/{stage}")
        assert (c.lr, c.epochs, c.limit) == (lr, 3, 20000)
        assert (c.data, c.image_root) == (values["MMPR_JSONL"], values["MMPR_IMAGES"])
    assert (configs["dpo"].beta, configs["dpo"].sft_weight) == (0.1, 0.0)
    base = configs["pretrain"]
    assert (base.vision, base.lm, base.out) == (values["SIGLIP2_DIR"], values["QWEN25_1_5B_DIR"], f"{runs}/base")
    assert (base.kind, base.vision_feature_layer) == ("llava_onevision", -2)  # SigLIP2 without its last block
    for source in ("sft", "dpo"):
        t = configs[f"transplant-{source}"]
        assert (t.stage, t.vision_from, t.lm, t.kind) == ("transplant", f"{runs}/{source}", values["QWEN25_1_5B_DIR"],
                                                          "llava_onevision")
        assert (t.lr, t.epochs, t.projector_epochs) == (base.lr, base.epochs, base.projector_epochs)
    capsys.readouterr()


def _run_py():
    spec = importlib.util.spec_from_file_location("pivot_run", PIVOT / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_run_py_fills_the_variables_and_names_the_missing_ones(tmp_path, monkeypatch, capsys):
    run = _run_py()
    for name in _paper()["env"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RUNS", "/runs")
    assert run.main(["dpo"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("run.py: error: ") and "MMPR_IMAGES, MMPR_JSONL" in err
    assert "RUNS" not in err.split("variables")[-1]
    assert run.main(["dpo", "--dry-run"]) == 0
    line = capsys.readouterr().out.strip()
    assert line == _paper()["stages"]["dpo"].replace("${RUNS}", "/runs")
    assert run.main(["nope"]) == 2 and "no stage nope" in capsys.readouterr().err
    exp = tmp_path / "exp.json"  # a stage is its command, run as it is; its exit code is run.py's
    exp.write_text(json.dumps({"stages": {"a": "${PY} -c 'import sys; sys.exit(0)'",
                                          "b": "${PY} -c 'import sys; sys.exit(3)'"}}))
    monkeypatch.setenv("PY", sys.executable)
    assert run.main(["a", "b", "--config", str(exp)]) == 3
    assert "stage b failed (exit 3)" in capsys.readouterr().err
