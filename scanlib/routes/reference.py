"""The torch reference for the route ops: one gather per op, any device torch runs on.

scan:  out[b, k, c, l] = x[b, c, idx[k, l]]              (0 where idx is -1 padding)
merge: out[b, c, p]    = sum_k y[b, k, c, inv[k, p]]     (0 where route k never reads p)

Merge is a gather through the inverse table plus a sum over k, not a scatter-add: no atomics,
so results are deterministic on every device. Each op's backward is the other op (merge is the
adjoint of scan), written as autograd Functions so the backward is one gather, not autograd
through indexing.

Fast path: when every route of a set reads the whole map in one of the eight "dihedral" orders
(row- or column-major, from any corner: cross2d, unidi, bidi, rot90), scan and merge are strided
copies, transposes and flips instead of gathers; on CPU that is 2-3x faster (a gather computes
an offset per element, a copy streams). The results are the same values (merge may sum in
another order).
"""

from __future__ import annotations

import weakref

import numpy as np
import torch

from .core import RouteSet
from .inputs import RouteInputs

_flip_out = torch.ops.aten.flip.out

# (transposed, flip rows, flip columns) per route: route k reads (g[::fh, ::fw] (.T if t)).ravel()
# of the position grid g; None when some route is not of that form
Plan = tuple[tuple[bool, bool, bool], ...] | None
_plans: weakref.WeakKeyDictionary[RouteSet, dict[tuple[int, int], Plan]] = (
    weakref.WeakKeyDictionary()
)


def dihedral_plan(rs: RouteSet, H: int, W: int) -> Plan:
    """How each route of ``rs`` reads an ``H x W`` map, if all are dihedral orders (cached)."""
    per_set = _plans.get(rs)
    if per_set is None:
        per_set = _plans.setdefault(rs, {})
    key = (H, W)
    if key in per_set:
        return per_set[key]
    plan: Plan = None
    if rs.is_permutation:
        g = np.arange(H * W, dtype=np.int64).reshape(H, W)
        forms = {}
        for t in (False, True):
            for fh in (False, True):
                for fw in (False, True):
                    v = g[:: -1 if fh else 1, :: -1 if fw else 1]
                    order = (v.T if t else v).ravel()
                    forms.setdefault(order.tobytes(), (t, fh, fw))
        idx = rs.indices(H, W).numpy()
        got = [forms.get(np.ascontiguousarray(row).tobytes()) for row in idx]
        plan = None if any(f is None for f in got) else tuple(got)
    per_set[key] = plan
    return plan


def _scan_dihedral(src: torch.Tensor, plan: tuple, H: int, W: int) -> torch.Tensor:
    """src: [B, C, H, W] (any strides) -> [B, K, C, H*W] by copies, transposes and flips."""
    B, C = src.shape[:2]
    K = len(plan)
    out = src.new_empty(B, K, C, H * W)
    done: dict[tuple[bool, bool, bool], int] = {}
    for k, (t, fh, fw) in enumerate(plan):
        if (t, fh, fw) in done:  # a repeated route: copy the first
            out[:, k].copy_(out[:, done[t, fh, fw]])
            continue
        rev = done.get((t, not fh, not fw))
        if rev is not None:  # the reverse of a route already read: one flip of the sequence
            _flip_out(out[:, rev], [-1], out=out[:, k])
        else:
            v = src.transpose(2, 3) if t else src
            dst = out[:, k].view(B, C, *v.shape[2:])
            # in the transposed view, dim 2 runs along W and dim 3 along H
            dims = [d for d, f in ((2, fw if t else fh), (3, fh if t else fw)) if f]
            if dims:
                _flip_out(v, dims, out=dst)
            else:
                dst.copy_(v)
        done[t, fh, fw] = k
    return out


