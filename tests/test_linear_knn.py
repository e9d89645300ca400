"""The `imagenet` (linear) and `knn` probes: solver parity with sklearn, no leak, kNN by hand, per-item
outcomes that recompute every metric, seeds that rerun what is stochastic, real signal."""
import json

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression as SkLogisticRegression

import probes.linear as linear
from conftest import assert_one_line, assert_one_line_error, run_cli, write_imagefolder
from encoder_probe import load_encoder
from encoder_probe.context import Run
from encoder_probe.errors import SpecError
from encoder_probe.items import Items
from encoder_probe.logreg import LogisticRegression, fit_path
from encoder_probe.normalize import Normalizer
from encoder_probe.runner import run_probe
from encoder_probe.selection import held_out
from probes.knn import KNNConfig, knn_accuracy
from probes.linear import LinearConfig, LinearProbe, run_protocol

SEVEN = tuple("abcdefg")  # more than 5 classes: top-5 is defined


def gaussian_classes(n, k=25, d=48, spread=0.35, seed=0):
    """Overlapping Gaussian classes: hard enough that the regularisation matters."""
    rng = np.random.default_rng(seed)
    means = np.random.default_rng(123).normal(size=(k, d)) * spread
    y = rng.integers(0, k, n)
    return (means[y] + rng.normal(size=(n, d))).astype(np.float32), y


def brute_force_knn(x, y, xv, yv, k, temperature, n_classes):
    """(top1, top5) hits per val row, one image at a time in float64: DINO's weighted vote by hand."""
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    qn = xv / np.linalg.norm(xv, axis=1, keepdims=True)
    top1, top5 = [], []
    for q, truth in zip(qn, yv):
        sims = xn @ q
        votes = np.zeros(n_classes)
        for j in np.argsort(-sims)[:k]:
            votes[y[j]] += np.exp(sims[j] / temperature)
        ranked = np.argsort(-votes, kind="stable")
        top1.append(ranked[0] == truth)
        top5.append(truth in ranked[:5])
    return np.array(top1), np.array(top5)


@pytest.fixture(scope="module")
def test_vit():
    return load_encoder("timm:test_vit")


@pytest.fixture(scope="module")
def seven_classes(tmp_path_factory):
    """7 classes of random pictures (8 train, 4 val each), with a cache the module's runs share."""
    root = tmp_path_factory.mktemp("seven")
    write_imagefolder(root / "data", classes=SEVEN, per_class=8, split="train")
    write_imagefolder(root / "data", classes=SEVEN, per_class=4, split="val", seed=1)
    return {"imagenet": str(root / "data")}, root / "cache"


def items_of(entry, out, encoder) -> Items:
    return Items.load(out / encoder.fingerprint[:16] / entry["items"]["file"])


@pytest.mark.parametrize("C", [0.01, 1.0])
def test_torch_solver_matches_sklearn(C):
    x, y = gaussian_classes(3000)
    xt, yt = gaussian_classes(3000, seed=1)
    ours = LogisticRegression(C=C).fit(x, y)
    clip_recipe = SkLogisticRegression(C=C, max_iter=1000).fit(x, y)
    assert abs(ours.score(xt, yt) - clip_recipe.score(xt, yt)) <= 0.003
    exact = SkLogisticRegression(C=C, max_iter=20000, tol=1e-10).fit(x, y)  # sklearn's optimum, tightly
    reference = LogisticRegression.from_sklearn(exact)
    assert abs(ours.objective(x, y) - reference.objective(x, y)) <= 1e-4 * reference.objective(x, y)


def test_warm_path_and_minibatch_reach_the_same_optimum():
    x, y = gaussian_classes(2000)
    path = fit_path(x, y, [0.01, 0.1, 1.0])
    cold = LogisticRegression(C=1.0).fit(x, y)
    assert abs(path[-1].objective(x, y) - cold.objective(x, y)) <= 1e-4 * cold.objective(x, y)
    minibatch = LogisticRegression(C=0.1, batch_size=256, epochs=40).fit(x, y)
    assert abs(minibatch.objective(x, y) - path[1].objective(x, y)) <= 1e-2 * path[1].objective(x, y)


