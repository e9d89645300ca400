"""Feature extraction: one frozen forward pass per image, streamed into an on-disk cache.

Every probe that needs frozen features reads a ``FeatureSet``: pooled vectors (float32) for any
number of layers and poolings, optionally the patch and prefix tokens (float16), the labels and,
for dense data, the masks at the encoder's resolution, all as memory-mapped ``.npy`` arrays.

The cache entry is named by a sha256 over everything that determines its bytes: the encoder's
fingerprint (weights, preprocessing, layer choice), the dataset's content hash (every file's
bytes), split and options, the transform, the layers, poolings, token flag and compute dtype.
A change to any of them is a new entry; an entry is never rewritten in place.

Work is cut into fixed chunks of whole batches. A finished chunk is a safetensors file written
atomically into ``.KEY.partial/``; a rerun after a crash or ``kill -9`` skips the chunks already
there and computes the rest with the same batches, so the merged entry is byte-identical to an
uninterrupted run. Under ``torchrun`` rank r takes chunks r, r+W, ..., and rank 0 merges. Memory
stays at one chunk whatever the dataset size.

View ``full`` (an MLLM's every visual token: anyres base + tiles, InternVL tiles + thumbnail, Qwen
native resolution) gives each image its own number of tokens. Such an entry is *ragged*:
``tokens.L<layer>.npy`` holds the (total_tokens, D) tokens of every row one after the other, with
``token_offsets.npy`` (N+1,); ``layouts.jsonl`` one TokenLayout per row (``layout_offsets.npy``,
byte offsets); ``visual_tokens.npy`` / ``lm_tokens.npy`` the counts per row; masks stay at each
image's original size (``mask_pixels.npy`` flat + ``mask_shapes.npy`` (N, 2)). Pooled features pool
each image's whole sequence, exactly as ``encoder.pool(encoder.encode(image), how)``. The key and
meta.json carry the view (and meta.json ``tokens_per_image``); base entries are unchanged.

An entry is built under a lock file beside it (``.KEY.lock``, held by rank 0): a second process
asking for the same entry waits, then reuses it. DataLoader workers ignore SIGINT, so Ctrl-C is
handled by the main process alone (one line from the CLI, finished chunks kept to resume).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
from dataclasses import asdict
from datetime import timedelta
from functools import cached_property
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .cache import atomic_dir, atomic_write_bytes, atomic_write_json, feature_cache
from .data.base import ImageDataset
from .runtime import AUTOCASTS, DECODES
from .data.images import BadSample
from .errors import DataError, SpecError

FORMAT_VERSION = 1
POOLS = ("cls", "mean", "cls+mean", "head")
BAD_IMAGE_POLICIES = ("fail", "skip")
AUTOCAST = dict(zip(AUTOCASTS, (torch.bfloat16, torch.float16)))
FULL_VIEW_BATCH = 8  # images per loader batch in view full (the tower still runs passes of 64 tiles)


def _layer_tag(layer) -> str:
    return f"L{layer}"


class FeatureSet:
    """A finished cache entry; arrays are memory-mapped, so opening one costs nothing."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_file = self.path / "meta.json"
        if not meta_file.is_file():
            raise DataError(f"{self.path}: not a feature cache entry (no meta.json)")
        self.meta = json.loads(meta_file.read_text())

    def _array(self, name: str) -> np.ndarray:
        file = self.path / f"{name}.npy"
        if not file.is_file():
            raise DataError(f"{file}: not in this feature set (it holds: "
                            f"{', '.join(sorted(p.stem for p in self.path.glob('*.npy')))})")
        return np.load(file, mmap_mode="r")

    def _layer(self, layer):
        layers = self.meta["key"]["layers"]
        if layer is None:
            return layers[0]
        if isinstance(layer, int) and layer < 0:  # counted from the end of the full tower, as at extraction
            layer += self.meta["depth"] + 1
        if layer not in layers:
            raise DataError(f"{self.path}: layer {layer!r} was not extracted (layers: {layers})")
        return layer

    def pooled(self, how: str = "mean", layer=None) -> np.ndarray:
        """(N, D) float32 pooled features."""
        return self._array(f"pooled.{_layer_tag(self._layer(layer))}.{how}")

    def tokens(self, layer=None) -> np.ndarray:
        """(N, h*w, D) float16 patch tokens, row-major over ``grid``; view full (``ragged``): the
        (total_tokens, D) tokens of every row one after the other (see ``token_rows``)."""
        return self._array(f"tokens.{_layer_tag(self._layer(layer))}")

    # -- view "full": a variable number of tokens per image ------------------------------------------
    @property
    def view(self) -> str:
        """The encoder view the entry was extracted with: "base" or "full"."""
        return self.meta.get("view", "base")

    @property
    def ragged(self) -> bool:
        """True for view full: tokens, layouts and masks differ in size from row to row."""
        return self.view == "full"

    @cached_property
    def token_offsets(self) -> np.ndarray:
        """(N+1,) int64: row i's tokens are ``tokens()[token_offsets[i]:token_offsets[i+1]]``."""
        if not self.ragged:
            n, per = len(self), self.grid[0] * self.grid[1]
            return np.arange(n + 1, dtype=np.int64) * per
        return self._array("token_offsets")

    def token_rows(self, i: int, layer=None) -> np.ndarray:
        """(N_i, D) float16 patch tokens of row ``i``, in the order of ``layout(i)``."""
        if not self.ragged:
            return self.tokens(layer)[i]
        a, b = self.token_offsets[i], self.token_offsets[i + 1]
        return self.tokens(layer)[a:b]

    def token_counts(self) -> dict[str, np.ndarray]:
        """{"visual": (N,), "lm": (N,)} int64 tokens per row: the patch tokens, and what the MLLM's LM
        reads (after the projector's merge or shrink, image_newline tokens included: ``encoder.lm_layout``).
        Base view: the grid for every row, both (the entry does not know the projector; the runner maps
        the grid to the LM's count)."""
        if not self.ragged:
            visual = np.full(len(self), self.grid[0] * self.grid[1], dtype=np.int64)
            return {"visual": visual, "lm": visual}
        return {"visual": np.asarray(self._array("visual_tokens")), "lm": np.asarray(self._array("lm_tokens"))}

    @cached_property
    def _layout_offsets(self) -> np.ndarray:
        return self._array("layout_offsets")

    @cached_property
    def _layout_bytes(self):
        file = self.path / "layouts.jsonl"
        if not file.is_file():
            raise DataError(f"{self.path}: no token layouts (extracted with view {self.view!r}; layouts are kept "
                            "for view full)")
        return np.memmap(file, dtype=np.uint8, mode="r") if file.stat().st_size else np.zeros(0, np.uint8)

    def layout(self, i: int):
        """The :class:`~encoder_probe.encoders.views.TokenLayout` of row ``i`` (view full): where each
        of its tokens sits on the original image."""
        from .encoders.views import TokenLayout
        data = self._layout_bytes  # first: its error says why a base entry has none
        a, b = self._layout_offsets[i], self._layout_offsets[i + 1]
        return TokenLayout.from_dict(json.loads(bytes(data[a:b])))

    def mask(self, i: int) -> np.ndarray:
        """(H_i, W_i) uint8 train ids of row ``i`` (255 = ignore): view full keeps every mask at its
        image's original resolution; base view: ``masks[i]`` at the encoder's input resolution."""
        if not self.ragged:
            return self.masks[i]
        shapes, starts = self._mask_index
        h, w = shapes[i]
        return self._array("mask_pixels")[starts[i]:starts[i] + h * w].reshape(h, w)

    @cached_property
    def _mask_index(self):
        shapes = np.asarray(self._array("mask_shapes"))
        starts = np.concatenate([[0], np.cumsum(shapes[:, 0] * shapes[:, 1])]).astype(np.int64)
        return shapes, starts

    def prefix(self, layer=None) -> np.ndarray:
        """(N, P, D) float16 CLS/register tokens (P may be 0)."""
        return self._array(f"prefix.{_layer_tag(self._layer(layer))}")

    @cached_property
    def labels(self) -> np.ndarray:
        return self._array("labels")

    @cached_property
    def index(self) -> np.ndarray:
        """Dataset index of every row (rows of skipped images are absent)."""
        return self._array("index")

    @property
    def masks(self) -> np.ndarray:
        """(N, H, W) uint8 train ids at the encoder's input resolution, 255 = ignore (base view;
        view full keeps masks at each image's own size: ``mask(i)``)."""
        if self.ragged:
            raise DataError(f"{self.path}: view full keeps masks at each image's original size; read them "
                            "one by one with mask(i)")
        return self._array("masks")

    @property
    def key(self) -> str:
        return self.meta["key_sha256"]

    @property
    def grid(self) -> tuple[int, int] | None:
        """The base view's token grid (None for view full: grids differ from view to view)."""
        return tuple(self.meta["grid"]) if self.meta.get("grid") is not None else None

    # -- the dataset the entry was extracted from (probes read these, never meta["data"]) -------------
    @property
    def data(self) -> dict:
        """A copy of meta.json's data block (name, root, split, size, num_classes, class_names, ...):
        editing it cannot change what later readers of this entry see."""
        return json.loads(json.dumps(self.meta["data"]))

    @property
    def dataset(self) -> str:
        """The dataset's name ("imagenet", "ade20k", an image folder's name)."""
        return self.meta["data"]["name"]

    @property
    def root(self) -> str:
        """The dataset's root directory as it was read."""
        return str(self.meta["data"]["root"])

    @property
    def split(self) -> str:
        return self.meta["data"]["split"]

    @property
    def num_classes(self) -> int:
        return int(self.meta["data"]["num_classes"])

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["data"]["class_names"])

    @property
    def layers(self) -> list:
        return self.meta["key"]["layers"]

    def __len__(self) -> int:
        return self.meta["n"]

    def __repr__(self) -> str:
        view = ", view='full'" if self.ragged else ""
        return (f"FeatureSet({str(self.path)!r}, n={len(self)}, layers={self.layers}, "
                f"pool={self.meta['key']['pool']}{view})")


