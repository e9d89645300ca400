"""Side-by-side comparison of results.json files: one table, noise marks, a refusal on mixed protocols.

Every probe is read generically from the shape runner.py writes (``probes[name].metrics[metric]``
= value, ci95, higher_is_better, statistic), so probes added later show up without code here.

Fairness: a probe's numbers are comparable only when it ran with the same protocol. ``config``
holds the protocol settings only (runtime ones, device and batch sizes, are in ``runtime`` and
may differ), so runs whose ``config_hash`` of a probe differs are refused (``allow_mixed``
compares anyway, with a note) and the message names the settings that differ. Older records
without ``runtime`` are compared on their config as it is.

Noise: where both runs left per-item outcomes (``items``, beside results.json) and the metric
names its statistic, the difference gets a bootstrap 95% CI and p-value over the items: *paired*
when both runs scored the same items (the same ids: each resample draws the same images for
both), *unpaired* otherwise (and a note says so). A difference is *outside the noise* only when
that CI excludes 0. Without per-item outcomes the old rule applies: outside when the two runs'
own 95% CIs do not overlap. ``noise_rule`` says which rule judged each row.

Order and reference: runs are shown in the order they were run (see ``schema.load_runs``), and
every delta is against the reference run: the first one unless ``reference`` names another (a
run label, an encoder spec or a fingerprint prefix). A metric one run reports and another does
not (e.g. top-5 left out on data of five classes or fewer) is shown as absent there, never as 0.
"""
from __future__ import annotations

import json
import numbers
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..errors import DataError, EncoderProbeError, SpecError
from ..encoders.registry import spec_label
from .schema import load_runs

DEFAULT_BOOTSTRAP = 1000
TABLE_COLUMNS = ["probe", "metric", "run", "value", "ci_low", "ci_high", "ci_over", "seed_ci_low", "seed_ci_high",
                 "n_seeds", "higher_is_better", "delta", "delta_ci_low", "delta_ci_high", "p_value", "paired",
                 "noise", "noise_rule"]


def run_labels(records: list[dict]) -> list[str]:
    """Short unique names: the spec with weight paths cut to their file name; repeats get a suffix."""
    labels = [spec_label(record["encoder"]["spec"]) for record in records]
    seen: dict[str, int] = {}
    unique = []
    for label, record in zip(labels, records):
        if labels.count(label) > 1:
            seen[label] = seen.get(label, 0) + 1
            label = f"{label} #{seen[label]} ({record['encoder']['fingerprint'][:8]})"
        unique.append(label)
    return unique


