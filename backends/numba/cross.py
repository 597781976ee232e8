"""Fused numba forward of ``cross_selective_scan``: route reads, scan of every route and the merge.

Letters: B batch, Di channels, L = H*W pixels, K routes, N state size, R rank of a low-rank delta.

Channels-last inside: a work unit is one (sample, tile of ``CT`` channels), and at every step of a
route the kernel reads the ``CT`` contiguous channels of the pixel the route visits (x
``[B, L, Di]``, and delta ``[B, K, L, Di]`` or, low-rank, ``R`` scalars), so each inner loop runs
across the lanes without any transpose. All K routes of a tile run inside the unit, one after the
other, and add their outputs into ``out [B, L, Di]`` at the pixels they visit: no per-route
intermediates, no separate merge, no races (units own disjoint channels). The D skip term is the
same pixel for every route, so ``sum_k D_k`` is added once, by the first route.

Forward only (no saved states): training uses scanlib's composition.
Imported on first use (it imports numba).
"""

from __future__ import annotations

import weakref

import numpy as np
import torch
from llvmlite import ir
from numba import carray, njit, prange, types
from numba.extending import intrinsic

from scanlib.cross import CrossScanInputs

from . import _team
from ._math import exp_finite, softplus_value
from ._run import _empty_out, _lock, _threads
from .kernels import _PAR, _UNIT, _stack_ptr

#: lanes (channels) per work unit: four AVX2 vectors of float32. Measured at VMamba-T's shapes:
#: 15 % faster than 16 lanes (the per-step scalar work, route table, ranks and B/C, is shared
#: by more lanes); 64 lanes leave Di = 96 with a partial tile and too few units for two threads.
CT = 32

#: steps per chunk of a route: the chunk's [TC, CT] buffers stay in L1
TC = 32

# entries of the kernel's int parameters: strides of u (2), delta (4), B (4), C (4); channels;
# flags
_SU, _SD, _SB, _SC, _DIM, _SOFTPLUS, _LOWRANK, _N, _R = 0, 2, 6, 10, 14, 15, 16, 17, 18

#: largest rank applied inside the kernel; above it one batched GEMM makes the full delta first
#: (measured: in-kernel ties the GEMM at R = 24 and loses at R = 48, VMamba-T's last stage)
MAX_KERNEL_RANK = 32

_I32 = ir.IntType(32)

# float32 math: _math's exp without its NaN select (the decays' arguments delta * A <= 0 cannot
# overflow, and a NaN reaches the output through the recurrence's input term) and softplus value
fexp = exp_finite
fsoftplus = softplus_value


# ---------------------------------------------------------------------- row operations
# numba runs LLVM's loop vectoriser but not its SLP vectoriser: a lane loop short enough to be
# fully unrolled (a CT-wide copy or add) becomes CT scalar instructions. These intrinsics move and
# combine whole CT-lane rows as one LLVM vector (<CT x float>, split into AVX registers by LLVM).
# Offsets are flat element offsets into 1-D arrays, in range by construction (no wraparound, no
# bounds check: numba's wraparound select also hides consecutive addresses from LLVM).


def _row_ptr(context, builder, arrty, arr, offty, off):
    a = context.make_array(arrty)(context, builder, arr)
    idx = context.cast(builder, off, offty, types.intp)
    vty = ir.VectorType(context.get_data_type(arrty.dtype), CT)
    return builder.bitcast(builder.gep(a.data, [idx]), vty.as_pointer())


def _align(arrty) -> int:
    return arrty.dtype.bitwidth // 8


def _is_row_array(a) -> bool:
    return isinstance(a, types.Array) and a.ndim == 1 and a.dtype in (types.float32, types.float64)


def _splat(builder, val, vty):
    v = builder.insert_element(ir.Constant(vty, ir.Undefined), val, ir.Constant(_I32, 0))
    return builder.shuffle_vector(
        v, ir.Constant(vty, ir.Undefined), ir.Constant(ir.VectorType(_I32, CT), [0] * CT)
    )


