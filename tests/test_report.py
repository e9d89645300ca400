"""Reports: compare and check on hand-written results.json files (exact tables, exit codes, refusals),
differences judged by the paired bootstrap over per-item outcomes (items files beside results.json),
the runner's results schema, and report.html in headless Chromium (every image loads)."""
import copy
import hashlib
import json
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from encoder_probe.cli import main
from encoder_probe.errors import DataError
from encoder_probe.report import check, compare, load_results
from encoder_probe.report.compare import noise
from conftest import write_imagefolder


def metric(value, ci=None, higher=True, values=None):
    """A metric as results.json version 2 wrote it: ci95 from the seeds, no per-item statistic."""
    m = {"value": value, "higher_is_better": higher, "values": values or [value]}
    if ci is not None:
        m["ci95"] = ci
    return m


LINEAR_CONFIG = {"Cs": [0.1, 1.0, 10.0], "solver": "torch", "pool": "mean", "seeds": 3, "layers": ["final"],
                 "device": None}  # version 2: runtime settings were in the config
PROTOCOL = {"Cs": [0.1, 1.0, 10.0], "solver": "torch", "pool": "mean", "layers": "final"}  # version 3


def probe(metrics, config=None, **extra):
    from encoder_probe.probe import config_hash
    config = copy.deepcopy(config if config is not None else LINEAR_CONFIG)
    return {"status": "ok", "metrics": metrics, "config": config, "config_hash": config_hash(config),
            "data": {"train": 240, "val": 60}, "wall_s": 1.0, **extra}


def record(spec, fingerprint, probes, version=2):
    return {"schema_version": version, "created": "2026-11-26T00:00:00+00:00",
            "encoder": {"spec": spec, "source": spec.split(":")[0], "fingerprint": fingerprint * 64,
                        "layer": "final", "pooling": "mean", "n_params": 1000},
            "data": {"imagenet": {"root": "/data", "splits": {"train": 240, "val": 60}, "content_hash": "ab" * 32}},
            "env": {"device": "cpu", "dtype": "float32"}, "probes": probes}


def write(path, rec):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec))
    return path


@pytest.fixture
def runs(tmp_path):
    """Two runs with CIs (one difference outside the noise, one inside), a CI-less probe, a
    lower-is-better metric and a failed probe."""
    knn_config = {"ks": [10], "temperature": 0.07}
    a = record("timm:vit_small@/ckpt/sft.safetensors", "a", {
        "imagenet": probe({"top1": metric(0.80, [0.78, 0.82]), "top5": metric(0.95, [0.93, 0.97]),
                           "loss": metric(1.0, [0.9, 1.1], higher=False)}),
        "knn": probe({"top1@k=10": metric(0.70)}, knn_config)})
    b = record("timm:vit_small@/ckpt/dpo.safetensors", "b", {
        "imagenet": probe({"top1": metric(0.75, [0.73, 0.77]), "top5": metric(0.94, [0.92, 0.96]),
                           "loss": metric(0.8, [0.7, 0.95], higher=False)}),
        "knn": probe({"top1@k=10": metric(0.725)}, knn_config),
        "seg": {"status": "failed", "error": "RuntimeError: boom", "wall_s": 0.1}})
    return write(tmp_path / "runs" / "a" / "results.json", a), write(tmp_path / "runs" / "b" / "results.json", b)


def test_noise_rule_by_hand():
    assert noise({"ci95": [0.78, 0.82]}, {"ci95": [0.73, 0.77]}) == "outside"
    assert noise({"ci95": [0.78, 0.82]}, {"ci95": [0.82, 0.9]}) == "inside"  # touching intervals overlap
    assert noise({"ci95": [0.78, 0.82]}, {"value": 0.5}) == ""  # no CI on one side: no claim


