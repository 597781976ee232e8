"""Fused Triton kernels of the 2D scan routes: ``cross_scan`` and ``cross_merge``, one pass each.

Both read the route set's cached index tables (any route set works: built-in, user-defined,
sub-grid sets with padding) and take the 2D map through its strides, so channels-first
``[B, C, H, W]`` and channels-last ``[B, H, W, C]`` (or any other strided view) need no copy:

* scan:  ``out[b, k, c, l] = x[b, c, idx[k, l]]`` (0 where idx is -1): a gather, written
  contiguously along l; the K routes of one (batch, channel block) are neighbouring programs so
  their reads of the same map hit L2.
* merge: ``out[b, c, p] = sum_k y[b, k, c, inv[k, p]]`` (terms with inv = -1 skipped): a gather
  through the inverse table summed over k in float32 registers; no scatter, no atomics, so the
  result is deterministic.

Each op's backward is the other op.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from scanlib.routes.reference import adjoint_pair

from . import tuning
from .tuning import Launch

INTERPRETED = tuning.INTERPRETED


@triton.jit
def _cross_scan_kernel(
    x_ptr, idx_ptr, out_ptr,
    K, C, L, W, n_cblk, n_lblk,
    sx_b, sx_c, sx_h, sx_w,
    FLAT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    lb = pid % n_lblk
    r = pid // n_lblk
    k = r % K
    r = r // K
    cb = r % n_cblk
    b = (r // n_cblk).to(tl.int64)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    l = lb * BLOCK_L + tl.arange(0, BLOCK_L)
    l_mask = l < L
    p = tl.load(idx_ptr + k * L + l, mask=l_mask, other=-1).to(tl.int64)
    if FLAT:  # (h, w) addressed as one flat axis
        off = p * sx_w
    else:
        off = (p // W) * sx_h + (p % W) * sx_w
    src = x_ptr + b * sx_b + c[:, None].to(tl.int64) * sx_c + off[None, :]
    v = tl.load(src, mask=c_mask[:, None] & (p >= 0)[None, :], other=0.0)
    dst = out_ptr + ((b * K + k) * C + c[:, None]) * L + l[None, :]
    tl.store(dst, v, mask=c_mask[:, None] & l_mask[None, :])


@triton.jit
def _cross_merge_kernel(
    y_ptr, inv_ptr, out_ptr,
    K, C, HW, W, n_cblk, n_pblk,
    sy_b, sy_k, sy_c, sy_l,
    so_b, so_c, so_h, so_w,
    FLAT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    pb = pid % n_pblk
    r = pid // n_pblk
    cb = r % n_cblk
    b = (r // n_cblk).to(tl.int64)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = p < HW
    base = y_ptr + b * sy_b + c[:, None].to(tl.int64) * sy_c
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    for k in range(0, K):
        l = tl.load(inv_ptr + k * HW + p, mask=p_mask, other=-1).to(tl.int64)
        v = tl.load(
            base + k * sy_k + l[None, :] * sy_l, mask=c_mask[:, None] & (l >= 0)[None, :], other=0.0
        )
        acc += v.to(tl.float32)
    p64 = p.to(tl.int64)
    if FLAT:
        off = p64 * so_w
    else:
        off = (p64 // W) * so_h + (p64 % W) * so_w
    dst = out_ptr + b * so_b + c[:, None].to(tl.int64) * so_c + off[None, :]
    tl.store(dst, acc, mask=c_mask[:, None] & p_mask[None, :])


# ---------------------------------------------------------------------------------- launchers
@dataclass(frozen=True)
class RouteConfig:
    block_c: int
    block_l: int
    num_warps: int = 4


def _pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def default_config(C: int, L: int, interpreted: bool = INTERPRETED) -> RouteConfig:
    if interpreted:
        return RouteConfig(min(_pow2(C), 16), min(_pow2(L), 64), 1)
    # 16 values per thread at 4 warps: 30-110 registers on sm_90 for both layouts, no spills
    bc = min(_pow2(C), 16)
    return RouteConfig(bc, max(16, min(_pow2(L), 2048 // bc)), 4)


def candidate_configs(C: int, L: int) -> list[RouteConfig]:
    """What the tuner tries on a GPU, the default first."""
    out = [default_config(C, L, interpreted=False)]
    for bc, bl, nw in (
        (8, 128, 4),
        (16, 64, 4),
        (32, 64, 4),
        (8, 256, 4),
        (64, 32, 4),
        (32, 128, 8),
        (16, 256, 8),
    ):
        cfg = RouteConfig(min(bc, _pow2(C)), max(16, min(bl, _pow2(L))), nw)
        if cfg not in out:
            out.append(cfg)
    return out


#: route-op problems smaller than this many output elements use the default configuration
TUNE_MIN_ELEMENTS = 1 << 22

_tables_lock = threading.Lock()
_tables32: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _int32(table: torch.Tensor) -> torch.Tensor:
    """An int32 copy of a cached int64 index table (cached by the table's identity)."""
    got = _tables32.get(id(table))
    if got is not None and got[0] is table:
        return got[1]
    t32 = table.to(torch.int32).contiguous()
    with _tables_lock:
        _tables32[id(table)] = (table, t32)  # keeps ``table`` alive, so its id stays unique
    return t32


def _map_strides(t: torch.Tensor, channels_last: bool) -> tuple[int, int, int, int]:
    """(s_b, s_c, s_h, s_w) of a map [B, C, H, W] or, channels-last, [B, H, W, C]."""
    if channels_last:
        return t.stride(0), t.stride(3), t.stride(1), t.stride(2)
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def scan_launch(
    x: torch.Tensor,
    idx: torch.Tensor,
    out: torch.Tensor,
    W: int,
    channels_last: bool,
    cfg: RouteConfig,
) -> Launch:
    """The cross-scan kernel's launch: x (map) -> out [B, K, C, L] through idx [K, L] (int32)."""
    K, L = idx.shape
    B, _, C, _ = out.shape
    s_b, s_c, s_h, s_w = _map_strides(x, channels_last)
    H = x.shape[1] if channels_last else x.shape[2]
    flat = H == 1 or s_h == W * s_w
    n_cblk, n_lblk = triton.cdiv(C, cfg.block_c), triton.cdiv(L, cfg.block_l)
    return Launch(_cross_scan_kernel, (B * n_cblk * K * n_lblk,), (
        x, idx, out, K, C, L, W, n_cblk, n_lblk, s_b, s_c, s_h, s_w,
    ), dict(FLAT=flat, BLOCK_C=cfg.block_c, BLOCK_L=cfg.block_l, num_warps=cfg.num_warps))  # fmt: skip


def merge_launch(
    y: torch.Tensor,
    inv: torch.Tensor,
    out: torch.Tensor,
    W: int,
    channels_last: bool,
    cfg: RouteConfig,
) -> Launch:
    """The cross-merge kernel's launch: y [B, K, C, L] -> out (map) through inv [K, H*W] (int32)."""
    K, HW = inv.shape
    B, _, C, _ = y.shape
    so_b, so_c, so_h, so_w = _map_strides(out, channels_last)
    H = HW // W
    flat = H == 1 or so_h == W * so_w
    n_cblk, n_pblk = triton.cdiv(C, cfg.block_c), triton.cdiv(HW, cfg.block_l)
    return Launch(_cross_merge_kernel, (B * n_cblk * n_pblk,), (
        y, inv, out, K, C, HW, W, n_cblk, n_pblk,
        y.stride(0), y.stride(1), y.stride(2), y.stride(3), so_b, so_c, so_h, so_w,
    ), dict(FLAT=flat, BLOCK_C=cfg.block_c, BLOCK_P=cfg.block_l, num_warps=cfg.num_warps))  # fmt: skip


def scan_tensor(x: torch.Tensor, rs, H: int, W: int, channels_last: bool) -> torch.Tensor:
    """x [B, C, H, W] (or [B, H, W, C]) -> [B, K, C, L] contiguous; no autograd."""
    idx = _int32(rs.indices(H, W, x.device))
    K, L = idx.shape
    C = x.shape[3] if channels_last else x.shape[1]
    out = torch.empty(x.shape[0], K, C, L, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    measure = tuning.enabled(x.device, out.numel(), TUNE_MIN_ELEMENTS)
    cands = candidate_configs(C, L) if measure else [default_config(C, L)]
    run = lambda cfg: scan_launch(x, idx, out, W, channels_last, cfg)()  # noqa: E731
    key = ("cross_scan", K, C, L, H, W, x.dtype, channels_last, x.stride())
    run(tuning.pick(key, cands, run, measure))
    return out


def merge_tensor(y: torch.Tensor, rs, H: int, W: int, channels_last: bool) -> torch.Tensor:
    """y [B, K, C, L] -> [B, C, H, W] (or [B, H, W, C]) contiguous, summed over routes; no autograd."""
    inv = _int32(rs.inverse_indices(H, W, y.device))
    B, K, C, L = y.shape
    shape = (B, H, W, C) if channels_last else (B, C, H, W)
    out = torch.empty(shape, dtype=y.dtype, device=y.device)
    if out.numel() == 0:
        return out
    measure = tuning.enabled(y.device, y.numel(), TUNE_MIN_ELEMENTS)
    cands = candidate_configs(C, H * W) if measure else [default_config(C, H * W)]
    run = lambda cfg: merge_launch(y, inv, out, W, channels_last, cfg)()  # noqa: E731
    key = ("cross_merge", K, C, L, H, W, y.dtype, channels_last, y.stride())
    run(tuning.pick(key, cands, run, measure))
    return out


# ---------------------------------------------------------------------------------- autograd
_CrossScan, _CrossMerge = adjoint_pair(scan_tensor, merge_tensor)


def cross_scan(inputs) -> torch.Tensor:
    """``[B, K, C, L]`` for a ``RouteInputs`` with op "cross_scan"; differentiable."""
    return _CrossScan.apply(inputs.tensor, inputs.routes, inputs.H, inputs.W, inputs.channels_last)


def cross_merge(inputs) -> torch.Tensor:
    """``[B, C, H, W]`` (or ``[B, H, W, C]``) for a ``RouteInputs`` with op "cross_merge"."""
    return _CrossMerge.apply(inputs.tensor, inputs.routes, inputs.H, inputs.W, inputs.channels_last)
