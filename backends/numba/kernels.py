"""numba kernels of the selective scan (imported on first use: importing it imports numba).

Work layout: channels are cut into tiles of ``CT`` lanes that never straddle a group of B or C, so
inside a tile grouped/per-sequence B_t and C_t are one scalar per (n, t) shared by every lane, and
constant B/C are one vector per n. A tile's inputs are copied per chunk of ``chunk`` steps into a
small time-major workspace [chunk, q, CT]; the time loop then runs over the chunk with every inner
loop across the CT lanes, so the recurrence of CT channels advances in a few AVX instructions and
no horizontal sum is needed per step (the issue's "vectorise across channels, not only N").

Work is parallel over (batch, tile) in the forward and over (batch, part) in the backward, where a
part is a run of tiles sharing their B and C groups: its per-lane dB/dC accumulators are summed
across lanes once per chunk, not once per tile.

Saved state: the state at the start of each chunk, [B, tiles, chunks, N, CT]; the backward
recomputes a chunk's states from it, so memory is O(B D N L / chunk).

Vectorisation notes: numba's heap arrays may alias as far as LLVM knows, so a loop writing one
heap array while reading another gets runtime overlap checks or stays scalar. The hot loops
therefore write only stack buffers (``_stack``) or one heap workspace indexed at constant offsets.

Latency notes: the element-wise work (softplus of delta, and at N = 1 the decays exp(delta A))
does not depend on the recurrence, so it runs in loops of its own over the whole chunk before the
step loop: inside the step loop its long dependency chains (exp, log1p polynomials) would wait on
each other, with only CT lanes in flight. At N = 1 the backward likewise keeps only h and g in
sequential loops (a fused single loop was measured slower: register pressure).

Optional tensors travel as size-0 arrays plus flags (never None) and every array is C-contiguous,
so each kernel compiles once per compute dtype.
"""

from __future__ import annotations

import numpy as np
from numba import carray, njit, prange, types
from numba.extending import intrinsic, overload

from . import _team
from ._math import fexp, silu, softplus, softplus_value
from ._transpose import transpose_block, transpose_block_out

#: lanes (channels) per tile: four AVX2 vectors of float32
CT = 32

# flags of scan_fwd
F_SOFTPLUS, F_Z, F_BCONST, F_CCONST, F_H0, F_SAVE = range(6)
# extra flags of scan_bwd
F_DOUT, F_DLAST = 6, 7

# rows of the forward's time-major workspace [chunk, _QF, CT]
_U, _DELTA, _Z, _Y, _DLF, _AF = range(6)
_QF = 6
# rows of the backward's time-major workspace [chunk, _QB, CT] (_CB.._H1: the N = 1 path's)
_DOUT, _DL, _SIG, _YB, _DU, _DDELTA, _DZ, _CB, _CC, _A1, _H1 = range(3, 14)
_QB = 14
# rows reused by the N = 1 path once their first use is over: g_t there goes into _DELTA (read
# only by the softplus pass), dy_t into _YB (read only by the dz pass)
_GG, _DY = _DELTA, _YB
# rows of the backward's state workspace [chunk, N, 4, CT]
_H, _A, _ACCB, _ACCC = range(4)

# The parallel kernels are a thin prange over work units calling a plain compiled function per
# unit: numba's parfor passes then see a tiny loop body.
_UNIT = dict(cache=True, nogil=True, error_model="numpy", fastmath={"contract"})
_PAR = dict(_UNIT, parallel=True)


@intrinsic
def _stack_ptr(typingctx, n, like):
    """Pointer to n uninitialised elements of like's dtype on the stack of the calling function."""
    if not isinstance(n, types.Integer) or not isinstance(like, types.Array):
        return None
    dty = like.dtype

    def codegen(context, builder, sig, args):
        size = context.cast(builder, args[0], sig.args[0], types.intp)
        ptr = builder.alloca(context.get_data_type(dty), size=size)
        ptr.align = 64
        return ptr

    return types.CPointer(dty)(n, like), codegen


