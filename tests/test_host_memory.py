"""`host_memory.release_freed` gives the OS back heap pages that freed blocks hold."""

import os

import numpy as np

from t5x_like.training import host_memory


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_freed_heap_blocks_leave_the_rss_only_after_release():
    # 3,000 blocks of 64 KiB (under malloc's mmap threshold: they come from the heap),
    # then one more that pins the heap's top, so free() alone cannot shrink it.
    blocks = [np.ones(8192) for _ in range(3000)]
    pin = np.ones(8192)
    held = _rss_mib()
    del blocks
    after_free = _rss_mib()
    assert host_memory.release_freed()          # glibc, on this Linux
    released = _rss_mib()
    assert held - after_free < 50, "free() alone returned the pages: nothing to test"
    assert after_free - released > 150, (held, after_free, released)
    del pin
