"""Process-level settings the command line applies before sampling on the CPU.

glibc returns a freed block of memory above its trim threshold to the operating system and
serves large requests (above its mmap threshold) with fresh pages, which the kernel faults in
and zeroes on first touch. A sampling loop allocates and frees a few state-sized tensors at
every step, so on the CPU at 16×3×256×256 (12.6 MB per tensor) that page traffic costs 3–4×
the arithmetic (BENCHMARKS.md, "Real-model scale"). :func:`keep_freed_memory` raises both
thresholds, so freed blocks are reused: the process keeps its peak memory instead of handing
it back. This is an application's decision, never taken by the library; in your own program
call it once, or set the environment variables ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` before Python starts.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: glibc's largest mmap threshold on 64-bit systems (4 MiB × sizeof(long)).
MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD = 2**30


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse (see the module docstring); ``False`` where
    the C library is not glibc (nothing is changed then)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