@njit(inline="always")
def _stack(rows, like, fill):
    """A [rows, CT] stack buffer filled with ``fill``. Call it at function level, outside loops:
    it lives until the unit function returns. LLVM knows it aliases no other memory."""
    a = carray(_stack_ptr(rows * CT, like), (rows, CT))
    for r in range(rows):
        for c in range(CT):
            a[r, c] = fill
    return a


def _is_f32(a):
    """Whether a is a float32 array, a compile-time constant: the N = 1 paths are compiled for
    float32 only (float64 is not the fast path; LLVM drops the dead branch before its costly
    passes, which keeps the float64 compile time down)."""
    return a.dtype == np.float32


@overload(_is_f32, inline="always")
def _is_f32_ov(a):
    if isinstance(a, types.Array) and a.dtype == types.float32:
        return lambda a: True
    return lambda a: False


@njit(**_PAR)
def scan_fwd(u, delta, z, dbias, A, Dp, Bg, Bc, Cg, Cc, h0, tiles, b_per, c_per, flags, chunk, out, last, saved):  # fmt: skip
    """Forward. u, delta, z, out: [Bt, D, L]; A: [D, N]; dbias, Dp: [D]; Bg/Cg: [Bt, G, N, L]
    (grouped forms) and Bc/Cc: [D, N] (constant forms), the unused one size 0; h0, last:
    [Bt, D, N]; tiles: [T, 2] (first channel, lanes); saved: [Bt, T, chunks, N, CT]."""
    n_units = u.shape[0] * tiles.shape[0]
    for w in prange(n_units):
        _fwd_unit(w, u, delta, z, dbias, A, Dp, Bg, Bc, Cg, Cc, h0, tiles, b_per, c_per, flags, chunk, out, last, saved)  # fmt: skip


@njit(inline="always")
def _team_inputs(h, like):
    """The leading arguments :func:`scan_fwd` and :func:`scan_bwd` share, read from a team
    header (see ``_team``): (u, delta, z, dbias, A, Dp, Bg, Bc, Cg, Cc, next offset)."""
    u, o = _team.arr3(h, 1, like)
    delta, o = _team.arr3(h, o, like)
    z, o = _team.arr3(h, o, like)
    dbias, o = _team.arr1(h, o, like)
    A, o = _team.arr2(h, o, like)
    Dp, o = _team.arr1(h, o, like)
    Bg, o = _team.arr4(h, o, like)
    Bc, o = _team.arr2(h, o, like)
    Cg, o = _team.arr4(h, o, like)
    Cc, o = _team.arr2(h, o, like)
    return u, delta, z, dbias, A, Dp, Bg, Bc, Cg, Cc, o


@njit(**_UNIT)
def _fwd_team_body(data, like):
    """:func:`scan_fwd`'s units on a thread of torch's OpenMP team (see ``_team``): its
    arguments unpacked from the header at ``data``; ``like`` a scalar of the float type."""
    h = _team.words(data)
    u, delta, z, dbias, A, Dp, Bg, Bc, Cg, Cc, o = _team_inputs(h, like)
    h0, o = _team.arr3(h, o, like)
    tiles, o = _team.arr2(h, o, np.int64(0))
    b_per, c_per = h[o], h[o + 1]
    flags, o = _team.arr1(h, o + 2, np.int64(0))
    chunk = h[o]
    out, o = _team.arr3(h, o + 1, like)
    last, o = _team.arr3(h, o, like)
    saved, o = _team.arr5(h, o, like)
    n_units = h[o]
    while True:
        w = _team.claim(h, o + 1)
        if w >= n_units:
            break
        _fwd_unit(w, u, delta, z, dbias, A, Dp, Bg, Bc, Cg, Cc, h0, tiles, b_per, c_per, flags, chunk, out, last, saved)  # fmt: skip


