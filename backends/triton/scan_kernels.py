"""Triton kernels of the selective scan (forward and backward) and their launchers.

Imported lazily by :class:`scanlib_backends.triton.TritonBackend`: importing it imports triton, and
``triton.jit`` decides at decoration time whether kernels run compiled or in the CPU interpreter
(``TRITON_INTERPRET=1``), so that variable must be set before the first import of this module.

Layout of the work. Channels are cut into "grid groups" of ``DG`` consecutive channels such that
every grid group lies inside one group of B and one group of C (``DG`` = gcd of the two group
sizes). One program owns ``BLOCK_D`` channels of one grid group in one batch element, every state
``n < N`` (``BLOCK_N`` = next power of two) and the whole sequence, walked in chunks of ``BLOCK_L``:

* forward: inside a chunk, ``h_t = a_t h_{t-1} + x_t`` is an associative scan over (a, x) pairs
  (``a_t = exp(delta_t A)``, ``x_t = delta_t u_t B_t``); the state at the chunk end is carried to
  the next chunk. With ``SAVE`` the state at every chunk start goes to ``states [B, D, N, NC]``.
* backward: chunks in reverse; each recomputes its states from the saved chunk start, then runs the
  reverse recurrence ``g_t = a_{t+1} g_{t+1} + dy_t C_t`` (``g`` = dL/dh_t) as a reverse associative
  scan, the carry being ``g`` at the first step of the later chunk. Gradients of per-channel inputs
  are written directly; those summed over channels/batch/time (A, D, delta_bias, B, C) are written
  as per-program partial sums and reduced by ``torch.sum`` afterwards: no atomics, so the result is
  bitwise reproducible.

B and C are read through strides in every form: grouped ``[B, G, N, L]`` (the group is a scalar per
program), per-sequence ``[B, N, L]`` (one group) and constant ``[D, N]`` (``*_CONST``: per channel).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from scanlib.inputs import BCForm, ScanInputs

from . import tuning
from .tuning import Launch

#: whether these kernels were decorated for the CPU interpreter (fixed when this module loads)
INTERPRETED = tuning.INTERPRETED
if INTERPRETED:
    from ._interpreter import vectorize_scans

    vectorize_scans()


# ---------------------------------------------------------------------------------- jit helpers
@triton.jit
def _lin_combine(a1, x1, a2, x2):
    # (a1, x1) then (a2, x2): h -> a2 (a1 h + x1) + x2. The reverse scan of the backward uses the
    # same map with the roles of "earlier" and "later" swapped, which is exactly what reverse=True does.
    return a1 * a2, a2 * x1 + x2


@triton.jit
def _load_delta(ptrs, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """delta tile after bias (broadcast) and softplus (0 where masked), and the raw value.

    softplus as torch computes it (threshold 20), with log1p(e) for tiny e kept exact. Written
    inline, not as a helper: every nested jit call costs the CPU interpreter milliseconds.
    """
    raw = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw = raw + bias
    dt = raw
    if SOFTPLUS:
        e = tl.exp(-tl.abs(raw))
        lp = tl.where(e < 1e-4, e * (1.0 - 0.5 * e), tl.log(1.0 + e))
        dt = tl.where(raw > 20.0, raw, tl.maximum(raw, 0.0) + lp)
    dt = tl.where(mask, dt, 0.0)
    return dt, raw


@triton.jit
def _channels(pid, n_dblocks, DG, BLOCK_D: tl.constexpr):
    """(batch index, block index, grid group, channel ids [BD, 1, 1], channel mask [BD, 1, 1])."""
    b = (pid // n_dblocks).to(tl.int64)
    blk = pid % n_dblocks
    nblk_g = tl.cdiv(DG, BLOCK_D)
    grp = blk // nblk_g
    dd = (blk % nblk_g) * BLOCK_D + tl.arange(0, BLOCK_D)[:, None, None]
    d_mask = dd < DG
    d = (grp * DG + dd).to(tl.int64)
    return b, blk, grp, d, d_mask


# Every tile is 3D, [channels, states, steps]: per-channel data [BD, 1, BL], B/C [1, BN, BL] (or
# [BD, BN, 1] when constant), parameters and states [BD, BN, 1]. Building the 3D tiles straight
# from 3D pointers (not by expanding 2D loads) lets loads, scans and stores share one register
# layout, with no shared-memory layout conversions in the loop.


# ---------------------------------------------------------------------------------- forward
@triton.jit
def _scan_fwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, Dv_ptr, z_ptr, bias_ptr, h0_ptr,
    out_ptr, last_ptr, states_ptr,
    n_dblocks, DIM, L, N, DG, DGB, DGC,
    su_b, su_d, su_l,
    sdt_b, sdt_d, sdt_l,
    sz_b, sz_d, sz_l,
    so_b, so_d, so_l,
    sA_d, sA_n,
    sB_b, sB_g, sB_n, sB_l,
    sC_b, sC_g, sC_n, sC_l,
    sh_b, sh_d, sh_n,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, B_CONST: tl.constexpr, C_CONST: tl.constexpr, SAVE: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, NUM_STAGES: tl.constexpr,
):  # fmt: skip
    b, blk, grp, d, d_mask = _channels(tl.program_id(0), n_dblocks, DG, BLOCK_D)
    n = tl.arange(0, BLOCK_N)[None, :, None]
    n_mask = n < N
    ll = tl.arange(0, BLOCK_L)[None, None, :]
    dn_mask = d_mask & n_mask
    gB = (grp * DG) // DGB
    gC = (grp * DG) // DGC

    A = tl.load(A_ptr + d * sA_d + n * sA_n, mask=dn_mask, other=0.0).to(tl.float32)
    bias = tl.zeros([BLOCK_D, 1, 1], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=d_mask, other=0.0).to(tl.float32)
    Dv = tl.zeros([BLOCK_D, 1, 1], dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(Dv_ptr + d, mask=d_mask, other=0.0).to(tl.float32)
    if B_CONST:
        Bc = tl.load(B_ptr + d * sB_g + n * sB_n, mask=dn_mask, other=0.0).to(tl.float32)
    if C_CONST:
        Cc = tl.load(C_ptr + d * sC_g + n * sC_n, mask=dn_mask, other=0.0).to(tl.float32)
    # grouped / per-sequence B and C: one [1, BN, BL] tile per chunk, shared by the program's channels
    B_seq = B_ptr + b * sB_b + gB * sB_g + n * sB_n
    C_seq = C_ptr + b * sC_b + gC * sC_g + n * sC_n
    u_row = u_ptr + b * su_b + d * su_d
    dt_row = dt_ptr + b * sdt_b + d * sdt_d
    z_row = z_ptr + b * sz_b + d * sz_d
    o_row = out_ptr + b * so_b + d * so_d
    h = tl.zeros([BLOCK_D, BLOCK_N, 1], dtype=tl.float32)
    if HAS_H0:
        h = tl.load(h0_ptr + b * sh_b + d * sh_d + n * sh_n, mask=dn_mask, other=0.0).to(tl.float32)
    NC = tl.cdiv(L, BLOCK_L)
    st_base = states_ptr + ((b * DIM + d) * N + n) * NC  # [BD, BN, 1]

    # num_stages: the loads of the next chunks are issued (cp.async) while this one computes
    for c in tl.range(0, NC, num_stages=NUM_STAGES):
        l = c * BLOCK_L + ll
        l_mask = l < L
        m = d_mask & l_mask  # [BD, 1, BL]
        nl_mask = n_mask & l_mask  # [1, BN, BL]
        dt, raw = _load_delta(dt_row + l * sdt_l, m, bias, HAS_BIAS, SOFTPLUS)
        u = tl.load(u_row + l * su_l, mask=m, other=0.0).to(tl.float32)
        if B_CONST:
            Bt = Bc
        else:
            Bt = tl.load(B_seq + l * sB_l, mask=nl_mask, other=0.0).to(tl.float32)
        if C_CONST:
            Ct = Cc
        else:
            Ct = tl.load(C_seq + l * sC_l, mask=nl_mask, other=0.0).to(tl.float32)
        if SAVE:
            tl.store(st_base + c, h, mask=dn_mask)
        a = tl.exp(dt * A)  # [BD, BN, BL]
        x = (dt * u) * Bt
        aa, xx = tl.associative_scan((a, x), 2, _lin_combine)
        hs = aa * h + xx
        # masked steps past L have a = 1, x = 0: the last column is the state after the chunk
        h = tl.sum(tl.where(ll == BLOCK_L - 1, hs, 0.0), 2, keep_dims=True)
        y = tl.sum(hs * Ct, 1, keep_dims=True)  # [BD, 1, BL]
        if HAS_D:
            y += Dv * u
        if HAS_Z:
            zz = tl.load(z_row + l * sz_l, mask=m, other=0.0).to(tl.float32)
            y = y * zz * tl.sigmoid(zz)
        tl.store(o_row + l * so_l, y, mask=m)

    tl.store(last_ptr + (b * DIM + d) * N + n, h, mask=dn_mask)


# ---------------------------------------------------------------------------------- backward
@triton.jit
def _scan_bwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, Dv_ptr, z_ptr, bias_ptr, states_ptr, dout_ptr, dlast_ptr,
    du_ptr, ddt_ptr, dz_ptr, dA_ptr, dD_ptr, dbias_ptr, dB_ptr, dC_ptr, dh0_ptr,
    n_dblocks, DIM, L, N, DG, DGB, DGC,
    su_b, su_d, su_l,
    sdt_b, sdt_d, sdt_l,
    sz_b, sz_d, sz_l,
    sdo_b, sdo_d, sdo_l,
    sA_d, sA_n,
    sB_b, sB_g, sB_n, sB_l,
    sC_b, sC_g, sC_n, sC_l,
    sdl_b, sdl_d, sdl_n,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, B_CONST: tl.constexpr, C_CONST: tl.constexpr,
    HAS_DOUT: tl.constexpr, HAS_DLAST: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, NUM_STAGES: tl.constexpr,
):  # fmt: skip
    b, blk, grp, d, d_mask = _channels(tl.program_id(0), n_dblocks, DG, BLOCK_D)
    n = tl.arange(0, BLOCK_N)[None, :, None]
    n_mask = n < N
    ll = tl.arange(0, BLOCK_L)[None, None, :]
    dn_mask = d_mask & n_mask
    gB = (grp * DG) // DGB
    gC = (grp * DG) // DGC

    A = tl.load(A_ptr + d * sA_d + n * sA_n, mask=dn_mask, other=0.0).to(tl.float32)
    bias = tl.zeros([BLOCK_D, 1, 1], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=d_mask, other=0.0).to(tl.float32)
    Dv = tl.zeros([BLOCK_D, 1, 1], dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(Dv_ptr + d, mask=d_mask, other=0.0).to(tl.float32)
    if B_CONST:
        Bc = tl.load(B_ptr + d * sB_g + n * sB_n, mask=dn_mask, other=0.0).to(tl.float32)
    if C_CONST:
        Cc = tl.load(C_ptr + d * sC_g + n * sC_n, mask=dn_mask, other=0.0).to(tl.float32)
    B_seq = B_ptr + b * sB_b + gB * sB_g + n * sB_n
    C_seq = C_ptr + b * sC_b + gC * sC_g + n * sC_n
    u_row = u_ptr + b * su_b + d * su_d
    dt_row = dt_ptr + b * sdt_b + d * sdt_d
    z_row = z_ptr + b * sz_b + d * sz_d
    do_row = dout_ptr + b * sdo_b + d * sdo_d
    # per-channel gradients are contiguous [B, D, L]
    g_row = b * DIM * L + d * L  # [BD, 1, 1]
    # g carried from the later chunk: dL/dh at the first step after this chunk (dlast at the end)
    gc = tl.zeros([BLOCK_D, BLOCK_N, 1], dtype=tl.float32)
    if HAS_DLAST:
        gc = tl.load(dlast_ptr + b * sdl_b + d * sdl_d + n * sdl_n, mask=dn_mask, other=0.0).to(
            tl.float32
        )
    dA_acc = tl.zeros([BLOCK_D, BLOCK_N, 1], dtype=tl.float32)
    dBc_acc = tl.zeros([BLOCK_D, BLOCK_N, 1], dtype=tl.float32)
    dCc_acc = tl.zeros([BLOCK_D, BLOCK_N, 1], dtype=tl.float32)
    dD_acc = tl.zeros([BLOCK_D, 1, 1], dtype=tl.float32)
    dbias_acc = tl.zeros([BLOCK_D, 1, 1], dtype=tl.float32)
    NC = tl.cdiv(L, BLOCK_L)
    st_base = states_ptr + ((b * DIM + d) * N + n) * NC
    part = (b * n_dblocks + blk) * N * L + n * L  # this program's rows of the [B, P, N, L] partials

    for ci in tl.range(0, NC, num_stages=NUM_STAGES):
        c = NC - 1 - ci
        l = c * BLOCK_L + ll
        l_mask = l < L
        m = d_mask & l_mask
        nl_mask = n_mask & l_mask
        dt, raw = _load_delta(dt_row + l * sdt_l, m, bias, HAS_BIAS, SOFTPLUS)
        u = tl.load(u_row + l * su_l, mask=m, other=0.0).to(tl.float32)
        if B_CONST:
            Bt = Bc
        else:
            Bt = tl.load(B_seq + l * sB_l, mask=nl_mask, other=0.0).to(tl.float32)
        if C_CONST:
            Ct = Cc
        else:
            Ct = tl.load(C_seq + l * sC_l, mask=nl_mask, other=0.0).to(tl.float32)
        # recompute the chunk's states from its saved start
        h0 = tl.load(st_base + c, mask=dn_mask, other=0.0)
        a = tl.exp(dt * A)
        dtu = dt * u
        x = dtu * Bt
        aa, xx = tl.associative_scan((a, x), 2, _lin_combine)
        hs = aa * h0 + xx

        dy = tl.zeros([BLOCK_D, 1, BLOCK_L], dtype=tl.float32)
        if HAS_DOUT:
            dy = tl.load(do_row + l * sdo_l, mask=m, other=0.0).to(tl.float32)
        if HAS_Z:
            zz = tl.load(z_row + l * sz_l, mask=m, other=0.0).to(tl.float32)
            y = tl.sum(hs * Ct, 1, keep_dims=True)
            if HAS_D:
                y += Dv * u
            sig = tl.sigmoid(zz)
            tl.store(dz_ptr + g_row + l, dy * y * sig * (1.0 + zz * (1.0 - sig)), mask=m)
            dy = dy * zz * sig
        du = tl.zeros([BLOCK_D, 1, BLOCK_L], dtype=tl.float32)
        if HAS_D:
            dD_acc += tl.sum(dy * u, 2, keep_dims=True)
            du = dy * Dv

        # reverse recurrence; the decay of the *next* step is read again from memory (shifted by one)
        m1 = d_mask & (l + 1 < L)
        dt1, _ = _load_delta(dt_row + (l + 1) * sdt_l, m1, bias, HAS_BIAS, SOFTPLUS)
        a_next = tl.where(l + 1 < L, tl.exp(dt1 * A), 1.0)
        cin = dy * Ct
        pp, qq = tl.associative_scan((a_next, cin), 2, _lin_combine, reverse=True)
        g = qq + pp * gc  # [BD, BN, BL]
        gc = tl.sum(tl.where(ll == 0, g, 0.0), 2, keep_dims=True)

        d_dtu = tl.sum(g * Bt, 1, keep_dims=True)  # [BD, 1, BL]
        dlog_a = g * (hs - x)  # g_t * a_t * h_{t-1}
        d_dt = d_dtu * u + tl.sum(dlog_a * A, 1, keep_dims=True)
        dA_acc += tl.sum(dlog_a * dt, 2, keep_dims=True)
        du += d_dtu * dt
        if SOFTPLUS:
            d_dt = d_dt * tl.sigmoid(raw)
        d_dt = tl.where(m, d_dt, 0.0)  # steps past L carry g but no input
        dbias_acc += tl.sum(d_dt, 2, keep_dims=True)
        tl.store(du_ptr + g_row + l, du, mask=m)
        tl.store(ddt_ptr + g_row + l, d_dt, mask=m)

        dB3 = g * dtu  # [BD, BN, BL]; zero on masked channels and steps
        dC3 = dy * hs
        if B_CONST:
            dBc_acc += tl.sum(dB3, 2, keep_dims=True)
        else:
            tl.store(dB_ptr + part + l, tl.sum(dB3, 0, keep_dims=True), mask=nl_mask)
        if C_CONST:
            dCc_acc += tl.sum(dC3, 2, keep_dims=True)
        else:
            tl.store(dC_ptr + part + l, tl.sum(dC3, 0, keep_dims=True), mask=nl_mask)

    dn_off = (b * DIM + d) * N + n  # [BD, BN, 1]
    tl.store(dA_ptr + dn_off, dA_acc, mask=dn_mask)
    if B_CONST:
        tl.store(dB_ptr + dn_off, dBc_acc, mask=dn_mask)
    if C_CONST:
        tl.store(dC_ptr + dn_off, dCc_acc, mask=dn_mask)
    if HAS_D:
        tl.store(dD_ptr + b * DIM + d, dD_acc, mask=d_mask)
    if HAS_BIAS:
        tl.store(dbias_ptr + b * DIM + d, dbias_acc, mask=d_mask)
    if HAS_H0:
        # dL/dh_{-1} = a_0 g_0
        dt0, _ = _load_delta(dt_row, d_mask, bias, HAS_BIAS, SOFTPLUS)
        tl.store(dh0_ptr + dn_off, tl.exp(dt0 * A) * gc, mask=dn_mask)


# ---------------------------------------------------------------------------------- launchers
@dataclass(frozen=True)
class Config:
    """One launch configuration: channels and steps per program tile, warps."""

    block_d: int
    block_l: int
    num_warps: int = 4
    num_stages: int = 3


def _pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


@dataclass(frozen=True)
class _Plan:
    """How one call maps onto programs (independent of the tile configuration but block_d)."""

    batch: int
    dim: int
    L: int
    N: int
    DG: int  # channels per grid group
    DGB: int  # channels per B group (1 for constant B: every channel its own)
    DGC: int
    GB: int  # groups of B (D for constant)
    GC: int
    block_n: int

    def n_dblocks(self, block_d: int) -> int:
        return (self.dim // self.DG) * -(-self.DG // block_d)


def _plan(inputs: ScanInputs) -> _Plan:
    d = inputs.dim
    gsize = {}
    for name in ("B", "C"):
        form = getattr(inputs, f"{name}_form")
        gsize[name] = 1 if form is BCForm.CONSTANT else d // getattr(inputs, f"{name}_groups")
    # grid groups must nest in the B and C groups; constant forms do not constrain them
    sizes = [
        s
        for s, form in ((gsize["B"], inputs.B_form), (gsize["C"], inputs.C_form))
        if form is not BCForm.CONSTANT
    ]
    DG = math.gcd(*sizes) if sizes else d
    return _Plan(
        batch=inputs.batch,
        dim=d,
        L=inputs.seqlen,
        N=inputs.dstate,
        DG=DG,
        DGB=gsize["B"],
        DGC=gsize["C"],
        GB=d // gsize["B"],
        GC=d // gsize["C"],
        block_n=_pow2(inputs.dstate),
    )


def _bc_strides(inputs: ScanInputs, name: str) -> tuple[int, int, int, int]:
    """(s_b, s_g, s_n, s_l) of B/C; constant [D, N] puts its channel stride in s_g."""
    t = getattr(inputs, name)
    form = getattr(inputs, f"{name}_form")
    if form is BCForm.CONSTANT:
        return 0, t.stride(0), t.stride(1), 0
    if form is BCForm.SEQUENCE:
        return t.stride(0), 0, t.stride(1), t.stride(2)
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def _strides3(t: torch.Tensor | None) -> tuple[int, int, int]:
    return (0, 0, 0) if t is None else (t.stride(0), t.stride(1), t.stride(2))


def default_config(plan: _Plan, interpreted: bool = INTERPRETED) -> Config:
    """A good configuration without measuring (the only one used under the interpreter)."""
    if interpreted:
        # few, small programs: each interpreted op costs the same whatever the tile size
        return Config(
            block_d=min(_pow2(plan.DG), 4), block_l=max(1, min(_pow2(plan.L), 32)), num_warps=1
        )
    # About 4 values per thread of a [BLOCK_D, BLOCK_N, BLOCK_L] tile at 4 warps: sm_90 builds of
    # these shapes need ~50 (forward) / ~100 (backward) registers, so many programs fit per SM;
    # with the loads pipelined (3 stages) that keeps enough bytes in flight. Small programs also
    # make many waves, so the last, partial wave costs little.
    block_l = max(16, min(_pow2(plan.L), 32 if plan.block_n >= 8 else 64))
    block_d = max(1, min(_pow2(plan.DG), 512 // (plan.block_n * block_l)))
    return Config(block_d=block_d, block_l=block_l, num_warps=4, num_stages=3)


#: (block_d, block_l, num_warps, num_stages) tried by the tuner for N <= 4, scaled down for larger N
_CANDIDATES = (
    (8, 64, 4, 3),
    (16, 32, 4, 3),
    (4, 128, 4, 3),
    (8, 32, 4, 3),
    (16, 64, 4, 3),
    (32, 32, 4, 3),
    (8, 64, 4, 2),
    (4, 64, 4, 4),
    (16, 64, 8, 3),
)


def candidate_configs(
    plan: _Plan, block_l: int | None = None, max_tile: int = 2048
) -> list[Config]:
    """Configurations the tuner tries on a GPU, the default first. ``block_l`` is fixed when the
    forward and backward share saved states; tiles above ``max_tile`` values per 4 warps are left
    out (sm_90 builds spill registers beyond ~2048 in the forward, ~1024 in the backward)."""
    dflt = default_config(plan, interpreted=False)
    if block_l is not None:
        dflt = Config(dflt.block_d, block_l, dflt.num_warps, dflt.num_stages)
    out = [dflt]
    shrink = max(1, plan.block_n // 4)  # keep the tile size for bigger state sizes
    for bd, bl, nw, ns in _CANDIDATES:
        bl = block_l or max(16, min(_pow2(plan.L), bl))
        bd = max(1, min(_pow2(plan.DG), bd // shrink))
        cfg = Config(bd, bl, nw, ns)
        if cfg not in out and bd * plan.block_n * bl * 4 <= max_tile * nw:
            out.append(cfg)
    return out


def _args_common(inputs: ScanInputs, plan: _Plan):
    sB = _bc_strides(inputs, "B")
    sC = _bc_strides(inputs, "C")
    return (
        (plan.dim, plan.L, plan.N, plan.DG, plan.DGB, plan.DGC),
        _strides3(inputs.u) + _strides3(inputs.delta) + _strides3(inputs.z),
        (inputs.A.stride(0), inputs.A.stride(1)) + sB + sC,
    )


def _flags(inputs: ScanInputs) -> dict:
    return dict(
        HAS_D=inputs.D is not None,
        HAS_Z=inputs.z is not None,
        HAS_BIAS=inputs.delta_bias is not None,
        SOFTPLUS=bool(inputs.delta_softplus),
        HAS_H0=inputs.initial_state is not None,
        B_CONST=inputs.B_form is BCForm.CONSTANT,
        C_CONST=inputs.C_form is BCForm.CONSTANT,
    )


def fwd_launch(inputs: ScanInputs, plan: _Plan, cfg: Config, out, last, states) -> Launch:
    """The forward kernel's launch (``states`` None: nothing saved)."""
    dims, s_in, s_par = _args_common(inputs, plan)
    u = inputs.u
    dummy = u  # never read: the matching flag is off
    h0 = inputs.initial_state
    nblk = plan.n_dblocks(cfg.block_d)
    grid = (plan.batch * nblk,)
    return Launch(_scan_fwd_kernel, grid, (
        u, inputs.delta, inputs.A, inputs.B, inputs.C,
        dummy if inputs.D is None else inputs.D,
        dummy if inputs.z is None else inputs.z,
        dummy if inputs.delta_bias is None else inputs.delta_bias,
        dummy if h0 is None else h0,
        out, last, last if states is None else states,
        nblk, *dims,
        *s_in, *_strides3(out), *s_par, *_strides3(h0),
    ), dict(
        **_flags(inputs), SAVE=states is not None,
        BLOCK_D=cfg.block_d, BLOCK_N=plan.block_n, BLOCK_L=cfg.block_l, NUM_STAGES=cfg.num_stages,
        num_warps=cfg.num_warps,
    ))  # fmt: skip