@intrinsic
def _rcopy(typingctx, src, so, dst, do):
    """dst[do : do + CT] = src[so : so + CT]."""
    if not (_is_row_array(src) and _is_row_array(dst) and src.dtype == dst.dtype):
        return None

    def codegen(context, builder, sig, args):
        ps = _row_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1])
        pd = _row_ptr(context, builder, sig.args[2], args[2], sig.args[3], args[3])
        al = _align(sig.args[0])
        builder.store(builder.load(ps, align=al), pd, align=al)
        return context.get_dummy_value()

    return types.void(src, so, dst, do), codegen


@intrinsic
def _radd(typingctx, src, so, dst, do):
    """dst[do : do + CT] += src[so : so + CT]."""
    if not (_is_row_array(src) and _is_row_array(dst) and src.dtype == dst.dtype):
        return None

    def codegen(context, builder, sig, args):
        ps = _row_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1])
        pd = _row_ptr(context, builder, sig.args[2], args[2], sig.args[3], args[3])
        al = _align(sig.args[0])
        s = builder.fadd(builder.load(pd, align=al), builder.load(ps, align=al))
        builder.store(s, pd, align=al)
        return context.get_dummy_value()

    return types.void(src, so, dst, do), codegen


def _make_raxpy(J: int):
    """An intrinsic ``f(a, ao, x, xo, dst, do)``: dst[do : do + CT] += sum_j a[ao + j] *
    x[xo + j*CT : xo + (j+1)*CT] for j < J: J rank terms per load/store of dst, summed as a tree
    (short dependency chains)."""

    def typer(typingctx, a, ao, x, xo, dst, do):
        if not (_is_row_array(a) and _is_row_array(x) and _is_row_array(dst)):
            return None
        if not (a.dtype == x.dtype == dst.dtype):
            return None

        def codegen(context, builder, sig, args):
            a_arr = context.make_array(sig.args[0])(context, builder, args[0])
            ao_v = context.cast(builder, args[1], sig.args[1], types.intp)
            px = _row_ptr(context, builder, sig.args[2], args[2], sig.args[3], args[3])
            pd = _row_ptr(context, builder, sig.args[4], args[4], sig.args[5], args[5])
            al = _align(sig.args[2])
            vty = px.type.pointee
            fl = ("contract",)
            terms = []
            for j in range(J):
                aj_ptr = builder.gep(a_arr.data, [builder.add(ao_v, ir.Constant(ao_v.type, j))])
                xj = builder.load(builder.gep(px, [ir.Constant(ir.IntType(64), j)]), align=al)
                terms.append(builder.fmul(_splat(builder, builder.load(aj_ptr), vty), xj, flags=fl))
            while len(terms) > 1:
                pairs = range(0, len(terms) - 1, 2)
                terms = [builder.fadd(terms[i], terms[i + 1], flags=fl) for i in pairs] + (
                    [terms[-1]] if len(terms) % 2 else []
                )
            s = builder.fadd(builder.load(pd, align=al), terms[0], flags=fl)
            builder.store(s, pd, align=al)
            return context.get_dummy_value()

        return types.void(a, ao, x, xo, dst, do), codegen

    typer.__name__ = f"_raxpy{J}"
    return intrinsic(typer)


_raxpy8 = _make_raxpy(8)
_raxpy4 = _make_raxpy(4)
_raxpy2 = _make_raxpy(2)
_raxpy1 = _make_raxpy(1)


