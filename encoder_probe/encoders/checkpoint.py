"""Reading weights safely and only the part we need.

A checkpoint never runs code: safetensors, or ``torch.load(weights_only=True)``. Sharded
checkpoints are read through their index, and only the shards holding the requested keys are
opened (memory-mapped), so the tower of an 8B MLLM loads without touching the LM's shards.
"""
from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from ..errors import CheckpointError

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


class CheckpointReader:
    """Key listing and selective loading over one weights file or a (sharded) directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: no such file or directory")
        self._key_to_file = self._index()
        if not self._key_to_file:
            raise CheckpointError(f"{self.path}: checkpoint holds no tensors")

    # -- discovery ------------------------------------------------------------------------------
    def _index(self) -> dict[str, Path]:
        if self.path.is_file():
            return {k: self.path for k in _file_keys(self.path)}
        for name in (SAFETENSORS_INDEX, PICKLE_INDEX):
            index = self.path / name
            if index.is_file():
                return _read_index(index)
        files = sorted(self.path.glob("*.safetensors")) or sorted(
            p for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if not files:
            raise CheckpointError(f"{self.path}: no weights found (*.safetensors, "
                                  f"{SAFETENSORS_INDEX} or pytorch_model.bin)")
        return {k: f for f in files for k in _file_keys(f)}

    def keys(self) -> list[str]:
        return list(self._key_to_file)

    def files_for(self, keys: Iterable[str]) -> list[Path]:
        return sorted({self._key_to_file[k] for k in keys})

    # -- loading --------------------------------------------------------------------------------
    def load(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """Tensors for ``keys``, opening only the files that hold them."""
        keys = list(keys)
        by_file: dict[Path, list[str]] = {}
        for k in keys:
            by_file.setdefault(self._key_to_file[k], []).append(k)
        out: dict[str, torch.Tensor] = {}
        for file, file_keys in by_file.items():
            out.update(_load_file(file, file_keys))
        return out

    def first_tensor(self, names: Iterable[str]) -> torch.Tensor | None:
        """The first of ``names`` the checkpoint has (one weight in several layouts), or None."""
        name = next((n for n in names if n in self._key_to_file), None)
        return None if name is None else self.load([name])[name]

    def load_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        """All tensors under ``prefix``, with the prefix stripped."""
        keys = [k for k in self._key_to_file if k.startswith(prefix)]
        return {k[len(prefix):]: v for k, v in self.load(keys).items()}

    def first_prefix(self, candidates: Iterable[str]) -> str | None:
        """The first candidate prefix under which the checkpoint has keys (newest layout first)."""
        for prefix in candidates:
            if any(k.startswith(prefix) for k in self._key_to_file):
                return prefix
        return None


def _read_index(index: Path) -> dict[str, Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid weights index ({e})") from None
    out = {}
    for key, shard in weight_map.items():
        file = index.parent / shard
        if not file.is_file():
            raise CheckpointError(f"{file}: shard named in {index.name} is missing")
        out[key] = file
    return out


def _file_keys(file: Path) -> list[str]:
    if file.suffix == ".safetensors":
        from safetensors import safe_open
        try:
            with safe_open(file, framework="pt") as f:
                return list(f.keys())
        except Exception as e:  # safetensors raises its own error type for bad headers
            raise CheckpointError(f"{file}: truncated or corrupt safetensors file ({_one_line(e)})") from None
    if file.suffix in PICKLE_SUFFIXES:
        return list(_load_pickle(file))
    raise CheckpointError(f"{file}: unknown weights format (expected .safetensors or "
                          f"{'/'.join(PICKLE_SUFFIXES)})")


def _load_file(file: Path, keys: list[str]) -> dict[str, torch.Tensor]:
    if file.suffix != ".safetensors":
        state = _load_pickle(file)
        return {k: state[k] for k in keys}
    from safetensors import safe_open
    try:
        with safe_open(file, framework="pt") as f:
            return {k: f.get_tensor(k) for k in keys}
    except Exception as e:
        raise CheckpointError(f"{file}: truncated or corrupt safetensors file ({_one_line(e)})") from None


def _load_pickle(file: Path) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True: anything but plain tensors and containers is refused."""
    try:
        import zipfile  # mmap needs the zip format; legacy (torch < 1.6) files are read whole
        obj = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{file}: refused to unpickle: {_refusal(e)}; only plain tensors and containers "
                              "are read (torch.load weights_only=True)") from None
    except Exception as e:
        raise CheckpointError(f"{file}: unreadable checkpoint ({_one_line(e)[:200]})") from None
    # unwrap the usual training-script containers
    while isinstance(obj, dict) and len(obj) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in ("state_dict", "model", "module", "weights") if k in obj), None)
        if not isinstance(inner, dict):
            break
        obj = inner
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, dict) else {}
    if not tensors:
        raise CheckpointError(f"{file}: holds no tensor state dict")
    return tensors


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


