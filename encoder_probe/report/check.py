"""Regression gate for CI: every baseline metric must hold within its tolerance.

A metric regresses when it falls below ``baseline - tolerance`` (above ``baseline + tolerance``
when lower is better). A baseline metric that the run lacks (probe failed or absent) counts as
a regression too: a gate that passes because a probe crashed guards nothing. The one exception
is a metric the run's probe says is undefined for its data (``undefined_metrics``, e.g. top-5 of
five classes, which an older baseline may still carry as a trivial 1.0): its status is
"undefined", with a note, and it does not fail the gate. Baseline and run must share the
protocol (config hashes), as in ``compare``. Rows follow the runs in the order they were run.

Noise (``significant``): a gate that fails on a difference of two images flaps. With
``significant`` a metric regresses only when it is beyond the tolerance *and* outside the noise:
the bootstrap 95% CI of run - baseline over the evaluation items (paired on the same items)
excludes 0 on the bad side; beyond the tolerance but inside the noise is "inside noise" and
passes. A metric without per-item outcomes on both sides cannot be judged that way: it is
counted as a regression (conservative), with a note. The delta CI and p-value columns are filled
wherever both sides have per-item outcomes, with or without ``significant``.
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from ..errors import DataError, SpecError
from .compare import DEFAULT_BOOTSTRAP, Pairing, require_comparable, run_labels, to_markdown
from .schema import load_results, load_runs, results_files, validate

EPS = 1e-12  # float slack: 0.79 against 0.80 - 0.01 is not a regression
CHECK_COLUMNS = ["run", "probe", "metric", "baseline", "value", "delta", "delta_ci_low", "delta_ci_high", "p_value",
                 "paired", "tolerance", "higher_is_better", "status"]
FAILING = ("regression", "missing")  # statuses that fail the gate; "ok", "inside noise" and "undefined" do not
PASSING = ("ok", "inside noise")  # the metric holds


def parse_tolerances(items) -> dict[str, float]:
    """``METRIC=ABS`` items (METRIC: ``probe/metric``, ``metric`` or ``*``) -> {METRIC: ABS}."""
    if isinstance(items, dict):
        items = [f"{k}={v}" for k, v in items.items()]
    tolerances = {}
    for item in items or []:
        key, sep, raw = str(item).rpartition("=")  # metric names may hold "=" (top1@k=10)
        try:
            value = float(raw)
        except ValueError:
            value = None
        if not sep or not key.strip() or value is None or not value >= 0:
            raise SpecError(f"--tolerance {item!r}: expected METRIC=ABS with ABS >= 0, e.g. top1=0.01")
        tolerances[key.strip()] = value
    return tolerances


def tolerance_for(tolerances: dict[str, float], probe: str, metric: str) -> float:
    """The most specific tolerance: probe/metric, then metric, then *, else 0."""
    for key in (f"{probe}/{metric}", metric, "*"):
        if key in tolerances:
            return tolerances[key]
    return 0.0


@dataclass
class CheckResult:
    table: pd.DataFrame
    unknown_tolerances: list[str]
    notes: list[str]

    @property
    def regressions(self) -> pd.DataFrame:
        return self.table[self.table["status"].isin(FAILING)]

    @property
    def passed(self) -> bool:
        return self.regressions.empty

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1

    def to_markdown(self) -> str:
        shown = self.table.copy()
        for column in ("baseline", "value", "delta", "delta_ci_low", "delta_ci_high", "tolerance"):
            shown[column] = [f"{v:.4f}" if isinstance(v, float) and v == v else ("" if v is None else v)
                             for v in shown[column]]
        shown["p_value"] = [f"{v:.2g}" if isinstance(v, float) and v == v else "" for v in shown["p_value"]]
        return to_markdown(shown.fillna(""))

    def _repr_markdown_(self) -> str:
        return self.to_markdown()


def _status(worse: bool, diff: dict | None, higher_is_better: bool, significant: bool) -> str:
    """regression | inside noise | ok: beyond the tolerance, and (significant) outside the noise on the bad side."""
    if not worse:
        return "ok"
    if not significant or diff is None:
        return "regression"  # without per-item outcomes, --significant cannot clear it
    lo, hi = diff["ci95"] or (None, None)
    bad_side = lo is not None and (hi < 0 if higher_is_better else lo > 0)
    return "regression" if bad_side else "inside noise"


def _check_one(label: str, run: dict, baseline: dict, tolerances: dict, notes: list | None = None, *,
               pairing: Pairing | None = None, significant: bool = False) -> list[dict]:
    rows = []
    for probe, base in baseline["probes"].items():
        if base["status"] != "ok":
            continue
        current = run["probes"].get(probe, {})
        for metric, b in base["metrics"].items():
            tol = tolerance_for(tolerances, probe, metric)
            m = current.get("metrics", {}).get(metric) if current.get("status") == "ok" else None
            row = {"run": label, "probe": probe, "metric": metric, "baseline": b["value"], "value": None,
                   "delta": None, "delta_ci_low": None, "delta_ci_high": None, "p_value": None, "paired": None,
                   "tolerance": tol, "higher_is_better": b["higher_is_better"], "status": "missing"}
            undefined = (current.get("undefined_metrics") or {}).get(metric) if current.get("status") == "ok" else None
            if m is not None and m["value"] is not None and b["value"] is not None:
                worse = m["value"] < b["value"] - tol - EPS if b["higher_is_better"] else \
                    m["value"] > b["value"] + tol + EPS
                diff = None if pairing is None else pairing.difference(baseline, run, probe, metric, "baseline", label)
                if diff is not None:
                    ci = diff["ci95"] or [None, None]
                    row.update(delta_ci_low=ci[0], delta_ci_high=ci[1], p_value=diff["p_value"], paired=diff["paired"])
                row.update(value=m["value"], delta=m["value"] - b["value"],
                           status=_status(worse, diff, b["higher_is_better"], significant))
                if worse and significant and diff is None and notes is not None:
                    notes.append(f"{probe}/{metric} of {label}: no per-item outcomes on both sides, so --significant "
                                 "cannot judge the noise; counted as a regression")
            elif m is None and undefined is not None:
                row["status"] = "undefined"
                if notes is not None:
                    notes.append(f"{probe}/{metric} is not checked for {label}: {undefined}")
            rows.append(row)
    return rows


def check(run, baseline, tolerance=None, *, allow_mixed: bool = False, significant: bool = False,
          bootstrap: int = DEFAULT_BOOTSTRAP) -> CheckResult:
    """Check every results.json of ``run`` (file, run dir or record) against ``baseline`` (file or record).

    ``significant``: a metric beyond its tolerance fails only when also outside the noise (its
    bootstrap delta CI, ``bootstrap`` resamples of the items, excludes 0 on the bad side)."""
    tolerances = parse_tolerances(tolerance)
    pairing = Pairing(bootstrap)
    if isinstance(baseline, dict):
        base = validate(baseline, baseline.get("_path", "<baseline>"))
    else:
        found = results_files(baseline)
        if len(found) != 1:
            raise DataError(f"{baseline}: a baseline is one results.json; this holds {len(found)}")
        base = load_results(found[0])
    runs = load_runs(run)
    rows, notes = [], []
    for label, record in zip(run_labels(runs), runs):
        notes += require_comparable([base, record], ["baseline", label], allow_mixed)
        rows += _check_one(label, record, base, tolerances, notes, pairing=pairing, significant=significant)
    notes += pairing.notes
    known = {f"{r['probe']}/{r['metric']}" for r in rows} | {r["metric"] for r in rows} | {"*"}
    return CheckResult(pd.DataFrame(rows, columns=CHECK_COLUMNS), sorted(set(tolerances) - known), notes)
