"""The CuPy side: the RawModule built from ``selective_scan.cu`` and the kernel launcher.

Imported only when a kernel runs (it imports cupy). Tensors cross to CuPy zero-copy through
DLPack, and every kernel is launched on torch's current CUDA stream, so launches order with torch
work and can be captured in CUDA graphs (warm up once before capturing: the first call compiles).
"""

from __future__ import annotations

import threading

import cupy
import numpy as np
import torch

from . import kernels

_lock = threading.Lock()
_module: cupy.RawModule | None = None


def module() -> cupy.RawModule:
    """The RawModule with every instantiation in NAME_EXPRESSIONS (CuPy compiles it on first use
    per device and caches the binary on disk)."""
    global _module
    with _lock:
        if _module is None:
            _module = cupy.RawModule(
                code=kernels.read_source(),
                options=kernels.COMPILE_OPTIONS,
                name_expressions=list(kernels.NAME_EXPRESSIONS),
            )
        return _module


def _to_cupy(kind: str, value):
    if kind == "ptr":
        if value is None:
            return np.uint64(0)  # a null pointer: 8 bytes by value
        t = value.detach()
        if t.dtype == torch.bfloat16:  # CuPy has no bfloat16: hand over the raw bits
            t = t.view(torch.int16)
        # stream=-1: no cross-stream sync, the kernel runs on the stream that produced the data
        # (also keeps event records out of CUDA graph captures)
        try:
            return cupy.from_dlpack(t.__dlpack__(stream=-1))
        except TypeError:  # a CuPy that takes only protocol objects, not capsules
            return cupy.from_dlpack(t)
    if kind == "i32":
        return np.int32(value)
    if kind == "i64":
        return np.int64(value)
    if kind == "f32":
        return np.float32(value)
    raise ValueError(f"unknown kernel argument kind {kind!r}")


def launch(
    name: str,
    grid: int,
    block: int,
    shared_mem: int,
    args: list[kernels.Arg],
    device: torch.device,
) -> None:
    """Launch kernel ``name`` on torch's current stream of ``device``."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    # torch's and CuPy's current device both set: __dlpack__ refuses a tensor of another device
    with torch.cuda.device(index), cupy.cuda.Device(index):
        stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(index).cuda_stream)
        with stream:
            fn = module().get_function(name)
            cargs = tuple(_to_cupy(kind, v) for kind, v in args)
            fn((grid,), (block,), cargs, shared_mem=shared_mem)
