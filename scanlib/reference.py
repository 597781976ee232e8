"""The sequential selective scan: readable, float64-capable, the truth every backend is tested against.

    delta <- softplus(delta + delta_bias)            (each part when asked)
    h_t    = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t      h_0 = initial_state or 0
    y_t    = <C_t, h_t> + D * u_t
    out    = y * silu(z)                             (when z is given)

Autograd differentiates straight through the loop, so gradients of every input (and through the
returned last state) come for free; it is slow and meant for tests and small inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .inputs import ScanInputs


def per_channel(inputs: ScanInputs, name: str, dtype: torch.dtype) -> torch.Tensor:
    """B or C as [B, D, N, L] (each channel's own B_t / C_t)."""
    g = inputs.grouped(name)  # [B, G, N, L]
    G = g.shape[1]
    if G != inputs.dim:
        g = g.repeat_interleave(inputs.dim // G, dim=1)
    return g.to(dtype)


def selective_scan_ref_inputs(inputs: ScanInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the reference on validated inputs; returns (out [B, D, L], last_state [B, D, N])."""
    cdt = inputs.compute_dtype
    u = inputs.u.to(cdt)
    delta = inputs.delta.to(cdt)
    if inputs.delta_bias is not None:
        delta = delta + inputs.delta_bias.to(cdt)[:, None]
    if inputs.delta_softplus:
        delta = F.softplus(delta)
    A = inputs.A.to(cdt)
    Bc = per_channel(inputs, "B", cdt)  # [B, D, N, L]
    Cc = per_channel(inputs, "C", cdt)
    deltaA = torch.exp(delta.unsqueeze(2) * A.unsqueeze(-1))  # [B, D, N, L]
    deltaBu = (delta * u).unsqueeze(2) * Bc  # [B, D, N, L]
    if inputs.initial_state is not None:
        h = inputs.initial_state.to(cdt)
    else:
        h = u.new_zeros(inputs.batch, inputs.dim, inputs.dstate)
    ys = []
    # unbind, not indexing: its backward is one stack, not a full-size zero tensor per step
    for a_t, x_t, c_t in zip(deltaA.unbind(-1), deltaBu.unbind(-1), Cc.unbind(-1)):
        h = a_t * h + x_t
        ys.append((h * c_t).sum(-1))
    y = torch.stack(ys, dim=-1)
    if inputs.D is not None:
        y = y + u * inputs.D.to(cdt)[:, None]
    if inputs.z is not None:
        y = y * F.silu(inputs.z.to(cdt))
    return y.to(inputs.result_dtype), h


def selective_scan_ref(
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
):
    """Reference selective scan with the same signature as :func:`scanlib.selective_scan`."""
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
    out, last = selective_scan_ref_inputs(inputs)
    return (out, last) if return_last_state else out