def test_val_and_heldout_rows_never_enter_the_sweep(monkeypatch):
    x, y = gaussian_classes(600, k=5)
    xv, yv = gaussian_classes(200, k=5, seed=9)
    events = []
    real_sweep = linear.sweep_path

    class SpyNormalizer(Normalizer):
        def __init__(self, how, rows):
            events.append(("stats", rows.copy()))
            super().__init__(how, rows)

        def __call__(self, rows):
            events.append(("apply", rows.copy()))
            return super().__call__(rows)

    class SpyRegression(LogisticRegression):
        def fit(self, X, y, **kwargs):
            events.append(("refit", len(X)))
            return super().fit(X, y, **kwargs)

    class SpyGrid(linear.LogisticRegressionGrid):
        def fit(self, X, y, **kwargs):
            if len(self.Cs) == 1:  # the refit's first, preconditioned stage
                events.append(("refit", len(X)))
            return super().fit(X, y, **kwargs)

    def spy_sweep(rows, labels, held, held_labels, Cs, *args, **kwargs):
        events.append(("sweep", len(rows), len(held)))
        return real_sweep(rows, labels, held, held_labels, Cs, *args, **kwargs)

    monkeypatch.setattr(linear, "Normalizer", SpyNormalizer)
    monkeypatch.setattr(linear, "sweep_path", spy_sweep)
    monkeypatch.setattr(linear, "LogisticRegression", SpyRegression)
    monkeypatch.setattr(linear, "LogisticRegressionGrid", SpyGrid)
    config = LinearConfig(Cs=[0.01, 0.1, 1.0], sweep="stacked")
    result = run_protocol(x, y, xv, yv, config, seed=3, n_classes=5)
    events = [e for i, e in enumerate(events) if not (e[0] == "refit" and events[i - 1][0] == "refit")]

    fit_rows, held_rows = held_out(y, 0.1, 3)  # the shared stratified splitter, same seed
    as_set = lambda a: {r.tobytes() for r in a}
    val, held, fit = as_set(xv), as_set(x[held_rows]), as_set(x[fit_rows])
    # sweep: stats + fit on the fit rows, held-out rows only scored; refit on all train; val scored once, last
    assert [e[0] for e in events] == ["stats", "apply", "apply", "sweep", "stats", "apply", "refit", "apply"]
    assert as_set(events[0][1]) == fit and as_set(events[1][1]) == fit and as_set(events[2][1]) == held
    assert events[3][1:] == (len(fit_rows), len(held_rows)) and events[6][1] == len(x)
    assert as_set(events[4][1]) == as_set(events[5][1]) == fit | held  # the refit: the whole train split
    assert as_set(events[7][1]) == val
    assert not any(as_set(e[1]) & val for e in events[:7] if e[0] in ("stats", "apply"))
    assert len(result["sweep"]) == 3 and result["C"] in config.Cs


def test_knn_equals_brute_force_numpy():
    x, y = gaussian_classes(300, k=7, d=16)
    xv, yv = gaussian_classes(50, k=7, d=16, seed=4)
    x, xv = x.astype(np.float64), xv.astype(np.float64)
    got = knn_accuracy(x, y, xv, yv, ks=[10, 20], temperature=0.07, n_classes=7, chunk=16)
    for k in (10, 20):
        top1, top5 = brute_force_knn(x, y, xv, yv, k, 0.07, 7)
        assert got[k]["top1"] == pytest.approx(top1.mean(), abs=1e-9)
        assert got[k]["top5"] == pytest.approx(top5.mean(), abs=1e-9)


def test_knn_probe_items_are_its_metric_and_brute_force(seven_classes, test_vit, tmp_path):
    data, cache = seven_classes
    entry = run_probe("knn", test_vit, data=data, out=tmp_path, cache=cache, bootstrap=0)
    items = items_of(entry, tmp_path, test_vit)
    read = Run(test_vit, data=data, cache=cache, progress=False).context("knn").labelled(KNNConfig())
    top1, top5 = brute_force_knn(read.x.astype(np.float64), read.y, read.xv.astype(np.float64), read.yv, 10, 0.07, 7)
    assert items.ids.tolist() == read.val_ids.tolist()
    column = items.columns["top1@k=10"]
    assert column.shape == (1, 28)
    assert np.array_equal(column[0], top1) and np.array_equal(items.columns["top5@k=10"][0], top5)
    assert column.mean() == entry["metrics"]["top1@k=10"]["value"] == top1.mean()


