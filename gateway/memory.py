"""What the gateway's memory goes back to after a burst: the allocator it runs on, and giving
freed pages back to the system.

The gateway keeps state whose size follows its callers (registrations, connections, bodies) and
shrinks it again when they leave. With CPython's own small-object allocator (pymalloc) a shrink
frees almost nothing: it hands memory back in whole 1 MiB arenas, and a few long-lived objects
scattered through each arena pin it. Measured (tests/system/test_registrations.py): 1,500
workers naming 96,000 models, then gone, left the gateway at 150 MiB where it started at 70;
on the C library's malloc, trimmed after the forgetting, at 81. The price, in ``make bench``
(a fake worker that costs nothing, so the gateway is all there is): 0.80-1.03 of pymalloc's
requests/s at 64 clients, 0.90 in the median of three runs; with a real engine behind it the
gateway is not what limits. ``PYTHONMALLOC=pymalloc`` chooses the other.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys

ALLOCATOR = "malloc"  # PYTHONMALLOC for the serving process; an operator's own value wins


def use_system_allocator() -> None:
    """Run this process again on the C library's malloc, unless PYTHONMALLOC says otherwise.
    Call first thing in ``python -m gateway``: the allocator is chosen as the interpreter starts,
    and exec keeps the process id, its open files and its limits."""
    if "PYTHONMALLOC" in os.environ:
        return
    os.environ["PYTHONMALLOC"] = ALLOCATOR
    os.execv(sys.executable, sys.orig_argv)


def give_back() -> None:
    """Collect what is free and hand the free pages inside the heap back to the system (malloc
    keeps them otherwise). A full collection: call it after freeing much, not per request."""
    gc.collect()
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc's; musl and macOS have none
    if trim is not None:
        trim(0)