def _flatten(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(records: list[dict], labels: list[str]) -> dict[str, dict[str, dict[str, object]]]:
    """{probe: {setting: {run label: value}}} for probes whose config_hash differs between runs.

    ``config`` holds protocol settings only, so every setting that differs is listed. Results
    without a config, or whose hashes differ over the same config, list the hash itself."""
    found: dict[str, dict] = {}
    probes = sorted({name for r in records for name in r["probes"]})
    for probe in probes:
        runs = [(label, r["probes"][probe]) for label, r in zip(labels, records)
                if r["probes"].get(probe, {}).get("status") == "ok"]
        hashes = {p.get("config_hash") for _, p in runs}
        if len(hashes) <= 1:
            continue
        by_hash = {"config_hash": {label: p.get("config_hash") for label, p in runs}}
        if not all(isinstance(p.get("config"), dict) for _, p in runs):
            found[probe] = by_hash
            continue
        flat = [(label, _flatten(p["config"])) for label, p in runs]
        keys = sorted({k for _, c in flat for k in c})
        differing = {}
        for key in keys:
            values = {label: c.get(key, "<unset>") for label, c in flat}
            if len({json.dumps(v, sort_keys=True, default=str) for v in values.values()}) > 1:
                differing[key] = values
        found[probe] = differing or by_hash
    return found


def describe_differences(differences: dict) -> str:
    """'imagenet: solver (A: torch, B: sklearn), Cs (...)' on one line."""
    def short(value):
        text = json.dumps(value, default=str)
        return text if len(text) <= 40 else text[:37] + "..."
    parts = []
    for probe, settings in differences.items():
        listed = ", ".join(f"{key} ({', '.join(f'{label}: {short(v)}' for label, v in values.items())})"
                           for key, values in settings.items())
        parts.append(f"{probe}: {listed}")
    return "; ".join(parts)


def require_comparable(records: list[dict], labels: list[str], allow_mixed: bool = False) -> list[str]:
    """Raise DataError naming the differing settings, or (allow_mixed) return them as notes."""
    differences = config_differences(records, labels)
    if not differences:
        return []
    what = describe_differences(differences)
    if not allow_mixed:
        raise DataError(f"refusing to compare results run with different protocol settings: {what} "
                        "(pass --allow-mixed / allow_mixed=True to compare anyway)")
    return [f"mixed protocol settings (compared anyway): {what}"]


def data_differences(records: list[dict], labels: list[str]) -> list[str]:
    """Notes for datasets whose content hash differs between runs (same name, other files)."""
    notes = []
    names = sorted({name for r in records for name, d in (r.get("data") or {}).items() if isinstance(d, dict)})
    for name in names:
        hashes = {label: r["data"][name].get("content_hash") for label, r in zip(labels, records)
                  if isinstance((r.get("data") or {}).get(name), dict)}
        if len(set(hashes.values())) > 1:
            listed = ", ".join(f"{label}: {str(h)[:12]}" for label, h in hashes.items())
            notes.append(f"runs read different {name} data (content hash {listed})")
    return notes


def probe_warnings(records: list[dict], labels: list[str]) -> list[str]:
    """A probe's own ``warnings`` (e.g. a linear-probe refit that did not converge), one note each."""
    return [f"{label} {probe}: {warning}" for label, record in zip(labels, records)
            for probe, result in record["probes"].items() for warning in (result.get("warnings") or [])]


def undefined_notes(records: list[dict], labels: list[str]) -> list[str]:
    """Notes for metrics a run left out as undefined for its data while another run reports them."""
    notes = []
    for label, record in zip(labels, records):
        for probe, result in record["probes"].items():
            for metric, why in (result.get("undefined_metrics") or {}).items():
                if any(metric in (r["probes"].get(probe, {}).get("metrics") or {}) for r in records):
                    notes.append(f"{probe}/{metric} is left out for {label}: {why}")
    return notes


def resolve_reference(reference, records: list[dict], labels: list[str]) -> int:
    """The index of the reference run: an index, a run label, an encoder spec or a fingerprint prefix
    (4+ characters); anything else is a DataError listing the run labels."""
    listed = ", ".join(labels)
    if isinstance(reference, bool):
        raise DataError(f"reference run {reference!r}: give a run label, spec or fingerprint prefix ({listed})")
    if isinstance(reference, numbers.Integral):
        reference = int(reference)
        if not 0 <= reference < len(records):
            raise DataError(f"reference run {reference} out of range (0..{len(records) - 1}); runs: {listed}")
        return reference
    wanted = str(reference).strip()
    for matches in ([i for i, label in enumerate(labels) if label == wanted],
                    [i for i, r in enumerate(records) if r["encoder"]["spec"] == wanted],
                    [i for i, r in enumerate(records) if len(wanted) >= 4
                     and r["encoder"]["fingerprint"].lower().startswith(wanted.lower())]):
        if len(set(matches)) == 1:
            return matches[0]
        if matches:
            raise DataError(f"--reference {wanted!r} matches {len(matches)} runs "
                            f"({', '.join(labels[i] for i in matches)}); give its run label or a longer "
                            "fingerprint prefix")
    raise DataError(f"--reference {wanted!r}: no such run; runs: {listed} "
                    "(a run label, an encoder spec or a fingerprint prefix of 4+ characters)")


def noise(a: dict, b: dict) -> str:
    """The rule for runs without per-item outcomes: 'outside' when both 95% CIs exist and do not
    overlap, 'inside' when they overlap, '' without CIs."""
    if not a.get("ci95") or not b.get("ci95"):
        return ""
    (a_lo, a_hi), (b_lo, b_hi) = a["ci95"], b["ci95"]
    return "outside" if a_hi < b_lo or b_hi < a_lo else "inside"


def check_bootstrap(bootstrap) -> int:
    """B, the resamples behind a difference's CI: 0 (judge by CI overlap only) or >= 100, as ``probe run``."""
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or not (bootstrap == 0 or bootstrap >= 100):
        raise SpecError(f"--bootstrap {bootstrap!r}: must be 0 (CI overlap only) or an integer >= 100 resamples")
    return bootstrap


class Pairing:
    """Per-item outcomes of the runs' probes (each file read once and checked against the
    results.json that names it) and the bootstrap difference of a metric between two runs.

    ``notes`` collects, once each, what a reader must know: runs scored on different items
    (unpaired), a run without per-item outcomes (CI overlap), an items file that disagrees with
    the value its results.json reports."""

    def __init__(self, bootstrap: int = DEFAULT_BOOTSTRAP, seed: int = 0):
        self.bootstrap, self.seed = check_bootstrap(bootstrap), seed
        self.notes: list[str] = []
        self._items: dict = {}
        self._checked: set = set()

    def _note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def items(self, record: dict, probe: str):
        """(Items, path) of a run's probe, or (None, None) when it left none (older results, no out dir)."""
        from ..items import Items
        block = (record["probes"].get(probe) or {}).get("items")
        if not isinstance(block, dict) or "file" not in block or "_path" not in record:
            return None, None
        path = Path(record["_path"]).parent / block["file"]
        if path not in self._items:
            if not path.is_file():
                self._note(f"{path}: items file missing; {probe} of {record['encoder']['spec']} is compared by "
                           "CI overlap")
                self._items[path] = None
            else:
                items = Items.load(path)
                if len(items) != block["n"] or items.ids_sha256 != block["ids_sha256"]:
                    raise DataError(f"{path}: holds {len(items)} items (ids sha256 {items.ids_sha256[:12]}) but "
                                    f"results.json names {block['n']} (ids sha256 {block['ids_sha256'][:12]}): "
                                    "not this run's per-item outcomes")
                self._items[path] = items
        return self._items[path], path

    def _recompute(self, stat: dict, items, path, probe: str, metric: str, reported, label: str) -> None:
        """The items must give the reported value: a one-line error naming the file if they cannot."""
        from ..bootstrap import statistic_value
        if (path, metric) in self._checked:
            return
        self._checked.add((path, metric))
        try:
            value = statistic_value(stat, items)
        except EncoderProbeError as e:
            raise DataError(f"{path}: {probe}/{metric}: {e}") from None
        if reported is not None and not abs(value - reported) <= 1e-6:
            self._note(f"{label} {probe}/{metric}: its items file gives {value:.6f}, results.json reports "
                       f"{reported:.6f}")

    def difference(self, ref: dict, run: dict, probe: str, metric: str, ref_label: str, label: str) -> dict | None:
        """bootstrap.compare_items of ``metric`` (run against the reference), or None when either
        run lacks per-item outcomes or the two name different statistics."""
        from ..bootstrap import compare_items
        ref_m, m = ref["probes"][probe]["metrics"][metric], run["probes"][probe]["metrics"][metric]
        stat = m.get("statistic")
        if not stat or stat != ref_m.get("statistic") or not self.bootstrap:
            return None
        (a, path_a), (b, path_b) = self.items(ref, probe), self.items(run, probe)
        if a is None or b is None:
            if (a is None) != (b is None):
                self._note(f"{probe}: {ref_label if a is None else label} has no per-item outcomes; differences "
                           "to it are judged by CI overlap")
            return None
        self._recompute(stat, a, path_a, probe, metric, ref_m["value"], ref_label)
        self._recompute(stat, b, path_b, probe, metric, m["value"], label)
        found = compare_items(stat, a, b, self.bootstrap, self.seed)
        if not found["paired"]:
            self._note(f"{probe}: {label} and {ref_label} were scored on different items ({len(b)} vs {len(a)}, "
                       "ids differ): their differences use an unpaired bootstrap")
        return found


def _ci_over(record: dict, m: dict) -> str:
    """What a metric's ci95 is over: items (bootstrap), seeds (results before version 3), probe (its own)."""
    if not m.get("ci95"):
        return ""
    ci = m.get("ci")
    if isinstance(ci, dict):
        return str(ci.get("over") or ci.get("method") or "")
    return "seeds" if record.get("schema_version", 0) < 3 else "probe"


def judge(m: dict, ref_m: dict, diff: dict | None) -> dict:
    """delta CI, p-value, paired, noise and noise_rule of one run's metric against the reference's."""
    from ..bootstrap import outside_noise
    if diff is not None:
        ci = diff["ci95"] or [None, None]
        return {"delta_ci_low": ci[0], "delta_ci_high": ci[1], "p_value": diff["p_value"], "paired": diff["paired"],
                "noise": "outside" if outside_noise(diff["ci95"]) else "inside",
                "noise_rule": "paired" if diff["paired"] else "unpaired"}
    overlap = noise(m, ref_m)
    return {"delta_ci_low": None, "delta_ci_high": None, "p_value": None, "paired": None, "noise": overlap,
            "noise_rule": "ci-overlap" if overlap else ""}


def metrics_table(records: list[dict], labels: list[str], reference: int = 0,
                  pairing: Pairing | None = None) -> pd.DataFrame:
    """Long table: one row per (probe, metric, run); delta and noise against the reference run
    (by the bootstrap over items where ``pairing`` finds both runs' per-item outcomes)."""
    rows = []
    ref_record = records[reference]
    for label, record in zip(labels, records):
        for probe, result in record["probes"].items():
            if result["status"] != "ok":
                continue
            for metric, m in result["metrics"].items():
                ref = ref_record["probes"].get(probe, {})
                ref_m = ref.get("metrics", {}).get(metric) if ref.get("status") == "ok" else None
                ci, seed_ci = m.get("ci95") or [None, None], m.get("seed_ci95") or [None, None]
                row = {"probe": probe, "metric": metric, "run": label, "value": m["value"], "ci_low": ci[0],
                       "ci_high": ci[1], "ci_over": _ci_over(record, m), "seed_ci_low": seed_ci[0],
                       "seed_ci_high": seed_ci[1], "n_seeds": len(m.get("values") or [m["value"]]),
                       "higher_is_better": m["higher_is_better"], "delta": None, "noise": "", "noise_rule": ""}
                if ref_m is not None and record is not ref_record:
                    if m["value"] is not None and ref_m["value"] is not None:
                        row["delta"] = m["value"] - ref_m["value"]
                        diff = None if pairing is None else \
                            pairing.difference(ref_record, record, probe, metric, labels[reference], label)
                        row.update(judge(m, ref_m, diff))
                    else:
                        row["noise"] = noise(m, ref_m)
                rows.append(row)
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    order = {label: i for i, label in enumerate(labels)}
    table["_run"] = table["run"].map(order)
    return table.sort_values(["probe", "metric", "_run"], kind="stable").drop(columns="_run").reset_index(drop=True)


def _cell(row) -> str:
    """value [95% CI] and, with several seeds, the interval over seeds beside it."""
    if pd.isna(row["value"]):
        return "-"
    text = f"{row['value']:.4f}"
    if not pd.isna(row["ci_low"]):
        text += f" [{row['ci_low']:.4f}, {row['ci_high']:.4f}]"
    if not pd.isna(row["seed_ci_low"]):
        text += f" seeds [{row['seed_ci_low']:.4f}, {row['seed_ci_high']:.4f}]"
    return text


def _delta_cell(row) -> str:
    """'-0.0100 worse, inside noise (paired Δ CI [-0.0200, +0.0000], p=0.27)' or '... (CIs overlap)'."""
    if pd.isna(row["delta"]):
        return ""
    text = f"{row['delta']:+.4f}"
    if row["delta"] != 0:
        text += " better" if (row["delta"] > 0) == bool(row["higher_is_better"]) else " worse"
    if row["noise_rule"] in ("paired", "unpaired"):
        interval = "" if pd.isna(row["delta_ci_low"]) else \
            f" Δ CI [{row['delta_ci_low']:+.4f}, {row['delta_ci_high']:+.4f}],"
        text += f", {row['noise']} noise ({row['noise_rule']}{interval} p={row['p_value']:.2g})"
    elif row["noise"]:
        text += f", {row['noise']} noise ({'CIs apart' if row['noise'] == 'outside' else 'CIs overlap'})"
    return text


def wide_table(table: pd.DataFrame, labels: list[str], reference: int = 0,
               records: list[dict] | None = None) -> pd.DataFrame:
    """One row per (probe, metric): each run's value [CI] and, for the others, the delta to the reference.

    A run without the metric shows "-", or "n/a" where its probe says the metric is undefined
    for its data (``undefined_metrics``; needs ``records``)."""
    def absent(i: int, probe: str, metric: str) -> str:
        result = records[i]["probes"].get(probe, {}) if records is not None else {}
        return "n/a" if metric in (result.get("undefined_metrics") or {}) else "-"

    rows = []
    for (probe, metric), group in table.groupby(["probe", "metric"], sort=False):
        by_run = {row["run"]: row for _, row in group.iterrows()}
        row = {"probe": probe, "metric": metric}
        for i, label in enumerate(labels):
            row[label] = _cell(by_run[label]) if label in by_run else absent(i, probe, metric)
            if i != reference:
                row[f"Δ {label}"] = _delta_cell(by_run[label]) if label in by_run else ""
        rows.append(row)
    columns = ["probe", "metric"] + [c for i, label in enumerate(labels)
                                     for c in ([label] if i == reference else [label, f"Δ {label}"])]
    return pd.DataFrame(rows, columns=columns)


def to_markdown(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (no tabulate dependency)."""
    def esc(x) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(esc(c) for c in frame.columns) + " |",
             "| " + " | ".join("---" for _ in frame.columns) + " |"]
    lines += ["| " + " | ".join(esc(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def failures(records: list[dict], labels: list[str]) -> list[tuple[str, str, str]]:
    """(run, probe, error) of every failed probe."""
    return [(label, probe, result.get("error", "")) for label, record in zip(labels, records)
            for probe, result in record["probes"].items() if result["status"] == "failed"]


@dataclass
class Comparison:
    """What ``compare`` found and wrote: the records, their labels, the long and wide tables, notes, files."""
    records: list[dict]
    labels: list[str]
    table: pd.DataFrame
    wide: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    failures: list = field(default_factory=list)
    files: dict = field(default_factory=dict)
    reference: int = 0  # index into records / labels of the run every delta is taken against
    bootstrap: int = DEFAULT_BOOTSTRAP  # resamples behind each difference's CI

    def to_json(self) -> str:
        """The long table with the runs, reference and notes (NaN as null): table.json."""
        rows = json.loads(self.table.to_json(orient="records"))
        return json.dumps({"runs": self.labels, "reference": self.reference_label, "bootstrap": self.bootstrap,
                           "notes": self.notes, "rows": rows}, indent=1) + "\n"

    @property
    def reference_label(self) -> str:
        return self.labels[self.reference]

    def _repr_markdown_(self) -> str:  # shown inline in notebooks
        return to_markdown(self.wide)


def compare(runs, out: str | Path | None = None, *, allow_mixed: bool = False, reference: int | str | None = None,
            plots: bool = True, bootstrap: int = DEFAULT_BOOTSTRAP) -> Comparison:
    """Compare runs (results.json paths, run dirs or loaded records); with ``out``, write the report.

    Runs keep the order they were run in (a run dir's results by their ``created`` time; paths
    given one by one in the order given). ``reference``: the run every delta is against, as an
    index, a run label, an encoder spec or a fingerprint prefix (default: the first run).
    ``bootstrap``: resamples behind each difference's CI and p-value (runs with per-item outcomes).
    ``out`` gets table.csv and table.json (long form), table.md, one bar chart per probe (metric_<probe>.png),
    gradient-map overlays side by side (overlay_<probe>.png), report.md and a self-contained
    report.html. Nothing is written when the runs are refused.
    """
    pairing = Pairing(bootstrap)
    records = load_runs(runs)
    labels = run_labels(records)
    reference = resolve_reference(0 if reference is None else reference, records, labels)
    notes = require_comparable(records, labels, allow_mixed) + data_differences(records, labels) \
        + undefined_notes(records, labels) + probe_warnings(records, labels)
    table = metrics_table(records, labels, reference, pairing)
    result = Comparison(records, labels, table, wide_table(table, labels, reference, records),
                        notes + pairing.notes, failures(records, labels), reference=reference, bootstrap=bootstrap)
    if out is not None:
        write_report(result, Path(out), plots=plots)
    return result


def write_report(result: Comparison, out: Path, plots: bool = True) -> None:
    from ..cache import atomic_write_bytes
    from . import html
    from .plots import metric_bars, overlays_side_by_side
    out.mkdir(parents=True, exist_ok=True)
    files = {"table.csv": out / "table.csv", "table.json": out / "table.json", "table.md": out / "table.md"}
    atomic_write_bytes(files["table.csv"], result.table.to_csv(index=False).encode())
    atomic_write_bytes(files["table.json"], result.to_json().encode())
    atomic_write_bytes(files["table.md"], to_markdown(result.wide).encode())
    images = {}
    if plots:
        for probe, group in result.table.groupby("probe", sort=True):
            images[f"metrics: {probe}"] = metric_bars(group, result.labels, out / f"metric_{probe}.png", probe)
        for probe in sorted({p for r in result.records for p in r["probes"]}):
            path = overlays_side_by_side(result.records, result.labels, probe, out / f"overlay_{probe}.png")
            if path is not None:
                images[f"gradient maps: {probe}"] = path
    files.update({p.name: p for p in images.values()})
    files["report.md"] = out / "report.md"
    atomic_write_bytes(files["report.md"], html.markdown_report(result, images, out).encode())
    files["report.html"] = out / "report.html"
    atomic_write_bytes(files["report.html"], html.html_report(result, images, out).encode())
    result.files = files