@intrinsic
def _rvfma(typingctx, a, ao, x, xo, dst, do):
    """dst[do : do + CT] += a[ao : ao + CT] * x[xo : xo + CT]."""
    if not (_is_row_array(a) and _is_row_array(x) and _is_row_array(dst)):
        return None
    if not (a.dtype == x.dtype == dst.dtype):
        return None

    def codegen(context, builder, sig, args):
        pa = _row_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1])
        px = _row_ptr(context, builder, sig.args[2], args[2], sig.args[3], args[3])
        pd = _row_ptr(context, builder, sig.args[4], args[4], sig.args[5], args[5])
        al = _align(sig.args[0])
        prod = builder.fmul(builder.load(pa, align=al), builder.load(px, align=al),
                            flags=("contract",))  # fmt: skip
        s = builder.fadd(builder.load(pd, align=al), prod, flags=("contract",))
        builder.store(s, pd, align=al)
        return context.get_dummy_value()

    return types.void(a, ao, x, xo, dst, do), codegen


@intrinsic
def _ld(typingctx, arr, i):
    """arr[i] for a 1-D array and an in-range offset (no wraparound, no bounds check)."""
    if not (isinstance(arr, types.Array) and arr.ndim == 1 and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        idx = context.cast(builder, args[1], sig.args[1], types.intp)
        return builder.load(builder.gep(a.data, [idx]))

    return arr.dtype(arr, i), codegen


@njit(inline="always")
def _buf(n, like, fill):
    """A 1-D stack buffer of n elements filled with ``fill`` (call at function level, outside
    loops: it lives until the unit function returns; LLVM knows it aliases no other memory)."""
    a = carray(_stack_ptr(n, like), (n,))
    for i in range(n):
        a[i] = fill
    return a


# ---------------------------------------------------------------------- the kernel
@njit(**_PAR)
def cross_fwd(u, dl_in, Bm, Cm, At, dbias, Dsum, Wdt, routes, ints, out):
    """u: x, flat, strides (b, l) = ``ints[_SU:_SU+2]``, channel stride 1; dl_in: delta, flat,
    strides (b, k, channel-or-rank, l) = ``ints[_SD:_SD+4]`` (channel stride 1 at full rank);
    Bm/Cm: B and C, flat, strides (b, k, n, l) at ``_SB``/``_SC``; At: A as [K, N, Di], flat;
    dbias [K*Di]; Dsum [Di] (D summed over the routes); Wdt: [K, R, Di] flat (low rank; R = 0
    otherwise); routes [K, L] the pixel read at each step; ints[_DIM] = Di, ints[_N] = N,
    ints[_R] = R, flags at _SOFTPLUS, _LOWRANK; out: [B, L, Di] flat, C-contiguous."""
    dim = ints[_DIM]
    ntiles = (dim + CT - 1) // CT
    n_units = (out.size // (routes.shape[1] * dim)) * ntiles
    for w in prange(n_units):
        _unit(w, u, dl_in, Bm, Cm, At, dbias, Dsum, Wdt, routes, ints, out)


@njit(**_UNIT)
def cross_fwd_units(u, dl_in, Bm, Cm, At, dbias, Dsum, Wdt, routes, ints, out, w0, w1):
    """Work units [w0, w1) of :func:`cross_fwd` on the calling thread (nogil: several Python
    threads may run disjoint ranges side by side)."""
    for w in range(w0, w1):
        _unit(w, u, dl_in, Bm, Cm, At, dbias, Dsum, Wdt, routes, ints, out)


@njit(**_UNIT)
def _team_body(data, like):
    """The units of one call on a thread of torch's OpenMP team (see ``_team``): the arguments of
    :func:`cross_fwd` unpacked from the header at ``data``; ``like`` a scalar of the float type."""
    h = _team.words(data)
    u, o = _team.arr1(h, 1, like)
    dl_in, o = _team.arr1(h, o, like)
    Bm, o = _team.arr1(h, o, like)
    Cm, o = _team.arr1(h, o, like)
    At, o = _team.arr1(h, o, like)
    dbias, o = _team.arr1(h, o, like)
    Dsum, o = _team.arr1(h, o, like)
    Wdt, o = _team.arr1(h, o, like)
    routes, o = _team.arr2(h, o, np.int64(0))
    ints, o = _team.arr1(h, o, np.int64(0))
    out, o = _team.arr1(h, o, like)
    n_units = h[o]
    while True:
        w = _team.claim(h, o + 1)
        if w >= n_units:
            break
        _unit(w, u, dl_in, Bm, Cm, At, dbias, Dsum, Wdt, routes, ints, out)


def _team32(data):
    _team_body(data, np.float32(0))


def _team64(data):
    _team_body(data, np.float64(0))


@njit(**_UNIT)
def _unit(w, u, dl_in, Bm, Cm, At, dbias, Dsum, Wdt, routes, ints, out):
    """One (sample, channel tile): the K routes in turn, each added into out.

    A route runs in chunks of ``TC`` steps: gather the chunk's pixels into [TC, CT] stack buffers
    (rows of CT lanes), make the chunk's deltas (rank products, softplus) in flat loops, run the
    recurrence (lane loops, vectorised), scatter-add the outputs."""
    K = routes.shape[0]
    L = routes.shape[1]
    N = ints[_N]
    R = ints[_R]
    dim = ints[_DIM]
    sp = ints[_SOFTPLUS] != 0
    lowrank = ints[_LOWRANK] != 0
    su0, su1 = ints[_SU], ints[_SU + 1]
    sd0, sd1, sd2, sd3 = ints[_SD], ints[_SD + 1], ints[_SD + 2], ints[_SD + 3]
    sB0, sB1, sB2, sB3 = ints[_SB], ints[_SB + 1], ints[_SB + 2], ints[_SB + 3]
    sC0, sC1, sC2, sC3 = ints[_SC], ints[_SC + 1], ints[_SC + 2], ints[_SC + 3]
    ntiles = (dim + CT - 1) // CT
    b = w // ntiles
    d0 = (w - b * ntiles) * CT
    cnt = min(CT, dim - d0)
    full = cnt == CT
    # lane parameters; padded lanes (c >= cnt) keep u = 0, A = 0, bias = 0, W = 0 (finite, unused)
    Al = _buf(N * CT, u, 0)  # [N, CT]
    Wl = _buf(max(R, 1) * CT, u, 0)  # [R, CT]
    bias = _buf(CT, u, 0)
    Ds = _buf(CT, u, 0)
    h = _buf(N * CT, u, 0)
    UB = _buf(TC * CT, u, 0)  # u at the chunk's pixels, [TC, CT]
    XB = _buf(TC * CT, u, 0)  # raw delta, [TC, CT]
    DB = _buf(TC * CT, u, 0)  # delta, [TC, CT]
    YB = _buf(TC * CT, u, 0)  # outputs, [TC, CT]
    DT = _buf(TC * max(R, 1), u, 0)  # low-rank delta of the chunk's steps, [TC, R]
    BB = _buf(TC * N, u, 0)  # [TC, N]
    CB = _buf(TC * N, u, 0)
    PB = carray(_stack_ptr(TC, routes), (TC,))  # pixels of the chunk
    for c in range(cnt):
        Ds[c] = Dsum[d0 + c]
    u0 = b * su0 + d0
    o0 = b * L * dim + d0
    for k in range(K):
        # the route's lane parameters: rows of the [K, *, Di] tables
        if full:
            _rcopy(dbias, k * dim + d0, bias, 0)
            for n in range(N):
                _rcopy(At, (k * N + n) * dim + d0, Al, n * CT)
            for r in range(R):
                _rcopy(Wdt, (k * R + r) * dim + d0, Wl, r * CT)
        else:
            for c in range(cnt):
                bias[c] = dbias[k * dim + d0 + c]
                for n in range(N):
                    Al[n * CT + c] = At[(k * N + n) * dim + d0 + c]
                for r in range(R):
                    Wl[r * CT + c] = Wdt[(k * R + r) * dim + d0 + c]
        for i in range(N * CT):
            h[i] = 0
        dk = b * sd0 + k * sd1
        bk = b * sB0 + k * sB1
        ck = b * sC0 + k * sC1
        first = k == 0
        for t0 in range(0, L, TC):
            tl = min(TC, L - t0)
            # gather the chunk's rows
            for t in range(tl):
                p = routes[k, t0 + t]
                PB[t] = p
                row = t * CT
                uo = u0 + p * su1
                do = dk + p * sd3
                if lowrank:  # the chunk's ranks; the products follow, over all its steps
                    for r in range(R):
                        DT[t * R + r] = _ld(dl_in, do + r * sd2)
                elif full:
                    _rcopy(dl_in, do + d0, XB, row)
                    _radd(bias, 0, XB, row)
                else:
                    for c in range(cnt):
                        XB[row + c] = _ld(dl_in, do + d0 + c) + bias[c]
                if full:
                    _rcopy(u, uo, UB, row)
                else:
                    for c in range(cnt):
                        UB[row + c] = _ld(u, uo + c)
                for n in range(N):
                    BB[t * N + n] = _ld(Bm, bk + n * sB2 + p * sB3)
                    CB[t * N + n] = _ld(Cm, ck + n * sC2 + p * sC3)
            if lowrank:
                # delta = bias + sum_r dt_r W_r: r outermost, so the steps' sums are independent
                # chains (one chain of R dependent FMAs per step would stall on their latency)
                for t in range(tl):
                    _rcopy(bias, 0, XB, t * CT)
                # ranks in blocks of 8, 4, 2, 1: a delta row is loaded and stored once a block
                r = 0
                while r < R:
                    left = R - r
                    for t in range(tl):
                        if left >= 8:
                            _raxpy8(DT, t * R + r, Wl, r * CT, XB, t * CT)
                        elif left >= 4:
                            _raxpy4(DT, t * R + r, Wl, r * CT, XB, t * CT)
                        elif left >= 2:
                            _raxpy2(DT, t * R + r, Wl, r * CT, XB, t * CT)
                        else:
                            _raxpy1(DT, t * R + r, Wl, r * CT, XB, t * CT)
                    r += 8 if left >= 8 else 4 if left >= 4 else 2 if left >= 2 else 1
            m = tl * CT
            if sp:  # into another buffer: in place, LLVM makes the NaN passthrough a masked store
                for i in range(m):
                    DB[i] = fsoftplus(XB[i])
            else:
                for i in range(m):
                    DB[i] = XB[i]
            # the recurrence: lane loops with a long body, vectorised by LLVM's loop vectoriser;
            # state 0 starts y (with the D skip term, the same pixel on every route: added once,
            # on the first route), the other states add to it
            for t in range(tl):
                row = t * CT
                bt = BB[t * N]
                ct = CB[t * N]
                if first:
                    for c in range(CT):
                        dl = DB[row + c]
                        uu = UB[row + c]
                        hh = fexp(dl * Al[c]) * h[c] + (dl * uu) * bt
                        h[c] = hh
                        YB[row + c] = hh * ct + Ds[c] * uu
                else:
                    for c in range(CT):
                        dl = DB[row + c]
                        hh = fexp(dl * Al[c]) * h[c] + (dl * UB[row + c]) * bt
                        h[c] = hh
                        YB[row + c] = hh * ct
                for n in range(1, N):
                    bt = BB[t * N + n]
                    ct = CB[t * N + n]
                    for c in range(CT):
                        dl = DB[row + c]
                        hh = fexp(dl * Al[n * CT + c]) * h[n * CT + c] + (dl * UB[row + c]) * bt
                        h[n * CT + c] = hh
                        YB[row + c] += hh * ct
            # scatter into out: the first route writes, the others add
            for t in range(tl):
                oo = o0 + PB[t] * dim
                row = t * CT
                if full:
                    if first:
                        _rcopy(YB, row, out, oo)
                    else:
                        _radd(YB, row, out, oo)
                elif first:
                    for c in range(cnt):
                        out[oo + c] = YB[row + c]
                else:
                    for c in range(cnt):
                        out[oo + c] += YB[row + c]


# ---------------------------------------------------------------------- host side
#: calls with fewer (batch x routes x channels x pixels) elements run on the calling thread even
#: when more threads are allowed. Measured inside VMamba-T on the 2-core VM: a parallel launch
#: costs ~0.1 ms, and the helper thread first pulls the inputs torch just wrote on the other
#: core: at batch 1 every stage ran faster serially; at batch 8 stage 1 (9.6M elements) ran 1.3x
#: faster in parallel and stage 2 (4.8M) broke even.
PARALLEL_MIN_ELEMENTS = 1 << 22


def _run_units(args: tuple, n_units: int, elements: int) -> None:
    """Run the kernel's work units: on torch's OpenMP team when more than one thread is allowed
    (see ``_team``), else numba's parallel launch for large calls, else a plain loop on the
    calling thread."""
    threads = min(_threads(), n_units)
    if _team.run(_team64 if args[0].dtype == np.float64 else _team32, args, n_units, threads):
        return
    if elements >= PARALLEL_MIN_ELEMENTS and threads > 1:
        with _lock:  # numba's workqueue layer must not be entered by two threads at once
            cross_fwd(*args)
    else:  # nogil: concurrent calls from several Python threads may run side by side
        cross_fwd_units(*args, 0, n_units)


_arrays: dict[tuple[int, str], tuple[weakref.ref, tuple, np.ndarray]] = {}


def _cached(t: torch.Tensor, kind: str, dtype: torch.dtype, make) -> np.ndarray:  # noqa: ANN001
    """``make(t)`` (a host-side array derived from ``t``), cached per (tensor, kind) while the
    tensor's version counter, storage, dtype and strides are unchanged: a model passes the same
    parameters (or constants derived once from them) on every call, and at batch 1 converting
    them costs as much as a small stage's kernel. Inference tensors have no version counter:
    never cached."""
    if t.is_inference():
        return make(t)
    key = (id(t), kind)
    # in-place updates bump _version; ``param.data = ...`` changes data_ptr
    state = (t._version, t.data_ptr(), t.dtype, tuple(t.stride()), dtype)
    got = _arrays.get(key)
    if got is not None and got[0]() is t and got[1] == state:
        return got[2]
    arr = make(t)
    # the entry goes with its tensor (arr may share its storage: a dead tensor's must not be kept)
    _arrays[key] = (weakref.ref(t, lambda _, key=key: _arrays.pop(key, None)), state, arr)
    return arr


def _lanes_major(proj: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """delta_proj [K, Di, R] as a flat [K, R, Di] array (a route's rank-r weights contiguous
    across the lanes), cached (:func:`_cached`): the transposing copy costs as much as the rest
    of the host side."""
    return _cached(
        proj, "lanes", dtype, lambda p: _as(p, dtype).transpose(1, 2).contiguous().view(-1).numpy()
    )


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    t = t.detach()
    return t if t.dtype == dtype else t.to(dtype)


def _flat(t: torch.Tensor) -> tuple[np.ndarray, tuple[int, ...]]:
    """A 1-D numpy view spanning ``t``'s elements (from its first one) and its strides: no copy."""
    span = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    return t.as_strided((span,), (1,)).numpy(), tuple(t.stride())


def _pixels(t: torch.Tensor, lanes: bool) -> torch.Tensor:
    """``t [..., C, H, W]`` as ``[..., C, L]`` without a copy when its H and W merge into one
    pixel stride (and, when ``lanes``, its C stride is 1); otherwise a copy laid out
    ``[..., L, C]`` (channels contiguous), viewed back as ``[..., C, L]``."""
    *lead, c, h, w = t.shape
    sc, sh, sw = t.stride()[-3:]
    merged = h == 1 or w == 1 or sh == sw * w
    if merged and (not lanes or c == 1 or sc == 1):
        return t.reshape(*lead, c, h * w)  # a view: the strides merge
    nd = t.dim()
    perm = (*range(nd - 3), nd - 2, nd - 1, nd - 3)  # [..., H, W, C]
    back = (*range(nd - 3), nd - 2, nd - 3)  # [..., L, C] -> [..., C, L]
    return t.permute(perm).contiguous().reshape(*lead, h * w, c).permute(back)


def forward(inputs: CrossScanInputs) -> torch.Tensor:
    """The fused forward: ``inputs.out_shape()`` in the result dtype (channels-last memory)."""
    cdt = inputs.compute_dtype
    npdt = np.float64 if cdt == torch.float64 else np.float32
    b, di, h, w, k = inputs.batch, inputs.dim, inputs.H, inputs.W, inputs.K
    L = h * w
    x = _as(inputs.x, cdt)
    x = x.permute(0, 3, 1, 2) if inputs.channels_last else x  # [B, Di, H, W]
    u, (su0, _, su1) = _flat(_pixels(x, lanes=True))  # [B, Di, L], Di stride 1
    lowrank = inputs.low_rank and inputs.rank <= MAX_KERNEL_RANK
    delta = _as(inputs.delta, cdt)
    if inputs.low_rank and not lowrank:
        # route k's delta, [K, B*L, R] @ [K, R, Di]: one batched GEMM into [K, B, L, Di]
        ranks = delta.permute(1, 0, 3, 4, 2).reshape(k, b * L, inputs.rank)
        full = torch.bmm(ranks, _as(inputs.delta_proj, cdt).transpose(1, 2))
        delta = full.view(k, b, h, w, di).permute(1, 0, 4, 2, 3)  # [B, K, Di, H, W]
    dl_in, sd = _flat(_pixels(delta, lanes=not lowrank))  # [B, K, C, L]
    Bm, sB = _flat(_pixels(_as(inputs.B, cdt), lanes=False))
    Cm, sC = _flat(_pixels(_as(inputs.C, cdt), lanes=False))
    n = inputs.dstate
    # [K*Di, N] -> [K, N, Di]; the skip terms summed over the routes (added once per pixel)
    At = _cached(inputs.A, f"A{k}", cdt,
                 lambda a: _as(a, cdt).reshape(k, di, n).transpose(1, 2).contiguous().view(-1).numpy())  # fmt: skip
    if inputs.delta_bias is not None:
        dbias = _cached(inputs.delta_bias, "bias", cdt,
                        lambda t: _as(t, cdt).contiguous().numpy())  # fmt: skip
    else:
        dbias = np.zeros(k * di, npdt)
    if inputs.D is not None:
        Dsum = _cached(
            inputs.D, f"Dsum{k}", cdt, lambda t: _as(t, cdt).reshape(k, di).sum(0).numpy()
        )
    else:
        Dsum = np.zeros(di, npdt)
    Wdt = _lanes_major(inputs.delta_proj, cdt) if lowrank else np.zeros(0, npdt)
    rank = inputs.rank if lowrank else 0
    ints = np.array(
        [su0, su1, *sd, *sB, *sC, di, inputs.delta_softplus, lowrank, n, rank], dtype=np.int64
    )
    routes = inputs.indices().numpy()  # cached [K, L] int64 table
    out = _empty_out(b, L, di, dtype=cdt)
    args = (u, dl_in, Bm, Cm, At, dbias, Dsum, Wdt, routes, ints, out.view(-1).numpy())
    _run_units(args, b * -(-di // CT), b * k * di * L)
    out = out.view(b, h, w, di).to(inputs.result_dtype)
    return out if inputs.channels_last else out.permute(0, 3, 1, 2)