def test_compare_writes_exact_tables(runs, tmp_path):
    out = tmp_path / "report"
    result = compare(list(runs), out)
    long = pd.read_csv(out / "table.csv")
    assert list(long.columns) == ["probe", "metric", "run", "value", "ci_low", "ci_high", "ci_over", "seed_ci_low",
                                  "seed_ci_high", "n_seeds", "higher_is_better", "delta", "delta_ci_low",
                                  "delta_ci_high", "p_value", "paired", "noise", "noise_rule"]
    rows = {(r.probe, r.metric, r.run): r for r in long.itertuples()}
    a, b = "timm:vit_small@sft.safetensors", "timm:vit_small@dpo.safetensors"
    assert result.labels == [a, b]
    top1 = rows[("imagenet", "top1", b)]
    assert top1.value == 0.75 and (top1.ci_low, top1.ci_high) == (0.73, 0.77)
    assert top1.delta == pytest.approx(-0.05) and top1.noise == "outside"
    assert top1.noise_rule == "ci-overlap" and top1.ci_over == "seeds"  # version 2: no items, CIs from seeds
    assert pd.isna(top1.p_value) and pd.isna(top1.paired) and pd.isna(top1.delta_ci_low)
    assert rows[("imagenet", "top5", b)].noise == "inside"
    assert rows[("imagenet", "top5", b)].delta == pytest.approx(-0.01)
    assert pd.isna(rows[("knn", "top1@k=10", b)].noise) and rows[("knn", "top1@k=10", b)].delta == pytest.approx(0.025)
    assert pd.isna(rows[("imagenet", "top1", a)].delta)  # the reference run has no delta
    assert len(long) == 8  # 4 metrics x 2 runs; the failed probe has no rows

    md = (out / "table.md").read_text().splitlines()
    assert md[0] == f"| probe | metric | {a} | {b} | Δ {b} |"
    assert ("| imagenet | top1 | 0.8000 [0.7800, 0.8200] | 0.7500 [0.7300, 0.7700] | -0.0500 worse, outside noise "
            "(CIs apart) |") in md
    assert ("| imagenet | top5 | 0.9500 [0.9300, 0.9700] | 0.9400 [0.9200, 0.9600] | -0.0100 worse, inside noise "
            "(CIs overlap) |") in md
    assert ("| imagenet | loss | 1.0000 [0.9000, 1.1000] | 0.8000 [0.7000, 0.9500] | -0.2000 better, inside noise "
            "(CIs overlap) |") in md
    assert "| knn | top1@k=10 | 0.7000 | 0.7250 | +0.0250 better |" in md
    assert result.failures == [(b, "seg", "RuntimeError: boom")]
    report = (out / "report.md").read_text()
    assert "seg: `RuntimeError: boom`" in report and "![metrics: imagenet](metric_imagenet.png)" in report
    for name in ("metric_imagenet.png", "metric_knn.png", "report.html"):
        assert (out / name).stat().st_size > 0
    written = json.loads((out / "table.json").read_text())
    assert written["runs"] == [a, b] and written["reference"] == a and written["bootstrap"] == 1000
    assert len(written["rows"]) == 8 and written["rows"][0]["delta"] is None


def test_cli_compare_takes_run_dirs_and_files(runs, tmp_path, capsys):
    assert main(["compare", str(runs[0].parent.parent), "--out", str(tmp_path / "r1")]) == 0
    by_dir = pd.read_csv(tmp_path / "r1" / "table.csv")
    assert main(["compare", str(runs[0]), str(runs[1]), "--out", str(tmp_path / "r2")]) == 0
    pd.testing.assert_frame_equal(by_dir, pd.read_csv(tmp_path / "r2" / "table.csv"))
    assert "| knn | top1@k=10 | 0.7000 | 0.7250 | +0.0250 better |" in capsys.readouterr().out


def test_mismatched_configs_are_refused_naming_the_settings(runs, tmp_path, capsys):
    b = json.loads(runs[1].read_text())
    config = {**LINEAR_CONFIG, "solver": "sklearn", "Cs": [1.0]}
    b["probes"]["imagenet"] = probe(b["probes"]["imagenet"]["metrics"], config)
    write(runs[1], b)
    out = tmp_path / "report"
    with pytest.raises(DataError) as err:
        compare(list(runs), out)
    message = str(err.value)
    assert "imagenet: Cs (" in message and "solver (" in message and '"sklearn"' in message and '"torch"' in message
    assert "knn" not in message and "pool" not in message  # only what differs is named
    assert not out.exists()  # nothing written
    assert main(["compare", str(runs[0]), str(runs[1]), "--out", str(out)]) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and "solver" in err_lines[0] and "--allow-mixed" in err_lines[0]
    assert not out.exists()
    assert main(["compare", str(runs[0]), str(runs[1]), "--out", str(out), "--allow-mixed"]) == 0
    assert "mixed protocol settings (compared anyway): imagenet: Cs" in (out / "report.md").read_text()


def test_runtime_settings_may_differ_protocol_settings_may_not(runs, tmp_path):
    """config holds the protocol only: any difference there refuses; runtime (device, batch size) may differ."""
    recs = [json.loads(r.read_text()) for r in runs]
    for rec, device in zip(recs, ("cpu", "cuda")):
        rec["schema_version"] = 3
        rec["probes"]["imagenet"] = probe(rec["probes"]["imagenet"]["metrics"], PROTOCOL,
                                          runtime={"device": device, "batch_size": 64 if device == "cpu" else 256})
    assert compare(recs).notes == []
    recs[1]["probes"]["imagenet"] = probe(recs[1]["probes"]["imagenet"]["metrics"], {**PROTOCOL, "layers": "last4"})
    with pytest.raises(DataError, match=r'imagenet: layers \(.*"final".*"last4"\)'):
        compare(recs)
    old = json.loads(runs[1].read_text())  # version 2, no runtime block: its config is compared as it is
    old["probes"]["imagenet"] = probe(old["probes"]["imagenet"]["metrics"], {**LINEAR_CONFIG, "device": "cuda"})
    with pytest.raises(DataError, match=r"imagenet: device \("):
        compare([json.loads(runs[0].read_text()), old])


