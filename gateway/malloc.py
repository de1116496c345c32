"""The worker's C allocator (glibc): big buffers reuse the heap; a dropped answer's memory goes back.

Relaying megabytes of base64 makes many short-lived buffers of 64-256 KiB (each socket read,
aiohttp's copy of each body piece). With glibc's defaults those above its mmap threshold get
pages of their own, and freed memory at the top of the heap goes back to the kernel as soon as
a few MiB are free there, so the next buffers fault their pages in again: ~330 page faults per
~3 MB answer, about a quarter of the worker's CPU for such answers (bench/RESULTS.md, session 6).

``tune_malloc`` sets, through glibc's ``mallopt``:
- ``M_MMAP_THRESHOLD`` = 1 MiB: buffers below it come from the heap (larger ones, rare, still
  get their own pages and give them back when freed);
- ``M_TRIM_THRESHOLD`` = 64 MiB: the heap keeps up to that much free memory at its top for the
  next buffers, instead of returning it at once.

What a worker holds at its peak does not change (the same buffers are alive); after a peak it may
keep up to 64 MiB more. An operator who sets any ``MALLOC_*_`` variable (glibc reads them at
start), or ``glibc.malloc.*`` in ``GLIBC_TUNABLES``, keeps their own settings: nothing is changed
then. Not glibc (musl, another libc): nothing is changed either.

``give_memory_back`` hands the heap's free pages back to the kernel at once (``malloc_trim``, which
ignores the trim threshold): after a client that stopped reading is dropped, so the megabytes its
answer held do not stay in the worker's RSS.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 20
TRIM_THRESHOLD_BYTES = 64 << 20
_OPERATOR_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def _glibc() -> ctypes.CDLL | None:
    """The process's C library if it is glibc (another's thresholds differ or are absent), else None."""
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols, its C library's among them
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _glibc()


def tune_malloc() -> bool:
    """Set the two thresholds above; False when left as they were (operator's variables, not glibc)."""
    if any(name in os.environ for name in _OPERATOR_VARIABLES) or "glibc.malloc." in os.environ.get(
            "GLIBC_TUNABLES", ""):
        return False
    if _LIBC is None:
        return False
    mallopt = _LIBC.mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt answers 1 on success, 0 on error.
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


def give_memory_back() -> None:
    """Return the heap's free pages to the kernel now (glibc keeps them otherwise: RSS stays up)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)