# torch's weights-only unpickler names what it refused in one of these forms (torch 2.4 .. 2.x):
#   "Unsupported global: GLOBAL builtins.exec was not an allowed global by default."
#   "Trying to load unsupported GLOBAL posix.system whose module posix is blocked."
_GLOBAL = re.compile(r"\bGLOBAL\s+([A-Za-z_][\w.]*[\w])")
_OPERATION = re.compile(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\.?$)", re.S)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _refusal(e: Exception) -> str:
    """What the weights-only unpickler refused, from its (long, multi-line) message: the global
    it would have imported and called, else its own one-sentence reason, else the whole text."""
    text = _ANSI.sub("", str(e))
    found = _GLOBAL.search(text)
    if found:
        name = found.group(1) if "." in found.group(1) else f"builtins.{found.group(1)}"
        module, _, attr = name.rpartition(".")
        alias = f" = os.{attr}" if module in ("posix", "nt") else ""  # how os.system pickles
        return f"it asks to run code (GLOBAL {name}{alias} is not allowed)"
    reason = _OPERATION.search(text)
    if reason:
        return f"not a plain weights file ({' '.join(reason.group(1).split())})"
    return f"not a plain weights file ({_one_line(_ANSI.sub('', str(e)))})"


def load_into(
    module: nn.Module,
    state: dict[str, torch.Tensor],
    *,
    source: str | Path,
    optional: Callable[[str], bool] = lambda key: False,
) -> list[str]:
    """Load ``state`` into ``module`` strictly, after aligning a layout-dependent prefix.

    Older transformers layouts nest the tower under ``vision_model.``; transformers 5 towers do
    not. The alignment that matches the most module keys wins. Missing keys (other than
    ``optional`` ones), unexpected keys and shape mismatches are errors naming ``source``.
    Returns the optional keys that were missing.
    """
    expected = module.state_dict()
    state = _align(_renamed(state, module), expected.keys())
    missing = [k for k in expected if k not in state]
    required = [k for k in missing if not optional(k)]
    unexpected = [k for k in state if k not in expected]
    if required:
        raise CheckpointError(f"{source}: missing vision keys: {_few(required)}")
    if unexpected:
        raise CheckpointError(f"{source}: unexpected keys for this architecture: {_few(unexpected)}")
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise CheckpointError(f"{source}: shape mismatch for {k}: checkpoint {tuple(v.shape)}, "
                                  f"architecture {tuple(expected[k].shape)}")
    module.load_state_dict(state, strict=False)
    return [k for k in missing if optional(k)]


def _renamed(state: dict[str, torch.Tensor], module: nn.Module) -> dict[str, torch.Tensor]:
    """Apply transformers' own key renames for this class (published DINOv2 dirs still say
    ``attention.attention.query`` where transformers 5 modules say ``attention.q_proj``)."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:
        return state
    renames = [(src, tgt) for rule in get_checkpoint_conversion_mapping(type(module).__name__) or []
               if type(rule).__name__ == "WeightRenaming"
               for src, tgt in zip(rule.source_patterns, rule.target_patterns)]
    if not renames:
        return state
    out = {}
    for key, value in state.items():
        for src, tgt in renames:
            key = re.sub(src, tgt, key)
        out[key] = value
    return out


def _align(state: dict[str, torch.Tensor], expected: Iterable[str]) -> dict[str, torch.Tensor]:
    expected = set(expected)
    candidates = [state]
    for infix in ("vision_model.", "model."):
        candidates.append({infix + k: v for k, v in state.items()})
        if all(k.startswith(infix) for k in state):
            candidates.append({k[len(infix):]: v for k, v in state.items()})
    return max(candidates, key=lambda c: len(expected & c.keys()))


def _few(keys: list[str], n: int = 4) -> str:
    more = f" ... ({len(keys)} in all)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def training_details(path: Path) -> dict:
    """What `probe train` recorded in a dir it wrote (``pivot_train.json``): stage, steps, init; else {}."""
    try:
        record = json.loads((Path(path) / "pivot_train.json").read_text())
        config = record["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    origin = config.get("init") or config.get("vision_from") or config.get("vision")
    return {"stage": record.get("stage"), "trained": f"probe train {record.get('stage')}, {record.get('step')} steps "
                                                      f"from {origin}"}