def test_hand_written_results_without_config_name_the_hash(runs, tmp_path):
    recs = [json.loads(r.read_text()) for r in runs]
    for rec, h in zip(recs, ("1111", "2222")):
        rec["probes"]["knn"].pop("config")
        rec["probes"]["knn"]["config_hash"] = h
    with pytest.raises(DataError, match=r"knn: config_hash \(.*\"1111\".*\"2222\"\)"):
        compare(recs)


@pytest.mark.parametrize("value, tolerance, code", [
    (0.79, [], 1),                      # any drop fails without a tolerance
    (0.79, ["top1=0.01"], 0),           # exactly baseline - tolerance holds
    (0.785, ["top1=0.01"], 1),
    (0.785, ["top1=0", "imagenet/top1=0.02"], 0),  # probe/metric beats metric
    (0.70, ["*=0.2"], 0),
    (0.81, [], 0),
])
def test_check_exit_codes(runs, tmp_path, capsys, value, tolerance, code):
    rec = json.loads(runs[0].read_text())
    rec["probes"]["imagenet"]["metrics"]["top1"]["value"] = value
    run = write(tmp_path / "run.json", rec)
    args = ["check", str(run), "--baseline", str(runs[0])] + [f"--tolerance={t}" for t in tolerance]
    assert main(args) == code
    out = capsys.readouterr().out
    assert re.search(rf"\| imagenet \| top1 \| 0\.8000 \| {value:.4f} \| .* \| {'regression' if code else 'ok'} \|", out)


def test_check_table_lower_is_better_and_missing(runs, tmp_path):
    rec = json.loads(runs[0].read_text())
    rec["probes"]["imagenet"]["metrics"]["loss"]["value"] = 1.05  # lower is better: +0.05 is worse
    rec["probes"]["knn"] = {"status": "failed", "error": "RuntimeError: boom"}
    result = check(write(tmp_path / "run.json", rec), runs[0], {"loss": 0.04})
    table = result.table.set_index(["probe", "metric"])
    assert table.loc[("imagenet", "loss"), "status"] == "regression"
    assert table.loc[("imagenet", "loss"), "delta"] == pytest.approx(0.05)
    assert table.loc[("knn", "top1@k=10"), "status"] == "missing"
    assert table.loc[("imagenet", "top1"), "status"] == "ok" and table.loc[("imagenet", "top1"), "delta"] == 0
    assert result.exit_code == 1 and len(result.regressions) == 2
    assert check(write(tmp_path / "run.json", rec), runs[0], {"loss": 0.05, "knn/top1@k=10": 1}).exit_code == 1


def test_check_refuses_other_protocol_and_bad_tolerance(runs, tmp_path, capsys):
    rec = json.loads(runs[0].read_text())
    rec["probes"]["imagenet"] = probe(rec["probes"]["imagenet"]["metrics"], {**LINEAR_CONFIG, "seeds": 1})
    run = write(tmp_path / "run.json", rec)
    assert main(["check", str(run), "--baseline", str(runs[0])]) == 2
    assert "imagenet: seeds (baseline: 3" in capsys.readouterr().err
    assert main(["check", str(runs[0]), "--baseline", str(runs[0]), "--tolerance", "top1"]) == 2
    assert "expected METRIC=ABS" in capsys.readouterr().err