@njit(**_UNIT)
def _fwd_unit(w, u, delta, z, dbias, A, Dp, Bg, Bc, Cg, Cc, h0, tiles, b_per, c_per, flags, chunk, out, last, saved):  # fmt: skip
    """One (batch, tile) of the forward."""
    nd = u.shape[1]
    L = u.shape[2]
    N = A.shape[1]
    ntiles = tiles.shape[0]
    nchunks = (L + chunk - 1) // chunk
    sp = flags[F_SOFTPLUS] != 0
    has_z = flags[F_Z] != 0
    bconst = flags[F_BCONST] != 0
    cconst = flags[F_CCONST] != 0
    has_h0 = flags[F_H0] != 0
    save = flags[F_SAVE] != 0
    b = w // ntiles
    ti = w - b * ntiles
    d0 = tiles[ti, 0]
    cnt = tiles[ti, 1]
    gb = d0 // b_per
    gc = d0 // c_per
    # per-lane parameters; padded lanes (c >= cnt) keep A = 0 and u = 0: their state stays 0
    Al = _stack(N, u, 0)
    BL = _stack(N, u, 1)
    CL = _stack(N, u, 1)
    h = _stack(N, u, 0)
    lane = _stack(5, u, 0)  # rows: bias, D, dl, dl*u, y
    for c in range(cnt):
        d = d0 + c
        lane[0, c] = dbias[d]
        lane[1, c] = Dp[d]
        for n in range(N):
            Al[n, c] = A[d, n]
            if bconst:
                BL[n, c] = Bc[d, n]
            if cconst:
                CL[n, c] = Cc[d, n]
            if has_h0:
                h[n, c] = h0[b, d, n]
    bias = lane[0]
    Dl = lane[1]
    dl = lane[2]
    dlu = lane[3]
    y = lane[4]
    T = _zeros3(chunk, _QF, u)
    Tf = T.reshape(T.size)
    uf = u.reshape(u.size)
    deltaf = delta.reshape(delta.size)
    zf = z.reshape(z.size)
    outf = out.reshape(out.size)
    BT = _ones2(chunk, N, u)
    CTm = _ones2(chunk, N, u)
    tile0 = (b * nd + d0) * L  # flat offset of (b, d0, 0) in u, delta, z, out
    for k in range(nchunks):
        t0 = k * chunk
        if save:
            for n in range(N):
                for c in range(CT):
                    saved[b, ti, k, n, c] = h[n, c]
        tl = min(chunk, L - t0)
        row0 = tile0 + t0
        transpose_block(uf, row0, L, Tf, _U * CT, _QF * CT, cnt, tl)
        transpose_block(deltaf, row0, L, Tf, _DELTA * CT, _QF * CT, cnt, tl)
        if has_z:
            transpose_block(zf, row0, L, Tf, _Z * CT, _QF * CT, cnt, tl)
        if not bconst:
            for n in range(N):
                for t in range(tl):
                    BT[t, n] = Bg[b, gb, n, t0 + t]
        if not cconst:
            for n in range(N):
                for t in range(tl):
                    CTm[t, n] = Cg[b, gc, n, t0 + t]
        # delta first, in its own loop: independent across steps, so its long latency
        # chains overlap (inside the recurrence's step loop they would wait on each other)
        if sp:
            for t in range(tl):
                for c in range(CT):
                    T[t, _DLF, c] = softplus_value(T[t, _DELTA, c] + bias[c])
        else:
            for t in range(tl):
                for c in range(CT):
                    T[t, _DLF, c] = T[t, _DELTA, c] + bias[c]
        if N == 1 and _is_f32(u):
            # N = 1: the decays too in a loop of their own; the step loop keeps the recurrence
            for t in range(tl):
                for c in range(CT):
                    T[t, _AF, c] = fexp(T[t, _DLF, c] * Al[0, c])
            for t in range(tl):
                bt = BT[t, 0]
                ct = CTm[t, 0]
                for c in range(CT):
                    uu = T[t, _U, c]
                    hh = T[t, _AF, c] * h[0, c] + (T[t, _DLF, c] * uu) * (bt * BL[0, c])
                    h[0, c] = hh
                    T[t, _Y, c] = Dl[c] * uu + hh * (ct * CL[0, c])
        else:
            for t in range(tl):
                for c in range(CT):
                    dl[c] = T[t, _DLF, c]
                    dlu[c] = dl[c] * T[t, _U, c]
                    y[c] = Dl[c] * T[t, _U, c]
                for n in range(N):
                    bt = BT[t, n]
                    ct = CTm[t, n]
                    for c in range(CT):
                        hh = fexp(dl[c] * Al[n, c]) * h[n, c] + dlu[c] * (bt * BL[n, c])
                        h[n, c] = hh
                        y[c] += hh * (ct * CL[n, c])
                for c in range(CT):
                    T[t, _Y, c] = y[c]
        if has_z:
            for t in range(tl):
                for c in range(CT):
                    T[t, _Y, c] = T[t, _Y, c] * silu(T[t, _Z, c])[0]
        transpose_block_out(Tf, _Y * CT, _QF * CT, outf, row0, L, tl, cnt)
    for c in range(cnt):
        for n in range(N):
            last[b, d0 + c, n] = h[n, c]


