"""8 x 8 block transposes between a channel-major tensor and a kernel's time-major workspace.

The kernels read [.., D, L] rows (contiguous in time) into [chunk, q, lanes] buffers (contiguous
in channels). Element by element that costs a scalar load and store per value, as much as the whole
recurrence at N = 1. For float32 ``transpose8`` loads eight 8-wide rows, transposes them in
registers with 24 shuffles and stores eight 8-wide rows; LLVM emits no such code from loops.
float64 (not the fast path) uses plain loops.
"""

from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

_I32 = ir.IntType(32)


def _mask(idx: list[int]) -> ir.Constant:
    return ir.Constant(ir.VectorType(_I32, len(idx)), idx)


def _transpose8_typer(src, so, ss, dst, do, ds, nt: bool):
    ok = (
        isinstance(src, types.Array)
        and isinstance(dst, types.Array)
        and src.dtype == types.float32
        and dst.dtype == types.float32
        and src.ndim == 1
        and dst.ndim == 1
        and all(isinstance(x, types.Integer) for x in (so, ss, do, ds))
    )
    if not ok:
        return None

    def codegen(context, builder, sig, args):
        src_v, so_v, ss_v, dst_v, do_v, ds_v = args
        vec = ir.VectorType(ir.FloatType(), 8)
        i64 = ir.IntType(64)
        sa = context.make_array(sig.args[0])(context, builder, src_v)
        da = context.make_array(sig.args[3])(context, builder, dst_v)

        def as64(v, ty):
            return context.cast(builder, v, ty, types.int64)

        so64, ss64 = as64(so_v, sig.args[1]), as64(ss_v, sig.args[2])
        do64, ds64 = as64(do_v, sig.args[4]), as64(ds_v, sig.args[5])
        rows = []
        for i in range(8):
            off = builder.add(so64, builder.mul(ss64, ir.Constant(i64, i)))
            ptr = builder.bitcast(builder.gep(sa.data, [off]), vec.as_pointer())
            rows.append(builder.load(ptr, align=4))
        lo = _mask([0, 8, 1, 9, 4, 12, 5, 13])
        hi = _mask([2, 10, 3, 11, 6, 14, 7, 15])
        t = []
        for i in range(0, 8, 2):
            t.append(builder.shuffle_vector(rows[i], rows[i + 1], lo))
            t.append(builder.shuffle_vector(rows[i], rows[i + 1], hi))
        # t[0], t[1] from rows 0-1; t[2], t[3] from rows 2-3; ...
        a = _mask([0, 1, 8, 9, 4, 5, 12, 13])
        b = _mask([2, 3, 10, 11, 6, 7, 14, 15])
        s = [None] * 8
        for base in (0, 4):
            s[base + 0] = builder.shuffle_vector(t[base + 0], t[base + 2], a)
            s[base + 1] = builder.shuffle_vector(t[base + 0], t[base + 2], b)
            s[base + 2] = builder.shuffle_vector(t[base + 1], t[base + 3], a)
            s[base + 3] = builder.shuffle_vector(t[base + 1], t[base + 3], b)
        low = _mask([0, 1, 2, 3, 8, 9, 10, 11])
        high = _mask([4, 5, 6, 7, 12, 13, 14, 15])
        cols = [None] * 8
        for j in range(4):
            cols[j] = builder.shuffle_vector(s[j], s[4 + j], low)
            cols[j + 4] = builder.shuffle_vector(s[j], s[4 + j], high)
        for j in range(8):
            off = builder.add(do64, builder.mul(ds64, ir.Constant(i64, j)))
            ptr = builder.bitcast(builder.gep(da.data, [off]), vec.as_pointer())
            if nt:
                st = builder.store(cols[j], ptr, align=32)
                st.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(_I32, 1)]))
            else:
                builder.store(cols[j], ptr, align=4)
        return context.get_dummy_value()

    return types.void(src, so, ss, dst, do, ds), codegen


@intrinsic
def _transpose8_f32(typingctx, src, so, ss, dst, do, ds):
    """dst[do + j*ds + i] = src[so + i*ss + j] for i, j < 8 (1-D float32 arrays, element offsets)."""
    return _transpose8_typer(src, so, ss, dst, do, ds, False)


@intrinsic
def _transpose8_f32_nt(typingctx, src, so, ss, dst, do, ds):
    """_transpose8_f32 with non-temporal stores (no read of the destination lines, no cache
    pollution); every destination row start must be 32-byte aligned."""
    return _transpose8_typer(src, so, ss, dst, do, ds, True)