def test_every_metric_is_its_statistic_of_the_items(seven_classes, test_vit, tmp_path):
    """What the bootstrap resamples gives back the reported numbers, per seed and over seeds."""
    from sklearn.metrics import balanced_accuracy_score

    from encoder_probe.bootstrap import statistic_value
    data, cache = seven_classes
    found = {}
    for probe, options in (("imagenet", {"Cs": [0.1, 1.0]}), ("knn", {})):
        entry = run_probe(probe, test_vit, data=data, options=options, out=tmp_path, cache=cache, seeds=2,
                          bootstrap=0)
        found[probe] = entry, items_of(entry, tmp_path, test_vit)
        assert len(found[probe][1]) == entry["items"]["n"] == 28
        for name, metric in entry["metrics"].items():
            assert statistic_value(metric["statistic"], found[probe][1]) == pytest.approx(metric["value"], abs=1e-9)
    metrics, columns = found["imagenet"][0]["metrics"], found["imagenet"][1].columns
    assert set(metrics) == {"top1", "top5", "mean_per_class_recall"}
    assert all(columns[c].shape == (2, 28) for c in ("top1", "top5", "pred", "label", "rank"))
    rank, pred, label = columns["rank"], columns["pred"], columns["label"]
    assert np.array_equal(columns["top1"], (rank == 0).astype(float)) and np.array_equal(pred == label, rank == 0)
    assert np.array_equal(columns["top5"], (rank < 5).astype(float))
    for s in range(2):  # independently of the bootstrap code
        assert metrics["top1"]["values"][s] == columns["top1"][s].mean()
        assert metrics["top5"]["values"][s] == columns["top5"][s].mean()
        assert metrics["mean_per_class_recall"]["values"][s] == pytest.approx(
            balanced_accuracy_score(label[s], pred[s]), abs=1e-12)
    assert metrics["top1"]["value"] == pytest.approx(np.mean(metrics["top1"]["values"]), abs=1e-12)


def test_seeds_rerun_the_train_subsample_under_per_class(seven_classes, test_vit, tmp_path, monkeypatch):
    from encoder_probe.context import RunContext
    data, cache = seven_classes
    read = []
    real = RunContext.labelled

    def spy(self, cfg, layers=None, *, seed=0):
        got = real(self, cfg, layers, seed=seed)
        read.append((seed, frozenset(row.tobytes() for row in got.x), tuple(got.val_ids.tolist())))
        return got

    monkeypatch.setattr(RunContext, "labelled", spy)
    entry = run_probe("imagenet", test_vit, data=data, options={"Cs": [0.1, 1.0], "per_class": 4}, out=tmp_path,
                      cache=cache, seeds=3, bootstrap=0)
    assert [seed for seed, _, _ in read] == [0, 1, 2]
    assert len({train for _, train, _ in read}) == 3  # three train subsamples...
    assert len({val for _, _, val in read}) == 1  # ...scored on the same val images
    assert entry["data"]["train"] == 28 and entry["runtime"]["seeds"] == 3 and len(entry["chosen_C"]) == 3
    assert all(len(m["values"]) == 3 for m in entry["metrics"].values())
    assert items_of(entry, tmp_path, test_vit).columns["top1"].shape == (3, 28)
    read.clear()  # without per_class the train split is read once; each seed only draws its held-out split
    entry = run_probe("imagenet", test_vit, data=data, options={"Cs": [0.1, 1.0]}, cache=cache, seeds=3, bootstrap=0)
    assert [seed for seed, _, _ in read] == [0] and len(entry["sweep"]) == 3