# -- keys ---------------------------------------------------------------------------------------
def cache_key(encoder, dataset: ImageDataset, *, layers, pool, tokens: bool, memo_dir: Path | None,
              autocast: str | None = None, decode: str = "cpu") -> dict:
    """Every part that decides the bytes of an entry (hashed into its name, kept in meta.json)."""
    key = {
        "format": FORMAT_VERSION,
        "encoder": encoder.fingerprint,
        "data": {"name": dataset.name, "split": dataset.split, "options": dataset.options,
                 "content": dataset.content_hash(memo_dir)},
        "transform": {"preprocess": asdict(encoder.preprocess), "with_masks": dataset.has_masks},
        "layers": list(layers),
        "pool": list(pool),
        "tokens": bool(tokens),
        "dtype": str(encoder.dtype).removeprefix("torch."),
    }
    if autocast is not None:  # both change the features; keys without them stay what they were
        key["autocast"] = autocast
    if decode != "cpu":
        key["transform"]["decode"] = decode
    if getattr(encoder, "view", "base") != "base":  # base keys (and so base entries) stay what they were
        key["view"] = encoder.view
        if dataset.has_masks:
            key["transform"]["masks"] = "original"  # masks kept at the original image size
    return key


def _sha(data) -> str:
    import hashlib
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


