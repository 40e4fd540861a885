"""Keeps freed host memory inside the process, so a step's buffers are not faulted in anew.

On the CPU, XLA allocates a compiled step's temporaries (gigabytes for a training
step) with malloc and frees them when the step ends. glibc serves blocks that large
with mmap, or trims them off the top of its heap, and hands them back to the kernel
on free, so the next step page-faults every page in again and the kernel zeroes it:
in the R50-FPN training step at 512x512 that is about 550,000 faults and 1.6-2.3 s
of system time per step (BENCHMARKS.md, "Host memory"). `keep_freed_memory()` asks
glibc to keep what it frees: one malloc arena (XLA's worker threads allocate from
it too, instead of from per-thread arenas that map large blocks directly), no mmap
for large blocks, and no trimming of the heap's top.

Call it before JAX starts its backend (before the first array or jit), so that the
worker threads have not yet picked an arena. `DETECTAX_HOST_MEMORY=release` leaves
the allocator as it is (kernels/switches.py). `glibc_tunables()` gives the same
setting to a child process, such as the torchvision benchmark's.
"""

import ctypes
import sys

from projects.maskrcnn.kernels import switches

ENV = switches.HOST_MEMORY_ENV

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def requested_mode() -> str:
    """`DETECTAX_HOST_MEMORY` (default keep); a clear error for any other value."""
    return switches.host_memory()


def _glibc():
    """The process's C library when it is glibc, else None (musl, macOS, Windows)."""
    if not sys.platform.startswith('linux'):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not hasattr(libc, 'gnu_get_libc_version') or not hasattr(libc, 'mallopt'):
        return None
    return libc


def keep_freed_memory() -> str:
    """Sets glibc's malloc to keep freed memory (see the module doc); says what it did."""
    if requested_mode() == 'release':
        return f'allocator defaults ({ENV}=release)'
    libc = _glibc()
    if libc is None:
        return 'allocator defaults (not glibc)'
    # mallopt takes an int: -1 becomes SIZE_MAX, a trim threshold never reached.
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
    failed = [param for param, value in settings if libc.mallopt(param, value) != 1]
    if failed:
        raise RuntimeError(f'glibc mallopt refused parameters {failed}; set {ENV}=release '
                           'to run with the allocator defaults')
    return 'freed memory kept (glibc: one arena, no mmap, no trim)'


def glibc_tunables() -> str:
    """The same setting as GLIBC_TUNABLES, for a child process (empty for release)."""
    if requested_mode() == 'release':
        return ''
    return ('glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:'
            f'glibc.malloc.trim_threshold={2 ** 63}')
