"""Run a kernel's work units on torch's own OpenMP thread team.

numba's parallel launch runs a second pool of worker threads next to torch's OpenMP team. Inside a
model the two fight for the cores: right after each torch op, torch's OpenMP workers keep
spinning for a while, so a numba helper thread waits for a core, and a scan that needs
milliseconds gets nothing from the second core (measured: VMamba-T at batch 1 on 2 cores ran
3.5 % slower with numba's parallel launch than with the scan on one thread). When torch's
intra-op backend is OpenMP (Linux builds), this module instead calls that very runtime's
``GOMP_parallel`` with a compiled C callback: torch's already-spinning workers pick the units up
at once, and no second pool exists.

A kernel that uses it provides a plain Python function ``entry(data)``, compiled on first use into
a C callback (:func:`compiled`), which unpacks its arguments from an int64 header (:func:`header`:
its own length, then every array as its address and shape, C-contiguous, every integer as
itself, then the unit count and a shared counter; :func:`words` and the ``arr1``..``arr5``
readers) and claims work units with an atomic increment of the counter until none is left
(:func:`claim`). :func:`run` makes the call, or declines it. Units own disjoint outputs, so the
result does not depend on which thread runs which unit.

``SCANLIB_NUMBA_TEAM=0`` turns it off (numba's own parallel launch is used then).
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import sys

import numpy as np
import torch
from llvmlite import ir
from numba import carray, cfunc, njit, types
from numba.extending import intrinsic

_OMP_LIB = re.compile(r"^lib(g|i|)omp[^/]*\.so")


@functools.lru_cache(maxsize=1)
def gomp_parallel():
    """``GOMP_parallel`` of the OpenMP runtime torch's intra-op ops run on, or None where that
    cannot be found (another parallel backend, no ``/proc``, or switched off)."""
    if os.environ.get("SCANLIB_NUMBA_TEAM", "1") == "0" or not sys.platform.startswith("linux"):
        return None
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    try:  # the runtime torch loaded: only one OpenMP library is expected in the process
        with open("/proc/self/maps") as f:
            paths = {ln.split()[-1] for ln in f if _OMP_LIB.search(ln.rsplit("/", 1)[-1])}
    except OSError:
        return None
    torch_dir = os.path.dirname(torch.__file__)
    # prefer the copy torch ships (numba's own OpenMP layer may have loaded a system one)
    for path in sorted(paths, key=lambda p: not p.startswith(torch_dir)):
        try:
            fn = ctypes.CDLL(path).GOMP_parallel
        except (OSError, AttributeError):
            continue
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        fn.restype = None
        return fn
    return None


def header(args: tuple, n_units: int) -> np.ndarray | None:
    """The int64 argument block of a team kernel: arrays as (address, *shape), integers as
    themselves, then ``n_units`` and the claim counter (0). None when an array is not
    C-contiguous (the caller then takes another path)."""
    h: list[int] = [0]
    for a in args:
        if isinstance(a, np.ndarray):
            if not a.flags.c_contiguous:
                return None
            h.append(a.ctypes.data)
            h.extend(a.shape)
        else:
            h.append(int(a))
    h += [n_units, 0]
    h[0] = len(h)
    return np.array(h, dtype=np.int64)


@functools.cache
def compiled(entry):
    """``entry(data)`` (a module-level function, so numba caches it on disk) as a C callback."""
    return cfunc(types.void(types.voidptr), cache=True, nogil=True)(entry)


def run(entry, args: tuple, n_units: int, n_threads: int) -> bool:
    """Run ``entry``'s ``n_units`` work units over ``args`` on ``n_threads`` threads of torch's
    OpenMP team (the caller is one of them) and return True when every unit is done; return
    False, running nothing, when fewer than 2 threads are asked for, the team is not available or
    an array is not C-contiguous (the caller then launches the kernel itself). ctypes releases
    the GIL for the call."""
    n_threads = min(n_threads, n_units)
    if n_threads < 2:
        return False
    gomp = gomp_parallel()
    if gomp is None:
        return False
    h = header(args, n_units)
    if h is None:
        return False
    gomp(compiled(entry).address, h.ctypes.data, n_threads, 0)
    return True


@intrinsic
def addr_ptr(typingctx, addr, like):
    """The address ``addr`` (int64) as a pointer to ``like``'s scalar type."""
    if not isinstance(addr, types.Integer) or not isinstance(like, types.Number):
        return None

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(sig.return_type))

    return types.CPointer(like)(addr, like), codegen


@intrinsic
def claim(typingctx, h, i):
    """Atomically ``h[i] += 1``; returns the old value (the next unit to run)."""
    if not isinstance(h, types.Array) or h.dtype != types.int64:
        return None

    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        idx = context.cast(builder, args[1], sig.args[1], types.intp)
        ptr = builder.gep(a.data, [idx])
        return builder.atomic_rmw("add", ptr, ir.Constant(ir.IntType(64), 1), "monotonic")

    return types.int64(h, i), codegen


@njit(inline="always")
def words(data):
    """The header at ``data`` as an int64 array (its first word is its length)."""
    return carray(data, (carray(data, (1,), dtype=np.int64)[0],), dtype=np.int64)


# readers of the header's arrays: (array, offset of the next entry); ``like`` a scalar of the
# element type (``np.float32(0)``, ``np.int64(0)``, ...)


@njit(inline="always")
def arr1(h, o, like):
    return carray(addr_ptr(h[o], like), (h[o + 1],)), o + 2


@njit(inline="always")
def arr2(h, o, like):
    return carray(addr_ptr(h[o], like), (h[o + 1], h[o + 2])), o + 3


@njit(inline="always")
def arr3(h, o, like):
    return carray(addr_ptr(h[o], like), (h[o + 1], h[o + 2], h[o + 3])), o + 4


@njit(inline="always")
def arr4(h, o, like):
    return carray(addr_ptr(h[o], like), (h[o + 1], h[o + 2], h[o + 3], h[o + 4])), o + 5


@njit(inline="always")
def arr5(h, o, like):
    shape = (h[o + 1], h[o + 2], h[o + 3], h[o + 4], h[o + 5])
    return carray(addr_ptr(h[o], like), shape), o + 6