def bwd_launch(
    inputs: ScanInputs, plan: _Plan, cfg: Config, states, dout, dlast, bufs: dict
) -> Launch:
    """The backward kernel's launch, writing into ``bufs`` (from :func:`bwd_buffers`)."""
    dims, s_in, s_par = _args_common(inputs, plan)
    u = inputs.u
    dummy = bufs["dA"]
    nblk = plan.n_dblocks(cfg.block_d)
    grid = (plan.batch * nblk,)
    opt = lambda t: dummy if t is None else t  # noqa: E731
    return Launch(_scan_bwd_kernel, grid, (
        u, inputs.delta, inputs.A, inputs.B, inputs.C, opt(inputs.D), opt(inputs.z),
        opt(inputs.delta_bias), states, opt(dout), opt(dlast),
        bufs["du"], bufs["ddelta"], opt(bufs["dz"]), bufs["dA"], opt(bufs["dD"]), opt(bufs["dbias"]),
        bufs["dB"], bufs["dC"], opt(bufs["dh0"]),
        nblk, *dims,
        *s_in, *_strides3(dout), *s_par, *_strides3(dlast),
    ), dict(
        **_flags(inputs), HAS_DOUT=dout is not None, HAS_DLAST=dlast is not None,
        BLOCK_D=cfg.block_d, BLOCK_N=plan.block_n, BLOCK_L=cfg.block_l, NUM_STAGES=cfg.num_stages,
        num_warps=cfg.num_warps,
    ))  # fmt: skip