@pytest.mark.parametrize("mutate, needle", [
    (lambda text: text[:-5], "not valid JSON"),
    (lambda text: json.dumps({**json.loads(text), "schema_version": 99}), "schema_version: 99"),
    (lambda text: text.replace('"fingerprint": "a', '"fingerprint_": "a'), "encoder.fingerprint"),
    (lambda text: text.replace('"ci95": [0.78, 0.82]', '"ci95": [0.82, 0.78]'), "probes.imagenet.metrics.top1.ci95"),
    (lambda text: text.replace('"higher_is_better": false', '"higher_is_better": "no"'),
     "probes.imagenet.metrics.loss.higher_is_better"),
    (lambda text: text.replace('"status": "ok"', '"status": "done"', 1), "status: must be one of ok, failed"),
    (lambda text: text.replace('"value": 0.8,', '"value": "high",'), "top1.value: must be a number"),
])
def test_malformed_results_are_one_line_exit_2(runs, tmp_path, capsys, mutate, needle):
    bad = tmp_path / "bad.json"
    bad.write_text(mutate(runs[0].read_text()))
    out = tmp_path / "report"
    assert main(["compare", str(runs[1]), str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err and needle in err, err
    assert not out.exists()
    assert main(["check", str(bad), "--baseline", str(runs[1])]) == 2
    assert needle in capsys.readouterr().err


def test_missing_run_and_empty_dir(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for run in (tmp_path / "nope", tmp_path / "empty"):
        assert main(["compare", str(run), "--out", str(tmp_path / "r")]) == 2
        assert str(run) in capsys.readouterr().err


def _png(path, color, size=(60, 80)):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


@pytest.fixture
def runs_with_artifacts(runs):
    """gradcam results with overlay PNGs, a grid PNG and raw maps (npz) beside each results.json."""
    for path, color in zip(runs, ("red", "blue")):
        rec = json.loads(path.read_text())
        _png(path.parent / "gradcam" / "overlay.png", color)
        _png(path.parent / "gradcam" / "grid.png", color, (30, 30))
        np.savez(path.parent / "gradcam" / "maps.npz", maps=np.zeros((2, 4, 4)))
        rec["probes"]["gradcam"] = probe({"pointing_game": metric(0.5)}, {"target": "logit"},
                                         artifacts={"overlay": "gradcam/overlay.png", "grid": "gradcam/grid.png",
                                                    "maps": "gradcam/maps.npz"})
        write(path, rec)
    return runs


def test_overlays_side_by_side_and_self_contained_html(runs_with_artifacts, tmp_path):
    from matplotlib.image import imread
    out = tmp_path / "report"
    result = compare(list(runs_with_artifacts), out)
    overlay = imread(out / "overlay_gradcam.png")[..., :3]
    red = np.nonzero((overlay[..., 0] > 0.9) & (overlay[..., 1] < 0.1) & (overlay[..., 2] < 0.1))
    blue = np.nonzero((overlay[..., 2] > 0.9) & (overlay[..., 0] < 0.1) & (overlay[..., 1] < 0.1))
    assert len(red[1]) > 500 and len(blue[1]) > 500  # both pictures at their own size (60x80)
    assert red[1].max() < blue[1].min()  # first run left, second right
    assert abs(np.median(red[0]) - np.median(blue[0])) < 2  # side by side, one row
    html = (out / "report.html").read_text()
    sources = re.findall(r'<img[^>]* src="([^"]+)"', html)
    assert len(sources) == 6  # 3 metric charts + overlays + 2 grids
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r'(src|href)="(https?:)?//', html)  # nothing from the network
    assert 'href="../runs/a/gradcam/maps.npz"' in html  # not a picture: a link
    assert "overlay_gradcam.png" in result.files


@pytest.mark.slow
def test_report_html_renders_in_headless_chromium(runs_with_artifacts, tmp_path):
    """The page loads in a real browser and every <img> decodes (naturalWidth > 0); a screenshot is not blank."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed and could not be (`make chromium` needs apt-get as root)")
    out = tmp_path / "report"
    compare(list(runs_with_artifacts), out)
    probe_page = tmp_path / "probe.html"  # the report plus a script that records each image's decoded width
    probe_page.write_text((out / "report.html").read_text().replace("</body>", (
        "<script>window.addEventListener('load', () => { document.body.setAttribute('data-images', "
        "[...document.images].map(i => i.complete ? i.naturalWidth : -1).join(',')); });</script></body>")))
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
             "--virtual-time-budget=5000"]
    dom = subprocess.run(flags + ["--dump-dom", probe_page.as_uri()], capture_output=True, text=True, timeout=120)
    widths = re.search(r'data-images="([^"]*)"', dom.stdout)
    assert widths, dom.stderr[-2000:]
    widths = [int(w) for w in widths.group(1).split(",")]
    assert len(widths) == 6 and min(widths) > 0, widths
    assert "<td>timm:vit_small@dpo.safetensors</td>" in dom.stdout.replace(' class=""', "")

    shot = tmp_path / "shot.png"
    subprocess.run(flags + ["--window-size=1200,1600", f"--screenshot={shot}", (out / "report.html").as_uri()],
                   capture_output=True, timeout=120, check=True)
    from PIL import Image
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (1600, 1200)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # text, tables and charts, not a blank page


# -- the runner's results.json ------------------------------------------------------------------
def _probe_class(name, run):
    """A probe of the typed contract around ``run(ctx, cfg)``, with a protocol pool and the run's seeds."""
    from dataclasses import dataclass

    from encoder_probe.probe import Needs, Probe, protocol, runtime

    @dataclass
    class Config:
        pool: str = protocol("mean", choices=("mean", "cls"))
        seeds: int = runtime(1, min=1)

    return type(name.title(), (Probe,), {"name": name, "needs": Needs(data=("classification",)), "Config": Config,
                                         "run": lambda self, ctx, cfg: run(ctx, cfg)})


def _fixed(ctx, cfg):
    """Per-item outcomes of 10 val images for each seed: 5 right, then 7 right (score 0.5, 0.7)."""
    from encoder_probe.items import Items, stack_seeds
    from encoder_probe.probe import ProbeResult, over_seeds
    ctx.dataset("classification", "train")
    ctx.dataset("classification", "val")  # what a probe opens is what results.json describes
    hits = stack_seeds([np.arange(10) < 5, np.arange(10) < 7][:cfg.seeds]).astype(float)
    return ProbeResult(metrics={"score": over_seeds(hits.mean(1), statistic={"name": "mean", "column": "score"})},
                       items=Items([f"val/img_{i}.png" for i in range(10)], {"score": hits}))


def _malformed(ctx, cfg):
    from encoder_probe.probe import Metric, ProbeResult
    return ProbeResult(metrics={"score": Metric(float("nan"))})


def _broken(ctx, cfg):
    raise RuntimeError("boom")


def test_run_suite_writes_the_versioned_schema(tmp_path):
    import torch

    from encoder_probe import check as api_check, compare as api_compare, run_suite
    from encoder_probe.bootstrap import statistic_value
    from encoder_probe.data import open_dataset
    from encoder_probe.items import Items
    from encoder_probe.probe import _IN_PROCESS, register_probe

    data = write_imagefolder(tmp_path / "data", per_class=2)
    write_imagefolder(data, per_class=1, split="val", seed=1)
    for name, run in (("fixed", _fixed), ("malformed", _malformed), ("broken", _broken)):
        register_probe(name, _probe_class(name, run))
    try:
        [rec] = run_suite("timm:test_vit", "fixed,malformed,broken", tmp_path / "out", data={"imagenet": str(data)},
                          seeds=2, options={"pool": "cls"}, cache=tmp_path / "cache")
    finally:
        _IN_PROCESS.clear()
    [path] = (tmp_path / "out").glob("*/results.json")
    assert path.parent.name == rec["encoder"]["fingerprint"][:16]
    assert load_results(path)["probes"] == rec["probes"]
    assert rec["schema_version"] == 3
    assert rec["encoder"]["pooling"] == "cls" and rec["encoder"]["n_params"] > 0 and rec["encoder"]["layer"] == "final"
    memo = tmp_path / "cache" / ".file-hashes"
    hashes = [f"{s}:{open_dataset('imagenet', data, s).content_hash(memo)}" for s in ("train", "val")]
    assert rec["data"]["imagenet"]["splits"] == {"train": 6, "val": 3}
    assert rec["data"]["imagenet"]["content_hash"] == hashlib.sha256("\n".join(hashes).encode()).hexdigest()
    assert rec["env"]["packages"]["torch"] == torch.__version__ and rec["env"]["dtype"] == "float32"
    fixed = rec["probes"]["fixed"]
    score = fixed["metrics"]["score"]
    assert score["value"] == pytest.approx(0.6) and score["values"] == [0.5, 0.7]
    assert score["ci"] == {"method": "bootstrap", "over": "items", "B": 1000, "n": 10, "seed": 0}
    assert score["ci95"][0] < 0.6 < score["ci95"][1] and score["seed_ci95"][0] < 0.6 < score["seed_ci95"][1]
    assert fixed["config"] == {"pool": "cls"} and fixed["runtime"]["seeds"] == 2  # seeds: runtime, not hashed
    assert rec["config_hashes"] == {"fixed": fixed["config_hash"]}
    items = Items.load(path.parent / fixed["items"]["file"])
    assert fixed["items"] == {"file": "items/fixed.npz", "n": 10, "ids_sha256": items.ids_sha256}
    assert abs(statistic_value(score["statistic"], items) - score["value"]) < 1e-9
    assert rec["probes"]["broken"]["status"] == "failed" and "boom" in rec["probes"]["broken"]["error"]
    malformed = rec["probes"]["malformed"]
    assert malformed["status"] == "failed" and "score.value: must be finite" in malformed["error"]
    assert set(rec["timings"]["probes_s"]) == {"fixed", "malformed", "broken"} and rec["timings"]["total_s"] > 0
    assert rec["options"]["seeds"] == 2 and rec["options"]["pool"] == "cls"

    # the Python API matches the CLI: a run is its own baseline; compare reads the run dir and pairs the items
    assert api_check(tmp_path / "out", path).exit_code == 0
    assert api_check(tmp_path / "out", path, significant=True).exit_code == 0
    assert list(api_compare(tmp_path / "out").wide["metric"]) == ["score"]
    twice = api_compare([path, path]).table.set_index("run").iloc[1]
    assert twice.delta == 0 and twice.noise_rule == "paired" and twice.noise == "inside"


@pytest.mark.slow
def test_ci_gate_script_passes_on_its_baseline_and_fails_on_a_regression(tmp_path, monkeypatch):
    """experiments/ci/gate.sh end to end on a tiny encoder and data: exit 0 and a report on its own
    baseline; its last step (`probe check`) exits 1 once the baseline is better by more than the tolerance."""
    import os
    import sys
    from pathlib import Path

    from encoder_probe import run_suite

    data = write_imagefolder(tmp_path / "data", per_class=4)
    write_imagefolder(data, per_class=2, split="val", seed=1)
    monkeypatch.setenv("ENCODER_PROBE_CACHE", str(tmp_path / "cache"))
    [base] = run_suite("timm:test_vit", "knn", tmp_path / "base", data={"imagenet": str(data)}, progress=False)
    baseline = tmp_path / "base" / base["encoder"]["fingerprint"][:16] / "results.json"
    env = {**os.environ, "PROBE": str(Path(sys.executable).parent / "probe"), "SUITE": "knn", "SEEDS": "1",
           "DATA": f"imagenet={data}", "TOLERANCES": "*=0.01"}
    gate = Path(__file__).resolve().parent.parent / "experiments" / "ci" / "gate.sh"
    ok = subprocess.run(["bash", str(gate), "timm:test_vit", str(baseline), str(tmp_path / "ci")], env=env,
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    # top1@k=10 and top1@k=20: with 3 classes top-5 is undefined and left out
    assert "all 2 baseline metrics hold" in ok.stdout and (tmp_path / "ci" / "report" / "report.html").is_file()

    better = json.loads(baseline.read_text())
    better["probes"]["knn"]["metrics"]["top1@k=10"]["value"] += 0.02
    write(tmp_path / "better.json", better)
    assert main(["check", str(tmp_path / "ci" / "run"), "--baseline", str(tmp_path / "better.json"),
                 "--tolerance", "*=0.01"]) == 1
    assert main(["check", str(tmp_path / "ci" / "run"), "--baseline", str(tmp_path / "better.json"),
                 "--tolerance", "*=0.01", "--tolerance", "knn/top1@k=10=0.03"]) == 0


def test_different_data_is_noted(runs):
    recs = [json.loads(r.read_text()) for r in runs]
    recs[1]["data"]["imagenet"]["content_hash"] = "cd" * 32
    assert compare(recs).notes == ["runs read different imagenet data (content hash "
                                   "timm:vit_small@sft.safetensors: abababababab, "
                                   "timm:vit_small@dpo.safetensors: cdcdcdcdcdcd)"]


def test_a_probes_warnings_reach_the_report(tmp_path):
    """A linear-probe refit that did not converge is said in the notes, report.md and report.html."""
    from encoder_probe.report import compare
    warning = "linear probe refit at C=1000 (seed 0) did not converge in 1000 iterations"
    a = write(tmp_path / "a" / "results.json", record("timm:a", "a", {
        "imagenet": probe({"top1": metric(0.8, [0.7, 0.9])}, warnings=[warning])}))
    b = write(tmp_path / "b" / "results.json", record("timm:b", "b", {"imagenet": probe({"top1": metric(0.7, [0.6, 0.8])})}))
    result = compare([a, b], tmp_path / "report", plots=False)
    assert [n for n in result.notes if warning in n] == [f"timm:a imagenet: {warning}"]
    assert warning in (tmp_path / "report" / "report.md").read_text()
    assert warning in (tmp_path / "report" / "report.html").read_text()
    bad = record("timm:c", "c", {"imagenet": probe({"top1": metric(0.7, [0.6, 0.8])}, warnings="not a list")})
    with pytest.raises(Exception, match="warnings: must be a list of strings"):
        compare([write(tmp_path / "c" / "results.json", bad)], plots=False)


# -- differences judged by the paired bootstrap over per-item outcomes -----------------------------
IDS = [f"val/n{i % 5:02d}/img_{i:03d}.JPEG" for i in range(200)]


def scored(n=200, correct=150, seed=0):
    hit = np.zeros(n)
    hit[np.random.default_rng(seed).permutation(n)[:correct]] = 1
    return hit


def flipped(hit, worse=0, better=0, seed=1):
    """``hit`` with ``worse`` right answers turned wrong and ``better`` wrong ones turned right."""
    rng = np.random.default_rng(seed)
    out = hit.copy()
    out[rng.permutation(np.flatnonzero(hit == 1))[:worse]] = 0
    out[rng.permutation(np.flatnonzero(hit == 0))[:better]] = 1
    return out


def items_run(root, name, hit, ids=IDS, seeds=None, write_items=True):
    """A version-3 results.json as the runner writes it, with its items file at items/imagenet.npz."""
    from encoder_probe.bootstrap import bootstrap_ci
    from encoder_probe.items import Items
    items = Items(ids, {"top1": np.atleast_2d(hit)})
    top1 = {"value": float(np.nanmean(np.atleast_2d(hit), axis=1).mean()), "higher_is_better": True,
            "statistic": {"name": "mean", "column": "top1"}, "ci95": bootstrap_ci({"name": "mean", "column": "top1"},
                                                                                   items),
            "ci": {"method": "bootstrap", "over": "items", "B": 1000, "n": len(ids), "seed": 0}}
    if seeds is not None:
        top1.update(values=seeds, seed_ci95=[min(seeds), max(seeds)])
    entry = probe({"top1": top1}, PROTOCOL, runtime={"device": "cpu", "batch_size": 64},
                  items={"file": "items/imagenet.npz", "n": len(ids), "ids_sha256": items.ids_sha256})
    path = write(root / name / "results.json", record(f"timm:{name}", name[0], {"imagenet": entry}, version=3))
    if write_items:
        items.save(path.parent / "items" / "imagenet.npz")
    return path


def test_report_marks_differences_by_the_paired_rule(tmp_path):
    """Three encoders on the same 200 images: 2 images apart is inside the noise, 40 apart is
    outside, and 12 apart is outside by the paired rule although the two CIs overlap."""
    base = scored()
    paths = [items_run(tmp_path / "runs", "ref", base), items_run(tmp_path / "runs", "two", flipped(base, 2)),
             items_run(tmp_path / "runs", "forty", flipped(base, 40)),
             items_run(tmp_path / "runs", "twelve", flipped(base, 12))]
    out = tmp_path / "report"
    result = compare(paths, out, plots=False)
    rows = pd.read_csv(out / "table.csv").set_index("run")
    assert list(rows.index) == ["timm:ref", "timm:two", "timm:forty", "timm:twelve"]
    assert rows.loc["timm:two", "noise"] == "inside" and rows.loc["timm:forty", "noise"] == "outside"
    assert rows.loc["timm:twelve", "noise"] == "outside"
    assert noise(*(json.loads(p.read_text())["probes"]["imagenet"]["metrics"]["top1"] for p in paths[::3])) == "inside"
    assert set(rows["noise_rule"].dropna()) == {"paired"} and rows["paired"].dropna().astype(bool).all()
    two = rows.loc["timm:two"]
    assert two.delta == pytest.approx(-0.01) and two.delta_ci_low < 0 <= two.delta_ci_high and two.p_value > 0.05
    assert rows.loc["timm:forty", "delta_ci_high"] < 0 and rows.loc["timm:forty", "p_value"] < 0.01
    assert rows.loc["timm:ref", "ci_over"] == "items" and pd.isna(rows.loc["timm:ref", "delta"])
    assert result.notes == []

    md = (out / "table.md").read_text()
    assert re.search(r"\| -0\.0100 worse, inside noise \(paired Δ CI \[-0\.0\d+, \+0\.0000\], p=0\.\d+\) \|", md), md
    assert re.search(r"\| -0\.2000 worse, outside noise \(paired Δ CI \[-0\.\d+, -0\.\d+\], p=0\.002\) \|", md), md
    html = (out / "report.html").read_text()
    assert len(re.findall(r'<td class="num outside">[^<]*outside noise', html)) == 2  # forty and twelve
    assert "paired when both runs scored the same items" in (out / "report.md").read_text()
    data = json.loads((out / "table.json").read_text())
    forty = next(r for r in data["rows"] if r["run"] == "timm:forty")
    assert forty["paired"] is True and forty["noise_rule"] == "paired" and forty["delta_ci_high"] < 0


def test_runs_on_different_items_are_compared_unpaired_and_say_so(tmp_path):
    base = scored()
    other_ids = [f"val/other_{i:03d}.JPEG" for i in range(200)]
    paths = [items_run(tmp_path, "ref", base), items_run(tmp_path, "other", flipped(base, 40), ids=other_ids)]
    result = compare(paths, tmp_path / "report", plots=False)
    row = result.table.set_index("run").loc["timm:other"]
    assert row.paired == False and row.noise_rule == "unpaired" and row.noise == "outside"  # noqa: E712
    assert result.notes == ["imagenet: timm:other and timm:ref were scored on different items (200 vs 200, ids "
                            "differ): their differences use an unpaired bootstrap"]
    assert "(unpaired Δ CI [" in (tmp_path / "report" / "table.md").read_text()
    assert "unpaired bootstrap" in (tmp_path / "report" / "report.html").read_text()


def test_seed_interval_beside_the_item_interval(tmp_path):
    base = scored()
    paths = [items_run(tmp_path, "ref", base, seeds=[0.74, 0.76]), items_run(tmp_path, "alt", flipped(base, 2))]
    result = compare(paths, plots=False)
    ref = result.table.set_index("run").loc["timm:ref"]
    assert (ref.seed_ci_low, ref.seed_ci_high) == (0.74, 0.76) and ref.n_seeds == 2
    assert re.match(r"0\.7500 \[0\.\d+, 0\.\d+\] seeds \[0\.7400, 0\.7600\]$", result.wide.loc[0, "timm:ref"])


def test_runs_without_items_fall_back_to_ci_overlap_with_a_note(runs, tmp_path):
    base = scored()
    with_items = items_run(tmp_path, "ref", base)
    lean = json.loads(items_run(tmp_path, "lean", flipped(base, 40)).read_text())
    lean["probes"]["imagenet"].pop("items")  # run without an out dir: no items file
    result = compare([with_items, write(tmp_path / "lean.json", lean)], plots=False)
    row = result.table.set_index("run").loc["timm:lean"]
    assert row.noise_rule == "ci-overlap" and row.noise == "outside" and pd.isna(row.p_value)
    assert "imagenet: timm:lean has no per-item outcomes; differences to it are judged by CI overlap" in result.notes
    gone = items_run(tmp_path, "gone", flipped(base, 40), write_items=False)  # results.json names a missing file
    result = compare([with_items, gone], plots=False)
    assert result.table.set_index("run").loc["timm:gone", "noise_rule"] == "ci-overlap"
    assert any("items/imagenet.npz: items file missing" in n for n in result.notes)


def test_an_items_file_of_other_items_is_a_one_line_error(tmp_path, capsys):
    from encoder_probe.items import Items
    base = scored()
    paths = [items_run(tmp_path, "ref", base), items_run(tmp_path, "alt", flipped(base, 3))]
    Items(IDS[:199], {"top1": base[None, :199]}).save(paths[1].parent / "items" / "imagenet.npz")
    assert main(["compare", *map(str, paths), "--out", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(paths[1].parent / "items" / "imagenet.npz") in err
    assert "holds 199 items" in err and "results.json names 200" in err
    (paths[1].parent / "items" / "imagenet.npz").write_bytes(b"not an npz")
    assert main(["compare", *map(str, paths), "--out", str(tmp_path / "report")]) == 2
    assert "not a per-item outcomes file" in capsys.readouterr().err


def test_cli_bootstrap_flag(tmp_path, capsys):
    base = scored()
    paths = [str(items_run(tmp_path, "ref", base)), str(items_run(tmp_path, "alt", flipped(base, 40)))]
    assert main(["compare", *paths, "--out", str(tmp_path / "r"), "--bootstrap", "200"]) == 0
    assert json.loads((tmp_path / "r" / "table.json").read_text())["bootstrap"] == 200
    assert "p=0.01)" in capsys.readouterr().out  # 2 / (200 + 1)
    assert main(["compare", *paths, "--out", str(tmp_path / "r0"), "--bootstrap", "0"]) == 0  # CI overlap only
    assert set(pd.read_csv(tmp_path / "r0" / "table.csv")["noise_rule"].dropna()) == {"ci-overlap"}
    assert main(["compare", *paths, "--out", str(tmp_path / "bad"), "--bootstrap", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--bootstrap 5: must be 0" in err and not (tmp_path / "bad").exists()


def test_check_significant_needs_a_regression_outside_the_noise(tmp_path, capsys):
    base = scored()
    baseline = items_run(tmp_path, "base", base)
    two = items_run(tmp_path, "two", flipped(base, 2))
    forty = items_run(tmp_path, "forty", flipped(base, 40))
    assert main(["check", str(two), "--baseline", str(baseline)]) == 1  # the default: any drop past the tolerance
    out = capsys.readouterr().out
    assert re.search(r"\| imagenet \| top1 \| 0\.7500 \| 0\.7400 \| -0\.0100 \| -0\.0\d+ \| 0\.0000 \| 0\.\d+ \| True \|"
                     r" 0\.0000 \| True \| regression \|", out), out
    assert main(["check", str(two), "--baseline", str(baseline), "--significant"]) == 0
    captured = capsys.readouterr()
    assert "| inside noise |" in captured.out
    assert "all 1 baseline metrics hold (1 beyond the tolerance but inside the noise)" in captured.out
    assert main(["check", str(forty), "--baseline", str(baseline), "--significant"]) == 1
    result = check(forty, baseline, significant=True, bootstrap=200)
    assert result.table.loc[0, "status"] == "regression" and result.table.loc[0, "delta_ci_high"] < 0
    assert result.table.loc[0, "p_value"] == pytest.approx(2 / 201)
    better = items_run(tmp_path, "better", flipped(base, 0, 40))
    assert check(better, baseline, significant=True).passed  # outside the noise on the good side


def test_check_significant_without_items_counts_as_a_regression(runs, tmp_path):
    rec = json.loads(runs[0].read_text())
    rec["probes"]["imagenet"]["metrics"]["top1"]["value"] = 0.79  # version 2: no per-item outcomes
    result = check(write(tmp_path / "run.json", rec), runs[0], significant=True)
    assert result.table.set_index("metric").loc["top1", "status"] == "regression" and result.exit_code == 1
    assert result.notes == ["imagenet/top1 of timm:vit_small@sft.safetensors: no per-item outcomes on both sides, "
                            "so --significant cannot judge the noise; counted as a regression"]


@pytest.mark.parametrize("mutate, needle", [
    (lambda m, p: m.update(statistic={"column": "top1"}), "metrics.top1.statistic: must be an object with a name"),
    (lambda m, p: m.update(ci={"method": "bootstrap", "B": 0, "n": 200}), "metrics.top1.ci: a bootstrap needs B >= 1"),
    (lambda m, p: m.update(ci="bootstrap"), "metrics.top1.ci: must be an object with a method"),
    (lambda m, p: m.update(seed_ci95=[0.8, 0.7]), "metrics.top1.seed_ci95: must be [low, high]"),
    (lambda m, p: p["items"].update(file="/abs/items.npz"), "imagenet.items.file: paths must be relative"),
    (lambda m, p: p["items"].update(ids_sha256="abc"), "imagenet.items.ids_sha256: must be 64 hex digits"),
    (lambda m, p: p["items"].update(n=-1), "imagenet.items.n: must be a count of items"),
    (lambda m, p: p.update(runtime=["cpu"]), "probes.imagenet.runtime: must be an object"),
    (lambda m, p: p.update(unscored={"top1": 1}), "probes.imagenet.unscored: must map metric"),
])
def test_schema_checks_the_version_3_keys(tmp_path, capsys, mutate, needle):
    from encoder_probe.report import SCHEMA_VERSION
    assert SCHEMA_VERSION == 3
    path = items_run(tmp_path, "ref", scored())
    assert load_results(path)["schema_version"] == 3
    rec = json.loads(path.read_text())
    mutate(rec["probes"]["imagenet"]["metrics"]["top1"], rec["probes"]["imagenet"])
    write(path, rec)
    assert main(["compare", str(path), "--out", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and needle in err, err
