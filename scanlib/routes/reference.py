"""The torch reference for the route ops: one gather per op, any device torch runs on.

scan:  out[b, k, c, l] = x[b, c, idx[k, l]]              (0 where idx is -1 padding)
merge: out[b, c, p]    = sum_k y[b, k, c, inv[k, p]]     (0 where route k never reads p)

Merge is a gather through the inverse table plus a sum over k, not a scatter-add: no atomics,
so results are deterministic on every device. Each op's backward is the other op (merge is the
adjoint of scan), written as autograd Functions so the backward is one gather, not autograd
through indexing.
"""

from __future__ import annotations

import torch

from .core import RouteSet
from .inputs import RouteInputs


def scan_tensor(
    x: torch.Tensor, rs: RouteSet, H: int, W: int, channels_last: bool = False
) -> torch.Tensor:
    """x: [B, C, H, W] (or [B, H, W, C]) -> [B, K, C, L], contiguous. No autograd of its own."""
    t = rs.gather_tables(H, W, x.device)
    B = x.shape[0]
    n = H * W
    if channels_last:
        C = x.shape[3]
        flat = x.reshape(B, n, C)
        if t.scan_padded:
            flat = torch.cat([flat, flat.new_zeros(B, 1, C)], 1)
        src = flat.transpose(1, 2)  # [B, C, n(+1)], strided: gather reads it in place
    else:
        C = x.shape[1]
        src = x.reshape(B, C, n)
        if t.scan_padded:
            src = torch.cat([src, src.new_zeros(B, C, 1)], 2)
    K, L = t.scan.shape
    src = src.unsqueeze(1).expand(B, K, C, src.shape[-1])
    return torch.gather(src, 3, t.scan.view(1, K, 1, L).expand(B, K, C, L))


def merge_tensor(
    y: torch.Tensor, rs: RouteSet, H: int, W: int, channels_last: bool = False
) -> torch.Tensor:
    """y: [B, K, C, L] -> [B, C, H, W] (or [B, H, W, C]), contiguous, summed over the K routes."""
    t = rs.gather_tables(H, W, y.device)
    B, K, C, _ = y.shape
    n = H * W
    if t.merge_padded:
        y = torch.cat([y, y.new_zeros(B, K, C, 1)], 3)
    index = t.merge.view(1, K, 1, n).expand(B, K, C, n)
    out = torch.gather(y, 3, index).sum(1)  # [B, C, n]
    if channels_last:
        # gathering along L of a [B, K, L, C] view reads strided memory; on CPU one gather
        # along the contiguous axis plus one transpose copy is faster
        return out.transpose(1, 2).contiguous().view(B, H, W, C)
    return out.view(B, C, H, W)


class _CrossScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, rs, H, W, channels_last):
        ctx.meta = (rs, H, W, channels_last)
        return scan_tensor(x, rs, H, W, channels_last)

    @staticmethod
    def backward(ctx, dout):
        rs, H, W, channels_last = ctx.meta
        return _CrossMerge.apply(dout, rs, H, W, channels_last), None, None, None, None


class _CrossMerge(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, rs, H, W, channels_last):
        ctx.meta = (rs, H, W, channels_last)
        return merge_tensor(y, rs, H, W, channels_last)

    @staticmethod
    def backward(ctx, dout):
        rs, H, W, channels_last = ctx.meta
        return _CrossScan.apply(dout, rs, H, W, channels_last), None, None, None, None


def cross_scan(inputs: RouteInputs) -> torch.Tensor:
    """``[B, K, C, L]`` for ``inputs.op == "cross_scan"``; differentiable (backward: cross_merge)."""
    return _CrossScan.apply(inputs.tensor, inputs.routes, inputs.H, inputs.W, inputs.channels_last)


def cross_merge(inputs: RouteInputs) -> torch.Tensor:
    """``[B, C, H, W]`` / ``[B, H, W, C]`` for ``inputs.op == "cross_merge"``; differentiable."""
    return _CrossMerge.apply(inputs.tensor, inputs.routes, inputs.H, inputs.W, inputs.channels_last)
