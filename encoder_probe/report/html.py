"""report.md and a self-contained report.html (every picture inlined as a data: URI).

The HTML needs no other file and no network: it can be mailed, attached to a CI run or opened
from a browser's downloads folder and still show its tables and images. Wide tables stay inside
the page: long cells (specs, fingerprints, hashes) wrap, and a table that still does not fit
scrolls inside its own box rather than widening the page.
"""
from __future__ import annotations

import base64
import mimetypes
import os
from html import escape
from pathlib import Path

from .plots import IMAGE_KINDS, artifact_path

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1400px;overflow-wrap:anywhere}
.table{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;margin:1em 0;font-size:13px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top;overflow-wrap:anywhere;
word-break:break-word;min-width:4em}
th{background:#f3f3f3} td.outside{background:#fff2cc;font-weight:600} td.num{font-variant-numeric:tabular-nums}
img{max-width:100%;border:1px solid #eee;margin:.5em 0} .note{color:#8a4b00} .failed{color:#b00020}
code{font-size:12px}
"""


def data_uri(path: Path) -> str:
    mime = mimetypes.guess_type(str(path))[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(Path(path).read_bytes()).decode()}"


def _runs_rows(result) -> list[list[str]]:
    rows = []
    for label, record in zip(result.labels, result.records):
        enc = record["encoder"]
        data = record.get("data") or {}
        content = ", ".join(f"{name} {(d or {}).get('content_hash', '')[:12]}" for name, d in data.items()
                            if isinstance(d, dict))
        env = record.get("env") or {}
        pooling = str(enc.get("pooling", ""))
        if enc.get("view", "base") != "base":  # full: pooled over every token the LM reads
            lm = ((enc.get("tokens_per_image") or {}).get("lm") or {}).get("mean")
            pooling += f" (view {enc['view']}" + (f", {lm:g} LM tokens/image)" if lm is not None else ")")
        rows.append([label, enc["spec"], enc.get("source", ""), str(enc.get("layer", "")), pooling,
                     f"{enc['n_params']:,}" if isinstance(enc.get("n_params"), int) else "",
                     enc["fingerprint"][:16], content, f"{env.get('device', '')} {env.get('dtype', '')}".strip(),
                     record.get("created", "")])
    return rows


RUN_COLUMNS = ["run", "spec", "source", "layer", "pooling", "params", "fingerprint", "data (content hash)",
               "device", "created"]


def _other_artifacts(result, out: Path):
    """(run, probe, kind, path) of artifacts that are not the side-by-side overlays."""
    for label, record in zip(result.labels, result.records):
        for probe, p in record["probes"].items():
            for kind in (p.get("artifacts") or {}):
                if kind == "overlay":
                    continue
                path = artifact_path(record, probe, kind)
                if path is not None:
                    yield label, probe, kind, path


def markdown_report(result, images: dict[str, Path], out: Path) -> str:
    from .compare import to_markdown
    import pandas as pd
    lines = ["# encoder-probe comparison", "", "## Runs", "",
             to_markdown(pd.DataFrame(_runs_rows(result), columns=RUN_COLUMNS))]
    lines += [f"> {note}" for note in result.notes]
    lines += ["## Metrics", "", f"Value [95% CI]; Δ against {_reference(result)}; {NOISE_RULE}", "",
              to_markdown(result.wide)]
    if result.failures:
        lines += ["## Failed probes", ""] + [f"- {run} / {probe}: `{error}`" for run, probe, error in result.failures]
        lines.append("")
    for title, path in images.items():
        lines += [f"## {title}", "", f"![{title}]({path.name})", ""]
    others = list(_other_artifacts(result, out))
    if others:
        lines += ["## Artifacts", ""]
        lines += [f"- {run} / {probe}: [{kind}]({os.path.relpath(path, out)})" for run, probe, kind, path in others]
    return "\n".join(lines) + "\n"


NOISE_RULE = ("The 95% CIs are bootstrapped over the evaluation items (seeds [..]: the t-interval over training "
              "seeds). A difference is outside the noise only when the bootstrap 95% CI of the difference excludes "
              "0: paired when both runs scored the same items, unpaired (and noted) when their items differ; "
              "for runs without per-item outcomes, when the two runs' CIs do not overlap (CIs apart). "
              "n/a = undefined for the run's data.")


def _reference(result) -> str:
    """'the first run (LABEL)' or 'LABEL (the reference run)'."""
    label = result.reference_label
    return f"the first run ({label})" if result.reference == 0 else f"{label} (the reference run)"


def _html_table(columns, rows, classes=None) -> str:
    head = "".join(f"<th>{escape(str(c))}</th>" for c in columns)
    body = []
    for i, row in enumerate(rows):
        cells = "".join(f"<td class=\"{(classes or {}).get((i, j), '')}\">{escape(str(v))}</td>"
                        for j, v in enumerate(row))
        body.append(f"<tr>{cells}</tr>")
    return f"<div class=\"table\"><table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"


def html_report(result, images: dict[str, Path], out: Path) -> str:
    """The whole report as one HTML string; images inline, artifacts that are not pictures as links."""
    wide = result.wide
    classes = {(i, j): "num outside" if "outside noise" in str(v) else "num"
               for i, row in enumerate(wide.itertuples(index=False)) for j, v in enumerate(row) if j >= 2}
    parts = ["<!doctype html><html><head><meta charset=\"utf-8\"><title>encoder-probe comparison</title>",
             f"<style>{STYLE}</style></head><body>", "<h1>encoder-probe comparison</h1>",
             "<h2>Runs</h2>", _html_table(RUN_COLUMNS, _runs_rows(result))]
    parts += [f"<p class=\"note\">{escape(note)}</p>" for note in result.notes]
    parts += ["<h2>Metrics</h2>",
              f"<p>Value [95% CI]; Δ against {escape(_reference(result))}; highlighted = outside the noise. "
              f"{escape(NOISE_RULE)}</p>",
              _html_table(list(wide.columns), [list(r) for r in wide.itertuples(index=False)], classes)]
    if result.failures:
        parts.append("<h2>Failed probes</h2><ul>")
        parts += [f"<li class=\"failed\">{escape(run)} / {escape(probe)}: <code>{escape(error)}</code></li>"
                  for run, probe, error in result.failures]
        parts.append("</ul>")
    for title, path in images.items():
        parts += [f"<h2>{escape(title)}</h2>", f"<img alt=\"{escape(title)}\" src=\"{data_uri(path)}\">"]
    others = list(_other_artifacts(result, out))
    if others:
        parts.append("<h2>Artifacts</h2>")
        for run, probe, kind, path in others:
            if kind in IMAGE_KINDS and path.suffix.lower() in (".png", ".jpg", ".jpeg"):
                parts += [f"<h3>{escape(run)} / {escape(probe)}: {escape(kind)}</h3>",
                          f"<img alt=\"{escape(f'{run} {probe} {kind}')}\" src=\"{data_uri(path)}\">"]
            else:
                href = escape(os.path.relpath(path, out))
                parts.append(f"<p>{escape(run)} / {escape(probe)}: <a href=\"{href}\">{escape(kind)}</a></p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
