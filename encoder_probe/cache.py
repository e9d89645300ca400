"""Where generated data and extracted features live, and how they are written without tearing.

Every write here is atomic: a file is written beside its target and renamed over it, a
directory is built under a temporary name and renamed into place. A reader (or a rerun after
``kill -9``) therefore sees either nothing or the whole thing, never a half-written entry.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def cache_root() -> Path:
    """``$ENCODER_PROBE_CACHE``, else ``$XDG_CACHE_HOME/encoder-probe``, else ``~/.cache/encoder-probe``."""
    if os.environ.get("ENCODER_PROBE_CACHE"):
        return Path(os.environ["ENCODER_PROBE_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "encoder-probe"


@contextlib.contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside ``path``; on success it is renamed over ``path``, on error removed.

    For writers that want a file name (safetensors, savefig) rather than bytes in memory.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def save_png(fig, path: Path, dpi: int = 100, **options) -> Path:
    """A matplotlib figure (object API: no pyplot state, any backend) as a PNG written atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, **options)
    return Path(path)


def atomic_write_json(path: Path, data) -> None:
    """Write via a temp file and rename, so a reader never sees a partial file."""
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


@contextlib.contextmanager
def atomic_dir(target: Path):
    """Build a directory under a temporary name; on success rename it to ``target``.

    Yields the temporary path. If ``target`` appeared meanwhile (another process built the
    same deterministic content), ours is discarded. On error nothing is left behind.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        yield tmp
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
            shutil.rmtree(tmp)  # lost a race to an identical build
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
