"""Issue 15, report and run UX: runs in the order they were run and a chosen reference, progress
bars that name probe and encoder, where a PIVOT tower's weights came from, whole one-line pickle
refusals, no foreign warnings, report.html inside the page, and metrics left out when undefined."""
import json
import logging
import os
import re
import shutil
import subprocess
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from encoder_probe import load_encoder
from encoder_probe.cli import main
from encoder_probe.errors import CheckpointError, DataError
from encoder_probe.report import check, compare
from conftest import write_ade20k, write_imagefolder
from test_report import metric, probe, record, write

KNN = {"ks": [10], "temperature": 0.07}


def _run(spec, fingerprint, created, value, **probes):
    rec = record(spec, fingerprint, {"knn": probe({"top1@k=10": metric(value)}, KNN), **probes})
    rec["created"] = created
    return rec


@pytest.fixture
def run_dir(tmp_path):
    """Three encoders as `probe run --encoder C --encoder A --encoder B` writes them: fingerprint
    directories whose names sort A, B, C, created in the order C, A, B."""
    out = tmp_path / "out"
    specs = {"c": ("timm:vit_c", "2026-11-26T10:00:00.000001+00:00", 0.70),
             "a": ("timm:vit_a", "2026-11-26T10:00:05+00:00", 0.60),
             "b": ("timm:vit_b", "2026-11-26T10:01:00+00:00", 0.80)}
    paths = {}
    for fp, (spec, created, value) in specs.items():
        rec = _run(spec, fp, created, value)
        paths[fp] = write(out / (fp * 16) / "results.json", rec)
    return out, paths


# -- 1. order and reference ------------------------------------------------------------------------
def test_a_run_dir_keeps_the_order_the_encoders_were_run_in(run_dir):
    out, paths = run_dir
    result = compare(out)
    assert result.labels == ["timm:vit_c", "timm:vit_a", "timm:vit_b"]  # created order, not a/b/c dirs
    assert list(result.wide.columns) == ["probe", "metric", "timm:vit_c", "timm:vit_a", "Δ timm:vit_a",
                                         "timm:vit_b", "Δ timm:vit_b"]
    deltas = result.table.set_index("run")["delta"]
    assert pd.isna(deltas["timm:vit_c"]) and deltas["timm:vit_a"] == pytest.approx(-0.10)  # against C, the first
    assert deltas["timm:vit_b"] == pytest.approx(0.10)
    # results named one by one keep the command-line order
    assert compare([paths["b"], paths["c"], paths["a"]]).labels == ["timm:vit_b", "timm:vit_c", "timm:vit_a"]
    # the regression gate reads a run dir in the same order
    assert list(check(out, paths["c"], {"*": 1}).table["run"]) == ["timm:vit_c", "timm:vit_a", "timm:vit_b"]


def test_reference_by_label_spec_or_fingerprint_prefix(run_dir, tmp_path):
    out, _ = run_dir
    for reference in ("timm:vit_b", "bbbb", "BBBBbbbb", 2):
        result = compare(out, reference=reference)
        assert result.reference == 2 and result.reference_label == "timm:vit_b"
        deltas = result.table.set_index("run")["delta"]
        assert pd.isna(deltas["timm:vit_b"]) and deltas["timm:vit_c"] == pytest.approx(-0.10)
        assert list(result.wide.columns) == ["probe", "metric", "timm:vit_c", "Δ timm:vit_c", "timm:vit_a",
                                             "Δ timm:vit_a", "timm:vit_b"]
    written = compare(out, tmp_path / "report", reference="timm:vit_b")
    assert "Δ against timm:vit_b (the reference run)" in (tmp_path / "report" / "report.html").read_text()
    assert "Δ against timm:vit_b (the reference run)" in written.files["report.md"].read_text()
    with pytest.raises(DataError) as err:
        compare(out, tmp_path / "refused", reference="timm:vit_z")
    message = str(err.value)
    assert "\n" not in message and "'timm:vit_z'" in message
    assert "timm:vit_c, timm:vit_a, timm:vit_b" in message  # the run labels, in run order
    assert not (tmp_path / "refused").exists()
    with pytest.raises(DataError, match="no such run"):
        compare(out, reference="bb")  # a fingerprint prefix needs 4+ characters


