"""The public selective scan: validate, pick a backend, run."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import ops, registry
from .inputs import ScanInputs


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    *,
    initial_state: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    backend: str | Sequence[str] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Selective scan (Mamba S6) with the semantics of Mamba's ``selective_scan_fn``.

    Shapes (B batch, D channels, L length, N state size, G groups):
        u, delta, z: [B, D, L]      A: [D, N]      D, delta_bias: [D]
        B, C: [D, N] (constant) | [B, N, L] (per sequence) | [B, G, N, L] (grouped, D % G == 0;
              channel d uses group d // (D / G))
        initial_state, last state: [B, D, N]

    Computes ``delta <- softplus(delta + delta_bias)`` (each part when asked),
    ``h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t``, ``y_t = <C_t, h_t> + D u_t`` and returns
    ``y * silu(z)`` when ``z`` is given, in the input dtype or ``out_dtype``. Arithmetic is float32
    (float64 for float64 inputs). Returns ``out`` or ``(out, last_state)``; gradients reach every
    tensor input and flow through ``last_state``. ``backend`` overrides the selection for this call.
    """
    if ops.use_custom_op():
        # one opaque node for torch.compile / dispatch modes; validation runs inside the op
        out, last = ops.selective_scan_op(
            u,
            delta,
            A,
            B,
            C,
            D,
            z,
            delta_bias,
            initial_state,
            delta_softplus,
            out_dtype,
            ops.backend_spec(backend),
        )
        return (out, last) if return_last_state else out
    inputs = ScanInputs(
        u,
        delta,
        A,
        B,
        C,
        D,
        z,
        delta_bias,
        delta_softplus,
        return_last_state,
        initial_state,
        out_dtype,
    )
    impl = registry.select(inputs, backend)
    out, last = impl.selective_scan(inputs)
    return (out, last) if return_last_state else out


def scan_inputs(*args, **kwargs) -> ScanInputs:
    """Build validated :class:`ScanInputs` from ``selective_scan``'s arguments (for ``explain``)."""
    kwargs.pop("backend", None)
    return ScanInputs(*args, **kwargs)


def explain(*args, backend: str | Sequence[str] | None = None, **kwargs) -> dict[str, list[str]]:
    """For ``selective_scan``'s arguments (or a ready ``ScanInputs``/``RouteInputs``), each backend's
    reasons for declining, plus ``"selected"``: the backend the current rules would pick."""
    if len(args) == 1 and not kwargs and hasattr(args[0], "op"):
        inputs = args[0]
    else:
        inputs = scan_inputs(*args, **kwargs)
    result = registry.explain(inputs)
    try:
        result["selected"] = [registry.select(inputs, backend).name]
    except Exception as e:  # the explanation itself must not raise
        result["selected"] = [f"none: {e}"]
    return result
