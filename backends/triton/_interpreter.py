"""Faster ``tl.associative_scan`` in Triton's CPU interpreter (``TRITON_INTERPRET=1`` only).

The interpreter runs an associative scan with a user combine function one element at a time in
Python (``ScanOps.generic_scan``), which makes the scan kernels of this backend take seconds even on
tiny tensors. A combine function is elementwise by definition, so applying it to whole slices
across the scan axis computes exactly the same values in the same order of operations per element;
:func:`vectorize_scans` swaps that in. It only changes the interpreter (never compiled kernels) and
leaves triton untouched if its internals differ from what this expects.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

_done = False


def _scan_by_slices(self, input):
    """Drop-in for ``ScanOps.generic_scan``: one combine call per step along the axis."""
    import triton.language as tl

    axis = self.axis
    datas = [arg.handle.data for arg in input]
    nd = datas[0].ndim
    n = datas[0].shape[axis]
    outs = [np.empty_like(d) for d in datas]

    def at(i):  # keep the axis (size 1) so every slice stays a block tensor
        idx = [slice(None)] * nd
        idx[axis] = slice(i, i + 1)
        return tuple(idx)

    acc = [d[at(0)] for d in datas]
    for o, a in zip(outs, acc):
        o[at(0)] = a
    for i in range(1, n):
        args = [self.to_tensor(a, arg.dtype) for a, arg in zip(acc, input)]
        args += [self.to_tensor(d[at(i)], arg.dtype) for d, arg in zip(datas, input)]
        ret = self.combine_fn.fn(*args)
        ret = ret if isinstance(ret, tuple) else (ret,)
        acc = [
            (r.handle.data if isinstance(r, tl.core.tensor) else np.asarray(r)).astype(
                o.dtype, copy=False
            )
            for r, o in zip(ret, outs)
        ]
        acc = [np.broadcast_to(a, o[at(i)].shape) for a, o in zip(acc, outs)]
        for o, a in zip(outs, acc):
            o[at(i)] = a
    return [self.to_tensor(o, arg.dtype) for o, arg in zip(outs, input)]


def vectorize_scans() -> bool:
    """Install :func:`_scan_by_slices` in the interpreter; True when it is in place."""
    global _done
    if _done:
        return True
    try:
        from triton.runtime import interpreter
    except Exception:  # pragma: no cover - no interpreter in this triton
        return False
    ops = getattr(interpreter, "ScanOps", None)
    if ops is None or not hasattr(ops, "generic_scan") or not hasattr(ops, "to_tensor"):
        log.debug("triton interpreter layout not recognised; scans stay element by element")
        return False
    ops.generic_scan = _scan_by_slices
    _done = True
    return True
