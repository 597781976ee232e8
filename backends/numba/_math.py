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
_X_MAX = _f32(88.72283)  # e^x overflows float32 above
_HALF = _f32(0.5)
_ONE = _f32(1.0)
_ZERO = _f32(0.0)
_TWO = _f32(2.0)
_INF = _f32(np.inf)
# 2 atanh(s) = 2 (s + s^3/3 + s^5/5 + ...): truncation after s^13 is < 2e-8 relative for s <= 1/3
_L3, _L5, _L7, _L9, _L11, _L13 = (_f32(1 / k) for k in (3, 5, 7, 9, 11, 13))


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


@njit(cache=True, error_model="numpy", fastmath={"contract"})
def _exp32(x):
    xc = min(max(x, _X_MIN), _X_MAX)
    k = np.floor(xc * _LOG2E + _HALF)
    r = xc - k * _LN2_HI
    r = r - k * _LN2_LO
    p = _P6
    p = p * r + _P5
    p = p * r + _P4
    p = p * r + _P3
    p = p * r + _P2
    p = p * r + _P1
    p = p * r + _P0
    # scale by 2**(k-1) * 2 so that k = 128 (x up to the overflow bound) stays in range; the cost
    # is k = -126 (x near _X_MIN) giving 0 instead of ~1e-38
    res = (p * _pow2(k - _ONE)) * _TWO
    res = _ZERO if x < _X_MIN else res
    res = _INF if x > _X_MAX else res
    return x if x != x else res  # NaN stays NaN


@njit(cache=True, error_model="numpy", fastmath={"contract"})
def _softplus32(raw):
    # softplus(x) = max(x, 0) + log1p(t), t = e^-|x| in (0, 1]; log1p(t) = 2 atanh(s) with
    # s = t / (2 + t) in (0, 1/3]: an odd series in s, no exponent split and no cancellation
    t = _exp32(-abs(raw))
    s = t / (_TWO + t)
    s2 = s * s
    q = _L13
    q = q * s2 + _L11
    q = q * s2 + _L9
    q = q * s2 + _L7
    q = q * s2 + _L5
    q = q * s2 + _L3
    q = q * s2 + _ONE
    sp = max(raw, _ZERO) + _TWO * s * q
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


def softplus(raw):
    """(softplus(raw), sigmoid(raw)): the value and its derivative."""
    return _softplus64(raw)


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


@overload(softplus, inline="always")
def _softplus_ov(raw):
    if raw == types.float32:
        return lambda raw: _softplus32(raw)
    if raw == types.float64:
        return lambda raw: _softplus64(raw)
    return None


@overload(silu, inline="always")
def _silu_ov(z):
    if z == types.float32:
        return lambda z: _silu32(z)
    if z == types.float64:
        return lambda z: _silu64(z)
    return None
