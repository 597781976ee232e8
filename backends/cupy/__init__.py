"""The ``cupy`` backend: plain CUDA C kernels (``selective_scan.cu``) compiled at run time by NVRTC
through ``cupy.RawModule``, sharing memory with torch through DLPack.

Edit the ``.cu`` file and rerun: CuPy recompiles when the source changes (and caches the binary).
Without a GPU, ``scanlib_backends.cupy.emulator`` runs the same kernels on the CPU.

Importing this module does not import cupy (``runtime`` does, on the first kernel launch).
"""

from __future__ import annotations

import torch

from scanlib.autograd import scan_with_autograd
from scanlib.inputs import Feature, ScanInputs
from scanlib.registry import Backend, Requirement

from .kernels import ScanKernels, limits_reasons


class CupyBackend(Backend):
    """One thread per (batch, channel, state) stepping along L; fp32 arithmetic for fp32/fp16/bf16
    inputs. The backward recomputes states from checkpoints saved every 256 steps; gradients of
    per-step B/C ([B, N, L] and [B, G, N, L]) are summed with atomics, hence not deterministic."""

    name = "cupy"
    priority = 30
    devices = frozenset({"cuda"})
    dtypes = frozenset({torch.float32, torch.float16, torch.bfloat16})
    features = frozenset(Feature)
    deterministic = False
    requires = (Requirement("cupy", "cupy"),)
    description = "CUDA C kernels compiled at run time by CuPy (NVRTC); float64 not supported"

    def device_reasons(self, device: torch.device) -> list[str]:
        reasons = super().device_reasons(device)
        if not torch.cuda.is_available():  # probed per call, never at import
            reasons.append("no CUDA device (torch.cuda.is_available() is False)")
        return reasons

    def not_supported_reasons(self, inputs) -> list[str]:
        reasons = super().not_supported_reasons(inputs)
        if getattr(inputs, "op", None) == "selective_scan" and inputs.dtype == torch.float64:
            reasons = [r for r in reasons if "float64" not in r]
            reasons.append(
                "float64 is not supported (the kernels compute in float32); use the torch backend"
            )
        return reasons

    def extra_reasons(self, inputs) -> list[str]:
        return limits_reasons(inputs)

    def _launcher(self):
        """The callable that runs a kernel (see ``kernels.Launcher``): CuPy on the GPU."""
        from .runtime import launch

        return launch

    def _alloc(self):
        return torch.empty

    def selective_scan(self, inputs: ScanInputs):
        kernels = ScanKernels(self._launcher(), save_states=inputs.needs_grad, alloc=self._alloc())
        return scan_with_autograd(kernels, inputs)


__all__ = ["CupyBackend"]