@njit(inline="always")
def _bwd_chunk(T, W, BT, CTm, Al, BL, CL, Dl, hv, g, dAl, dDv, dbv, tl, has_z, tmp, lane):
    """A tile's chunk of the backward for any N: recompute the states (W's _H, _A rows) from hv,
    then the reverse pass; T's _DL and _SIG rows hold delta and its derivative."""
    N = Al.shape[0]
    dl = lane[2]
    dlu = lane[3]
    y = lane[4]
    dy = lane[5]
    ddlu = lane[6]
    ddl = lane[7]
    # recompute the chunk's states (and a_t, y_t) from its saved start state
    for t in range(tl):
        for c in range(CT):
            dl[c] = T[t, _DL, c]
            dlu[c] = dl[c] * T[t, _U, c]
            y[c] = Dl[c] * T[t, _U, c]
        for n in range(N):
            bt = BT[t, n]
            ct = CTm[t, n]
            for c in range(CT):
                a = fexp(dl[c] * Al[n, c])
                hh = a * hv[n, c] + dlu[c] * (bt * BL[n, c])
                hv[n, c] = hh
                tmp[0, c] = a
                y[c] += hh * (ct * CL[n, c])
            for c in range(CT):
                W[t, n, _H, c] = hv[n, c]
                W[t, n, _A, c] = tmp[0, c]
        for c in range(CT):
            T[t, _YB, c] = y[c]
    # reverse: g_t = a_{t+1} g_{t+1} + dy_t C_t (g holds a_{t+1} g_{t+1} on entry)
    for t in range(tl - 1, -1, -1):
        if has_z:
            for c in range(CT):
                s, ds = silu(T[t, _Z, c])
                T[t, _DZ, c] = T[t, _DOUT, c] * T[t, _YB, c] * ds
                dy[c] = T[t, _DOUT, c] * s
        else:
            for c in range(CT):
                dy[c] = T[t, _DOUT, c]
        for c in range(CT):
            dl[c] = T[t, _DL, c]
            dlu[c] = dl[c] * T[t, _U, c]
            dDv[c] += dy[c] * T[t, _U, c]
            ddlu[c] = 0
            ddl[c] = 0
        for n in range(N):
            bt = BT[t, n]
            ct = CTm[t, n]
            for c in range(CT):
                tmp[0, c] = W[t, n, _H, c]
                tmp[1, c] = W[t, n, _A, c]
            for c in range(CT):
                bb = bt * BL[n, c]
                gg = g[n, c] + dy[c] * (ct * CL[n, c])
                hh = tmp[0, c]
                tmp[2, c] = dy[c] * hh
                tmp[3, c] = gg * dlu[c]
                ddlu[c] += gg * bb
                # a_t h_{t-1} = h_t - x_t
                dla = gg * (hh - dlu[c] * bb)
                dAl[n, c] += dla * dl[c]
                ddl[c] += dla * Al[n, c]
                g[n, c] = tmp[1, c] * gg
            for c in range(CT):
                W[t, n, _ACCC, c] += tmp[2, c]
                W[t, n, _ACCB, c] += tmp[3, c]
        for c in range(CT):
            T[t, _DU, c] = dy[c] * Dl[c] + ddlu[c] * dl[c]
            dd = (ddlu[c] * T[t, _U, c] + ddl[c]) * T[t, _SIG, c]
            T[t, _DDELTA, c] = dd
            dbv[c] += dd


