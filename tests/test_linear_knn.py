"""The `imagenet` (linear) and `knn` probes: solver parity with sklearn, no leak, kNN by hand, real signal."""
import json

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression as SkLogisticRegression

import probes.linear as linear
from conftest import assert_one_line_error, run_cli, write_imagefolder
from encoder_probe import load_encoder
from encoder_probe.logreg import LogisticRegression, fit_path
from probes.knn import KNNProbe, knn_accuracy
from probes.linear import LinearConfig, LinearProbe, run_protocol


def gaussian_classes(n, k=25, d=48, spread=0.35, seed=0):
    """Overlapping Gaussian classes: hard enough that the regularisation matters."""
    rng = np.random.default_rng(seed)
    means = np.random.default_rng(123).normal(size=(k, d)) * spread
    y = rng.integers(0, k, n)
    return (means[y] + rng.normal(size=(n, d))).astype(np.float32), y


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
    real_fit, real_norm = linear._fit, linear.Normalizer

    class SpyNormalizer(real_norm):
        def __init__(self, how, rows):
            events.append(("stats", rows.copy()))
            super().__init__(how, rows)

        def __call__(self, rows):
            events.append(("apply", rows.copy()))
            return super().__call__(rows)

    def spy_fit(rows, labels, Cs, *args, **kwargs):
        events.append(("fit", len(Cs)))
        return real_fit(rows, labels, Cs, *args, **kwargs)

    monkeypatch.setattr(linear, "Normalizer", SpyNormalizer)
    monkeypatch.setattr(linear, "_fit", spy_fit)
    config = LinearConfig(Cs=[0.01, 0.1, 1.0])
    result = run_protocol(x, y, xv, yv, config, seed=3, n_classes=5)

    fit_rows, held_rows = linear.stratified_holdout(y, 0.1, 3)
    as_set = lambda a: {r.tobytes() for r in a}
    val, held, fit = as_set(xv), as_set(x[held_rows]), as_set(x[fit_rows])
    # sweep: stats + fit on the fit rows, held-out rows only scored; refit on all train; val scored once, last
    assert [e[0] for e in events] == ["stats", "apply", "fit", "apply", "stats", "apply", "fit", "apply"]
    assert as_set(events[0][1]) == fit and as_set(events[1][1]) == fit and as_set(events[3][1]) == held
    assert as_set(events[4][1]) == as_set(events[5][1]) == fit | held  # the refit: the whole train split
    assert as_set(events[7][1]) == val
    assert not any(as_set(e[1]) & val for e in events[:7] if e[0] != "fit")
    assert len(result["sweep"]) == 3 and result["C"] in config.Cs


def test_knn_equals_brute_force_numpy():
    x, y = gaussian_classes(300, k=7, d=16)
    xv, yv = gaussian_classes(50, k=7, d=16, seed=4)
    x, xv = x.astype(np.float64), xv.astype(np.float64)
    got = knn_accuracy(x, y, xv, yv, ks=[10, 20], temperature=0.07, n_classes=7, chunk=16)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    qn = xv / np.linalg.norm(xv, axis=1, keepdims=True)
    for k in (10, 20):
        top1 = top5 = 0
        for q, truth in zip(qn, yv):
            sims = xn @ q
            nearest = np.argsort(-sims)[:k]
            votes = np.zeros(7)
            for j in nearest:
                votes[y[j]] += np.exp(sims[j] / 0.07)
            ranked = np.argsort(-votes, kind="stable")
            top1 += ranked[0] == truth
            top5 += truth in ranked[:5]
        assert got[k]["top1"] == pytest.approx(top1 / 50, abs=1e-9)
        assert got[k]["top5"] == pytest.approx(top5 / 50, abs=1e-9)


