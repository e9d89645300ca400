"""notebooks/explore.ipynb executes end to end (nbclient) and shows its table and pictures inline."""
import json
import time
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "explore.ipynb"


def _loads(name: str) -> bool:
    from encoder_probe.probe import get_probe
    try:
        get_probe(name)
        return True
    except Exception:
        return False


@pytest.mark.slow
def test_explore_notebook_executes(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    monkeypatch.setenv("EXPLORE_OUT", str(tmp_path / "explore"))  # the kernel inherits the environment
    monkeypatch.setenv("ENCODER_PROBE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    start = time.perf_counter()
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    wall = time.perf_counter() - start
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    markdown = "".join(o.get("data", {}).get("text/markdown", "") for o in outputs)
    assert "| imagenet | top1 |" in markdown and "| knn | top1@k=10 |" in markdown
    assert "regression" in markdown  # the random twin fails the gate against the pretrained baseline
    pictures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pictures) >= 2  # one bar chart per probe
    text = "".join(o.get("text", "") for o in outputs)
    assert "exit code 1" in text

    records = {json.loads(p.read_text())["encoder"]["spec"]: json.loads(p.read_text())
               for p in (tmp_path / "explore" / "runs").glob("*/results.json")}
    top1 = {spec: r["probes"]["imagenet"]["metrics"]["top1"]["value"] for spec, r in records.items()}
    assert top1["torchvision:mobilenet_v2@imagenet"] > top1["torchvision:mobilenet_v2"] + 0.2, top1
    assert (tmp_path / "explore" / "report" / "report.html").is_file()
    if _loads("gradcam"):  # gradient maps of both encoders, side by side, shown inline
        assert all(r["probes"]["gradcam"]["status"] == "ok" for r in records.values())
        assert (tmp_path / "explore" / "report" / "overlay_gradcam.png").is_file()
        assert len(pictures) >= 4  # 3 bar charts + the overlays (shown again under "Gradient maps")
    print(f"notebook executed in {wall:.1f} s")
