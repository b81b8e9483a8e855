"""Idle OpenMP workers, freed: how an engine on a CPU gets its model thread's kernels to full speed.

torch's CPU kernels run on OpenMP (libgomp in the pip wheels), which gives every thread that runs a
parallel kernel a pool of its own worker threads, kept after the kernel ends. When libgomp manages more
threads than there are CPUs, it throttles how long its workers spin waiting for the next kernel and
puts them to sleep instead, so every kernel then starts with a wake-up. The engine's model thread is
such a thread; the idle pools of the caller's thread and of the encoder threads push it over the count.
On bench-cpu (2 cores, nothing else running) that costs the engine 10-30% (``benchmarks/cpu_threads.py``);
with other processes on the cores the throttled wait is the right one (spinning workers then take their
time slices: about 2x slower with two busy processes, same script). ``omp_pause_resource_all`` (OpenMP
5.0) frees the calling thread's pool; the runtime makes a new one when that thread next needs it.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os

logger = logging.getLogger(__name__)

OMP_PAUSE_SOFT = 1
RUNTIMES = ("libgomp", "libiomp5", "libomp")  # GNU (pip wheels), Intel, LLVM


@functools.cache
def _pause_resource_all():
    """The OpenMP runtime torch loaded (found in /proc/self/maps, torch's own copy first), or None."""
    import torch

    try:
        with open("/proc/self/maps") as maps:
            loaded = {line.split()[-1] for line in maps if ".so" in line}
    except OSError:  # not Linux
        return None
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    for path in sorted(loaded, key=lambda p: not p.startswith(torch_lib)):
        if os.path.basename(path).startswith(RUNTIMES):
            try:
                function = ctypes.CDLL(path).omp_pause_resource_all
            except (OSError, AttributeError):  # an OpenMP older than 5.0
                continue
            function.argtypes, function.restype = [ctypes.c_int], ctypes.c_int
            return function
    logger.debug("no OpenMP runtime with omp_pause_resource_all is loaded; idle workers stay")
    return None


def free_idle_workers() -> bool:
    """Free the calling thread's idle OpenMP worker threads; True when the runtime did.

    Call it from a thread that will not run torch kernels for a while (it costs a new pool, a few
    thread starts, when it does). A no-op returning False where the runtime lacks the call."""
    function = _pause_resource_all()
    return function is not None and function(OMP_PAUSE_SOFT) == 0