# -- 7. a metric present in one run and absent (undefined) in another ------------------------------
def test_a_metric_left_out_as_undefined_is_na_not_a_regression(run_dir, tmp_path):
    out, paths = run_dir
    rich = json.loads(paths["c"].read_text())  # an older baseline: top-5 of 3 classes, trivially 1.0
    rich["probes"]["knn"] = probe({"top1@k=10": metric(0.70), "top5@k=10": metric(1.0)}, KNN)
    write(paths["c"], rich)
    lean = json.loads(paths["a"].read_text())
    lean["probes"]["knn"]["undefined_metrics"] = {"top5@k=10": "top-5 of 3 classes is 1.0 by construction"}
    write(paths["a"], lean)
    result = compare(out, tmp_path / "report")
    md = (tmp_path / "report" / "table.md").read_text()
    assert "| knn | top5@k=10 | 1.0000 | n/a |  | - |  |" in md, md  # n/a: undefined; -: just absent
    assert "knn/top5@k=10 is left out for timm:vit_a: top-5 of 3 classes is 1.0 by construction" in result.notes
    assert (tmp_path / "report" / "metric_knn.png").stat().st_size > 0  # a bar chart with a run lacking a metric
    assert '<td class="num">n/a</td>' in result.files["report.html"].read_text()

    gate = check(paths["a"], paths["c"], {"*": 0.2})
    table = gate.table.set_index("metric")
    assert table.loc["top5@k=10", "status"] == "undefined" and gate.exit_code == 0
    assert gate.notes == ["knn/top5@k=10 is not checked for timm:vit_a: top-5 of 3 classes is 1.0 by construction"]
    assert check(paths["b"], paths["c"], {"*": 0.2}).exit_code == 1  # merely missing still fails the gate


def test_knn_leaves_out_top5_of_five_classes_or_fewer():
    from encoder_probe.context import Labelled
    from probes.knn import KNNConfig, KNNProbe

    class Features:  # what the probe reads of the train FeatureSet
        layers = ["final"]

        def __init__(self, n):
            self.num_classes = n

    class Context:  # what the probe asks of its run context
        def __init__(self, labelled):
            self._labelled = labelled

        def labelled(self, cfg, layers=None, **kwargs):
            return self._labelled

        def device_for(self, cfg):
            return "cpu"

    rng = np.random.default_rng(0)
    found = {}
    for n in (5, 6):
        y, yv = np.arange(4 * n) % n, np.arange(2 * n) % n
        x, xv = (np.eye(n, dtype=np.float32)[v] + 0.1 * rng.random((len(v), n), dtype=np.float32) for v in (y, yv))
        labelled = Labelled(x, y, xv, yv, Features(n), Features(n), np.array([f"val/{i}.png" for i in range(len(yv))]))
        found[n] = KNNProbe().run(Context(labelled), KNNConfig(ks=[3]))
    assert set(found[5].metrics) == {"top1@k=3"} and found[5].metrics["top1@k=3"].value == 1.0
    assert found[5].undefined == {"top5@k=3": "top-5 of 5 classes is 1.0 by construction"}
    assert set(found[6].metrics) == {"top1@k=3", "top5@k=3"} and not found[6].undefined


