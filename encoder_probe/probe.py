"""The probe registry: probes register under the ``encoder_probe.probes`` entry point group
(built-in ones in probes/, third-party ones from their own packages) or in-process."""
from __future__ import annotations

from importlib.metadata import entry_points

import numpy as np

from .errors import SpecError

_IN_PROCESS: dict[str, object] = {}


def register_probe(name: str, probe) -> None:
    """Register a probe object in this process (notebooks, tests, plugins not installed as packages)."""
    _IN_PROCESS[name] = probe


def available_probes() -> dict[str, str]:
    """name -> where it comes from, without importing the probes."""
    found = {ep.name: ep.value for ep in entry_points(group="encoder_probe.probes")}
    found.update({name: f"{type(p).__module__}.{type(p).__qualname__} (in-process)" for name, p in _IN_PROCESS.items()})
    return dict(sorted(found.items()))


def get_probe(name: str):
    if name in _IN_PROCESS:
        return _IN_PROCESS[name]
    for ep in entry_points(group="encoder_probe.probes"):
        if ep.name == name:
            obj = ep.load()
            return obj() if isinstance(obj, type) else obj
    installed = ", ".join(available_probes()) or "none installed yet"
    raise SpecError(f"unknown probe {name!r} (available: {installed})")


def resolve_suite(suite: str | list[str]) -> list[str]:
    """Split and validate a suite ('imagenet,seg,gradcam') before any work starts."""
    names = [s.strip() for s in (suite.split(",") if isinstance(suite, str) else suite) if s.strip()]
    if not names:
        raise SpecError("empty --suite")
    available = available_probes()
    unknown = [n for n in names if n not in available]
    if unknown:
        listed = ", ".join(available) or "none installed yet"
        raise SpecError(f"unknown probe(s) {', '.join(unknown)} (available: {listed})")
    return names


# -- what probes share -------------------------------------------------------------------------
def summarize(values, higher_is_better: bool = True) -> dict:
    """Mean over seeds with a 95% t-interval (none for a single seed), and the raw values."""
    from scipy import stats
    values = [float(v) for v in values]
    out = {"value": float(np.mean(values)), "values": values, "higher_is_better": higher_is_better}
    if len(values) > 1:
        half = stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / np.sqrt(len(values))
        out["ci95"] = [out["value"] - half, out["value"] + half]
    return out


def config_from(cls, options: dict | None):
    """A probe's config dataclass from the suite's shared options: it takes the keys it knows."""
    from dataclasses import fields
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in (options or {}).items() if k in known and v is not None})


def config_hash(config: dict) -> str:
    import hashlib
    import json
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def pick_dataset(data: dict | None, task: str, default: str) -> tuple[str, str | None]:
    """(name, root) of the first ``--data`` entry a probe of ``task`` can read; the demo data when none given.

    The running suite records the pick: its results.json describes only the datasets its probes read."""
    from .data import DATASETS
    from .errors import DataError
    from .runner import note_dataset_read
    if not data:
        return note_dataset_read(default, None)
    usable = [k for k in data if DATASETS[k].task == task]
    if not usable:
        given = ", ".join(f"{k} ({DATASETS[k].task})" for k in data)
        raise DataError(f"a {task} probe needs {task} data; --data gave only {given}")
    return note_dataset_read(usable[0], data[usable[0]])


def last_layers(encoder, k: int) -> list:
    """The encoder's layer alone (k = 1), or the last k blocks up to it (DINOv2's last-k concatenation)."""
    last = encoder.layer if encoder.layer != "final" else encoder.layers.available
    return [encoder.layer] if k == 1 else list(range(last - k + 1, last + 1))


def classification_features(encoder, data: dict | None, *, layers, pool, per_class, batch_size, cache=None,
                            progress=True):
    """Train and val FeatureSets of the classification data a suite runs on (default: the demo data)."""
    from .data import open_dataset
    from .features import extract
    name, root = pick_dataset(data, "classification", default="imagenet")
    options = {"per_class": per_class} if per_class else {}
    train = open_dataset(name, root, "train", **options)
    if hasattr(train, "wnids"):  # an ImageFolder: val labels follow train's class list, by name
        options["classes"] = train.wnids
    val = open_dataset(name, root, "val", **options)
    return tuple(extract(encoder, dataset, out=cache, layers=layers, pool=pool, batch_size=batch_size,
                         progress=progress) for dataset in (train, val))


def check_labels(y: np.ndarray, yv: np.ndarray, where: str) -> None:
    """A classifier needs two classes and val classes that train has seen."""
    from .errors import DataError
    if len(y) == 0 or len(yv) == 0:
        raise DataError(f"{where}: empty split (train {len(y)}, val {len(yv)} rows)")
    classes = np.unique(y)
    if len(classes) < 2:
        raise DataError(f"{where}: the train split has only one class ({classes[0]}); a classifier needs two")
    missing = np.setdiff1d(np.unique(yv), classes)
    if len(missing):
        raise DataError(f"{where}: val has classes absent from train: {missing[:10].tolist()}")


def labelled_arrays(encoder, data, config, context, layers=None):
    """(x, y, xv, yv, train FeatureSet): checked pooled features and labels of train and val.

    ``config`` supplies pool, per_class and batch_size; ``context`` the cache and progress flag.
    """
    train, val = classification_features(encoder, data, layers=layers, pool=config.pool,
                                         per_class=config.per_class, batch_size=config.batch_size,
                                         cache=context.get("cache"), progress=context.get("progress", True))
    x, xv = checked_features(train, config.pool, train.layers), checked_features(val, config.pool, val.layers)
    y, yv = np.array(train.labels), np.array(val.labels)
    check_labels(y, yv, str(train.meta["data"]["root"]))
    return x, y, xv, yv, train


def checked_features(features, pool: str, layers) -> np.ndarray:
    """Pooled features of ``layers`` side by side (float32, in memory); NaN/inf is a one-line error."""
    from .errors import DataError
    x = np.concatenate([np.asarray(features.pooled(pool, layer), dtype=np.float32) for layer in layers], axis=1)
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(1).sum())
        raise DataError(f"{features.path}: {bad} of {len(x)} feature rows contain NaN or inf")
    return x


def artifact_dir(encoder, context: dict | None, probe: str) -> "Path | None":
    """Where a probe writes its files: ``OUT/<fingerprint[:16]>/<probe>/`` beside the encoder's
    results.json (None when the caller gave no ``out``, e.g. a bare ``probe.run`` in a notebook)."""
    from pathlib import Path
    out = (context or {}).get("out")
    if out is None:
        return None
    path = Path(out) / encoder.fingerprint[:16] / probe
    path.mkdir(parents=True, exist_ok=True)
    return path
