"""Where generated data and extracted features live, and how they are written without tearing.

Every write here is atomic: a file is written beside its target and renamed over it, a
directory is built under a temporary name and renamed into place. A reader (or a rerun after
``kill -9``) therefore sees either nothing or the whole thing, never a half-written entry.
What is written gets the modes a plain ``open`` / ``mkdir`` would give it (0o666 / 0o777 less
the umask), not the private 0600 / 0700 of the temporary names.
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


def feature_cache(cache=None) -> Path:
    """Where extracted features live: ``cache`` if given, else ``features`` under :func:`cache_root`."""
    return Path(cache) if cache is not None else cache_root() / "features"


def current_umask() -> int:
    """The process umask, read without changing it where the OS tells (Linux), else set and restored."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_writable_dir(path, what: str = "--out") -> Path:
    """A directory we may create or write into, checked before any work (nothing is created here).

    One-line SpecError when ``path`` is an existing file, when the nearest existing ancestor is
    a file, or when that ancestor does not let this user create entries in it (os.access with the
    effective ids: permissions, ACLs and read-only file systems; root passes permission checks).
    """
    from .errors import SpecError
    path = Path(path).expanduser()
    if os.path.lexists(path) and not os.path.isdir(path):
        kind = "a dangling symlink" if os.path.islink(path) else "a file"
        raise SpecError(f"{what} {path}: is {kind}, not a directory")
    nearest = path
    while not os.path.lexists(nearest) and nearest.parent != nearest:
        nearest = nearest.parent
    if not os.path.isdir(nearest):
        raise SpecError(f"{what} {path}: {nearest} is a file, not a directory")
    effective = os.access in os.supports_effective_ids
    if not os.access(nearest, os.W_OK | os.X_OK, effective_ids=effective):
        raise SpecError(f"{what} {path}: " + ("not writable" if nearest == path else f"{nearest} is not writable"))
    return path


@contextlib.contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside ``path``; on success it is renamed over ``path``, on error removed.

    For writers that want a file name (safetensors, savefig) rather than bytes in memory.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        try:
            os.fchmod(fd, 0o666 & ~current_umask())  # what open() gives a new file, not mkstemp's 0600
        finally:
            os.close(fd)
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
        os.chmod(tmp, 0o777 & ~current_umask())  # what mkdir gives a new directory, not mkdtemp's 0700
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
