"""scanlib.cross_selective_scan: the fused numba kernel against the composition of the public ops
(float64 on the reference backend), gradients through the composition, dispatch, errors, and
SS2D's fused path against its old three-call path."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import scanlib
from scanlib.cross import CrossScanInputs, compose, fused_backend

# every built-in set whose routes each read every pixel once (atrous has sub-grid routes)
ROUTE_SETS = ["cross2d", "unidi", "bidi", "rot90", "snake", "zigzag", "hilbert", "local3"]


def numba_or_skip() -> None:
    reasons = scanlib.get_backend("numba").availability_reasons()
    if reasons:
        pytest.skip("numba backend unavailable: " + "; ".join(reasons))


def _layout(t: torch.Tensor, how: str) -> torch.Tensor:
    """The same values in another memory layout: contiguous, permuted memory, or every other
    element of a larger buffer along the last dim (non-unit strides everywhere)."""
    if how == "contiguous":
        return t.contiguous()
    if how == "permuted":  # memory order reversed, e.g. channels-last for a map
        perm = list(range(t.dim()))[::-1]
        inv = [perm.index(i) for i in range(t.dim())]
        return t.permute(perm).contiguous().permute(inv)
    big = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1])
    big[..., ::2] = t
    return big[..., ::2]


def _case(draw_or_params: dict, dtype: torch.dtype, seed: int = 0):
    """Inputs of one call, with the given sizes and layouts."""
    p = draw_or_params
    g = torch.Generator().manual_seed(seed)
    rs = scanlib.get_route_set(p["routes"])
    k, b, di, h, w, n = len(rs), p["batch"], p["dim"], p["H"], p["W"], p["N"]
    cdt = torch.float64 if dtype == torch.float64 else torch.float32

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dt)

    x = rnd(b, h, w, di) if p["channels_last"] else rnd(b, di, h, w)
    rank = p["rank"]
    if rank:
        delta = rnd(b, k, rank, h, w, scale=0.5)
        delta_proj = rnd(k, di, rank, scale=0.5, dt=cdt)
    else:
        delta = rnd(b, k, di, h, w, scale=0.5)
        delta_proj = None
    if not p["softplus"]:  # delta >= 0 as softplus would make it: a stable, finite recurrence
        delta = delta.abs()
        delta_proj = delta_proj.abs() if delta_proj is not None else None
    A = -torch.rand(k * di, n, generator=g, dtype=torch.float64).add(0.1).to(cdt)
    B = rnd(b, k, n, h, w)
    C = rnd(b, k, n, h, w)
    D = rnd(k * di, dt=cdt) if p["with_D"] else None
    bias = rnd(k * di, scale=0.5, dt=cdt) if p["with_bias"] else None
    if bias is not None and not p["softplus"]:
        bias = bias.abs()
    x, delta, B, C = (_layout(t, p["layout"]) for t in (x, delta, B, C))
    args = (x, delta, A, B, C, D, bias, p["softplus"])
    kwargs = dict(routes=p["routes"], delta_proj=delta_proj, channels_last=p["channels_last"])
    return args, kwargs


def _reference(args, kwargs) -> torch.Tensor:
    """The composition in float64 on the reference backend."""
    up = [a.detach().double() if isinstance(a, torch.Tensor) else a for a in args]
    proj = kwargs["delta_proj"]
    inputs = CrossScanInputs(
        *up,
        scanlib.get_route_set(kwargs["routes"]),
        kwargs["channels_last"],
        None,
        proj.detach().double() if proj is not None else None,
    )
    return compose(inputs, "reference")


params = st.fixed_dictionaries(
    {
        "routes": st.sampled_from(ROUTE_SETS),
        "batch": st.integers(1, 2),
        "dim": st.sampled_from([1, 5, 13, 16, 40, 70]),  # tiles of 32: partial, 1 or 2 full
        "H": st.integers(1, 17),
        "W": st.integers(1, 17),
        "N": st.integers(1, 4),
        "rank": st.sampled_from([0, 0, 1, 3, 6]),
        "channels_last": st.booleans(),
        "layout": st.sampled_from(["contiguous", "permuted", "strided"]),
        "softplus": st.booleans(),
        "with_D": st.booleans(),
        "with_bias": st.booleans(),
    }
)


# at least 30 examples (the ci profile's 12 are few for this many dimensions); more with
# SCANLIB_HYPOTHESIS_PROFILE=long
@settings(max_examples=max(30, settings().max_examples))
@given(p=params, dtype=st.sampled_from([torch.float32, torch.float64]))
def test_fused_numba_matches_composition(p, dtype):
    numba_or_skip()
    args, kwargs = _case(p, dtype)
    with torch.no_grad():
        inputs = CrossScanInputs(*args, scanlib.get_route_set(p["routes"]), p["channels_last"],
                                 None, kwargs["delta_proj"])  # fmt: skip
        assert fused_backend(inputs, "numba") is not None  # the fused kernel, not the fallback
        got = scanlib.cross_selective_scan(*args, **kwargs, backend="numba")
    want = _reference(args, kwargs)
    assert got.shape == want.shape and got.dtype == dtype
    tol = 1e-9 if dtype == torch.float64 else 2e-5
    scale = want.abs().max().item() + 1.0
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("rank", [40])  # above MAX_KERNEL_RANK: the delta comes from a GEMM
def test_fused_high_rank_and_out_dtype(rank):
    numba_or_skip()
    p = dict(routes="cross2d", batch=2, dim=24, H=5, W=6, N=2, rank=rank, channels_last=False,
             layout="strided", softplus=True, with_D=True, with_bias=True)  # fmt: skip
    args, kwargs = _case(p, torch.float32)
    with torch.no_grad():
        got = scanlib.cross_selective_scan(*args, **kwargs, out_dtype=torch.float64)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, _reference(args, kwargs), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_16bit_inputs_compute_in_float32(dtype):
    numba_or_skip()
    p = dict(routes="snake", batch=1, dim=16, H=4, W=7, N=1, rank=3, channels_last=True,
             layout="contiguous", softplus=True, with_D=True, with_bias=True)  # fmt: skip
    args, kwargs = _case(p, dtype)
    with torch.no_grad():
        got = scanlib.cross_selective_scan(*args, **kwargs, out_dtype=torch.float32)
    assert got.dtype == torch.float32
    want = _reference(args, kwargs)  # the same (rounded) 16-bit values, in float64
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max())


def test_parallel_and_serial_runs_agree(monkeypatch):
    numba_or_skip()
    from scanlib_backends.numba import _team
    from scanlib_backends.numba import cross as kernel

    p = dict(routes="cross2d", batch=3, dim=40, H=9, W=11, N=2, rank=6, channels_last=False,
             layout="contiguous", softplus=True, with_D=True, with_bias=True)  # fmt: skip
    args, kwargs = _case(p, torch.float32)
    gomp = _team.gomp_parallel()
    calls = []
    with torch.no_grad():
        monkeypatch.setattr(kernel, "PARALLEL_MIN_ELEMENTS", 0)
        monkeypatch.setattr(kernel, "_threads", lambda: 1)
        ser = scanlib.cross_selective_scan(*args, **kwargs)  # the calling thread
        monkeypatch.setattr(kernel, "_threads", lambda: 2)
        with monkeypatch.context() as m:
            m.setattr(_team, "gomp_parallel", lambda: None)
            par = scanlib.cross_selective_scan(*args, **kwargs)  # numba's parallel launch
        if gomp is not None:  # torch's OpenMP team (Linux), counted
            monkeypatch.setattr(_team, "gomp_parallel", lambda: lambda *a: calls.append(gomp(*a)))
            team = scanlib.cross_selective_scan(*args, **kwargs)
    # units own disjoint channels: same arithmetic either way
    assert torch.equal(par, ser)
    if gomp is not None:
        assert calls == [None] and torch.equal(team, ser)


def test_cached_weights_follow_in_place_updates():
    numba_or_skip()
    p = dict(routes="rot90", batch=1, dim=16, H=3, W=4, N=1, rank=3, channels_last=False,
             layout="contiguous", softplus=True, with_D=True, with_bias=True)  # fmt: skip
    args, kwargs = _case(p, torch.float32)
    proj = kwargs["delta_proj"]
    with torch.no_grad():
        first = scanlib.cross_selective_scan(*args, **kwargs)
        proj.mul_(0.5)  # e.g. an optimiser step: the kernel must not reuse the old weights
        second = scanlib.cross_selective_scan(*args, **kwargs)
        with torch.inference_mode():  # inference tensors have no version counter
            third = scanlib.cross_selective_scan(*args, **{**kwargs, "delta_proj": proj * 1})
    torch.testing.assert_close(second.double(), _reference(args, kwargs), rtol=2e-5, atol=2e-5)
    assert not torch.allclose(first, second)
    torch.testing.assert_close(third, second)


def test_cached_constants_follow_in_place_updates():
    """A, D and delta_bias are converted once per tensor and reused while unchanged: an in-place
    update (or the same A under another route count) must not reuse the old host copies."""
    numba_or_skip()
    p = dict(routes="cross2d", batch=1, dim=8, H=3, W=5, N=2, rank=2, channels_last=True,
             layout="contiguous", softplus=True, with_D=True, with_bias=True)  # fmt: skip
    args, kwargs = _case(p, torch.float32)
    x, delta, A, B, C, D, bias, sp = args
    with torch.no_grad(), scanlib.use_backend("numba"):
        assert scanlib.cross.explain_cross(*args, **kwargs)["selected"] == ["numba"]  # fused
        scanlib.cross_selective_scan(*args, **kwargs)  # fills the caches
        A.mul_(0.5)
        D.add_(1.0)
        bias.sub_(0.25)
        got = scanlib.cross_selective_scan(*args, **kwargs)
        torch.testing.assert_close(got.double(), _reference(args, kwargs), rtol=2e-5, atol=2e-5)
        # the same A, D, bias as K=8 routes of half the channels: another [K, N, Di] layout
        p2 = dict(p, routes="hilbert", dim=4)
        args2, kwargs2 = _case(p2, torch.float32)
        args2 = (*args2[:2], A, *args2[3:5], D, bias, sp)
        got2 = scanlib.cross_selective_scan(*args2, **kwargs2)
        from scanlib_backends.numba import cross as nb_cross

        # one entry per (tensor, layout): A as K=4 and as K=8 routes
        assert {(id(A), "A4"), (id(A), "A8"), (id(bias), "bias")} <= set(nb_cross._arrays)
        torch.testing.assert_close(got2.double(), _reference(args2, kwargs2), rtol=2e-5, atol=2e-5)


def test_cached_host_copies_go_with_their_tensor():
    """A cache entry (which may share the tensor's storage) is dropped when its tensor dies, so
    tensors passed once are not kept alive."""
    numba_or_skip()
    from scanlib_backends.numba import cross as nb_cross

    t = torch.randn(5)
    key = (id(t), "probe")
    arr = nb_cross._cached(t, "probe", torch.float32, lambda x: x.numpy())
    assert key in nb_cross._arrays and nb_cross._cached(t, "probe", torch.float32, None) is arr
    del t, arr
    assert key not in nb_cross._arrays


# ---------------------------------------------------------------------------- gradients, dispatch
def _tiny(dtype=torch.float64, rank=2, requires_grad=True):
    p = dict(routes="cross2d", batch=1, dim=2, H=2, W=3, N=1, rank=rank, channels_last=False,
             layout="contiguous", softplus=True, with_D=True, with_bias=True)  # fmt: skip
    args, kwargs = _case(p, dtype, seed=1)
    args = tuple(
        a.detach().requires_grad_(requires_grad) if isinstance(a, torch.Tensor) else a for a in args
    )
    if kwargs["delta_proj"] is not None:
        kwargs["delta_proj"] = kwargs["delta_proj"].detach().requires_grad_(requires_grad)
    return args, kwargs


@pytest.mark.parametrize("rank", [0, 2])
def test_gradcheck_through_the_composition(rank):
    args, kwargs = _tiny(rank=rank)
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    proj = kwargs.pop("delta_proj")
    if proj is not None:
        tensors.append(proj)

    def f(*ts):
        x, delta, A, B, C, D, bias = ts[:7]
        p = ts[7] if proj is not None else None
        return scanlib.cross_selective_scan(
            x, delta, A, B, C, D, bias, True, **kwargs, delta_proj=p, backend="torch"
        )

    assert torch.autograd.gradcheck(f, tensors, eps=1e-6, atol=1e-6)


def test_grad_needed_falls_back_to_the_composition():
    numba_or_skip()
    args, kwargs = _tiny(dtype=torch.float32)
    inputs = CrossScanInputs(*args, scanlib.get_route_set("cross2d"), False, None,
                             kwargs["delta_proj"])  # fmt: skip
    assert fused_backend(inputs) is None  # numba declines: its fused kernel has no backward
    reasons = scanlib.cross.explain_cross(*args, **kwargs)
    assert "no backward" in " ".join(reasons["numba"]) and reasons["selected"] == ["composition"]
    out = scanlib.cross_selective_scan(*args, **kwargs, backend="numba")
    out.square().sum().backward()
    assert all(a.grad is not None for a in args if isinstance(a, torch.Tensor))
    with torch.no_grad():
        assert fused_backend(inputs) is not None and fused_backend(inputs).name == "numba"
        # a named backend without the fused op keeps the whole call on it (the composition)
        assert fused_backend(inputs, "torch") is None
        with scanlib.use_backend("reference"):
            assert fused_backend(inputs) is None


def test_torch_compile_fullgraph_forward_and_backward():
    args, kwargs = _tiny(dtype=torch.float32, rank=2)

    def f(x, delta, A, B, C, D, bias, proj):
        return scanlib.cross_selective_scan(
            x, delta, A, B, C, D, bias, True, routes="cross2d", delta_proj=proj
        )

    tensors = [*args[:7], kwargs["delta_proj"]]
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = compiled(*tensors)
    want = f(*tensors)
    torch.testing.assert_close(got, want)
    dout = torch.randn_like(want)
    g_got = torch.autograd.grad(got, tensors, dout)
    g_want = torch.autograd.grad(want, tensors, dout)
    for name, a, b in zip(("x", "delta", "A", "B", "C", "D", "bias", "proj"), g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


# ---------------------------------------------------------------------------- errors
def _good():
    x = torch.zeros(1, 3, 2, 5)
    return dict(
        x=x,
        delta=torch.zeros(1, 4, 3, 2, 5),
        A=torch.zeros(12, 1),
        B=torch.zeros(1, 4, 1, 2, 5),
        C=torch.zeros(1, 4, 1, 2, 5),
        D=torch.zeros(12),
        delta_bias=torch.zeros(12),
    )


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(x=torch.zeros(3, 2, 5)), r"x must be \[B, Di, H, W\]"),
        (dict(delta=torch.zeros(1, 4, 3, 2, 4)), r"delta: expected shape \[B=1, K=4, Di=3"),
        (dict(A=torch.zeros(3, 1)), r"A: expected shape \[K\*Di=12, N\]"),
        (dict(B=torch.zeros(1, 4, 2, 2, 5)), r"B: expected shape \[B=1, K=4, N=1"),
        (dict(C=torch.zeros(1, 2, 1, 2, 5)), r"C: expected shape"),
        (dict(D=torch.zeros(3)), r"D: expected shape \[K\*Di=12\]"),
        (dict(delta=torch.zeros(1, 4, 3, 2, 5, dtype=torch.float64)), r"delta: dtype"),
        (dict(A=torch.zeros(12, 1, dtype=torch.float16)), r"A: dtype"),
        (dict(delta_proj=torch.zeros(4, 3)), r"delta_proj: expected shape \[K=4, Di=3, R\]"),
        (dict(routes="atrous"), r"sub-grid routes"),
        (dict(out_dtype=torch.float16), r"out_dtype"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, match):
    kw = _good()
    routes = change.pop("routes", "cross2d")
    kw.update(change)
    with pytest.raises(scanlib.ScanInputError, match=match):
        scanlib.cross_selective_scan(**kw, routes=routes)


def test_unknown_route_set():
    with pytest.raises(scanlib.UnknownRouteError):
        scanlib.cross_selective_scan(**_good(), routes="no_such_routes")


# ---------------------------------------------------------------------------- SS2D
@pytest.mark.parametrize(
    "channels_first, z_gate, d_state, routes, d_conv",
    [
        (True, False, 1, "cross2d", 3),
        (False, True, 2, "snake", 3),
        (True, False, 3, "hilbert", 3),
        (False, False, 1, "cross2d", 1),  # no conv: x reaches the scan channels-last
    ],
)
def test_ss2d_fused_path_equals_old_path(channels_first, z_gate, d_state, routes, d_conv):
    from vmamba import SS2D, SSMConfig

    torch.manual_seed(0)
    cfg = SSMConfig(d_state=d_state, z_gate=z_gate, routes=routes, d_conv=d_conv, init="v1")
    op = SS2D(24, cfg, channels_first)
    assert op._fused
    x = torch.randn(2, 24, 9, 7) if channels_first else torch.randn(2, 9, 7, 24)
    outs = {}
    for fused in (True, False):
        op._fused = fused
        with torch.no_grad():  # the fused kernel (numba) or the composition
            outs[fused, "eval"] = op(x)
        xg = x.clone().requires_grad_()
        y = op(xg)  # with gradients: the composition
        (gx,) = torch.autograd.grad(y.square().sum(), [xg])
        outs[fused, "grad"] = (y.detach(), gx)
    torch.testing.assert_close(outs[True, "eval"], outs[False, "eval"], rtol=1e-5, atol=1e-5)
    for a, b in zip(outs[True, "grad"], outs[False, "grad"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_ss2d_keeps_the_old_path_for_sub_grid_routes():
    from vmamba import SS2D, SSMConfig

    op = SS2D(8, SSMConfig(routes="atrous"), True)
    assert not op._fused
    with torch.no_grad():
        assert op(torch.randn(1, 8, 6, 5)).shape == (1, 8, 6, 5)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
def test_cross_selective_scan_on_gpu_matches_reference(backend):
    """On CUDA the op runs as the composition on a GPU scan backend: forward and gradients
    against the float64 reference on CPU."""
    reasons = scanlib.get_backend(backend).availability_reasons()
    if reasons:
        pytest.skip(f"{backend}: " + "; ".join(reasons))
    p = dict(routes="cross2d", batch=2, dim=40, H=9, W=13, N=4, rank=6, channels_last=True,
             layout="permuted", softplus=True, with_D=True, with_bias=True)  # fmt: skip
    args, kwargs = _case(p, torch.float32, seed=3)
    gpu = [a.cuda().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    proj = kwargs["delta_proj"].cuda().requires_grad_()
    out = scanlib.cross_selective_scan(*gpu, **dict(kwargs, delta_proj=proj), backend=backend)
    cpu = [a.detach().double().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    cproj = kwargs["delta_proj"].detach().double().requires_grad_()
    want = scanlib.cross_selective_scan(*cpu, **dict(kwargs, delta_proj=cproj), backend="reference")
    torch.testing.assert_close(out.double().cpu(), want, rtol=2e-4, atol=2e-4)
    dout = torch.randn(want.shape, dtype=torch.float64)
    out.backward(dout.to(out.dtype).cuda())
    want.backward(dout)
    for g, c in zip(gpu + [proj], cpu + [cproj]):
        if isinstance(g, torch.Tensor):
            torch.testing.assert_close(g.grad.double().cpu(), c.grad, rtol=1e-3, atol=1e-3)
