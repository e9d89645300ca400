"""The probe contract: option routing and validation before any work, protocol vs runtime hashing,
and a third-party probe installed as its own package running in a suite with the built-in ones."""
import json
import subprocess
import sys
import textwrap

import pytest

from conftest import assert_one_line_error, run_cli
from encoder_probe.errors import SpecError
from encoder_probe.probe import config_hash, split_config
from encoder_probe.runner import plan


@pytest.mark.parametrize("args, message", [
    (["--option", "kss=10"], "--option kss=10: no probe of this run takes 'kss' (imagenet: "),
    (["--option", "ks=abc"], "--option ks=abc: knn.ks must be a list of integers, got 'abc'"),
    (["--option", "ks=true"], "knn.ks must be a list of integers"),
    (["--option", "knn.temperature=-1"], "--option knn.temperature=-1: knn.temperature must be > 0, got -1.0"),
    (["--option", "knn.kss=1"], "--option knn.kss=1: probe 'knn' takes no option 'kss' (its options: ks, "),
    (["--option", "seg.head=mlp"], "--option seg.head=mlp: no probe 'seg' in this run (probes: imagenet, knn)"),
    (["--option", "holdout=1.5"], "imagenet.holdout must be < 1"),
    (["--option", "normalize=zscore"], "imagenet.normalize must be one of standardize, l2, got 'zscore'"),
    (["--head", "mlp"], "--head mlp: no probe of this run takes 'head'"),
    (["--option", "ks"], "--option 'ks': expected KEY=VALUE"),
    (["--bootstrap", "5"], "bootstrap must be 0 (no intervals) or an integer >= 100"),
])
def test_bad_options_are_one_line_before_any_work(tmp_path, no_work, args, message):
    proc, out = run_cli(tmp_path, "--encoder", "timm:test_vit", "--suite", "imagenet,knn", *args)
    assert_one_line_error(proc, message)
    assert not out.exists() or not any(out.rglob("results.json"))


def test_options_route_to_the_probes_that_declare_them():
    _, _, configs = plan("imagenet,knn,seg", {"batch_size": 8, "knn.temperature": 0.2, "head": "mlp",
                                              "knn.batch_size": 4, "ks": "5,10"}, seeds=3)
    assert configs["imagenet"].batch_size == 8 and configs["seg"].batch_size == 8
    assert configs["knn"].batch_size == 4  # probe.key beats key
    assert configs["knn"].temperature == 0.2 and configs["knn"].ks == [5, 10]
    assert configs["seg"].head == "mlp"
    assert configs["imagenet"].seeds == 3 and configs["seg"].seeds == 3  # the run's --seeds


def test_protocol_fields_are_hashed_and_runtime_fields_are_not():
    _, _, a = plan("knn", {"batch_size": 8, "chunk": 16})
    _, _, b = plan("knn", {"batch_size": 32})
    _, _, c = plan("knn", {"temperature": 0.1})
    hashes = [config_hash(split_config(cfgs["knn"])[0]) for cfgs in (a, b, c)]
    assert hashes[0] == hashes[1] != hashes[2]
    assert "batch_size" in split_config(a["knn"])[1] and "batch_size" not in split_config(a["knn"])[0]


def test_needed_probes_are_planned_and_their_options_checked():
    names, probes, configs = plan("gradcam", {"imagenet.Cs": [1.0]})
    assert names == ["gradcam"] and "imagenet" in probes and configs["imagenet"].Cs == [1.0]
    with pytest.raises(SpecError, match="imagenet.Cs must be a list of numbers"):
        plan("gradcam", {"imagenet.Cs": "a,b"})


def test_a_probe_breaking_the_contract_is_refused_in_one_line(tmp_path, monkeypatch):
    from encoder_probe import probe as registry

    class NoConfig:
        name = "broken"

        def run(self, ctx, cfg):
            return None
    monkeypatch.setitem(registry._IN_PROCESS, "broken", NoConfig)
    proc, _ = run_cli(tmp_path, "--encoder", "timm:test_vit", "--suite", "broken")
    assert_one_line_error(proc, "probe 'broken' (test_probe_api:")
    assert "needs a Config dataclass" in proc.stderr


def test_probe_list_shows_each_probes_options(tmp_path):
    from encoder_probe.cli import build_parser
    import contextlib
    import io
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        args = build_parser().parse_args(["list", "--options"])
        assert args.func(args) == 0
    text = buffer.getvalue()
    assert "temperature      protocol float        0.07 (gt 0)" in text
    assert "batch_size       runtime  int" in text


THIRD_PARTY = '''
"""A third-party probe: the mean L2 norm of each val image's pooled features."""
from dataclasses import dataclass

import numpy as np

from encoder_probe.items import Items
from encoder_probe.probe import Metric, Needs, Probe, ProbeResult, protocol, runtime


@dataclass
class NormConfig:
    pool: str = protocol("mean", choices=("mean", "cls"))
    scale: float = protocol(1.0, gt=0)
    batch_size: int = runtime(32, min=1)


class NormProbe(Probe):
    name = "featnorm"
    needs = Needs(data=("classification",), probes=("knn",))
    Config = NormConfig

    def run(self, ctx, cfg):
        dataset = ctx.dataset("classification", "val")
        features = ctx.features(dataset, pool=cfg.pool, batch_size=cfg.batch_size)
        norms = cfg.scale * np.linalg.norm(np.asarray(features.pooled(cfg.pool), np.float64), axis=1)
        knn = ctx.output("knn")  # another probe's result, through the context
        return ProbeResult(
            metrics={"mean_norm": Metric(float(norms.mean()), statistic={"name": "mean", "column": "norm"})},
            items=Items(ctx.item_ids(dataset, features.index), {"norm": norms[None]}),
            details={"knn_top1_seen": knn.metrics["top1@k=10"].value})
'''


