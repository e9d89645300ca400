"""The process's runtime settings: how the C allocator treats the forward's large buffers.

glibc hands a freed buffer above its (dynamic) mmap threshold back to the OS at once and trims the
heap top past 128 KiB, so every batch of a CPU forward re-faults its activations page by page (about
20k minor faults per image for MobileNetV2 at batch 64; kernel time larger than user time).
:func:`keep_freed_memory` raises those thresholds once per process with ``mallopt`` (the values of
the Makefile's ``TEST_MALLOC``), so the buffers are reused. Only where memory lives changes, never
what is computed: features stay bit-identical. DataLoader workers forked afterwards inherit it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's malloc.h
MMAP_THRESHOLD = 32 << 20  # glibc's ceiling for it on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes a C int: the Makefile's 16 GiB does not fit; 2 GiB - 1 keeps as much
TOP_PAD = 1 << 30
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")

AUTOCASTS = ("bf16", "fp16")  # extract(autocast=): the names here, the torch dtypes in features.AUTOCAST
DECODES = ("auto", "cpu", "device")  # extract(decode=)

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Tell glibc to keep large freed buffers (idempotent); True when the settings are in force.

    A no-op returning False without glibc's ``mallopt``, with ``ENCODER_PROBE_MALLOC=0``, or when the
    user tuned the allocator (``MALLOC_*_`` variables, ``glibc.malloc`` tunables): theirs win.
    """
    global _applied
    if _applied is None:
        _applied = _user_tuned() is None and _mallopt_all()
    return _applied


def _user_tuned() -> str | None:
    """Why the allocator is left as it is (None: ours to set)."""
    if os.environ.get("ENCODER_PROBE_MALLOC", "1") == "0":
        return "ENCODER_PROBE_MALLOC=0"
    for name in USER_SETTINGS:
        if name in os.environ:
            return name
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    return None


def _mallopt_all() -> bool:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt, Windows)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    settings = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD))
    return all(mallopt(param, value) == 1 for param, value in settings)


_extraction = {"autocast": None, "decode": "auto"}


def extraction_defaults(**settings) -> dict:
    """The process's defaults for ``extract``'s ``autocast`` / ``decode`` (what ``probe run --autocast
    / --decode`` sets for every probe's features); with arguments, sets those and returns the old."""
    old = dict(_extraction)
    unknown = set(settings) - set(_extraction)
    if unknown:
        raise TypeError(f"unknown extraction settings {sorted(unknown)}; known: {sorted(_extraction)}")
    _extraction.update(settings)
    return old