# -- distributed --------------------------------------------------------------------------------
def _distributed() -> tuple[int, int]:
    """(rank, world); joins the torchrun group (gloo: ranks only synchronise, data goes via files)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and "MASTER_ADDR" in os.environ:
        dist.init_process_group("gloo", timeout=timedelta(hours=4))
        return dist.get_rank(), world
    return 0, 1


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _rank_device(device, world: int):
    if device is not None and world > 1 and str(device) == "cuda":
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device


# -- extraction ---------------------------------------------------------------------------------
def _collate(items):
    good = [x for x in items if not isinstance(x, BadSample)]
    batch = {"bad": [x for x in items if isinstance(x, BadSample)],
             "index": torch.tensor([x["index"] for x in good], dtype=torch.int64),
             "label": torch.tensor([x["label"] for x in good], dtype=torch.int64)}
    if good:
        if isinstance(good[0]["pixels"], torch.Tensor):
            batch["pixels"] = torch.stack([x["pixels"] for x in good])
            if "mask" in good[0]:
                batch["mask"] = torch.stack([x["mask"] for x in good])
        else:  # view full: ProcessedImage items (tiles, native sizes) and masks at each image's own size
            batch["pixels"] = [x["pixels"] for x in good]
            if "mask" in good[0]:
                batch["mask"] = [x["mask"] for x in good]
    return batch


def _worker_init(worker_id: int) -> None:
    """DataLoader worker_init_fn: Ctrl-C reaches the whole process group, but only the main process
    handles it (it stops the workers), so no worker prints a KeyboardInterrupt traceback; nor one for
    the main process hanging up mid-transfer (the fd-sharing thread's ConnectionResetError / EOFError)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.excepthook = _worker_excepthook


def _worker_excepthook(kind, value, tb) -> None:
    if issubclass(kind, (ConnectionError, EOFError)):  # the main process went away: it reports, not us
        return
    sys.__excepthook__(kind, value, tb)


def _chunk_name(c: int) -> str:
    return f"chunk-{c:06d}.safetensors"


class _Extraction:
    """One (possibly resumed, possibly sharded) run that fills ``partial`` with chunk files."""

    def __init__(self, encoder, dataset, key, partial: Path, plan: dict, on_bad_image: str, pipeline=None):
        self.encoder, self.dataset, self.key, self.partial = encoder, dataset, key, partial
        self.batch_size, self.chunk_size = plan["batch_size"], plan["chunk_size"]
        self.on_bad_image = on_bad_image
        self.layers, self.pool, self.tokens = key["layers"], key["pool"], key["tokens"]
        self.pipeline = pipeline  # decode="device": workers read bytes, this decodes and preprocesses
        self.grid = None

    def autocast(self):
        """torch.autocast for the forward when the key asks for it (pooled features are stored float32)."""
        from contextlib import nullcontext
        name = self.key.get("autocast")
        return torch.autocast(self.encoder.device.type, AUTOCAST[name]) if name else nullcontext()

    def batches(self, chunks):
        n = len(self.dataset)
        out, owner = [], []
        for c in chunks:
            stop = min((c + 1) * self.chunk_size, n)
            for start in range(c * self.chunk_size, stop, self.batch_size):
                out.append(list(range(start, min(start + self.batch_size, stop))))
                owner.append(c)
        return out, owner

    def forward(self, batch) -> dict[str, np.ndarray]:
        if isinstance(batch.get("pixels"), list):
            return self.forward_full(batch)
        arrays = {"index": batch["index"].numpy(), "labels": batch["label"].numpy()}
        if "mask" in batch:
            arrays["masks"] = batch["mask"].numpy()
        if "pixels" not in batch:
            return arrays
        pixels = batch["pixels"].to(self.encoder.device, self.encoder.dtype, non_blocking=True)
        with torch.inference_mode(), self.autocast():
            per_layer = self.encoder.forward_tokens(pixels, self.layers)
            for layer, tokens in zip(self.layers, per_layer):
                tag = _layer_tag(layer)
                self.grid = tokens.grid
                for how in self.pool:
                    arrays[f"pooled.{tag}.{how}"] = self.encoder.pool(tokens, how).float().cpu().numpy()
                if self.tokens:
                    arrays[f"tokens.{tag}"] = tokens.patches.to(torch.float16).cpu().numpy()
                    arrays[f"prefix.{tag}"] = tokens.prefix.to(torch.float16).cpu().numpy()
        return arrays

    def forward_full(self, batch) -> dict[str, np.ndarray]:
        """View full: every image's own token sequence (the encoder sends all tiles of the batch through
        the tower at once), pooled over the whole sequence; tokens, layouts and masks stored ragged."""
        arrays = {"index": batch["index"].numpy(), "labels": batch["label"].numpy()}
        masks = [np.asarray(m, dtype=np.uint8) for m in batch.get("mask", [])]
        if masks:
            arrays["mask_pixels"] = np.concatenate([m.reshape(-1) for m in masks])
            arrays["mask_shapes"] = np.array([m.shape for m in masks], dtype=np.int64).reshape(-1, 2)
        with torch.inference_mode(), self.autocast():
            per_image = self.encoder.forward_tokens(batch["pixels"], self.layers)
        layouts = [image[0].layout for image in per_image]
        lines = [(json.dumps(layout.to_dict(), separators=(",", ":")) + "\n").encode() for layout in layouts]
        arrays["visual_tokens"] = np.array([layout.num_tokens for layout in layouts], dtype=np.int64)
        arrays["lm_tokens"] = np.array([self.encoder.lm_layout(layout).lm_tokens for layout in layouts], dtype=np.int64)
        arrays["layouts"] = np.frombuffer(b"".join(lines), dtype=np.uint8)
        arrays["layout_bytes"] = np.array([len(line) for line in lines], dtype=np.int64)
        with torch.inference_mode():
            for k, layer in enumerate(self.layers):
                tag = _layer_tag(layer)
                per_layer = [image[k] for image in per_image]
                for how in self.pool:
                    arrays[f"pooled.{tag}.{how}"] = torch.cat(
                        [self.encoder.pool(t, how) for t in per_layer]).float().cpu().numpy()
                if self.tokens:
                    arrays[f"tokens.{tag}"] = torch.cat([t.patches[0] for t in per_layer]).to(torch.float16).cpu().numpy()
                    arrays[f"prefix.{tag}"] = torch.cat([t.prefix for t in per_layer]).to(torch.float16).cpu().numpy()
        return arrays

    def check_bad(self, bad: list[BadSample], skipped: list):
        for b in bad:
            if b.fatal or self.on_bad_image == "fail":
                hint = "" if b.fatal else " (pass on_bad_image='skip' / --on-bad-image skip to skip and count)"
                raise DataError(f"{b.path}: {b.reason}{hint}")
            skipped.append({"index": b.index, "path": b.path, "reason": b.reason})

    def write_chunk(self, c: int, parts: list[dict], skipped: list):
        from safetensors.numpy import save
        names = sorted({name for part in parts for name in part})
        arrays = {name: np.ascontiguousarray(np.concatenate([p[name] for p in parts if name in p]))
                  for name in names}
        meta = {"skipped": json.dumps(skipped), "grid": json.dumps(self.grid)}
        atomic_write_bytes(self.partial / _chunk_name(c), save(arrays, metadata=meta))

    def run(self, chunks: list[int], *, num_workers: int, progress: bool, desc: str):
        from tqdm.auto import tqdm
        from .data.device_decode import FileBytes, collate_bytes, decode_batch
        batches, owner = self.batches(chunks)
        if not batches:
            return
        source, collate = (FileBytes(self.dataset), collate_bytes) if self.pipeline else (self.dataset, _collate)
        loader = torch.utils.data.DataLoader(
            source, batch_sampler=batches, num_workers=num_workers, collate_fn=collate,
            pin_memory=self.encoder.device.type == "cuda", worker_init_fn=_worker_init if num_workers else None)
        if self.pipeline:
            loader = (decode_batch(batch, self.pipeline, self.encoder.device) for batch in loader)
        remaining = {c: owner.count(c) for c in chunks}
        parts: dict[int, list] = {}
        skipped: dict[int, list] = {}
        with tqdm(total=sum(len(b) for b in batches), desc=desc, unit="img", disable=not progress,
                  file=sys.stderr) as bar:
            for batch, c in zip(loader, owner):
                self.check_bad(batch["bad"], skipped.setdefault(c, []))
                parts.setdefault(c, []).append(self.forward(batch))
                bar.update(len(batch["index"]) + len(batch["bad"]))
                remaining[c] -= 1
                if remaining[c] == 0:
                    self.write_chunk(c, parts.pop(c), skipped.pop(c))


def _merge(partial: Path, entry: Path, n_chunks: int, meta: dict) -> None:
    """Concatenate chunk files into memory-mapped .npy arrays, one chunk in memory at a time."""
    from safetensors import safe_open
    files = [partial / _chunk_name(c) for c in range(n_chunks)]
    dtypes = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "U8": np.uint8}
    shapes: dict[str, list] = {}
    kinds: dict[str, type] = {}
    skipped, grid = [], None
    for file in files:
        with safe_open(file, framework="np") as f:
            header = f.metadata()
            skipped += json.loads(header["skipped"])
            grid = grid or json.loads(header["grid"])
            for name in f.keys():
                shapes.setdefault(name, []).append(f.get_slice(name).get_shape())
                kinds[name] = dtypes[f.get_slice(name).get_dtype()]
    with atomic_dir(entry) as tmp:
        for name, chunk_shapes in sorted(shapes.items()):
            if name in _RAGGED_INDEX:  # view full: written below as offsets / a JSON-lines file
                continue
            shape = (sum(s[0] for s in chunk_shapes), *chunk_shapes[0][1:])
            with open(tmp / f"{name}.npy", "wb") as out:  # plain writes: the page cache, not our RSS, holds it
                np.lib.format.write_array_header_1_0(out, {"descr": np.lib.format.dtype_to_descr(np.dtype(kinds[name])),
                                                           "fortran_order": False, "shape": shape})
                for file in files:
                    with safe_open(file, framework="np") as f:
                        if name in f.keys():
                            out.write(np.ascontiguousarray(f.get_tensor(name)).tobytes())
        meta = {**meta, "n": int(sum(s[0] for s in shapes["index"])), "grid": grid,
                "skipped": sorted(skipped, key=lambda s: s["index"])}
        if meta["key"].get("view", "base") != "base":
            meta["view"] = meta["key"]["view"]
            meta["tokens_per_image"] = _merge_ragged(files, tmp, tokens=any(k.startswith("tokens.") for k in shapes))
        atomic_write_json(tmp / "meta.json", meta)
    shutil.rmtree(partial, ignore_errors=True)


