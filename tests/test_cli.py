"""The `probe` command: inspect reports the right layer and grid; bad input is one line, exit 2."""
import json
import os
import subprocess
import sys

import pytest
import torch

from encoder_probe import load_encoder, toy
from encoder_probe.cli import main
from encoder_probe.errors import CheckpointError


class _Evil:
    """Unpickling this would create a file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"
    weights = tmp_path / "model.pth"
    torch.save({"patch_embed.proj.weight": torch.zeros(1), "payload": _Evil(str(marker))}, weights)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        load_encoder(f"timm:vit_tiny_patch16_224@{weights}")
    assert main(["inspect", f"timm:vit_tiny_patch16_224@{weights}"]) == 2
    err = capsys.readouterr().err.strip()
    assert str(weights) in err and len(err.splitlines()) == 1
    assert not marker.exists()


@pytest.mark.parametrize("name,options,layer,grid,patches", [
    ("pivot", [], "2 of 3", "4x4", "(2, 16, 64)"),
    ("onevision", [], "2 of 3", "4x4", "(2, 16, 64)"),
    ("internvl", [], "final", "4x4", "(2, 16, 256)"),
    ("qwen2_5_vl", ["--image-size", "32"], "3 of 3", "8x8", "(2, 64, 64)"),
])
def test_inspect_prints_layer_and_grid(toy_dir, capsys, name, options, layer, grid, patches):
    writers = {"pivot": toy.write_pivot, "onevision": lambda d: toy.write_hf_mllm(d, "llava_onevision"),
               "internvl": lambda d: toy.write_hf_mllm(d, "internvl"),
               "qwen2_5_vl": lambda d: toy.write_hf_mllm(d, "qwen2_5_vl")}
    path = toy_dir(name, writers[name])
    assert main(["inspect", str(path), *options]) == 0
    out = capsys.readouterr().out
    lines = {line[:18].strip(): line[18:].strip() for line in out.splitlines()}
    assert lines["layer"].startswith(layer)
    assert f"grid {grid}" in lines["tokens"] and f"patches {patches}" in lines["tokens"]
    assert main(["inspect", str(path), *options, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["grid"] == grid and info["fingerprint"] == load_encoder(
        str(path), **({"image_size": 32} if options else {})).fingerprint


def test_inspect_layer_override_and_projector(toy_dir, capsys):
    path = toy_dir("qwen2_5_vl", lambda d: toy.write_hf_mllm(d, "qwen2_5_vl"))
    assert main(["inspect", str(path), "--image-size", "32", "--layer", "-2", "--with-projector", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layer"] == 2 and info["grid"] == "4x4" and info["patches"] == [2, 16, 64]


@pytest.mark.parametrize("argv,needle", [
    (["inspect", "nosuch:thing"], "unknown source"),
    (["inspect", "timm:"], "malformed spec"),
    (["inspect", "timm:vit_tiny_patch16_224@"], "malformed spec"),
    (["inspect", "/definitely/not/here"], "no such directory"),
    (["run", "--encoder", "timm:vit_tiny_patch16_224", "--suite", "imagenet,nosuch", "--out", "OUT"], "unknown probe"),
    (["run", "--encoder", "timm:vit_tiny_patch16_224", "--suite", "x", "--data", "=/data", "--out", "OUT"],
     "expected NAME[=ROOT]"),
    (["extract", "--encoder", "timm:test_vit", "--data", "imagenet1k=/data", "--out", "OUT"],
     "unknown dataset 'imagenet1k'"),
    (["extract", "--encoder", "timm:test_vit", "--data", "mnist-5k", "--split", "test", "--out", "OUT"],
     "split must be train or val"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, capsys, argv, needle):
    argv = [a.replace("OUT", str(tmp_path / "out")) for a in argv]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0]
    assert not (tmp_path / "out").exists()


def test_the_console_script_reports_bad_input_in_one_line(tmp_path):
    """The same path through a real interpreter, once: what a shell sees."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "encoder_probe.cli", "inspect", "nosuch:thing"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        proc.stderr.strip()] and "unknown source" in proc.stderr


def test_directory_without_checkpoint_names_the_file(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no recognisable checkpoint" in err and str(tmp_path) in err


def test_list_shows_sources_towers_and_probes(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for needle in ("timm", "open_clip", "hf-mllm", "llava", "qwen2-vl", "google/siglip2-so400m-patch16-384",
                   "openai/clip-vit-large-patch14-336", "Probes"):
        assert needle in out


def test_run_records_a_failing_probe_and_keeps_going(tmp_path, capsys):
    from encoder_probe.probe import _IN_PROCESS, register_probe

    from dataclasses import dataclass

    from encoder_probe.probe import Metric, Probe, ProbeResult

    @dataclass
    class Nothing:
        pass

    class MeanNorm(Probe):
        Config = Nothing

        def run(self, ctx, cfg):
            encoder = ctx.encoder
            pixels = torch.zeros(1, 3, *encoder.preprocess.size)
            with torch.no_grad():
                value = encoder.pool(encoder.forward_tokens(pixels), "mean").norm().item()
            return ProbeResult(metrics={"mean_norm": Metric(value)})

    class Broken(Probe):
        Config = Nothing

        def run(self, ctx, cfg):
            raise RuntimeError("boom")

    register_probe("meannorm", MeanNorm())
    register_probe("broken", Broken())
    try:
        code = main(["run", "--encoder", "timm:vit_tiny_patch16_224", "--suite", "meannorm,broken",
                     "--out", str(tmp_path)])
    finally:
        _IN_PROCESS.clear()
    assert code == 1
    (results,) = list(tmp_path.glob("*/results.json"))
    record = json.loads(results.read_text())
    encoder = load_encoder("timm:vit_tiny_patch16_224")
    assert record["encoder"]["fingerprint"] == encoder.fingerprint
    with torch.no_grad():
        expected = encoder.pool(encoder.forward_tokens(torch.zeros(1, 3, 224, 224)), "mean").norm().item()
    assert record["probes"]["meannorm"]["metrics"]["mean_norm"]["value"] == pytest.approx(expected, rel=1e-6)
    assert record["probes"]["broken"]["status"] == "failed" and "boom" in record["probes"]["broken"]["error"]
    assert not list(tmp_path.glob("*/.*.tmp"))