# -- 2. progress bars ------------------------------------------------------------------------------
def test_seg_and_gradcam_bars_name_the_probe_and_the_encoder(tmp_path, capsys):
    from encoder_probe.runner import run_probe
    ade = write_ade20k(tmp_path / "ade", n=2, num_classes=5, split="training")
    write_ade20k(ade, n=1, num_classes=5, split="validation", seed=1)
    images = write_imagefolder(tmp_path / "inet", per_class=2, size=(24, 24))
    write_imagefolder(images, per_class=1, split="val", seed=1, size=(24, 24))
    encoder = load_encoder("timm:test_vit")
    seg = run_probe("seg", encoder, data={"ade20k": str(ade)}, options={"epochs": 1, "lrs": [0.01], "show": 0},
                    cache=tmp_path / "cache", progress=True)
    assert seg["status"] == "ok", seg.get("error")
    gradcam = dict(data={"imagenet": str(images), "ade20k": str(ade)},
                   options={"target": "head", "limit": 1, "methods": ["gradcam"]}, cache=tmp_path / "cache")
    assert run_probe("gradcam", encoder, progress=True, **gradcam)["status"] == "ok"
    err = capsys.readouterr().err  # not a terminal: the bars show all the same
    for desc in ("seg [timm:test_vit] lr sweep", "seg [timm:test_vit] refit", "gradcam [timm:test_vit] head maps"):
        assert re.search(re.escape(desc) + r": 100%\|.*\| \d+/\d+", err), (desc, err[-2000:])
    run_probe("gradcam", encoder, progress=False, **gradcam)
    assert capsys.readouterr().err == ""  # the run's progress flag turns every bar off


def test_align_null_bar_and_short_specs(capsys):
    from encoder_probe.alignment import LinearCKA, permutation_null
    from encoder_probe.encoders.registry import short_spec
    x = np.random.default_rng(0).normal(size=(20, 4))
    permutation_null(LinearCKA(False), x, x, repeats=3, progress=True, label="timm:a vs timm:b")
    assert re.search(r"align \[timm:a vs timm:b\] null \S+ \(seed 0\): 100%\|.*\| 3/3", capsys.readouterr().err)
    assert short_spec("/ckpts/pivot-dpo/") == "pivot-dpo" and short_spec("timm:test_vit") == "timm:test_vit"
    assert short_spec("timm:vit_small_patch16_224@/ckpt/sft.safetensors") == "timm:vit_small_…@sft.safetensors"
    long = short_spec("timm:vit_small_patch16_224.augreg_in21k@/runs/2026/sft-step-10000.safetensors")
    assert len(long) == 32 and long.startswith("timm:vit_sma") and long.endswith("0.safetensors") and "…" in long


# -- 3. where a PIVOT checkpoint's weights come from ------------------------------------------------
def test_a_trained_mllm_names_its_stage_and_origin(tmp_path):
    """A `probe train` output is a plain save_pretrained dir; its pivot_train.json says how it was made."""
    import json

    from encoder_probe import toy
    ckpt = toy.write_hf_mllm(tmp_path / "sft", "qwen2_vl")
    (ckpt / "pivot_train.json").write_text(json.dumps({"stage": "sft", "step": 40, "finished": True,
                                                       "config": {"init": "/ckpts/base"}}))
    details = load_encoder(str(ckpt)).describe()
    assert details["stage"] == "sft" and details["trained"] == "probe train sft, 40 steps from /ckpts/base"
    assert "stage" not in load_encoder(str(toy.write_hf_mllm(tmp_path / "plain", "qwen2_vl"))).describe()


# -- 4. the pickle refusal, whole and on one line ---------------------------------------------------
class _RunsCode:
    def __init__(self, call, arg):
        self.call, self.arg = call, arg

    def __reduce__(self):
        return (self.call, (self.arg,))


@pytest.mark.parametrize("call, named", [(os.system, "GLOBAL posix.system = os.system is not allowed"),
                                         (exec, "GLOBAL builtins.exec is not allowed")])
