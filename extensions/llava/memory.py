"""Giving memory back to the operating system after large pictures.

Decoding a photo and running the tower over its views allocate hundreds of megabytes that are freed
right after. The C library keeps much of what is freed for later use, in pools per thread, so a
server that took several large pictures at once would stay that large. Asking it to hand back
what it holds free (glibc's ``malloc_trim``) after such work keeps the server near its usual size.
Elsewhere (macOS, Windows, musl) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

# Pictures with fewer pixels than this leave too little behind to be worth a trim (about 2 ms).
TRIM_AFTER_PIXELS = 4_000_000


@functools.cache
def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory(pixels: int) -> bool:
    """After work on ``pixels`` pixels is done and freed: hand what the allocator keeps free back to the
    operating system. Returns whether it was asked."""
    trim = _malloc_trim()
    if trim is None or pixels < TRIM_AFTER_PIXELS:
        return False
    trim(0)
    return True