@intrinsic
def _address(typingctx, arr):
    """The address of arr's first element, as an integer."""
    if not isinstance(arr, types.Array):
        return None

    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        return builder.ptrtoint(a.data, ir.IntType(64))

    return types.uint64(arr), codegen


@intrinsic
def _sfence(typingctx):
    """Order the non-temporal stores before everything after (they are weakly ordered)."""

    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse.sfence"
        )
        builder.call(fn, [])
        return context.get_dummy_value()

    return types.void(), codegen


def transpose8_nt(src, so, ss, dst, do, ds):
    """transpose8 with non-temporal stores where the dtype has them (float32)."""
    for i in range(8):
        for j in range(8):
            dst[do + j * ds + i] = src[so + i * ss + j]


def nt_ok(dst, do, ds):
    """Whether transpose8_nt may store at row starts do + j*ds (+ multiples of 8)."""
    return False


def sfence():
    """See _sfence."""


@overload(transpose8_nt, inline="always")
def _transpose8_nt_ov(src, so, ss, dst, do, ds):
    if isinstance(src, types.Array) and src.dtype == types.float32 and dst.dtype == types.float32:
        return lambda src, so, ss, dst, do, ds: _transpose8_f32_nt(src, so, ss, dst, do, ds)

    def loops(src, so, ss, dst, do, ds):
        for i in range(8):
            for j in range(8):
                dst[do + j * ds + i] = src[so + i * ss + j]

    return loops


@overload(nt_ok, inline="always")
def _nt_ok_ov(dst, do, ds):
    if isinstance(dst, types.Array) and dst.dtype == types.float32:
        return lambda dst, do, ds: ds % 8 == 0 and (_address(dst) + 4 * do) % 32 == 0
    return lambda dst, do, ds: False


@overload(sfence, inline="always")
def _sfence_ov():
    return lambda: _sfence()


def transpose8(src, so, ss, dst, do, ds):
    """dst[do + j*ds + i] = src[so + i*ss + j] for i, j < 8; src, dst 1-D arrays."""
    for i in range(8):
        for j in range(8):
            dst[do + j * ds + i] = src[so + i * ss + j]


@overload(transpose8, inline="always")
def _transpose8_ov(src, so, ss, dst, do, ds):
    if isinstance(src, types.Array) and src.dtype == types.float32 and dst.dtype == types.float32:
        return lambda src, so, ss, dst, do, ds: _transpose8_f32(src, so, ss, dst, do, ds)

    def loops(src, so, ss, dst, do, ds):
        for i in range(8):
            for j in range(8):
                dst[do + j * ds + i] = src[so + i * ss + j]

    return loops


@njit(cache=True, error_model="numpy")
def transpose_block(src, so, ss, dst, do, ds, rows, cols):
    """dst[do + j*ds + i] = src[so + i*ss + j] for i < rows, j < cols: 8 x 8 blocks, then loops."""
    r8 = rows - rows % 8
    c8 = cols - cols % 8
    for i in range(0, r8, 8):
        for j in range(0, c8, 8):
            transpose8(src, so + i * ss + j, ss, dst, do + j * ds + i, ds)
        for j in range(c8, cols):
            for ii in range(i, i + 8):
                dst[do + j * ds + ii] = src[so + ii * ss + j]
    for i in range(r8, rows):
        for j in range(cols):
            dst[do + j * ds + i] = src[so + i * ss + j]


@njit(cache=True, error_model="numpy")
def transpose_block_out(src, so, ss, dst, do, ds, rows, cols):
    """transpose_block with the destination rows outermost: each group of eight destination
    rows (channels of a [.., D, L] output) is written front to back, so eight write streams are
    open at a time instead of ``cols``."""
    r8 = rows - rows % 8
    c8 = cols - cols % 8
    # large outputs are not read again soon: non-temporal stores where the rows are aligned
    nt = nt_ok(dst, do, ds)
    for j in range(0, c8, 8):
        if nt:
            for i in range(0, r8, 8):
                transpose8_nt(src, so + i * ss + j, ss, dst, do + j * ds + i, ds)
        else:
            for i in range(0, r8, 8):
                transpose8(src, so + i * ss + j, ss, dst, do + j * ds + i, ds)
        for i in range(r8, rows):
            for jj in range(j, j + 8):
                dst[do + jj * ds + i] = src[so + i * ss + jj]
    for j in range(c8, cols):
        for i in range(rows):
            dst[do + j * ds + i] = src[so + i * ss + j]
    if nt:
        sfence()
