"""A small caching allocator for the large CPU tensors the scan kernels return.

Why: on Linux a tensor above glibc's mmap threshold (32 MiB at most) is fresh memory on every
call, and faulting its pages in costs more than the kernel that fills it: on the 2-core VMs of
this project about 2.4 us per 4 KiB page, 20 ms for one ``[8, 384, 3136]`` float32 output, while
the numba forward itself takes about 20 ms. Training repeats the same shapes every step, so the
outputs of one step can reuse the pages of the previous step's, as a GPU caching allocator does.

How: :func:`empty` hands out tensors viewing a cached numpy buffer; when the last reference to the
tensor's storage goes away, the buffer goes back to the cache (nothing is ever reused while any
view of it is alive). The cache keeps at most :func:`set_cache_limit` bytes of idle buffers
(default 256 MiB) and :func:`release_cached_memory` empties it. Small tensors and non-CPU devices
get a plain ``torch.empty``. Tensors from the cache are ordinary CPU tensors, except that their
storage cannot be resized in place (``Tensor.resize_`` to a larger size raises).
"""

from __future__ import annotations

import os
import threading

import numpy as np
import torch

#: below this a fresh tensor comes from malloc's heap anyway (no page faults worth avoiding)
MIN_BYTES = 1 << 20
_ENV_LIMIT = "SCANLIB_CPU_CACHE_MB"

_lock = threading.Lock()
_free: dict[int, list[np.ndarray]] = {}  # nbytes -> idle owner buffers
_idle_bytes = 0
_limit = int(os.environ.get(_ENV_LIMIT, "256")) << 20


class _Lease(np.ndarray):
    """The array a pooled tensor views; gives its owner buffer back when it dies."""

    def __del__(self) -> None:
        owner = getattr(self, "_owner", None)
        if owner is not None:
            _give_back(owner)


def _give_back(owner: np.ndarray) -> None:
    global _idle_bytes
    with _lock:
        if _idle_bytes + owner.nbytes > _limit:
            return  # over the limit: let it go back to the OS
        _free.setdefault(owner.nbytes, []).append(owner)
        _idle_bytes += owner.nbytes


def _take(nbytes: int) -> np.ndarray:
    global _idle_bytes
    with _lock:
        idle = _free.get(nbytes)
        if idle:
            _idle_bytes -= nbytes
            return idle.pop()
    # torch's allocator, not numpy's: numpy asks for transparent huge pages on large arrays,
    # and with the kernel's THP defrag policy "madvise" that makes the first touch stall
    with torch.inference_mode(False):  # outlives this call: never an inference tensor
        return torch.empty(nbytes, dtype=torch.uint8).numpy()


_NP = {
    torch.float32: np.float32,
    torch.float64: np.float64,
    torch.float16: np.float16,
    torch.bfloat16: np.uint16,  # reinterpreted as bfloat16 on the torch side
}


def empty(*shape: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype, device=device)``, reusing cached pages for large CPU
    tensors (contents are arbitrary, as with ``torch.empty``)."""
    device = torch.device(device)
    nbytes = dtype.itemsize
    for s in shape:
        nbytes *= s
    if device.type != "cpu" or nbytes < MIN_BYTES or dtype not in _NP or _limit <= 0:
        return torch.empty(shape, dtype=dtype, device=device)
    owner = _take(nbytes)
    lease = owner.view(_NP[dtype]).reshape(shape).view(_Lease)
    lease._owner = owner
    t = torch.from_numpy(lease)  # an inference tensor only if the caller is in inference_mode
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


def set_cache_limit(nbytes: int) -> None:
    """Keep at most ``nbytes`` of idle buffers (0 disables the cache). Env: SCANLIB_CPU_CACHE_MB."""
    global _limit
    with _lock:
        _limit = max(0, int(nbytes))
    if _limit == 0:
        release_cached_memory()


def release_cached_memory() -> int:
    """Free every idle cached buffer; returns the number of bytes released."""
    global _idle_bytes
    with _lock:
        freed = _idle_bytes
        _free.clear()
        _idle_bytes = 0
    return freed


def cached_bytes() -> int:
    """Bytes of idle buffers held by the cache now."""
    return _idle_bytes