def bwd_buffers(inputs: ScanInputs, plan: _Plan, cfg: Config) -> dict:
    """Outputs of the backward kernel: per-channel gradients in the input dtype, partial sums fp32."""
    b, d, L, n = plan.batch, plan.dim, plan.L, plan.N
    dev, f32, dt = inputs.device, torch.float32, inputs.dtype
    P = plan.n_dblocks(cfg.block_d)

    def part(const: bool) -> torch.Tensor:
        return torch.empty((b, d, n) if const else (b, P, n, L), dtype=f32, device=dev)

    def opt(present: bool, *shape, dtype=f32) -> torch.Tensor | None:
        return torch.empty(*shape, dtype=dtype, device=dev) if present else None

    return {
        "du": torch.empty(b, d, L, dtype=dt, device=dev),
        "ddelta": torch.empty(b, d, L, dtype=dt, device=dev),
        "dz": opt(inputs.z is not None, b, d, L, dtype=dt),
        "dA": torch.empty(b, d, n, dtype=f32, device=dev),
        "dD": opt(inputs.D is not None, b, d),
        "dbias": opt(inputs.delta_bias is not None, b, d),
        "dB": part(inputs.B_form is BCForm.CONSTANT),
        "dC": part(inputs.C_form is BCForm.CONSTANT),
        "dh0": opt(inputs.initial_state is not None, b, d, n),
    }


