"""Element functions for the numba kernels: exp, softplus and silu, vectorisable in float32.

numba has no vector math library here (no SVML), so ``math.exp`` inside a loop stays a scalar
libm call and blocks vectorisation. The float32 versions below use only arithmetic, rounding and
integer/bit moves of the exponent, which LLVM turns into AVX code; float64 keeps libm (accuracy
first, float64 is not the fast path).

Each function is a stub that dispatches on the argument's type (numba ``overload``), so the
kernels are written once for both compute dtypes.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit
from numba.core import types
from numba.extending import intrinsic, overload

_f32 = np.float32

# e^r on [-ln2/2, ln2/2]: degree-6 fit (least squares in relative error on Chebyshev nodes),
# max relative error ~1e-7 after float32 rounding
_P0, _P1, _P2, _P3, _P4, _P5, _P6 = (
    _f32(1.0),
    _f32(1.0),
    _f32(0.49999991059303284),
    _f32(0.1666642129421234),
    _f32(0.0416683591902256),
    _f32(0.008374771103262901),
    _f32(0.0013829420786350965),
)
_LOG2E = _f32(1.4426950408889634)
# ln 2 split so that k * _LN2_HI is exact for |k| <= 2^8 (Cody-Waite reduction)
_LN2_HI = _f32(0.693359375)
_LN2_LO = _f32(-2.12194440e-4)
_X_MIN = _f32(-87.33654)  # e^x < FLT_MIN below: the result is flushed to 0
_X_MAX = _f32(88.72283)  # ln(FLT_MAX)
_X_HUGE = _f32(89.0)  # e^x overflows float32 above ln(FLT_MAX) = 88.72284: clamp a bit above
_HALF = _f32(0.5)
_ONE = _f32(1.0)
_ZERO = _f32(0.0)
_TWO = _f32(2.0)
# log1p(t) / t on [0, 1]: degree-8 least squares in relative error (max 1.9e-7 in float32)
_Q1, _Q2, _Q3, _Q4, _Q5, _Q6, _Q7, _Q8 = (
    _f32(-0.4999943673610687),
    _f32(0.33317938446998596),
    _f32(-0.24833965301513672),
    _f32(0.19071364402770996),
    _f32(-0.1359068900346756),
    _f32(0.07738152146339417),
    _f32(-0.028992313891649246),
    _f32(0.005105888936668634),
)


@intrinsic
def _pow2(typingctx, k):
    """2**k for an integer-valued float32 k in [-126, 127] (built from the exponent bits)."""
    if k != types.float32:
        return None

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        ki = builder.fptosi(args[0], i32)
        bits = builder.shl(builder.add(ki, ir.Constant(i32, 127)), ir.Constant(i32, 23))
        return builder.bitcast(bits, ir.FloatType())

    return types.float32(types.float32), codegen


@njit(inline="always")
def _exp_reduced32(x):
    """e^x for x in [_X_MIN, _X_HUGE] as (p, k - 1), e^x = p * 2**(k-1) * 2. The polynomial is in
    Estrin's form: half the dependent steps of Horner's, so more elements are in flight."""
    k = np.floor(x * _LOG2E + _HALF)
    r = x - k * _LN2_HI
    r = r - k * _LN2_LO
    r2 = r * r
    r4 = r2 * r2
    p = (_P0 + _P1 * r) + (_P2 + _P3 * r) * r2 + ((_P4 + _P5 * r) + _P6 * r2) * r4
    return p, k - _ONE


@njit(cache=True, error_model="numpy", fastmath={"contract"})
def _exp32(x):
    # x is clamped to [_X_MIN, _X_HUGE] (NaN passes: numba's min/max propagate it): at _X_MIN
    # 2**(k-1) has a zero exponent field (the result is 0); above ln(FLT_MAX) the product
    # overflows to inf by itself, so no select is needed for either end.
    p, km1 = _exp_reduced32(min(max(x, _X_MIN), _X_HUGE))
    res = (p * _pow2(km1)) * _TWO  # 2**(k-1) * 2: k = 128 stays in range
    return x if x != x else res  # NaN stays NaN (fptosi of NaN gives an arbitrary exponent)


@njit(cache=True, error_model="numpy", fastmath={"contract"})
def _exp_finite32(x):
    """e^x for arguments that cannot overflow (x <= ln(FLT_MAX), e.g. a decay delta A <= 0),
    without exp's NaN select: a NaN x gives a finite value, so the caller must carry NaN on
    through another term (the recurrence's input does). Below _X_MIN: ~1e-38, not 0."""
    p, km1 = _exp_reduced32(min(max(x, _X_MIN), _X_MAX))
    return (p * _pow2(km1)) * _TWO


@njit(cache=True, error_model="numpy", fastmath={"contract"})
def _log1p_unit32(t):
    """log1p(t) for t in [0, 1]: t * q(t), q a degree-8 least-squares fit of log1p(t) / t
    (relative error below 2e-7 in float32), Estrin's form."""
    t2 = t * t
    t4 = t2 * t2
    q = ((_ONE + _Q1 * t) + (_Q2 + _Q3 * t) * t2) + (
        ((_Q4 + _Q5 * t) + (_Q6 + _Q7 * t) * t2) + _Q8 * t4
    ) * t4
    return t * q


@njit(cache=True, error_model="numpy", fastmath={"contract"})
def _softplus_value32(raw):
    # max(x, 0) + log1p(e^-|x|): no division, one NaN select (at the end)
    t = _exp_finite32(-abs(raw))
    sp = max(raw, _ZERO) + _log1p_unit32(t)
    return raw if raw != raw else sp


@njit(cache=True, error_model="numpy", fastmath={"contract"})
def _softplus32(raw):
    # softplus(x) = max(x, 0) + log1p(t), t = e^-|x| in (0, 1]; sigmoid from the same t
    t = _exp32(-abs(raw))
    sp = max(raw, _ZERO) + _log1p_unit32(t)
    sig = (_ONE if raw >= _ZERO else t) / (_ONE + t)
    sp = raw if raw != raw else sp
    return sp, sig


@njit(cache=True, error_model="numpy", fastmath={"contract"})
def _silu32(z):
    sig = _ONE / (_ONE + _exp32(-z))
    return z * sig, sig * (_ONE + z * (_ONE - sig))


@njit(cache=True, error_model="numpy", fastmath={"contract"})
def _softplus64(raw):
    if raw > 30.0:
        return raw, 1.0
    ex = math.exp(raw)
    return math.log1p(ex), ex / (1.0 + ex)


@njit(cache=True, error_model="numpy", fastmath={"contract"})
def _silu64(z):
    sig = 1.0 / (1.0 + math.exp(-z))
    return z * sig, sig * (1.0 + z * (1.0 - sig))


# ---------------------------------------------------------------------- type-dispatched stubs
def fexp(x):
    """e^x (float32: polynomial, vectorisable; float64: libm)."""
    return math.exp(x)


def exp_finite(x):
    """e^x for x <= ln(FLT_MAX) (float32: no NaN select, see _exp_finite32; float64: libm)."""
    return math.exp(x)


def softplus(raw):
    """(softplus(raw), sigmoid(raw)): the value and its derivative."""
    return _softplus64(raw)


def softplus_value(raw):
    """softplus(raw) alone (float32: no division)."""
    return _softplus64(raw)[0]


def silu(z):
    """(z sigmoid(z), d/dz of it)."""
    return _silu64(z)


@overload(fexp, inline="always")
def _fexp_ov(x):
    if x == types.float32:
        return lambda x: _exp32(x)
    if x == types.float64:
        return lambda x: math.exp(x)
    return None


@overload(exp_finite, inline="always")
def _exp_finite_ov(x):
    if x == types.float32:
        return lambda x: _exp_finite32(x)
    if x == types.float64:
        return lambda x: math.exp(x)
    return None


@overload(softplus, inline="always")
def _softplus_ov(raw):
    if raw == types.float32:
        return lambda raw: _softplus32(raw)
    if raw == types.float64:
        return lambda raw: _softplus64(raw)
    return None


@overload(softplus_value, inline="always")
def _softplus_value_ov(raw):
    if raw == types.float32:
        return lambda raw: _softplus_value32(raw)
    if raw == types.float64:
        return lambda raw: _softplus64(raw)[0]
    return None


@overload(silu, inline="always")
def _silu_ov(z):
    if z == types.float32:
        return lambda z: _silu32(z)
    if z == types.float64:
        return lambda z: _silu64(z)
    return None
