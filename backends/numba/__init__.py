"""The ``numba`` backend: compiled, multi-threaded CPU kernels of the selective scan.

Importing this package does not import numba: the kernels (``kernels.py``) load and compile on the
first call, and numba's on-disk cache (``cache=True``) makes later processes start fast.
"""

from __future__ import annotations

import torch

from scanlib.autograd import scan_with_autograd
from scanlib.inputs import Feature, ScanInputs
from scanlib.registry import Backend, Requirement

__all__ = ["NumbaBackend"]


class NumbaBackend(Backend):
    """numba-compiled CPU scan: parallel over (batch, channel tiles), vectorised across channels;
    float32 arithmetic for 32/16-bit inputs, float64 for float64 inputs; recomputing backward."""

    name = "numba"
    priority = 20
    ops = frozenset({"selective_scan", "cross_selective_scan"})
    devices = frozenset({"cpu"})
    dtypes = frozenset({torch.float32, torch.float16, torch.bfloat16, torch.float64})
    features = frozenset(Feature)
    deterministic = True
    requires = (Requirement("numba", "numba"),)
    description = "numba CPU kernels: tiles of channels vectorised, chunked recomputing backward"

    def selective_scan(self, inputs: ScanInputs) -> tuple[torch.Tensor, torch.Tensor]:
        from . import _run  # imports numba; compiles (or loads from cache) on first use

        return scan_with_autograd(_run.KERNELS, inputs)

    def extra_reasons(self, inputs) -> list[str]:
        if inputs.op == "cross_selective_scan" and Feature.BACKWARD in inputs.features:
            # forward-only kernel: scanlib then composes the op from selective_scan (which has one)
            return ["the fused cross_selective_scan kernel has no backward"]
        return []

    def cross_selective_scan(self, inputs) -> torch.Tensor:
        from . import cross  # imports numba; compiles (or loads from cache) on first use

        return cross.forward(inputs)
