"""keep_freed_memory: the allocator really keeps large freed buffers, and features do not change."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import write_imagefolder
from encoder_probe import runtime

FAULTS = """
import json, resource, torch
from encoder_probe.runtime import keep_freed_memory
def faults():
    def step():
        buffers = [torch.empty(6 << 20).fill_(1.0) for _ in range(6)]  # 6 x 24 MiB live, then freed
    step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
before = faults()
applied = keep_freed_memory()
print(json.dumps({"before": before, "applied": applied, "again": keep_freed_memory(), "after": faults()}))
"""

EXTRACT = """
import sys
import numpy as np
from encoder_probe import load_encoder
from encoder_probe.data import ImageFolder
from encoder_probe.features import extract
f = extract(load_encoder("timm:test_vit"), ImageFolder(sys.argv[1], "train"), out=sys.argv[2], batch_size=4,
            num_workers=1, pool=["cls", "mean"], tokens=True, progress=False)
np.savez(sys.argv[3], cls=f.pooled("cls"), mean=f.pooled("mean"), tokens=f.tokens())
"""


def _python(code, *args, **env):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}  # `make test` sets them
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                         env={**environ, **env}, check=True)
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_mallopt_applied_stops_refaulting_freed_buffers():
    seen = json.loads(_python(FAULTS))
    assert seen["applied"] and seen["again"]
    # 6 x 24 MiB x 5 = 180k pages; glibc's own sliding threshold keeps some: measured 43k-368k before, 0-12k after
    assert seen["before"] > 20_000 and seen["after"] < seen["before"] / 10, seen


def test_left_alone_when_the_user_tuned_malloc_or_opted_out():
    assert json.loads(_python(FAULTS, ENCODER_PROBE_MALLOC="0"))["applied"] is False
    seen = json.loads(_python(FAULTS, MALLOC_TRIM_THRESHOLD_="131072"))
    assert seen["applied"] is False


def test_no_glibc_is_a_no_op(monkeypatch):
    import ctypes
    monkeypatch.setattr(runtime, "_applied", None)
    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: (_ for _ in ()).throw(OSError("no libc")))
    assert runtime.keep_freed_memory() is False


@pytest.mark.slow
def test_features_bit_identical_with_and_without_it(tmp_path):
    data = write_imagefolder(tmp_path / "data", per_class=3)
    arrays = []
    for name, env in (("on", {}), ("off", {"ENCODER_PROBE_MALLOC": "0"})):
        _python(EXTRACT, data, tmp_path / f"cache-{name}", tmp_path / f"{name}.npz", **env)
        arrays.append(np.load(tmp_path / f"{name}.npz"))
    for key in ("cls", "mean", "tokens"):
        assert arrays[0][key].tobytes() == arrays[1][key].tobytes(), key
