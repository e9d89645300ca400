"""Per-item outcomes of a probe: what the bootstrap resamples and what `probe compare` pairs.

A probe's metrics are functions of its evaluation items (images, records): whether each val image
was classified right, its confusion counts, whether a gradient map's peak hit the object. Keeping
those outcomes beside results.json lets every metric get a confidence interval over the items
and lets two encoders scored on the same images be compared *paired*, item by item.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DataError


@dataclass
class Items:
    """``ids`` (n,) stable item ids (an image's path relative to its dataset root, ``record:<i>``
    for VQA records): the same ids mean the same items. ``columns``: dense columns are (S, n, ...)
    with S the number of seeds (1 by default); sparse columns (e.g. seg's confusion triples) are
    named and shaped by the statistic that reads them. ``meta``: JSON-able facts the statistics need
    (``num_classes``)."""

    ids: np.ndarray
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.ids = np.asarray([str(i) for i in self.ids], dtype=str)
        self.columns = {name: np.asarray(value) for name, value in self.columns.items()}

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def ids_sha256(self) -> str:
        return hashlib.sha256("\n".join(self.ids.tolist()).encode()).hexdigest()

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        arrays = {"ids": self.ids, "meta": np.array(json.dumps(self.meta, sort_keys=True))}
        arrays.update({f"col/{name}": value for name, value in self.columns.items()})
        np.savez_compressed(buffer, **arrays)
        return buffer.getvalue()

    def save(self, path: str | Path) -> Path:
        """One .npz (``ids``, ``col/<name>``, ``meta`` as JSON), written atomically."""
        from .cache import atomic_write_bytes
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, self.to_bytes())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Items":
        """Read an items file back (no pickles: a file never runs code); a bad file is a one-line DataError."""
        try:
            with np.load(Path(path), allow_pickle=False) as f:
                columns = {k.removeprefix("col/"): f[k] for k in f.files if k.startswith("col/")}
                return cls(f["ids"], columns, json.loads(str(f["meta"])) if "meta" in f.files else {})
        except FileNotFoundError:
            raise DataError(f"{path}: no such items file") from None
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"{path}: not a per-item outcomes file ({' '.join(str(e).split())[:120]})") from None


def stack_seeds(per_seed: list[np.ndarray]) -> np.ndarray:
    """One dense column (S, n, ...) from each seed's (n, ...) outcomes."""
    return np.stack([np.asarray(v) for v in per_seed])