@njit(inline="always")
def _bwd_chunk_n1(T, W, BT, CTm, Al, BL, CL, Dl, hv, g, dAl, dDv, dbv, tl, has_z):
    """_bwd_chunk for N = 1: only h and g are sequential, so everything else runs in loops over
    the whole chunk. Each loop writes one heap array (T, or W at the end) besides stack buffers:
    a loop reading one heap array and writing another stays scalar."""
    for t in range(tl):
        for c in range(CT):
            T[t, _A1, c] = fexp(T[t, _DL, c] * Al[0, c])
    for t in range(tl):
        bt = BT[t, 0]
        for c in range(CT):
            hh = T[t, _A1, c] * hv[0, c] + (T[t, _DL, c] * T[t, _U, c]) * (bt * BL[0, c])
            hv[0, c] = hh
            T[t, _H1, c] = hh
    if has_z:
        for t in range(tl):
            ct = CTm[t, 0]
            for c in range(CT):
                yb = Dl[c] * T[t, _U, c] + T[t, _H1, c] * (ct * CL[0, c])
                s, ds = silu(T[t, _Z, c])
                T[t, _DZ, c] = T[t, _DOUT, c] * yb * ds
                T[t, _DY, c] = T[t, _DOUT, c] * s
        dyr = _DY
    else:
        dyr = _DOUT
    # g_t = a_{t+1} g_{t+1} + dy_t C_t, the only sequential part of the reverse pass
    for t in range(tl - 1, -1, -1):
        ct = CTm[t, 0]
        for c in range(CT):
            gg = g[0, c] + T[t, dyr, c] * (ct * CL[0, c])
            T[t, _GG, c] = gg
            g[0, c] = T[t, _A1, c] * gg
    for t in range(tl - 1, -1, -1):
        bt = BT[t, 0]
        for c in range(CT):
            dy = T[t, dyr, c]
            uu = T[t, _U, c]
            dl = T[t, _DL, c]
            gg = T[t, _GG, c]
            hh = T[t, _H1, c]
            dlu = dl * uu
            bb = bt * BL[0, c]
            dDv[c] += dy * uu
            T[t, _CC, c] = dy * hh
            T[t, _CB, c] = gg * dlu
            ddlu = gg * bb
            # a_t h_{t-1} = h_t - x_t
            dla = gg * (hh - dlu * bb)
            dAl[0, c] += dla * dl
            T[t, _DU, c] = dy * Dl[c] + ddlu * dl
            dd = (ddlu * uu + dla * Al[0, c]) * T[t, _SIG, c]
            T[t, _DDELTA, c] = dd
            dbv[c] += dd
    for t in range(tl):
        for c in range(CT):
            W[t, 0, _ACCC, c] += T[t, _CC, c]
            W[t, 0, _ACCB, c] += T[t, _CB, c]


@njit(inline="always")
def _lane_sums(Wf, o, ws, tl, Sc, S):
    """S[t] = sum over lanes c (in order) of Wf[o + t*ws + c] for t < tl, and zero those entries.
    Lanes are transposed to rows first, so the sums are vector adds across steps, not a scalar
    chain per step."""
    transpose_block(Wf, o, ws, Sc, 0, tl, tl, CT)
    for t in range(tl):
        S[t] = 0
    for c in range(CT):
        for t in range(tl):
            S[t] += Sc[c * tl + t]
    for t in range(tl):
        for c in range(CT):
            Wf[o + t * ws + c] = 0


@njit(inline="always")
def _zeros3(a, q, like):
    return np.zeros((a, q, CT), like.dtype)


@njit(inline="always")
def _ones2(a, n, like):
    return np.ones((a, n), like.dtype)