def _merge_dihedral(
    y: torch.Tensor, plan: tuple, H: int, W: int, channels_last: bool
) -> torch.Tensor:
    """y: [B, K, C, H*W] -> [B, C, H, W] (or [B, H, W, C]), contiguous, summed over the routes."""
    B, K, C, n = y.shape
    # routes sharing the transposition are summed in the frame of the first of them (the others
    # flipped into it); each such sum is then put back on the map: [frame flips, sum, owned]
    groups: dict[bool, list] = {}
    for k, (t, fh, fw) in enumerate(plan):
        yk = y[:, k]
        if t not in groups:
            groups[t] = [(fh, fw), yk, False]
            continue
        (gh, gw), acc, owned = groups[t]
        rh, rw = fh != gh, fw != gw
        fresh = rh or rw
        if rh and rw:  # the reversed sequence
            yk = yk.flip(-1)
        elif fresh:
            shape = (B, C, W, H) if t else (B, C, H, W)
            dims = [d for d, f in ((2, rw if t else rh), (3, rh if t else rw)) if f]
            yk = yk.view(shape).flip(dims).view(B, C, n)
        if owned:
            acc.add_(yk)
        elif fresh:  # accumulate into the flipped copy: y itself stays intact
            acc = yk.add_(acc)
        else:
            acc = acc + yk
        groups[t] = [(gh, gw), acc, True]
    maps = []
    for t, ((gh, gw), acc, _) in groups.items():
        v = acc.view(B, C, W, H).transpose(2, 3) if t else acc.view(B, C, H, W)
        if gh or gw:
            v = v.flip([d for d, f in ((2, gh), (3, gw)) if f])
        maps.append(v)
    if len(maps) == 1 and not channels_last:
        v = maps[0]
        t, (_, acc, owned) = next(iter(groups.items()))
        if owned and v.data_ptr() == acc.data_ptr() and v.is_contiguous():
            return v  # the sum this function made is already the map
    if channels_last:
        out = y.new_empty(B, H, W, C)
        dst = out.permute(0, 3, 1, 2)
    else:
        out = dst = y.new_empty(B, C, H, W)
    if len(maps) == 1:
        dst.copy_(maps[0])
    else:
        torch.add(maps[0], maps[1], out=dst)
    return out


def scan_tensor(
    x: torch.Tensor, rs: RouteSet, H: int, W: int, channels_last: bool = False
) -> torch.Tensor:
    """x: [B, C, H, W] (or [B, H, W, C]) -> [B, K, C, L], contiguous. No autograd of its own."""
    plan = dihedral_plan(rs, H, W)
    if plan is not None:
        return _scan_dihedral(x.permute(0, 3, 1, 2) if channels_last else x, plan, H, W)
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
    plan = dihedral_plan(rs, H, W)
    if plan is not None:
        return _merge_dihedral(y.contiguous(), plan, H, W, channels_last)
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


def adjoint_pair(scan_tensor, merge_tensor) -> tuple[type, type]:
    """autograd Functions for a backend's (scan, merge) tensor functions: each one's backward is
    the other (they are adjoint), so gradients of any order need no extra kernels.

    Both take ``(tensor, route_set, H, W, channels_last)``."""

    class CrossScan(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, rs, H, W, channels_last):
            ctx.meta = (rs, H, W, channels_last)
            return scan_tensor(x, rs, H, W, channels_last)

        @staticmethod
        def backward(ctx, dout):
            return CrossMerge.apply(dout, *ctx.meta), None, None, None, None

    class CrossMerge(torch.autograd.Function):
        @staticmethod
        def forward(ctx, y, rs, H, W, channels_last):
            ctx.meta = (rs, H, W, channels_last)
            return merge_tensor(y, rs, H, W, channels_last)

        @staticmethod
        def backward(ctx, dout):
            return CrossScan.apply(dout, *ctx.meta), None, None, None, None

    return CrossScan, CrossMerge


_CrossScan, _CrossMerge = adjoint_pair(scan_tensor, merge_tensor)


def cross_scan(inputs: RouteInputs) -> torch.Tensor:
    """``[B, K, C, L]`` for ``inputs.op == "cross_scan"``; differentiable (backward: cross_merge)."""
    return _CrossScan.apply(inputs.tensor, inputs.routes, inputs.H, inputs.W, inputs.channels_last)


def cross_merge(inputs: RouteInputs) -> torch.Tensor:
    """``[B, C, H, W]`` / ``[B, H, W, C]`` for ``inputs.op == "cross_merge"``; differentiable."""
    return _CrossMerge.apply(inputs.tensor, inputs.routes, inputs.H, inputs.W, inputs.channels_last)