_RAGGED_INDEX = ("layouts", "layout_bytes")


def _merge_ragged(files: list[Path], tmp: Path, tokens: bool) -> dict:
    """View full: ``layouts.jsonl`` (one TokenLayout per row) with ``layout_offsets.npy`` (N+1,) byte
    offsets into it, ``token_offsets.npy`` (N+1,) when tokens were kept; returns the token counts."""
    from safetensors import safe_open
    counts = {"visual": [], "lm": []}
    sizes = []
    with open(tmp / "layouts.jsonl", "wb") as out:
        for file in files:
            with safe_open(file, framework="np") as f:
                if "layouts" not in f.keys():  # a chunk of unreadable images only
                    continue
                out.write(f.get_tensor("layouts").tobytes())
                sizes.append(f.get_tensor("layout_bytes"))
                counts["visual"].append(f.get_tensor("visual_tokens"))
                counts["lm"].append(f.get_tensor("lm_tokens"))
    sizes = np.concatenate(sizes) if sizes else np.zeros(0, np.int64)
    np.save(tmp / "layout_offsets.npy", np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))
    visual = np.concatenate(counts["visual"]) if counts["visual"] else np.zeros(0, np.int64)
    if tokens:
        np.save(tmp / "token_offsets.npy", np.concatenate([[0], np.cumsum(visual)]).astype(np.int64))
    lm = np.concatenate(counts["lm"]) if counts["lm"] else np.zeros(0, np.int64)
    return {kind: token_summary(values) for kind, values in (("visual", visual), ("lm", lm))}