@njit(**_PAR)
def scan_bwd(
    u, delta, z, dbias, A, Dp, Bg, Bc, Cg, Cc, tiles, parts, b_per, c_per, flags, chunk, saved, dout, dlast,
    du, ddelta, dz, dA_p, dD_p, dbias_p, dB_p, dC_p, dBc_p, dCc_p, dh0,
):  # fmt: skip
    """Backward. Inputs as in scan_fwd plus saved (its output), dout [Bt, D, L], dlast [Bt, D, N]
    and parts [P, 2] (tile ranges sharing B/C groups). Writes du, ddelta, dz [Bt, D, L]; per-batch
    partial sums dA_p, dBc_p, dCc_p [Bt, D, N], dD_p, dbias_p [Bt, D]; per-part partial sums
    dB_p, dC_p [Bt, P, N, L] (grouped forms); dh0 [Bt, D, N]."""
    n_units = u.shape[0] * parts.shape[0]
    for w in prange(n_units):
        _bwd_unit(
            w, u, delta, z, dbias, A, Dp, Bg, Bc, Cg, Cc, tiles, parts, b_per, c_per, flags, chunk, saved, dout,
            dlast, du, ddelta, dz, dA_p, dD_p, dbias_p, dB_p, dC_p, dBc_p, dCc_p, dh0,
        )  # fmt: skip


@njit(**_UNIT)
def _bwd_team_body(data, like):
    """:func:`scan_bwd`'s units on a thread of torch's OpenMP team (see :func:`_fwd_team_body`)."""
    h = _team.words(data)
    u, delta, z, dbias, A, Dp, Bg, Bc, Cg, Cc, o = _team_inputs(h, like)
    tiles, o = _team.arr2(h, o, np.int64(0))
    parts, o = _team.arr2(h, o, np.int64(0))
    b_per, c_per = h[o], h[o + 1]
    flags, o = _team.arr1(h, o + 2, np.int64(0))
    chunk = h[o]
    saved, o = _team.arr5(h, o + 1, like)
    dout, o = _team.arr3(h, o, like)
    dlast, o = _team.arr3(h, o, like)
    du, o = _team.arr3(h, o, like)
    ddelta, o = _team.arr3(h, o, like)
    dz, o = _team.arr3(h, o, like)
    dA_p, o = _team.arr3(h, o, like)
    dD_p, o = _team.arr2(h, o, like)
    dbias_p, o = _team.arr2(h, o, like)
    dB_p, o = _team.arr4(h, o, like)
    dC_p, o = _team.arr4(h, o, like)
    dBc_p, o = _team.arr3(h, o, like)
    dCc_p, o = _team.arr3(h, o, like)
    dh0, o = _team.arr3(h, o, like)
    n_units = h[o]
    while True:
        w = _team.claim(h, o + 1)
        if w >= n_units:
            break
        _bwd_unit(
            w, u, delta, z, dbias, A, Dp, Bg, Bc, Cg, Cc, tiles, parts, b_per, c_per, flags, chunk, saved, dout,
            dlast, du, ddelta, dz, dA_p, dD_p, dbias_p, dB_p, dC_p, dBc_p, dCc_p, dh0,
        )  # fmt: skip


