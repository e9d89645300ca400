"""Side-by-side comparison of results.json files: one table, noise marks, a refusal on mixed protocols.

Every probe is read generically from the shape runner.py writes (``probes[name].metrics[metric]``
= value, ci95, higher_is_better), so probes added later show up without code here.

Fairness: a probe's numbers are comparable only when it ran with the same protocol. Runs whose
``config_hash`` of a probe differ are refused (``allow_mixed`` compares anyway, with a note), and
the message names the settings that differ. Settings that describe the encoder or the machine
rather than the protocol (``NON_PROTOCOL``: resolved layers, device, batch sizes) may differ.

Noise: with 95% CIs on both sides (seeds > 1), a difference is *outside the noise* when the two
intervals do not overlap, else *inside*; without CIs nothing is claimed.

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

from ..errors import DataError
from ..encoders.registry import spec_label
from .schema import load_runs

NON_PROTOCOL = frozenset({"layers", "device", "batch_size", "chunk", "num_workers", "progress"})
TABLE_COLUMNS = ["probe", "metric", "run", "value", "ci_low", "ci_high", "n_seeds", "higher_is_better",
                 "delta", "noise"]


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

    Only protocol settings are listed; a probe whose hashes differ in non-protocol settings only
    is absent. Hand-written results without a config list the hash itself as the differing setting.
    """
    found: dict[str, dict] = {}
    probes = sorted({name for r in records for name in r["probes"]})
    for probe in probes:
        runs = [(label, r["probes"][probe]) for label, r in zip(labels, records)
                if r["probes"].get(probe, {}).get("status") == "ok"]
        hashes = {p.get("config_hash") for _, p in runs}
        if len(hashes) <= 1:
            continue
        if not all(isinstance(p.get("config"), dict) for _, p in runs):
            found[probe] = {"config_hash": {label: p.get("config_hash") for label, p in runs}}
            continue
        flat = [(label, _flatten(p["config"])) for label, p in runs]
        keys = sorted({k for _, c in flat for k in c})
        differing = {}
        for key in keys:
            if key.split(".")[0] in NON_PROTOCOL:
                continue
            values = {label: c.get(key, "<unset>") for label, c in flat}
            if len({json.dumps(v, sort_keys=True, default=str) for v in values.values()}) > 1:
                differing[key] = values
        if differing:
            found[probe] = differing
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
    """'outside' when both 95% CIs exist and do not overlap, 'inside' when they overlap, '' without CIs."""
    if not a.get("ci95") or not b.get("ci95"):
        return ""
    (a_lo, a_hi), (b_lo, b_hi) = a["ci95"], b["ci95"]
    return "outside" if a_hi < b_lo or b_hi < a_lo else "inside"


def metrics_table(records: list[dict], labels: list[str], reference: int = 0) -> pd.DataFrame:
    """Long table: one row per (probe, metric, run); delta and noise against the reference run."""
    rows = []
    for label, record in zip(labels, records):
        for probe, result in record["probes"].items():
            if result["status"] != "ok":
                continue
            for metric, m in result["metrics"].items():
                ref = records[reference]["probes"].get(probe, {})
                ref_m = ref.get("metrics", {}).get(metric) if ref.get("status") == "ok" else None
                ci = m.get("ci95") or [None, None]
                is_ref = record is records[reference]
                rows.append({"probe": probe, "metric": metric, "run": label, "value": m["value"],
                             "ci_low": ci[0], "ci_high": ci[1], "n_seeds": len(m.get("values") or [m["value"]]),
                             "higher_is_better": m["higher_is_better"],
                             "delta": None if ref_m is None or is_ref or m["value"] is None or ref_m["value"] is None
                             else m["value"] - ref_m["value"],
                             "noise": "" if ref_m is None or is_ref else noise(m, ref_m)})
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    order = {label: i for i, label in enumerate(labels)}
    table["_run"] = table["run"].map(order)
    return table.sort_values(["probe", "metric", "_run"], kind="stable").drop(columns="_run").reset_index(drop=True)


def _cell(row) -> str:
    if pd.isna(row["value"]):
        return "-"
    text = f"{row['value']:.4f}"
    if not pd.isna(row["ci_low"]):
        text += f" [{row['ci_low']:.4f}, {row['ci_high']:.4f}]"
    return text


def _delta_cell(row) -> str:
    if pd.isna(row["delta"]):
        return ""
    text = f"{row['delta']:+.4f}"
    if row["delta"] != 0:
        text += " better" if (row["delta"] > 0) == bool(row["higher_is_better"]) else " worse"
    if row["noise"]:
        text += f", {row['noise']} noise"
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

    @property
    def reference_label(self) -> str:
        return self.labels[self.reference]

    def _repr_markdown_(self) -> str:  # shown inline in notebooks
        return to_markdown(self.wide)


def compare(runs, out: str | Path | None = None, *, allow_mixed: bool = False, reference: int | str | None = None,
            plots: bool = True) -> Comparison:
    """Compare runs (results.json paths, run dirs or loaded records); with ``out``, write the report.

    Runs keep the order they were run in (a run dir's results by their ``created`` time; paths
    given one by one in the order given). ``reference``: the run every delta is against, as an
    index, a run label, an encoder spec or a fingerprint prefix (default: the first run).
    ``out`` gets table.csv (long form), table.md, one bar chart per probe (metric_<probe>.png),
    gradient-map overlays side by side (overlay_<probe>.png), report.md and a self-contained
    report.html. Nothing is written when the runs are refused.
    """
    records = load_runs(runs)
    labels = run_labels(records)
    reference = resolve_reference(0 if reference is None else reference, records, labels)
    notes = require_comparable(records, labels, allow_mixed) + data_differences(records, labels) \
        + undefined_notes(records, labels) + probe_warnings(records, labels)
    table = metrics_table(records, labels, reference)
    result = Comparison(records, labels, table, wide_table(table, labels, reference, records), notes,
                        failures(records, labels), reference=reference)
    if out is not None:
        write_report(result, Path(out), plots=plots)
    return result


def write_report(result: Comparison, out: Path, plots: bool = True) -> None:
    from ..cache import atomic_write_bytes
    from . import html
    from .plots import metric_bars, overlays_side_by_side
    out.mkdir(parents=True, exist_ok=True)
    files = {"table.csv": out / "table.csv", "table.md": out / "table.md"}
    atomic_write_bytes(files["table.csv"], result.table.to_csv(index=False).encode())
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