def token_summary(values) -> dict | None:
    """{"min", "mean", "max"} of per-image token counts (None for no images)."""
    values = np.asarray(values)
    if not len(values):
        return None
    return {"min": int(values.min()), "mean": round(float(values.mean()), 2), "max": int(values.max())}


def default_workers() -> int:
    """One loader process per core up to 8: decoding must keep ahead of the forward even in bursts."""
    return min(8, os.cpu_count() or 1)


def cores() -> int:
    """The cores this process may run on (its affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


PLAN_PROBE = 8  # images decoded and forwarded to weigh decoding against the forward


def cpu_plan(encoder, dataset, batch_size: int, decoded_on_device: bool = False) -> tuple[int, int | None]:
    """(loader workers, torch threads or None to leave them) for ``extract``'s default.

    Off CPU (or decoding on the device) the forward does not compete with the loader: the usual
    workers. On CPU both share the cores, and torch's spinning threads lose badly to a worker that
    preempts them: decoding a few images and forwarding them measures the decode share s of the
    work per image; when the loader needs at least half a core (cores x s >= 0.5) it gets its own
    cores and torch the rest, else one worker fits in the forward's gaps and torch keeps every core.
    """
    n = cores()
    if encoder.device.type != "cpu" or decoded_on_device or len(dataset) < 2 * batch_size \
            or getattr(encoder, "view", "base") != "base" or n < 2:
        return default_workers(), None
    share = _decode_share(encoder, dataset)
    if share is None:
        return default_workers(), None
    workers = max(1, math.ceil(n * share))
    return (workers, max(1, n - workers)) if n * share >= 0.5 else (1, None)


def _decode_share(encoder, dataset) -> float | None:
    """Decode time over decode + forward core time per image, on the first few images."""
    import time
    start = time.perf_counter()
    items = [dataset[i] for i in range(min(PLAN_PROBE, len(dataset)))]
    decode = time.perf_counter() - start
    pixels = [x["pixels"] for x in items if not isinstance(x, BadSample)]
    if not pixels or not isinstance(pixels[0], torch.Tensor):
        return None
    x = torch.stack(pixels).to(encoder.device, encoder.dtype)
    with torch.inference_mode():
        encoder.forward_tokens(x, [encoder.layer])  # warm-up: first calls allocate and pick kernels
        start = time.perf_counter()
        encoder.forward_tokens(x, [encoder.layer])
        forward = (time.perf_counter() - start) * torch.get_num_threads() * len(items) / len(pixels)
    return decode / (decode + forward)


def _decode_plan(decode: str, encoder, dataset) -> tuple[object, dict]:
    """(device pipeline or None, what meta.json records about decoding)."""
    from .data.device_decode import device_pipeline
    if decode == "cpu" or (decode == "auto" and encoder.device.type != "cuda"):
        return None, {"asked": decode, "used": "cpu"}
    if getattr(encoder, "view", "base") != "base":
        return None, {"asked": decode, "used": "cpu", "reason": "view full: the checkpoint's own processor"}
    pipeline, reason = device_pipeline(encoder.preprocess.transform, dataset)
    if pipeline is None:
        return None, {"asked": decode, "used": "cpu", "reason": reason}
    return pipeline, {"asked": decode, "used": "device"}


def extract(encoder, dataset: ImageDataset, *, out: str | Path | None = None, layers=None,
            pool: str | Sequence[str] = ("mean",), tokens: bool = False, batch_size: int = 64,
            chunk_size: int | None = None, num_workers: int | None = None, device=None, dtype=None,
            on_bad_image: str = "fail", progress: bool = True, autocast: str | None = None,
            decode: str | None = None) -> FeatureSet:
    """Extract (or reuse) features of ``dataset`` through ``encoder``; returns the cache entry.

    layers: None (the encoder's default layer), one layer, or a list (one forward pass for all).
    pool: any of cls | mean | cls+mean | head. tokens: also keep patch/prefix tokens (float16).
    An encoder loaded with ``view="full"`` gives a ragged entry (``FeatureSet.ragged``; see the module
    docstring): ``token_rows(i)``, ``layout(i)``, ``mask(i)`` per row.
    out: the cache directory (default :func:`~encoder_probe.cache.feature_cache`: ``cache_root()/features``).
    on_bad_image: "fail" (default; the error names the file) or "skip" (skipped files are counted
    in ``meta["skipped"]``). A mask that does not fit its image or has unknown labels always fails.
    num_workers: None balances loader workers against torch threads on CPU (:func:`cpu_plan`).
    autocast: None, "bf16" or "fp16": the forward under ``torch.autocast`` (part of the key).
    decode: "cpu" (PIL in the workers), "device" (workers read bytes, JPEGs decoded and preprocessed on
    the encoder's device; falls back to "cpu" with the reason in ``meta["decode"]`` where the data or
    the preprocessing does not allow it) or "auto" ("device" on CUDA, else "cpu"). None for either: the
    process default (``runtime.extraction_defaults``: no autocast, "auto", unless ``probe run`` set them).
    """
    from .encoders import load_encoder
    from .runtime import extraction_defaults, keep_freed_memory
    keep_freed_memory()
    defaults = extraction_defaults()
    autocast = defaults["autocast"] if autocast is None else autocast
    decode = defaults["decode"] if decode is None else decode
    if isinstance(encoder, str):
        encoder = load_encoder(encoder)
    pool = [pool] if isinstance(pool, str) else list(pool)
    bad_pool = [p for p in pool if p not in POOLS]
    if bad_pool or not pool:
        raise SpecError(f"unknown pooling {bad_pool or pool}; choose from {', '.join(POOLS)}")
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise SpecError(f"on_bad_image must be 'fail' or 'skip', got {on_bad_image!r}")
    if batch_size < 1:
        raise SpecError(f"batch_size must be >= 1, got {batch_size}")
    if autocast is not None and autocast not in AUTOCAST:
        raise SpecError(f"autocast must be None, {', '.join(map(repr, AUTOCAST))}; got {autocast!r}")
    if decode not in DECODES:
        raise SpecError(f"decode must be one of {', '.join(map(repr, DECODES))}; got {decode!r}")
    if getattr(encoder, "view", "base") == "full":  # an image is up to 37 tiles: loader batches of a few images
        batch_size = min(batch_size, FULL_VIEW_BATCH)  # keep host memory near a base batch's (tokens are per image)
    rank, world = _distributed()
    device = _rank_device(device, world)
    encoder.fingerprint  # of the weights as loaded, before any cast (cached)
    if device is not None or dtype is not None:
        from .encoders.registry import parse_dtype
        encoder.to(device=device, dtype=parse_dtype(dtype) if isinstance(dtype, str) else dtype)
    layers = [encoder.layer] if layers is None else [layers] if isinstance(layers, (int, str)) else list(layers)
    layers = [encoder.resolve_layer(layer) for layer in layers]
    if "head" in pool and layers != ["final"]:
        raise SpecError(f"pool 'head' is the model's own head on its final tokens: needs layers=['final'], "
                        f"got {layers}")
    out = feature_cache(out)
    dataset.with_transform(encoder.preprocess)
    pipeline, decoded = _decode_plan(decode, encoder, dataset)

    memo = out / ".file-hashes"
    if rank != 0:
        _barrier(world)  # rank 0 hashes the files first; the others then hit its memo
    key = cache_key(encoder, dataset, layers=layers, pool=pool, tokens=tokens, memo_dir=memo, autocast=autocast,
                    decode="device" if pipeline else "cpu")
    if rank == 0:
        _barrier(world)
    sha = _sha(key)
    entry = out / sha[:20]
    if world == 1 and (entry / "meta.json").is_file():  # finished entries are never rewritten: no lock to read
        return _finished(entry, sha)  # (one that cannot take a lock, e.g. a read-only cache, reads)
    lock = _lock_entry(out, entry, progress) if rank == 0 else None
    try:
        _barrier(world)  # the other ranks look at the entry once rank 0 holds its lock
        return _extract_entry(encoder, dataset, key, sha, out, entry, rank=rank, world=world,
                              batch_size=batch_size, chunk_size=chunk_size, num_workers=num_workers,
                              on_bad_image=on_bad_image, progress=progress, pipeline=pipeline, decoded=decoded)
    finally:
        if lock is not None:
            lock.release()


def _finished(entry: Path, sha: str) -> FeatureSet:
    found = FeatureSet(entry)
    if found.key != sha:
        raise DataError(f"{entry}: cache entry belongs to another key (hash prefix collision); remove it")
    return found


def _lock_entry(out: Path, entry: Path, progress: bool):
    """Hold ``out/.KEY.lock`` while the entry is checked and built; waits while another process builds it."""
    from filelock import FileLock, Timeout
    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out / f".{entry.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if progress:
            print(f"waiting for another process building {entry} ...", file=sys.stderr)
        lock.acquire()
    return lock


def _extract_entry(encoder, dataset, key: dict, sha: str, out: Path, entry: Path, *, rank: int, world: int,
                   batch_size: int, chunk_size: int | None, num_workers: int | None, on_bad_image: str,
                   progress: bool, pipeline=None, decoded: dict | None = None) -> FeatureSet:
    """The entry under its lock: reuse it if built, else extract (resuming finished chunks) and merge."""
    partial = out / f".{entry.name}.partial"
    if (entry / "meta.json").is_file():
        return _finished(entry, sha)

    n = len(dataset)
    if chunk_size is None:
        chunk_size = (256 if key["tokens"] else 1024) if "view" not in key else (32 if key["tokens"] else 256)
    chunk_size = max(batch_size, math.ceil(chunk_size / batch_size) * batch_size)
    plan = {"key_sha256": sha, "n": n, "batch_size": batch_size, "chunk_size": chunk_size}
    plan_file = partial / "plan.json"
    if rank == 0:
        if plan_file.is_file() and json.loads(plan_file.read_text()).get("key_sha256") == sha:
            plan = json.loads(plan_file.read_text())  # resume with the batches the first run used
        else:
            shutil.rmtree(partial, ignore_errors=True)
            atomic_write_json(plan_file, plan)
    _barrier(world)
    plan = json.loads(plan_file.read_text())
    n_chunks = math.ceil(n / plan["chunk_size"])
    done = {c for c in range(n_chunks) if (partial / _chunk_name(c)).is_file()}
    mine = [c for c in range(n_chunks) if c % world == rank and c not in done]
    if done and rank == 0 and progress:
        print(f"resuming {entry.name}: {len(done)} of {n_chunks} chunks already done", file=sys.stderr)

    job = _Extraction(encoder, dataset, key, partial, plan, on_bad_image, pipeline)
    workers, threads = (num_workers, None) if num_workers is not None or not mine else \
        cpu_plan(encoder, dataset, plan["batch_size"], decoded_on_device=pipeline is not None)
    desc = f"extract {dataset.name}/{dataset.split}" + (f" [rank {rank}/{world}]" if world > 1 else "")
    before = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        job.run(mine, num_workers=workers, progress=progress, desc=desc)
    except BaseException as e:  # bad data, or nothing done yet: leave no trace; else keep chunks to resume
        if isinstance(e, DataError) or not any(partial.glob("chunk-*")):
            shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(before)
    _barrier(world)
    if rank == 0:
        meta = {"key_sha256": sha, "key": key, "encoder": {"spec": encoder.spec, "source": encoder.source},
                "data": {**dataset.describe(), "class_names": dataset.class_names},
                "depth": encoder.layers.depth, "plan": {k: plan[k] for k in ("batch_size", "chunk_size")},
                "decode": decoded}
        _merge(partial, entry, n_chunks, meta)
    _barrier(world)
    return FeatureSet(entry)
