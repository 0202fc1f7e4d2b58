"""Keep freed memory in the process while a model scores on the CPU (glibc only).

glibc hands a block over its mmap threshold back to the OS when it is freed and serves the next one from fresh
pages that the kernel faults in and zeroes; a scoring batch allocates and frees such blocks (activations, a chunk of
logits) in every layer, and on some corpora the process then spends a large share of its time faulting pages in
(measured in bench/RESULTS.md, run H). ``hold()`` raises the mmap and trim thresholds to their maximum while a CPU
model is open, so freed blocks stay in the heap and are reused (the peak RSS grows by the few blocks the heap
keeps); ``release()`` by the last holder sets glibc's documented defaults back (128 kB; its dynamic adjustment stays
off once a threshold has been set) and returns the kept memory (``malloc_trim``). A Ray actor runs its stage in a
worker thread, whose glibc arena has heaps of its own. Other C libraries (musl, macOS): nothing changes.
"""

from __future__ import annotations

import functools
import threading

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
_KEEP = (1 << 31) - 1  # mallopt takes an int: the largest
_KEEP_OLD_GLIBC = 32 << 20  # glibc before 2.35 refuses an mmap threshold over HEAP_MAX_SIZE / 2
_DEFAULT = 128 * 1024  # both thresholds' documented defaults

_lock = threading.Lock()
_holders = 0


@functools.cache
def _libc():
    """glibc's mallopt and malloc_trim, or None elsewhere (looked up once: ``platform.libc_ver`` reads the
    interpreter's executable)."""
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def hold() -> bool:
    """Keep freed memory in this process until the matching ``release()``; True if the allocator took it."""
    global _holders
    with _lock:
        libc = _libc()
        if libc is None:
            return False
        if _holders == 0:
            if not libc.mallopt(_M_MMAP_THRESHOLD, _KEEP) and not libc.mallopt(_M_MMAP_THRESHOLD, _KEEP_OLD_GLIBC):
                return False
            libc.mallopt(_M_TRIM_THRESHOLD, _KEEP)
        _holders += 1
        return True


def release() -> None:
    """End one ``hold()`` that returned True; the last one restores the defaults and gives the kept memory back."""
    global _holders
    with _lock:
        if _holders == 0:
            return
        _holders -= 1
        libc = _libc()
        if _holders == 0 and libc is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, _DEFAULT)
            libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT)
            libc.malloc_trim(0)