# ---------------------------------------------------------------------------------- tuning
#: problems smaller than this many [B, D, L] elements use the default configuration
TUNE_MIN_ELEMENTS = 1 << 22


def _measure(inputs: ScanInputs) -> bool:
    return tuning.enabled(
        inputs.device, inputs.batch * inputs.dim * inputs.seqlen, TUNE_MIN_ELEMENTS
    )


def _key(kind: str, inputs: ScanInputs, plan: _Plan, extra=()) -> tuple:
    return (
        "scan",
        kind,
        plan,
        inputs.dtype,
        inputs.result_dtype,
        tuple(sorted(_flags(inputs).items())),
        *extra,
    )


# ---------------------------------------------------------------------------------- entry points
@dataclass
class Saved:
    """What the forward keeps for the backward: chunk-start states [B, D, N, NC] and the chunk."""

    states: torch.Tensor
    block_l: int


def _training_block_l(plan: _Plan) -> int:
    """Chunk length of a forward that saves states: the backward walks the same chunks."""
    return default_config(plan).block_l


def scan_fwd(inputs: ScanInputs, save: bool) -> tuple[torch.Tensor, torch.Tensor, Saved | None]:
    """Forward. Returns (out [B, D, L] in the result dtype, last state [B, D, N] fp32, saved)."""
    plan = _plan(inputs)
    dev = inputs.device
    out = torch.empty(plan.batch, plan.dim, plan.L, dtype=inputs.result_dtype, device=dev)
    last = torch.empty(plan.batch, plan.dim, plan.N, dtype=torch.float32, device=dev)
    if save:
        bl = _training_block_l(plan)
        nc = -(-plan.L // bl)
        states = torch.empty(plan.batch, plan.dim, plan.N, nc, dtype=torch.float32, device=dev)
        measure = _measure(inputs)
        cands = candidate_configs(plan, bl) if measure else [default_config(plan)]
        run = lambda c: fwd_launch(inputs, plan, c, out, last, states)()  # noqa: E731
        cfg = tuning.pick(_key("fwd_save", inputs, plan), cands, run, measure)
        fwd_launch(inputs, plan, cfg, out, last, states)()
        return out, last, Saved(states, cfg.block_l)
    measure = _measure(inputs)
    cands = candidate_configs(plan) if measure else [default_config(plan)]
    run = lambda c: fwd_launch(inputs, plan, c, out, last, None)()  # noqa: E731
    cfg = tuning.pick(_key("fwd", inputs, plan), cands, run, measure)
    fwd_launch(inputs, plan, cfg, out, last, None)()
    return out, last, None


def scan_bwd(
    inputs: ScanInputs, saved: Saved, dout: torch.Tensor | None, dlast: torch.Tensor | None
) -> dict[str, torch.Tensor | None]:
    """Gradients of every tensor input (per-channel ones already in the input dtype)."""
    plan = _plan(inputs)
    b, L, n = plan.batch, plan.L, plan.N
    extra = (saved.block_l, dout is not None, dlast is not None)
    measure = _measure(inputs)
    dflt = default_config(plan)
    cands = [Config(dflt.block_d, saved.block_l, dflt.num_warps, dflt.num_stages)]
    if measure:
        cands = candidate_configs(plan, saved.block_l, max_tile=1024)
    probe: dict = {}

    def run(cfg: Config) -> None:
        if cfg not in probe:
            probe.clear()
            probe[cfg] = bwd_buffers(inputs, plan, cfg)
        bwd_launch(inputs, plan, cfg, saved.states, dout, dlast, probe[cfg])()

    cfg = tuning.pick(_key("bwd", inputs, plan, extra), cands, run, measure)
    bufs = bwd_buffers(inputs, plan, cfg)
    bwd_launch(inputs, plan, cfg, saved.states, dout, dlast, bufs)()

    def reduce_bc(name: str, part: torch.Tensor) -> torch.Tensor:
        form = getattr(inputs, f"{name}_form")
        if form is BCForm.CONSTANT:
            return part.sum(0)
        G = plan.GB if name == "B" else plan.GC
        red = part.view(b, G, part.shape[1] // G, n, L).sum(2)
        return red.squeeze(1) if form is BCForm.SEQUENCE else red

    return {
        "u": bufs["du"],
        "delta": bufs["ddelta"],
        "z": bufs["dz"],
        "A": bufs["dA"].sum(0),
        "D": None if bufs["dD"] is None else bufs["dD"].sum(0),
        "delta_bias": None if bufs["dbias"] is None else bufs["dbias"].sum(0),
        "B": reduce_bc("B", bufs["dB"]),
        "C": reduce_bc("C", bufs["dC"]),
        "initial_state": bufs["dh0"],
    }
