"""The run context a probe gets: data, cached features, references and other probes' outputs.

One :class:`Run` per encoder of a suite holds what its probes share: the encoder and the run's
load options, the feature cache, the datasets and features read (for results.json), loaded
references and the results of probes already run. Each probe sees it through a
:class:`RunContext` bound to its name, so features are extracted once with the run's encoder
options whatever probe asks, references load exactly as the encoder under test did, and a probe
that needs another's output gets it whatever the suite order (``ctx.output`` runs it first).
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import DataError, EncoderProbeError, SpecError

DEFAULT_DATA = {"classification": "imagenet", "segmentation": "ade20k", "vqa": "vqa"}  # built-in demo data


@dataclass
class Labelled:
    """Pooled train and val features of the classification data, checked, with their labels."""

    x: np.ndarray
    y: np.ndarray
    xv: np.ndarray
    yv: np.ndarray
    train: object  # FeatureSet
    val: object  # FeatureSet
    val_ids: np.ndarray

    @property
    def num_classes(self) -> int:
        return self.train.num_classes


def item_ids(dataset, rows) -> np.ndarray:
    """Stable ids of dataset rows: the file's path relative to the dataset root (``#k`` for row k of
    an array file), so two runs over the same files pair up item by item."""
    ids = []
    for row in np.asarray(rows, dtype=int):
        sample = dataset.samples[int(row)]
        try:
            name = Path(sample.path).relative_to(dataset.root).as_posix()
        except ValueError:
            name = Path(sample.path).name
        ids.append(name if sample.item is None else f"{name}#{sample.item}")
    return np.asarray(ids, dtype=str)


def checked_features(features, pool: str, layers) -> np.ndarray:
    """Pooled features of ``layers`` side by side (float32, in memory); NaN/inf is a one-line error."""
    x = np.concatenate([np.asarray(features.pooled(pool, layer), dtype=np.float32) for layer in layers], axis=1)
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(1).sum())
        raise DataError(f"{features.path}: {bad} of {len(x)} feature rows contain NaN or inf")
    return x


def check_labels(y: np.ndarray, yv: np.ndarray, where: str) -> None:
    """A classifier needs two classes and val classes that train has seen."""
    if len(y) == 0 or len(yv) == 0:
        raise DataError(f"{where}: empty split (train {len(y)}, val {len(yv)} rows)")
    classes = np.unique(y)
    if len(classes) < 2:
        raise DataError(f"{where}: the train split has only one class ({classes[0]}); a classifier needs two")
    missing = np.setdiff1d(np.unique(yv), classes)
    if len(missing):
        raise DataError(f"{where}: val has classes absent from train: {missing[:10].tolist()}")


class Run:
    """What the probes of one encoder share in a suite run (see the module docstring)."""

    def __init__(self, encoder, *, data=None, out=None, cache=None, progress: bool = True,
                 load_options: dict | None = None, configs: dict | None = None,
                 execute: Callable[[str], object] | None = None):
        self.encoder, self.data, self.cache, self.progress = encoder, data, cache, progress
        self.out = Path(out) if out is not None else None
        self.load_options = dict(load_options or {})  # vision_config, image_size, view: what references get too
        self.configs = dict(configs or {})
        self.execute = execute  # runs a probe by name and stores its result (the runner's)
        self.results: dict[str, object] = {}
        self.running: list[str] = []
        self.datasets_read: dict[str, object] = {}  # name -> root (None: built-in)
        self.features_read: dict[str, dict] = {}  # encoder fingerprint -> {data key: FeatureSet}
        self._references: dict[tuple, object] = {}
        self._features: dict[str, object] = {}

    def context(self, name: str, needs=None) -> "RunContext":
        return RunContext(self, name, needs)

    @property
    def encoder_dir(self) -> Path | None:
        return None if self.out is None else self.out / self.encoder.fingerprint[:16]


class RunContext:
    """What ``Probe.run(ctx, cfg)`` reads its inputs from; one per probe and encoder."""

    def __init__(self, run: Run, name: str, needs=None):
        self._run, self.name = run, name
        self._needs = needs

    # -- the encoder and the run -----------------------------------------------------------------
    @property
    def encoder(self):
        return self._run.encoder

    @property
    def data(self) -> dict | None:
        return self._run.data

    @property
    def progress(self) -> bool:
        return self._run.progress

    @property
    def label(self) -> str:
        from .encoders.registry import short_spec
        return short_spec(self.encoder.spec)

    def device_for(self, cfg):
        """Where a probe's heads run: its ``device`` setting, else the encoder's device."""
        import torch
        device = getattr(cfg, "device", None)
        return torch.device(device) if device else self.encoder.device

    @property
    def out(self) -> Path | None:
        """This probe's artifact directory ``OUT/<fingerprint[:16]>/<probe>/`` (None without an out dir)."""
        base = self._run.encoder_dir
        if base is None:
            return None
        path = base / self.name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def bar(self, iterable=None, *, total=None, desc: str = "", unit: str = "it", **options):
        """A tqdm bar on stderr named after the probe and encoder, off when the run's progress is off."""
        from tqdm.auto import tqdm
        return tqdm(iterable, total=total, desc=f"{self.name} [{self.label}] {desc}".rstrip(), unit=unit,
                    disable=not self.progress, file=sys.stderr, **options)

    # -- data and features -----------------------------------------------------------------------
    def dataset(self, task: str | None = None, split: str = "val", *, any_task: bool = False,
                demo_fallback: bool = False, **options):
        """The first ``--data`` dataset of ``task`` (``any_task``: the first of any task), else the
        built-in demo data for that task; recorded as read for results.json's data block. When
        ``--data`` has none of ``task``: a DataError, or with ``demo_fallback`` the demo data (the
        probe should say so: :meth:`used_demo_for`)."""
        from .data import DATASETS, open_dataset
        data = self.data
        usable = [k for k in data or {} if DATASETS[k].task == task]
        if any_task:
            name, root = next(iter(data.items())) if data else (DEFAULT_DATA[task or "classification"], None)
        elif not data or (not usable and demo_fallback):
            name, root = DEFAULT_DATA[task], None
        else:
            if not usable:
                given = ", ".join(f"{k} ({DATASETS[k].task})" for k in data)
                raise DataError(f"probe {self.name!r} needs {task} data; --data gave only {given}")
            name, root = usable[0], data[usable[0]]
        self._run.datasets_read.setdefault(name, root)
        return open_dataset(name, root, split, **{k: v for k, v in options.items() if v is not None})

    def used_demo_for(self, task: str) -> bool:
        """Whether :meth:`dataset` fell back to the demo data for ``task`` although --data was given."""
        from .data import DATASETS
        return bool(self.data) and not any(DATASETS[k].task == task for k in self.data)

    def features(self, dataset, *, layers=None, pool="mean", tokens: bool = False, batch_size: int = 64,
                 encoder=None):
        """Cached features of ``dataset`` through ``encoder`` (default: the encoder under test), with
        the run's cache and progress flag; extracted once per run and key."""
        from .features import extract
        encoder = encoder or self.encoder
        features = extract(encoder, dataset, out=self._run.cache, layers=layers, pool=pool, tokens=tokens,
                           batch_size=batch_size, progress=self.progress)
        key = json.dumps(features.meta["key"]["data"], sort_keys=True)  # the same images once, whatever layers
        self._run.features_read.setdefault(encoder.fingerprint, {}).setdefault(key, features)
        return features

    def labelled(self, cfg, layers=None, *, seed: int = 0) -> Labelled:
        """Pooled, checked train and val features of the classification data with their labels.

        Reads ``cfg.pool``, ``cfg.per_class`` (K images per class, train drawn with ``seed``: each
        seed of a ``--seeds`` run gets its own subsample; val always the seed-0 draw) and
        ``cfg.batch_size``."""
        per_class = getattr(cfg, "per_class", None)
        train = self.dataset("classification", "train", per_class=per_class,
                             seed=seed if per_class else None)
        val_options = {"per_class": per_class}
        if hasattr(train, "wnids"):  # an ImageFolder: val labels follow train's class list, by name
            val_options["classes"] = train.wnids
        val = self.dataset("classification", "val", **val_options)
        pool = getattr(cfg, "pool", "mean")
        batch = getattr(cfg, "batch_size", 64)
        train_set, val_set = (self.features(d, layers=layers, pool=pool, batch_size=batch) for d in (train, val))
        x, xv = checked_features(train_set, pool, train_set.layers), checked_features(val_set, pool, val_set.layers)
        y, yv = np.asarray(train_set.labels), np.asarray(val_set.labels)
        check_labels(y, yv, str(train_set.root))
        return Labelled(x, y, xv, yv, train_set, val_set, item_ids(val, val_set.index))

    def item_ids(self, dataset, rows) -> np.ndarray:
        return item_ids(dataset, rows)

    # -- other encoders and probes ---------------------------------------------------------------
    def reference(self, spec: str, view: str | None = None):
        """Encoder ``spec`` loaded as the encoder under test was: same device, dtype and load options
        (``--vision-config``, ``--image-size``); in ``view``, else the test encoder's view where the
        reference's source has it, else base. Loaded once per run."""
        from .encoders import load_encoder
        from .encoders.registry import check_view, parse_spec
        options = {k: v for k, v in self._run.load_options.items() if k != "view"}
        wanted = view or getattr(self.encoder, "view", "base")
        try:
            source = parse_spec(spec).source
            if view is None and wanted != "base":
                try:
                    check_view(source, spec, wanted)
                except SpecError:
                    wanted = "base"  # a plain encoder (timm, open_clip) as reference: its only view
            key = (spec, wanted)
            if key not in self._run._references:
                accepted = _accepted(source)
                taken = {k: v for k, v in options.items() if k in accepted}
                if wanted != "base":
                    taken["view"] = wanted
                self._run._references[key] = load_encoder(spec, device=self.encoder.device,
                                                          dtype=self.encoder.dtype, **taken)
            return self._run._references[key]
        except EncoderProbeError as e:
            raise type(e)(f"reference {spec!r}: {e}") from None

    def output(self, name: str):
        """The result of probe ``name`` in this run, running it now if it has not run yet; only for a
        probe this one declares in ``needs.probes``."""
        declared = getattr(self._needs, "probes", ())
        if name not in declared:
            raise SpecError(f"probe {self.name!r} asked for the output of {name!r} but does not declare it "
                            f"in needs.probes {tuple(declared)}")
        if name not in self._run.results:
            if name in self._run.running:
                raise SpecError(f"probes need each other's outputs in a cycle: {' -> '.join(self._run.running)}"
                                f" -> {name}")
            self._run.execute(name)
        result = self._run.results[name]
        if result is None:  # recorded as this probe's failure too, not a reason to lose the other results
            raise RuntimeError(f"probe {self.name!r} needs the output of {name!r}, which failed on this encoder")
        return result

    def config_of(self, name: str):
        """The routed config of another probe of this run (one this probe needs)."""
        return self._run.configs.get(name)


def _accepted(source) -> set:
    import inspect
    return set(inspect.signature(source.load).parameters)
