"""The ``triton`` backend: Triton kernels for the selective scan and the fused 2D scan routes.

Importing this package does not import triton; the kernels (``scan_kernels``, ``route_kernels``)
load on the first call. Tensors must be on a CUDA device, or on the CPU when the environment
variable ``TRITON_INTERPRET=1`` is set (Triton's interpreter: slow, for tests). Arithmetic is
float32 for float32/float16/bfloat16 inputs; gradients are reduced without atomics, so repeated
calls give bitwise-identical results.
"""

from __future__ import annotations

import os
import sys

import torch

from scanlib.autograd import scan_with_autograd
from scanlib.inputs import Feature, ScanInputs
from scanlib.registry import Backend, OpInputs, Requirement

_KERNELS = "scanlib_backends.triton.scan_kernels"
#: largest state size N: one program holds [BLOCK_D, next_pow2(N), BLOCK_L] tiles in registers
MAX_DSTATE = 256


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class _Priority:
    """``priority`` of the triton backend: 40 as class data; an instance ranks below every other
    backend while the CPU interpreter is on (read at call time), so automatic selection never
    sends work to the slow interpreter when a compiled backend can run it (name it to use it)."""

    def __init__(self, value: int, interpreted: int) -> None:
        self.value, self.interpreted = value, interpreted

    def __get__(self, obj, objtype=None) -> int:
        if obj is not None and _interpret_env():
            return self.interpreted
        return self.value


class _TritonKernels:
    """``ScanKernels`` for :func:`scanlib.autograd.scan_with_autograd` (forward saves states)."""

    def forward(self, inputs: ScanInputs):
        from . import scan_kernels

        return scan_kernels.scan_fwd(inputs, save=True)

    def backward(self, inputs: ScanInputs, saved, dout, dlast):
        from . import scan_kernels

        return scan_kernels.scan_bwd(inputs, saved, dout, dlast)


class TritonBackend(Backend):
    """Chunked associative-scan kernels in Triton; fused gather kernels for the scan routes."""

    name = "triton"
    priority = _Priority(40, interpreted=-50)  # type: ignore[assignment]
    ops = frozenset({"selective_scan", "cross_scan", "cross_merge"})
    devices = frozenset({"cuda"})
    dtypes = frozenset({torch.float32, torch.float16, torch.bfloat16})
    features = frozenset(Feature)
    deterministic = True
    requires = (Requirement("triton", "triton"),)
    description = "Triton: chunked associative scan (fwd/bwd, no atomics); fused cross-scan/merge"

    _kernels = _TritonKernels()

    def device_reasons(self, device: torch.device) -> list[str]:
        if device.type == "cuda":
            return []
        if device.type == "cpu" and _interpret_env():
            mod = sys.modules.get(_KERNELS)
            if mod is not None and not mod.INTERPRETED:
                return [
                    "the Triton kernels were loaded before TRITON_INTERPRET=1 was set, so they "
                    "cannot run on CPU tensors in this process"
                ]
            return []
        return [
            f"runs on cuda tensors (cpu tensors only under TRITON_INTERPRET=1), not {device.type}"
        ]

    def not_supported_reasons(self, inputs: OpInputs) -> list[str]:
        reasons = super().not_supported_reasons(inputs)
        if inputs.dtype == torch.float64:
            # replace the generic dtype line with what to do instead
            reasons = [r for r in reasons if "dtype" not in r]
            reasons.append(
                "computes in float32; float64 inputs need another backend (torch, numba)"
            )
        return reasons

    def extra_reasons(self, inputs: OpInputs) -> list[str]:
        if inputs.op != "selective_scan":
            return []
        reasons = []
        if inputs.dstate > MAX_DSTATE:
            reasons.append(f"state size N={inputs.dstate} exceeds {MAX_DSTATE}")
        # the kernels index steps and states with int32 offsets (batch and channels with int64)
        for name in ("u", "delta", "z", "B", "C"):
            t = getattr(inputs, name)
            if t is not None and any(
                (n - 1) * abs(s) >= 2**31 for n, s in zip(t.shape, t.stride())
            ):
                reasons.append(f"{name}: a stride times its size reaches 2^31 elements")
        return reasons

    # ------------------------------------------------------------------ ops
    def selective_scan(self, inputs: ScanInputs):
        if inputs.needs_grad:
            return scan_with_autograd(self._kernels, inputs)
        from . import scan_kernels

        out, last, _ = scan_kernels.scan_fwd(inputs, save=False)
        return out, last

    def cross_scan(self, inputs):
        from . import route_kernels

        return route_kernels.cross_scan(inputs)

    def cross_merge(self, inputs):
        from . import route_kernels

        return route_kernels.cross_merge(inputs)
