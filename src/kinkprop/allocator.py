"""How the C allocator treats the arrays a training step frees.

A kinkprop step allocates and frees tens of megabytes of short-lived NumPy arrays (im2col columns,
activations, gradients). With glibc's defaults, freed memory at the top of the heap beyond a
threshold that adapts to the largest freed block is handed back to the operating system at once,
and the next step faults it back in, page by page: ~2000 minor page faults, about a third of a
LeNet step (batch 128) on a 2-core machine, and most of its run-to-run spread. PyTorch keeps its
own caches for the same reason.

:func:`keep_freed_memory` asks glibc (``mallopt``) to serve arrays up to 32 MB (its maximum) from
the heap and to keep up to 256 MB of freed memory at the heap's top for reuse. What it costs:
memory freed there, and in holes below arrays still alive, stays with the process instead of
going back to the operating system. A training loop, which frees and allocates the same sizes
every step, reuses it (an MLP epoch's peak above its baseline: 1.3 MB, PyTorch's 22 MB); a process
whose allocations fragment the heap can hold much more than with glibc's defaults (forty 16 MB
arrays freed between live 1 MB ones, then larger ones: 719 MB resident afterwards instead of 79).
The setting is process-wide: a host process (PyTorch included) gets it too. ``import kinkprop``
calls it; set ``KINKPROP_MALLOC=system`` in the environment before importing to leave the
allocator as it is (``keep``, the default, applies it). On other C libraries (macOS, musl,
Windows) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import warnings

#: mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: arrays up to this size come from the heap (glibc accepts at most 32 MB on 64-bit systems)
MMAP_THRESHOLD = 32 << 20
#: freed memory kept at the top of the heap
TRIM_THRESHOLD = 256 << 20
#: ``KINKPROP_MALLOC=system`` leaves the allocator's settings alone
ENV = "KINKPROP_MALLOC"

_applied = False


def keep_freed_memory(mmap_threshold: int = MMAP_THRESHOLD,
                      trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Set glibc's mmap and trim thresholds; True if both were accepted, False where the C
    library has no ``mallopt`` (not glibc) or refused a value."""
    global _applied
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)) == 1 and ok
    _applied = _applied or ok
    return ok


def applied() -> bool:
    """Whether :func:`keep_freed_memory` has taken effect in this process."""
    return _applied


def _at_import() -> None:
    value = os.environ.get(ENV, "keep").strip().lower()
    if value not in ("keep", "system", ""):
        warnings.warn(f"{ENV}={os.environ[ENV]!r} is not understood; use 'keep' (the default: keep "
                      "freed memory for reuse) or 'system' (leave the allocator alone). Keeping "
                      "freed memory.", RuntimeWarning, stacklevel=3)
    if value != "system":
        keep_freed_memory()