def test_a_pickle_that_runs_code_is_refused_naming_the_global(tmp_path, capsys, call, named):
    marker = tmp_path / "ran"
    command = f"touch {marker}" if call is os.system else f"open({str(marker)!r}, 'w').close()"
    evil = tmp_path / "weights.pt"
    torch.save({"blocks.0.weight": torch.zeros(2), "payload": _RunsCode(call, command)}, evil)  # a normal pickle
    with pytest.raises(CheckpointError) as err:
        load_encoder(f"timm:test_vit@{evil}")
    message = str(err.value)
    assert message == (f"{evil}: refused to unpickle: it asks to run code ({named}); only plain tensors and "
                       "containers are read (torch.load weights_only=True)")
    assert main(["inspect", f"timm:test_vit@{evil}"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"probe: error: {message}"]
    assert not marker.exists()  # nothing ran


# -- 5. foreign warnings ----------------------------------------------------------------------------
def test_open_clip_random_init_is_not_a_foreign_warning(caplog):
    root = logging.getLogger()
    handlers, filters = list(root.handlers), list(root.filters)
    with caplog.at_level(logging.INFO):
        encoder = load_encoder("open_clip:ViT-S-32")
    assert encoder.describe()["weights"] == "random init"  # we say it ourselves
    assert "No pretrained weights loaded" not in caplog.text
    assert root.handlers == handlers and root.filters == filters  # no basicConfig handler left behind


def test_a_huge_image_gets_our_one_line_not_pils_warning(tmp_path, monkeypatch, caplog):
    from PIL import Image

    from encoder_probe.data.images import load_mask, load_rgb
    data = write_imagefolder(tmp_path / "data", classes=("cat", "dog"), per_class=1, size=(40, 50))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)  # 2000 pixels: over the limit, under twice it
    path = data / "train" / "cat" / "cat_000.png"
    with warnings.catch_warnings(record=True) as seen, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        assert load_rgb(path).size == (50, 40)  # still read
        Image.fromarray(np.zeros((40, 50), np.uint8)).save(tmp_path / "mask.png")
        assert load_mask(tmp_path / "mask.png").shape == (40, 50)
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("encoder_probe")]
    assert ours == [f"warning: {path}: 50x40 image (2,000 pixels) is over PIL's decompression-bomb limit "
                    "(1,500); read anyway", f"warning: {tmp_path / 'mask.png'}: 50x40 image (2,000 pixels) is over "
                    "PIL's decompression-bomb limit (1,500); read anyway"]
    assert "DecompressionBomb" not in caplog.text


# -- 6. report.html stays inside the page -----------------------------------------------------------
def test_wide_report_fits_a_1000px_window_in_chromium(tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed and could not be (`make chromium` needs apt-get as root)")
    long = "/mnt/checkpoints/experiments/2026-11-26/pivot-siglip2-so400m-patch16-384-{}-lr1e-6-beta0.1/step-0020000"
    runs = []
    for i, stage in enumerate(("stage1-projector-only", "sft-on-chosen-responses", "dpo-sigmoid-from-sft")):
        rec = _run(f"timm:vit_so400m_patch16_siglip_384@{long.format(stage)}/model.safetensors", "abc"[i],
                   f"2026-11-26T10:0{i}:00+00:00", 0.5 + i / 10)
        rec["data"]["imagenet"]["root"] = "/data/" + "x" * 120
        runs.append(write(tmp_path / "runs" / str(i) / "results.json", rec))
    out = tmp_path / "report"
    compare(runs, out, plots=False)
    page = tmp_path / "measure.html"
    page.write_text((out / "report.html").read_text().replace("</body>", (
        "<script>window.addEventListener('load', () => { document.body.setAttribute('data-fit', "
        "document.documentElement.scrollWidth + 'x' + window.innerWidth); });</script></body>")))
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                          "--disable-component-update", "--disable-sync", "--no-first-run",
                          f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=3000",
                          "--window-size=1000,800", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    fit = re.search(r'data-fit="(\d+)x(\d+)"', dom.stdout)
    assert fit, dom.stderr[-2000:]
    scroll_width, viewport = map(int, fit.groups())
    assert viewport == 1000 and scroll_width <= viewport, (scroll_width, viewport)
    assert "sft-on-chosen-responses" in dom.stdout  # the long specs are in the page, wrapped
