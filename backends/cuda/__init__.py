"""The ``cuda`` backend: scanlib's own compiled CUDA kernels (``csrc/``), loaded with ctypes.

The kernels are plain CUDA C++ behind a C ABI, built once per CUDA toolkit and GPU architecture
by ``python -m scanlib.build`` (or automatically on first use when nvcc is found), so they work
with any torch version. Importing this module probes nothing: the device and the library are
looked at only when a call asks whether the backend can run.
"""

from __future__ import annotations

from pathlib import Path

import torch

from scanlib.inputs import Feature, ScanInputs
from scanlib.registry import Backend

MAX_DSTATE = 256


class CudaBackend(Backend):
    """Compiled CUDA kernels: block-parallel chunked scan, recomputing backward."""

    name = "cuda"
    priority = 50
    devices = frozenset({"cuda"})
    dtypes = frozenset({torch.float32, torch.float16, torch.bfloat16})
    features = frozenset(Feature)
    deterministic = True
    description = "compiled CUDA C++ kernels (C ABI, ctypes); build with `python -m scanlib.build`"

    def availability_reasons(self) -> list[str]:
        reasons = super().availability_reasons()
        if not torch.cuda.is_available():
            return reasons + ["no CUDA device (torch.cuda.is_available() is False)"]
        return reasons + self._library_reasons(torch.device("cuda", torch.cuda.current_device()))

    def device_reasons(self, device: torch.device) -> list[str]:
        reasons = super().device_reasons(device)
        if not reasons and torch.cuda.is_available():
            reasons += self._library_reasons(device)
        return reasons

    @staticmethod
    def _library_reasons(device: torch.device) -> list[str]:
        from . import ops

        problem = ops.library_problem(ops.device_arch(device))
        return [problem] if problem else []

    def extra_reasons(self, inputs: ScanInputs) -> list[str]:
        if inputs.dstate > MAX_DSTATE:
            return [f"N={inputs.dstate} exceeds the compiled kernels' maximum {MAX_DSTATE}"]
        return []

    def selective_scan(self, inputs: ScanInputs):
        from . import ops

        return ops.selective_scan(inputs)


class EmulatedCudaBackend(CudaBackend):
    """The same kernels run by their CPU emulation (``scanlib.build.build_emulation``), on CPU
    tensors. For tests of the kernels without a GPU; never registered by default."""

    name = "cuda-emulation"
    priority = -200
    devices = frozenset({"cpu"})
    description = "CPU emulation of the compiled CUDA kernels (tests only, slow)"

    def __init__(self, library: str | Path):
        self.library = Path(library)

    def availability_reasons(self) -> list[str]:
        if not self.library.exists():
            return [f"the emulation library {self.library} does not exist"]
        return []

    def device_reasons(self, device: torch.device) -> list[str]:
        return Backend.device_reasons(self, device)

    def selective_scan(self, inputs: ScanInputs):
        from . import ops

        ops.set_emulation_library(self.library)
        return ops.selective_scan(inputs)


__all__ = ["CudaBackend", "EmulatedCudaBackend"]