@njit(**_UNIT)
def _bwd_unit(
    w, u, delta, z, dbias, A, Dp, Bg, Bc, Cg, Cc, tiles, parts, b_per, c_per, flags, chunk, saved, dout, dlast,
    du, ddelta, dz, dA_p, dD_p, dbias_p, dB_p, dC_p, dBc_p, dCc_p, dh0,
):  # fmt: skip
    """One (batch, part) of the backward."""
    nd = u.shape[1]
    L = u.shape[2]
    N = A.shape[1]
    dt = u.dtype
    nparts = parts.shape[0]
    nchunks = (L + chunk - 1) // chunk
    sp = flags[F_SOFTPLUS] != 0
    has_z = flags[F_Z] != 0
    bconst = flags[F_BCONST] != 0
    cconst = flags[F_CCONST] != 0
    has_h0 = flags[F_H0] != 0
    has_dout = flags[F_DOUT] != 0
    has_dlast = flags[F_DLAST] != 0
    b = w // nparts
    p = w - b * nparts
    ts = parts[p, 0]
    ntu = parts[p, 1] - ts
    gb = tiles[ts, 0] // b_per
    gc = tiles[ts, 0] // c_per
    # running sums of each tile, kept between chunks: g (= a_{t+1} dL/dh_{t+1}), dA, dB, dC
    # (constant forms), dD, dbias; padded lanes stay 0
    run = np.zeros((ntu, N, 4, CT), dt)
    run1 = np.zeros((ntu, 2, CT), dt)
    if has_dlast:
        for j in range(ntu):
            d0 = tiles[ts + j, 0]
            for c in range(tiles[ts + j, 1]):
                for n in range(N):
                    run[j, n, 0, c] = dlast[b, d0 + c, n]
    # stack copies of one tile's parameters and running sums while it is processed
    Al = _stack(N, u, 0)
    BL = _stack(N, u, 1)
    CL = _stack(N, u, 1)
    g = _stack(N, u, 0)
    dAl = _stack(N, u, 0)
    dBl = _stack(N, u, 0)
    dCl = _stack(N, u, 0)
    hv = _stack(N, u, 0)
    tmp = _stack(4, u, 0)  # one step's h, a, dC and dB terms on their way to/from W
    lane = _stack(10, u, 0)  # rows: bias, D, dl, dl*u, y, dy, d(dl*u), d(dl), dD, dbias
    bias = lane[0]
    Dl = lane[1]
    dDv = lane[8]  # rows 2-7: _bwd_chunk's per-step values
    dbv = lane[9]
    T = _zeros3(chunk, _QB, u)
    Tf = T.reshape(T.size)
    uf = u.reshape(u.size)
    deltaf = delta.reshape(delta.size)
    zf = z.reshape(z.size)
    doutf = dout.reshape(dout.size)
    duf = du.reshape(du.size)
    ddeltaf = ddelta.reshape(ddelta.size)
    dzf = dz.reshape(dz.size)
    W = np.zeros((chunk, N, 4, CT), dt)
    Wf = W.reshape(W.size)
    Sc = np.empty(CT * chunk, dt)  # _lane_sums' scratch
    S = carray(_stack_ptr(chunk, u), (chunk,))
    BT = _ones2(chunk, N, u)
    CTm = _ones2(chunk, N, u)
    for k in range(nchunks - 1, -1, -1):
        t0 = k * chunk
        tl = min(chunk, L - t0)
        if not bconst:
            for n in range(N):
                for t in range(tl):
                    BT[t, n] = Bg[b, gb, n, t0 + t]
        if not cconst:
            for n in range(N):
                for t in range(tl):
                    CTm[t, n] = Cg[b, gc, n, t0 + t]
        for j in range(ntu):
            ti = ts + j
            d0 = tiles[ti, 0]
            cnt = tiles[ti, 1]
            # load the tile: parameters, running sums, the chunk's inputs (padded lanes: zeros)
            for c in range(CT):
                bias[c] = 0
                Dl[c] = 0
                dDv[c] = run1[j, 0, c]
                dbv[c] = run1[j, 1, c]
                for n in range(N):
                    Al[n, c] = 0
                    g[n, c] = run[j, n, 0, c]
                    dAl[n, c] = run[j, n, 1, c]
                    dBl[n, c] = run[j, n, 2, c]
                    dCl[n, c] = run[j, n, 3, c]
                    hv[n, c] = saved[b, ti, k, n, c]
            for c in range(cnt):
                d = d0 + c
                bias[c] = dbias[d]
                Dl[c] = Dp[d]
                for n in range(N):
                    Al[n, c] = A[d, n]
                    if bconst:
                        BL[n, c] = Bc[d, n]
                    if cconst:
                        CL[n, c] = Cc[d, n]
            for t in range(tl):
                for q in range(_DOUT + 1):
                    for c in range(cnt, CT):
                        T[t, q, c] = 0
            row0 = (b * nd + d0) * L + t0  # flat offset of (b, d0, t0) in the [Bt, D, L] tensors
            transpose_block(uf, row0, L, Tf, _U * CT, _QB * CT, cnt, tl)
            transpose_block(deltaf, row0, L, Tf, _DELTA * CT, _QB * CT, cnt, tl)
            if has_z:
                transpose_block(zf, row0, L, Tf, _Z * CT, _QB * CT, cnt, tl)
            if has_dout:
                transpose_block(doutf, row0, L, Tf, _DOUT * CT, _QB * CT, cnt, tl)
            # delta and its derivative for the whole chunk first (independent across steps)
            if sp:
                for t in range(tl):
                    for c in range(CT):
                        s, sg = softplus(T[t, _DELTA, c] + bias[c])
                        T[t, _DL, c] = s
                        T[t, _SIG, c] = sg
            else:
                for t in range(tl):
                    for c in range(CT):
                        T[t, _DL, c] = T[t, _DELTA, c] + bias[c]
                        T[t, _SIG, c] = 1
            if N == 1 and _is_f32(u):
                _bwd_chunk_n1(T, W, BT, CTm, Al, BL, CL, Dl, hv, g, dAl, dDv, dbv, tl, has_z)
            else:
                _bwd_chunk(
                    T, W, BT, CTm, Al, BL, CL, Dl, hv, g, dAl, dDv, dbv, tl, has_z, tmp, lane
                )
            transpose_block_out(Tf, _DU * CT, _QB * CT, duf, row0, L, tl, cnt)
            transpose_block_out(Tf, _DDELTA * CT, _QB * CT, ddeltaf, row0, L, tl, cnt)
            if has_z:
                transpose_block_out(Tf, _DZ * CT, _QB * CT, dzf, row0, L, tl, cnt)
            # constant B/C: each lane is its own channel, sum over time now
            if bconst:
                for t in range(tl):
                    for n in range(N):
                        for c in range(CT):
                            dBl[n, c] += W[t, n, _ACCB, c]
                            W[t, n, _ACCB, c] = 0
            if cconst:
                for t in range(tl):
                    for n in range(N):
                        for c in range(CT):
                            dCl[n, c] += W[t, n, _ACCC, c]
                            W[t, n, _ACCC, c] = 0
            for c in range(CT):
                run1[j, 0, c] = dDv[c]
                run1[j, 1, c] = dbv[c]
                for n in range(N):
                    run[j, n, 0, c] = g[n, c]
                    run[j, n, 1, c] = dAl[n, c]
                    run[j, n, 2, c] = dBl[n, c]
                    run[j, n, 3, c] = dCl[n, c]
        # grouped B/C: every lane of the part shares the group, sum across lanes once per chunk
        if not bconst:
            for n in range(N):
                _lane_sums(Wf, (n * 4 + _ACCB) * CT, N * 4 * CT, tl, Sc, S)
                for t in range(tl):
                    dB_p[b, p, n, t0 + t] = S[t]
        if not cconst:
            for n in range(N):
                _lane_sums(Wf, (n * 4 + _ACCC) * CT, N * 4 * CT, tl, Sc, S)
                for t in range(tl):
                    dC_p[b, p, n, t0 + t] = S[t]
    for j in range(ntu):
        d0 = tiles[ts + j, 0]
        for c in range(tiles[ts + j, 1]):
            d = d0 + c
            dD_p[b, d] = run1[j, 0, c]
            dbias_p[b, d] = run1[j, 1, c]
            for n in range(N):
                dA_p[b, d, n] = run[j, n, 1, c]
                if bconst:
                    dBc_p[b, d, n] = run[j, n, 2, c]
                if cconst:
                    dCc_p[b, d, n] = run[j, n, 3, c]
                if has_h0:
                    dh0[b, d, n] = run[j, n, 0, c]


def _fwd_team32(data):
    _fwd_team_body(data, np.float32(0))


def _fwd_team64(data):
    _fwd_team_body(data, np.float64(0))


def _bwd_team32(data):
    _bwd_team_body(data, np.float32(0))


def _bwd_team64(data):
    _bwd_team_body(data, np.float64(0))


#: the team entry points (see ``_team``) by kernel and float64-ness
TEAM = {
    ("fwd", False): _fwd_team32,
    ("fwd", True): _fwd_team64,
    ("bwd", False): _bwd_team32,
    ("bwd", True): _bwd_team64,
}