@pytest.fixture(scope="module")
def third_party_site(tmp_path_factory):
    """The probe above as its own installed package (pip, entry point group encoder_probe.probes)."""
    root = tmp_path_factory.mktemp("plugin")
    package = root / "src" / "featnorm_probe"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent(THIRD_PARTY))
    (root / "src" / "pyproject.toml").write_text(textwrap.dedent('''
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "featnorm-probe"
        version = "0.3.0"
        [project.entry-points."encoder_probe.probes"]
        featnorm = "featnorm_probe:NormProbe"
        [tool.setuptools]
        packages = ["featnorm_probe"]
    '''))
    site = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", str(site), str(root / "src")], check=True, capture_output=True)
    return site


def test_third_party_probe_package_runs_in_a_suite_with_built_in_ones(tmp_path, monkeypatch, third_party_site):
    monkeypatch.syspath_prepend(str(third_party_site))
    proc, out = run_cli(tmp_path, "--encoder", "timm:test_vit", "--suite", "featnorm,imagenet",
                        "--option", "featnorm.scale=2", "--option", "knn.ks=10", "--option", "Cs=[0.1,1.0]",
                        "--bootstrap", "200")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(next(out.rglob("results.json")).read_text())
    assert list(record["probes"]) == ["featnorm", "imagenet", "knn"]  # knn ran because featnorm needs it
    assert record["probes"]["knn"]["needed_by"] == ["featnorm"]
    entry = record["probes"]["featnorm"]
    assert entry["status"] == "ok", entry
    assert entry["config"] == {"pool": "mean", "scale": 2.0} and entry["runtime"] == {"batch_size": 32}
    assert entry["probe"] == {"class": "featnorm_probe:NormProbe", "package": "featnorm-probe", "version": "0.3.0"}
    assert entry["knn_top1_seen"] == record["probes"]["knn"]["metrics"]["top1@k=10"]["value"]
    metric = entry["metrics"]["mean_norm"]
    assert metric["ci95"][0] < metric["value"] < metric["ci95"][1] and metric["ci"]["B"] == 200
    from encoder_probe.items import Items
    items = Items.load(next(out.rglob("results.json")).parent / entry["items"]["file"])
    assert items.columns["norm"].mean() == pytest.approx(metric["value"])
    unknown, _ = run_cli(tmp_path, "--encoder", "timm:test_vit", "--suite", "featnorm", "--option", "featnorm.scale=0")
    assert_one_line_error(unknown, "featnorm.scale must be > 0")


def test_probes_needing_each_other_in_a_cycle_are_one_line(tmp_path, monkeypatch):
    from dataclasses import dataclass

    from encoder_probe import probe as registry
    from encoder_probe.probe import Needs, Probe

    @dataclass
    class Nothing:
        pass

    def needing(name, other):
        class Needy(Probe):
            Config = Nothing
            needs = Needs(probes=(other,))

            def run(self, ctx, cfg):
                return ctx.output(other)
        Needy.name = name
        return Needy
    monkeypatch.setitem(registry._IN_PROCESS, "ping", needing("ping", "pong"))
    monkeypatch.setitem(registry._IN_PROCESS, "pong", needing("pong", "ping"))
    proc, _ = run_cli(tmp_path, "--encoder", "timm:test_vit", "--suite", "ping")
    assert_one_line_error(proc, "probes need each other's outputs in a cycle: ping -> pong -> ping")


def test_run_probe_gives_the_results_json_entry_of_one_probe(tmp_path):
    from encoder_probe.encoders import load_encoder
    from encoder_probe.runner import run_probe
    encoder = load_encoder("timm:test_vit")
    entry = run_probe("knn", encoder, options={"ks": [5]}, cache=tmp_path, bootstrap=200)
    assert entry["status"] == "ok" and entry["config"]["ks"] == [5] and "file" not in entry["items"]
    metric = entry["metrics"]["top1@k=5"]
    assert metric["ci"] == {"method": "bootstrap", "over": "items", "B": 200, "n": entry["items"]["n"], "seed": 0}
    with pytest.raises(SpecError, match="knn.ks must be >= 1"):
        run_probe("knn", encoder, options={"ks": [0]}, cache=tmp_path)


def test_a_probe_whose_dependency_failed_is_recorded_failed_and_the_rest_stand(tmp_path, monkeypatch):
    from dataclasses import dataclass

    from encoder_probe import probe as registry
    from encoder_probe.probe import Needs, Probe

    @dataclass
    class Nothing:
        pass

    class Broken(Probe):
        name, Config = "broken", Nothing

        def run(self, ctx, cfg):
            raise RuntimeError("boom")

    class Dependent(Probe):
        name, Config, needs = "dependent", Nothing, Needs(probes=("broken",))

        def run(self, ctx, cfg):
            return ctx.output("broken")
    monkeypatch.setitem(registry._IN_PROCESS, "broken", Broken)
    monkeypatch.setitem(registry._IN_PROCESS, "dependent", Dependent)
    proc, out = run_cli(tmp_path, "--encoder", "timm:test_vit", "--suite", "dependent,knn", "--bootstrap", "0")
    assert proc.returncode == 1
    record = json.loads(next(out.rglob("results.json")).read_text())
    assert record["probes"]["dependent"]["status"] == "failed" and "which failed" in record["probes"]["dependent"]["error"]
    assert record["probes"]["broken"]["status"] == "failed" and record["probes"]["knn"]["status"] == "ok"
