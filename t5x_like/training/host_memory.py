"""Handing the host back the memory that initialisation and compilation freed.

Why: glibc's malloc keeps freed small and mid-sized blocks in its arenas instead of
returning them to the OS. Initialising the state and compiling the step free
hundreds of MB that way (T5.1.1-small on one CPU device: 0.66 GiB after init, 0.33
after compiling), and the step's temporaries then come on top of that garbage, so
the process's peak RSS carries it for the whole run. `malloc_trim(0)` returns the
free pages; called twice before the first step, it lowered that run's peak RSS from
4.19 to 3.87 GiB (benchmarks/RESULTS.md, "A leaner training step"). It changes no
arithmetic. Where libc is not glibc (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library('c')
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):      # no such library, or a libc without it
        return None


def release_freed() -> bool:
    """Returns freed heap pages to the OS; True if the C library could."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