@pytest.mark.slow
def test_pretrained_tower_beats_its_random_twin_on_demo_data(tmp_path):
    """Real signal on the built-in demo data (the ImageNet tower, not a tower trained in the test:
    test_vit/test_resnet trained 15 epochs on the 240 demo images stayed at chance)."""
    scores = {}
    for spec in ("torchvision:mobilenet_v2@imagenet", "torchvision:mobilenet_v2"):
        encoder = load_encoder(spec)
        result = LinearProbe().run(encoder, None, {"seeds": 2, "Cs": [0.01, 0.1, 1.0, 10.0]},
                                   {"cache": tmp_path, "progress": False})
        knn = KNNProbe().run(encoder, None, {}, {"cache": tmp_path, "progress": False})
        scores[spec] = result["metrics"]["top1"]["value"], knn["metrics"]["top1@k=10"]["value"]
        assert len(result["metrics"]["top1"]["values"]) == 2 and "ci95" in result["metrics"]["top1"]
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
    # 3 classes: top-5 would be 1.0 by construction, so it is left out and said why
    assert set(knn_result["metrics"]) == {"top1@k=10", "top1@k=20"}
    assert set(knn_result["undefined_metrics"]) == {"top5@k=10", "top5@k=20"}
    assert set(linear_result["metrics"]) == {"top1", "mean_per_class_recall"}
    assert "3 classes" in linear_result["undefined_metrics"]["top5"]


@pytest.mark.parametrize("options", [{"ks": []}, {"ks": [0]}, {"temperature": 0}])
def test_knn_rejects_bad_options_before_any_work(tmp_path, options):
    from encoder_probe.errors import SpecError
    with pytest.raises(SpecError, match="knn probe: need ks >= 1"):
        KNNProbe().run(load_encoder("timm:test_vit"), None, options, {"cache": tmp_path})
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("solver, classes", [("torch", ("cat", "dog", "fish")), ("sklearn", ("cat", "dog", "fish")),
                                             ("sklearn", ("cat", "dog"))])
def test_saved_head_reproduces_the_reported_top1(tmp_path, solver, classes):
    """imagenet/head.safetensors is the refit classifier: applied to val features it gives the probe's top-1."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    from encoder_probe.data import open_dataset
    from encoder_probe.features import extract
    data = tmp_path / "data"
    write_imagefolder(data, classes=classes, per_class=8, split="train")
    write_imagefolder(data, classes=classes, per_class=4, split="val", seed=1)
    encoder = load_encoder("timm:test_vit")
    context = {"cache": tmp_path / "cache", "out": tmp_path / "out", "progress": False}
    result = LinearProbe().run(encoder, {"imagenet": str(data)}, {"solver": solver, "Cs": [0.1, 1.0]}, context)
    path = tmp_path / "out" / encoder.fingerprint[:16] / result["artifacts"]["head"]
    head = load_file(str(path))
    with safe_open(str(path), "np") as f:
        assert json.loads(f.metadata()["class_names"]) == list(classes)
    val = extract(encoder, open_dataset("imagenet", data, "val", classes=list(classes)), out=tmp_path / "cache",
                  progress=False)
    x = (np.asarray(val.pooled("mean"), np.float64) - head["mean"]) / head["std"]
    top1 = float(((x @ head["weight"].T.astype(np.float64) + head["bias"]).argmax(1) == val.labels).mean())
    assert top1 == result["metrics"]["top1"]["value"]


# --------------------------------------------------------------------------------------------
# two classes: C is sklearn's C (binomial model), and convergence is recorded
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lfw_features(tmp_path_factory):
    """Standardised pooled features of the built-in ImageNet MobileNetV2 on lfw-faces (face vs not)."""
    from encoder_probe.probe import labelled_arrays
    encoder = load_encoder("torchvision:mobilenet_v2@imagenet")
    x, y, xv, yv, _ = labelled_arrays(encoder, {"lfw-faces": None}, LinearConfig(),
                                      {"cache": tmp_path_factory.mktemp("lfw"), "progress": False})
    norm = linear.Normalizer("standardize", x)
    return norm(x), y, norm(xv), yv


@pytest.mark.parametrize("C", [0.001, 1.0, 1000.0])
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
    model = LogisticRegression(C=1000.0, max_iter=3).fit(linear.Normalizer("standardize", x)(x), y)
    assert model.grad_norm_ > 0 and not model.converged_
    [warning] = linear.convergence_warnings([run])
    assert "C=1000" in warning and "did not converge in 3 iterations" in warning
