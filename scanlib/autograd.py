"""Glue between a backend's ``fwd``/``bwd`` kernels (no autograd) and torch autograd.

A backend implements :class:`ScanKernels` and calls :func:`scan_with_autograd`; gradients flow to
every tensor input, including through the returned last state.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from .inputs import ScanInputs

TENSOR_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


class ScanKernels(Protocol):
    def forward(self, inputs: ScanInputs) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """(out [B, D, L], last_state [B, D, N], whatever backward needs)."""

    def backward(
        self, inputs: ScanInputs, saved: Any, dout: torch.Tensor | None, dlast: torch.Tensor | None
    ) -> dict[str, torch.Tensor | None]:
        """Gradients keyed by TENSOR_NAMES (any dtype; cast back here)."""


def _rebuild(template: ScanInputs, tensors: tuple) -> ScanInputs:
    kw = dict(zip(TENSOR_NAMES, tensors))
    return ScanInputs(
        delta_softplus=template.delta_softplus,
        return_last_state=template.return_last_state,
        out_dtype=template.out_dtype,
        **kw,
    )


class _ScanFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernels: ScanKernels, template: ScanInputs, *tensors):
        inputs = _rebuild(template, tensors)
        out, last, saved = kernels.forward(inputs)
        ctx.kernels = kernels
        ctx.template = template
        ctx.saved = saved
        ctx.save_for_backward(*[t for t in tensors if t is not None])
        ctx.present = [t is not None for t in tensors]
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):
        it = iter(ctx.saved_tensors)
        tensors = tuple(next(it) if p else None for p in ctx.present)
        inputs = _rebuild(ctx.template, tensors)
        grads = ctx.kernels.backward(inputs, ctx.saved, dout, dlast)
        result: list[torch.Tensor | None] = [None, None]
        for name, t, need in zip(TENSOR_NAMES, tensors, ctx.needs_input_grad[2:]):
            g = grads.get(name)
            result.append(None if (t is None or not need or g is None) else g.to(t.dtype))
        return tuple(result)


def scan_with_autograd(
    kernels: ScanKernels, inputs: ScanInputs
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``kernels`` on ``inputs``; differentiable when any input requires grad."""
    if not inputs.needs_grad:
        out, last, _ = kernels.forward(inputs)
        return out, last
    tensors = tuple(getattr(inputs, n) for n in TENSOR_NAMES)
    return _ScanFunction.apply(kernels, inputs, *tensors)