@pytest.mark.slow
def test_pretrained_tower_beats_its_random_twin_on_demo_data(tmp_path):
    """Real signal on the built-in demo data (the ImageNet tower, not a tower trained in the test:
    test_vit/test_resnet trained 15 epochs on the 240 demo images stayed at chance)."""
    scores = {}
    for spec in ("torchvision:mobilenet_v2@imagenet", "torchvision:mobilenet_v2"):
        encoder = load_encoder(spec)
        result = run_probe("imagenet", encoder, options={"Cs": [0.01, 0.1, 1.0, 10.0]}, cache=tmp_path, seeds=2)
        knn = run_probe("knn", encoder, cache=tmp_path, bootstrap=0)
        scores[spec] = result["metrics"]["top1"]["value"], knn["metrics"]["top1@k=10"]["value"]
        top1 = result["metrics"]["top1"]
        assert len(top1["values"]) == 2 and "ci95" in top1 and "seed_ci95" in top1  # both sources of noise
        assert len(result["chosen_C"]) == 2 and len(result["sweep"][0]) == 4
    (lin, knn), (lin0, knn0) = scores.values()
    assert lin > 0.6 and lin - lin0 > 0.2, scores
    assert knn - knn0 > 0.15, scores


@pytest.mark.parametrize("problem, message", [
    ("one_class", "has only one class"),
    ("unseen_val_class", "classes absent from the train split: zebra"),
    ("empty_split", "split 'val'"),
    ("nan_features", "contain NaN or inf"),
    ("segmentation_only", "needs classification data; --data gave only ade20k (segmentation)"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, problem, message):
    data = tmp_path / "data"
    encoder = "timm:test_vit"
    if problem == "one_class":
        write_imagefolder(data, classes=("cat",), per_class=3, split="train")
        write_imagefolder(data, classes=("cat",), per_class=2, split="val")
    else:
        write_imagefolder(data, per_class=3, split="train")
        if problem != "empty_split":
            write_imagefolder(data, classes=("cat", "zebra") if problem == "unseen_val_class" else ("cat", "dog"),
                              per_class=2, split="val")
    if problem == "nan_features":
        from safetensors.torch import save_file
        state = load_encoder(encoder).module.state_dict()
        state["norm.weight"] = torch.full_like(state["norm.weight"], float("nan"))
        save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "nan.safetensors")
        encoder = f"{encoder}@{tmp_path / 'nan.safetensors'}"
    name = "ade20k" if problem == "segmentation_only" else "imagenet"
    proc, out = run_cli(tmp_path, "--encoder", encoder, "--suite", "imagenet", "--data", f"{name}={data}")
    assert_one_line_error(proc, message)
    assert not list(out.glob("*/results.json"))


def test_cli_run_writes_linear_and_knn_results(tmp_path):
    data = tmp_path / "data"
    write_imagefolder(data, per_class=6, split="train")
    write_imagefolder(data, per_class=3, split="val", seed=1)
    proc, out = run_cli(tmp_path, "--encoder", "timm:test_vit", "--suite", "imagenet,knn", "--data", f"imagenet={data}",
                        "--solver", "sklearn", "--seeds", "2")
    assert proc.returncode == 0, proc.stderr
    [results] = list(out.glob("*/results.json"))
    record = json.loads(results.read_text())
    linear_result, knn_result = record["probes"]["imagenet"], record["probes"]["knn"]
    assert linear_result["status"] == "ok" and linear_result["config"]["solver"] == "sklearn"
    assert linear_result["data"] == {"train": 18, "val": 9, "classes": 3, "root": str(data)}
    assert linear_result["runtime"]["seeds"] == 2 and len(linear_result["chosen_C"]) == 2
    assert "layers" not in linear_result["config"] and linear_result["layers"] == ["final"]
    # 3 classes: top-5 would be 1.0 by construction, so it is left out and said why
    assert set(knn_result["metrics"]) == {"top1@k=10", "top1@k=20"}
    assert set(knn_result["undefined_metrics"]) == {"top5@k=10", "top5@k=20"}
    assert set(linear_result["metrics"]) == {"top1", "mean_per_class_recall"}
    assert "3 classes" in linear_result["undefined_metrics"]["top5"]
    for name, entry in (("imagenet", linear_result), ("knn", knn_result)):
        assert entry["items"]["file"] == f"items/{name}.npz" and (results.parent / entry["items"]["file"]).is_file()
        assert all("ci95" in m for m in entry["metrics"].values())


@pytest.mark.parametrize("probe, options, named", [
    ("knn", {"ks": 0}, "knn.ks must be >= 1"),
    ("knn", {"ks": "10,0"}, "knn.ks must be >= 1"),
    ("knn", {"temperature": 0}, "knn.temperature must be > 0"),
    ("imagenet", {"holdout": 1.0}, "imagenet.holdout must be < 1"),
    ("imagenet", {"Cs": [0.1, -1]}, "imagenet.Cs must be > 0"),
    ("imagenet", {"Cs": []}, "Cs must hold at least one C"),
    ("imagenet", {"solver": "liblinear"}, "imagenet.solver must be one of torch, sklearn"),
    ("imagenet", {"seeds": 0}, "imagenet.seeds must be >= 1"),
])
def test_bad_options_are_refused_before_any_extraction(tmp_path, monkeypatch, test_vit, probe, options, named):
    import encoder_probe.features

    def extract(*args, **kwargs):
        raise AssertionError("features extracted before the options were validated")

    monkeypatch.setattr(encoder_probe.features, "extract", extract)
    with pytest.raises(SpecError) as excinfo:
        run_probe(probe, test_vit, options=options, out=tmp_path / "out", cache=tmp_path / "cache", bootstrap=0)
    assert_one_line(excinfo, named)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("solver, classes", [("torch", ("cat", "dog", "fish")), ("sklearn", ("cat", "dog", "fish")),
                                             ("sklearn", ("cat", "dog"))])
def test_saved_head_reproduces_the_reported_top1(tmp_path, test_vit, solver, classes):
    """imagenet/head.safetensors is the refit classifier: applied to val features it gives the probe's top-1."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    from encoder_probe.data import open_dataset
    from encoder_probe.features import extract
    data = tmp_path / "data"
    write_imagefolder(data, classes=classes, per_class=8, split="train")
    write_imagefolder(data, classes=classes, per_class=4, split="val", seed=1)
    result = run_probe("imagenet", test_vit, data={"imagenet": str(data)}, options={"solver": solver, "Cs": [0.1, 1.0]},
                       out=tmp_path / "out", cache=tmp_path / "cache", bootstrap=0)
    path = tmp_path / "out" / test_vit.fingerprint[:16] / result["artifacts"]["head"]
    assert result["artifacts"]["head"] == "imagenet/head.safetensors"
    head = load_file(str(path))
    with safe_open(str(path), "np") as f:
        assert json.loads(f.metadata()["class_names"]) == list(classes)
    val = extract(test_vit, open_dataset("imagenet", data, "val", classes=list(classes)), out=tmp_path / "cache",
                  progress=False)
    x = (np.asarray(val.pooled("mean"), np.float64) - head["mean"]) / head["std"]
    top1 = float(((x @ head["weight"].T.astype(np.float64) + head["bias"]).argmax(1) == val.labels).mean())
    assert top1 == result["metrics"]["top1"]["value"]


def test_head_output_is_the_saved_head_or_says_why_not(seven_classes, test_vit, tmp_path):
    """outputs["head"] (what gradcam reads through the context) is seed 0's refit head, the saved one."""
    from safetensors.numpy import load_file
    data, cache = seven_classes
    run = Run(test_vit, data=data, out=tmp_path, cache=cache, progress=False)
    result = LinearProbe().run(run.context("imagenet"), LinearConfig(Cs=[0.1, 1.0], seeds=2))
    head = result.outputs["head"]
    assert set(head) == {"weight", "bias", "mean", "std", "pool", "layer", "class_names", "root", "C"}
    assert head["weight"].shape == (7, head["mean"].shape[0]) and head["bias"].shape == (7,)
    assert (head["pool"], head["layer"], head["class_names"]) == ("mean", "final", list(SEVEN))
    assert head["root"] == data["imagenet"] and head["C"] == result.details["chosen_C"][0]
    saved = load_file(str(result.artifacts["head"]))
    assert all(np.array_equal(saved[k], head[k].astype(np.float32)) for k in ("weight", "bias", "mean", "std"))
    for options, why in (({"normalize": "l2"}, "l2-normalised"), ({"last_layers": 2}, "2 layers")):
        run = Run(test_vit, data=data, cache=cache, progress=False)
        result = LinearProbe().run(run.context("imagenet"), LinearConfig(Cs=[1.0], **options))
        assert "head" not in result.outputs and why in result.outputs["head_unavailable"]
        assert "head" not in result.artifacts


# --------------------------------------------------------------------------------------------
# two classes: C is sklearn's C (binomial model), and convergence is recorded
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lfw_features(shared_cache):
    """Standardised pooled features of the built-in ImageNet MobileNetV2 on lfw-faces (face vs not),
    extracted once per run (the tests that read them may run on either xdist worker)."""
    encoder = load_encoder("torchvision:mobilenet_v2@imagenet")
    run = Run(encoder, data={"lfw-faces": None}, cache=shared_cache / "lfw", progress=False)
    read = run.context("imagenet").labelled(LinearConfig())
    norm = Normalizer("standardize", read.x)
    return norm(read.x), read.y, norm(read.xv), read.yv


@pytest.mark.parametrize("C", [0.001, 1.0, 1000.0])
@pytest.mark.slow
def test_two_classes_fit_sklearns_binomial_model_at_the_same_C(lfw_features, C):
    x, y, xv, yv = lfw_features
    assert len(np.unique(y)) == 2
    ours = LogisticRegression(C=C).fit(x, y)
    exact = SkLogisticRegression(C=C, tol=1e-12, max_iter=100000).fit(x.astype(np.float64), y)
    reference = LogisticRegression.from_sklearn(exact)
    assert ours.coef_.shape == exact.coef_.shape == (1, x.shape[1])  # one weight vector, as sklearn's
    assert ours.converged_
    assert abs(ours.objective(x, y) - reference.objective(x, y)) <= 1e-4 * reference.objective(x, y)
    assert np.array_equal(ours.predict(xv), exact.predict(xv))
    # the decision values are sklearn's too (1-D for two classes), not those of a model at 2C
    assert np.allclose(ours.decision_function(xv).numpy(), exact.decision_function(xv), rtol=1e-2, atol=1e-2)
    at_2C = SkLogisticRegression(C=2 * C, tol=1e-12, max_iter=100000).fit(x.astype(np.float64), y)
    assert not np.allclose(ours.decision_function(xv).numpy(), at_2C.decision_function(xv), rtol=1e-2, atol=1e-2)


@pytest.mark.slow
def test_probe_solvers_agree_on_two_classes_and_record_convergence(lfw_features):
    x, y, xv, yv = lfw_features
    runs = {solver: run_protocol(x, y, xv, yv, LinearConfig(solver=solver, Cs=[1e-4, 1e-3, 1e-2]), 0, 2)
            for solver in ("torch", "sklearn")}
    assert runs["torch"]["C"] == runs["sklearn"]["C"]
    assert runs["torch"]["top1"] == runs["sklearn"]["top1"]
    assert "top5" not in runs["torch"]  # 2 classes: undefined
    torch_conv = runs["torch"]["convergence"]
    assert [c["C"] for c in torch_conv["sweep"]] == [1e-4, 1e-3, 1e-2]
    refit = torch_conv["refit"]
    assert refit["converged"] and refit["relative_gradient"] <= refit["tol"] and refit["n_iter"] > 0
    assert runs["sklearn"]["convergence"]["refit"]["converged"] is True


def test_unconverged_refit_is_recorded_and_warned():
    x, y = gaussian_classes(400, k=5)
    xv, yv = gaussian_classes(100, k=5, seed=3)
    config = LinearConfig(Cs=[1000.0], max_iter=3)
    run = run_protocol(x, y, xv, yv, config, 0, 5)
    refit = run["convergence"]["refit"]
    assert refit["n_iter"] <= 3 and not refit["converged"] and refit["relative_gradient"] > refit["tol"]
    # its gradient is the objective's real gradient at the returned solution
    model = LogisticRegression(C=1000.0, max_iter=3).fit(Normalizer("standardize", x)(x), y)
    assert model.grad_norm_ > 0 and not model.converged_
    [warning] = linear.convergence_warnings([run])
    assert "C=1000" in warning and "did not converge in 3 iterations" in warning
