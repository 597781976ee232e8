"""numba-backend specific tests (the shared property suite covers the general contract)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import scanlib
from scanlib.inputs import BCForm
from scanlib.testing import ScanCase, assert_scan_close, rel_error

pytest.importorskip("numba")


def _case(**kw) -> ScanCase:
    return ScanCase.example(**{**dict(seqlen=65), **kw})


def test_import_does_not_import_numba():
    code = "import sys, scanlib, scanlib_backends.numba; print('numba' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"


def test_automatic_selection_picks_numba_on_cpu():
    kw = _case().make("cpu", requires_grad=False)
    assert scanlib.explain(**kw)["selected"] == ["numba"]
    assert scanlib.get_backend("numba").not_supported_reasons(scanlib.scan_inputs(**kw)) == []


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_dtypes(dtype):
    assert_scan_close(_case(dtype=dtype), "numba")


def test_float64_is_computed_in_float64():
    errs = assert_scan_close(_case(dtype=torch.float64, seqlen=300), "numba")
    assert max(errs.values()) < 1e-12, errs


def test_large_L_accuracy():
    # long sequence, slow decay: errors would accumulate if the recurrence lost precision
    case = _case(batch=1, dim=4, dstate=2, seqlen=20000, groups=1, has_z=False)
    kw = case.make("cpu", requires_grad=False)
    kw["delta_softplus"] = False
    kw["delta_bias"] = None
    kw["delta"] = torch.full_like(kw["delta"], 1e-3)
    out, last = scanlib.selective_scan(**kw, backend="numba")
    ref_kw = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    ref_out, ref_last = scanlib.selective_scan(**ref_kw, backend="numba")
    assert ref_out.dtype == torch.float64
    assert rel_error(out, ref_out) < 1e-4
    assert rel_error(last, ref_last) < 1e-4


@pytest.mark.parametrize("seqlen", [1, 15, 17, 255, 257, 1000])
@pytest.mark.parametrize("dstate", [1, 16, 33])
def test_chunk_boundaries(seqlen, dstate):
    # chunk lengths are 256 (N=1), 64 (N=16), 16 (N=33): L below, at and past chunk multiples
    case = _case(seqlen=seqlen, dstate=dstate, dim=5, groups=1, batch=1)
    assert_scan_close(case, "numba")


def test_many_channels_cross_tiles_and_groups():
    # D = 70 with 5 groups of 14: tiles of 32 lanes must cut at group edges; mixed B/C forms
    for bf, cf in [
        (BCForm.GROUPED, BCForm.CONSTANT),
        (BCForm.SEQUENCE, BCForm.GROUPED),
        (BCForm.CONSTANT, BCForm.CONSTANT),
    ]:
        assert_scan_close(
            _case(dim=70, groups=5, B_form=bf, C_form=cf, seqlen=40, dstate=3), "numba"
        )


def test_non_contiguous_inputs():
    case = _case(dim=8, groups=2, seqlen=50)
    kw = case.make("cpu", requires_grad=False)
    nc = {}
    for k, v in kw.items():
        if isinstance(v, torch.Tensor) and v.dim() >= 2:
            # same values, transposed storage
            v = v.transpose(-1, -2).contiguous().transpose(-1, -2)
            assert not v.is_contiguous()
        nc[k] = v
    nc["u"] = torch.cat([kw["u"], kw["u"]], dim=-1)[..., ::2]  # strided view
    kw["u"] = nc["u"].contiguous()
    out, last = scanlib.selective_scan(**nc, backend="numba")
    ref_out, ref_last = scanlib.selective_scan(**kw, backend="numba")
    assert torch.equal(out, ref_out) and torch.equal(last, ref_last)
    # gradients also reach non-contiguous leaves
    u = nc["u"].detach().clone().requires_grad_(True)
    o, _ = scanlib.selective_scan(**{**nc, "u": u}, backend="numba")
    o.sum().backward()
    assert u.grad is not None and u.grad.shape == u.shape and torch.isfinite(u.grad).all()


def test_gradient_through_last_state_only():
    case = _case(has_z=False)
    kw = case.make("cpu", requires_grad=True)
    out, last = scanlib.selective_scan(**kw, backend="numba")
    last.square().sum().backward()
    grads = {k: v.grad.clone() for k, v in kw.items() if isinstance(v, torch.Tensor)}
    ref = {
        k: (v.detach().double().requires_grad_(True) if isinstance(v, torch.Tensor) else v)
        for k, v in kw.items()
    }
    _, ref_last = scanlib.selective_scan(**ref, backend="reference")
    ref_last.square().sum().backward()
    for k, g in grads.items():
        rg = ref[k].grad
        if rg is None:  # D does not reach the last state
            assert not g.any(), k
        else:
            assert rel_error(g, rg) < 2e-4, k


def test_deterministic():
    kw = _case(dim=64, groups=2, seqlen=300).make("cpu", requires_grad=True)
    res = []
    for _ in range(2):
        out, last = scanlib.selective_scan(**kw, backend="numba")
        grads = torch.autograd.grad((out.sum() + last.sum()), [kw["B"], kw["A"], kw["delta"]])
        res.append((out, last, *grads))
    for a, b in zip(*res):
        assert torch.equal(a, b)


def counted_team_launches(monkeypatch) -> list[int]:
    """Count the calls that reach torch's OpenMP runtime (``_team``); skip where it is absent."""
    from scanlib_backends.numba import _team

    gomp = _team.gomp_parallel()
    if gomp is None:
        pytest.skip("torch's OpenMP runtime was not found (not Linux, or not an OpenMP build)")
    calls = [0]

    def counting(*args):
        calls[0] += 1
        return gomp(*args)

    monkeypatch.setattr(_team, "gomp_parallel", lambda: counting)
    return calls


def test_team_runtime_found_where_torch_uses_openmp():
    from scanlib_backends.numba import _team

    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("torch's intra-op backend is not OpenMP")
    if not sys.platform.startswith("linux"):
        pytest.skip("the runtime is looked up in /proc/self/maps (Linux)")
    assert _team.gomp_parallel() is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_team_launch_equals_numba_launch(monkeypatch, dtype):
    """The units on torch's OpenMP team (the default with 2+ threads) and on numba's own pool
    give the same bits: forward, last state and every gradient."""
    from scanlib_backends.numba import _run, _team

    kw = _case(dim=100, groups=2, dstate=3, seqlen=97, dtype=dtype).make("cpu", requires_grad=True)
    kw["z"] = torch.randn_like(kw["u"]).requires_grad_()
    kw["D"] = torch.randn(kw["u"].shape[1], dtype=kw["u"].dtype).requires_grad_()
    names = [k for k, v in kw.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    monkeypatch.setattr(_run, "_threads", lambda: 2)  # two threads even on a 1-core machine
    res = []
    for team in (True, False):
        with monkeypatch.context() as m:
            calls = counted_team_launches(m) if team else None
            if not team:
                m.setattr(_team, "gomp_parallel", lambda: None)
            out, last = scanlib.selective_scan(**kw, backend="numba")
            loss = (out * out).sum() + last.sum()
            res.append((out, last, *torch.autograd.grad(loss, [kw[k] for k in names])))
            if team:
                assert calls[0] == 2  # the forward and the backward ran on the team
    for a, b in zip(*res):
        assert torch.equal(a, b)


def test_team_header_rejects_non_contiguous_arrays():
    from scanlib_backends.numba import _team

    a = np.zeros((4, 6), np.float32)
    h = _team.header((a, 3, a[:, 1:].copy()), 5)
    assert h is not None and h[0] == len(h) and list(h[-2:]) == [5, 0]
    assert list(h[2:4]) == [4, 6] and h[4] == 3
    assert _team.header((a[:, ::2],), 1) is None


def test_no_grad_and_bad_input():
    kw = _case().make("cpu", requires_grad=False)
    with torch.no_grad():
        out, last = scanlib.selective_scan(**kw, backend="numba")
    assert out.shape == (2, 6, 65) and last.shape == (2, 6, 4)
    kw["u"] = kw["u"].to(torch.float64)
    with pytest.raises(scanlib.ScanInputError):
        scanlib.selective_scan(**kw, backend="numba")


def _math_kernels():
    from numba import njit
    from scanlib_backends.numba._math import fexp, silu, softplus, softplus_value

    @njit(cache=False)
    def run(x):
        n = x.size
        e = np.empty_like(x)
        sp = np.empty_like(x)
        sp2 = np.empty_like(x)
        sg = np.empty_like(x)
        si = np.empty_like(x)
        ds = np.empty_like(x)
        for i in range(n):
            e[i] = fexp(x[i])
            sp[i] = softplus_value(x[i])
            sp2[i], sg[i] = softplus(x[i])
            si[i], ds[i] = silu(x[i])
        return e, sp, sp2, sg, si, ds

    return run


def _wide_float32() -> np.ndarray:
    grid = np.concatenate(
        [
            np.linspace(-100, 100, 200001),
            np.linspace(-1e-3, 1e-3, 2001),
            np.geomspace(1e-30, 1e30, 2001),
            -np.geomspace(1e-30, 1e30, 2001),
            [-87.33654, -87.3, -86.9, 88.72, 88.7228, 88.7229, 88.75, 89.0, 89.5, 1e38, -1e38],
            [0.0, -0.0, np.log(2) / 2, -np.log(2) / 2],
        ]
    )
    return grid.astype(np.float32)


def test_float32_math_accuracy():
    """The float32 polynomial exp / softplus / silu against float64 over a wide range."""
    x = _wide_float32()
    e, sp, sp2, sg, si, ds = _math_kernels()(x)
    xd = x.astype(np.float64)
    with np.errstate(over="ignore"):
        ref_e = np.exp(xd)
    ref_sp = np.logaddexp(0.0, xd)
    en = np.exp(-np.abs(xd))
    ref_sg = np.where(xd >= 0, 1.0, en) / (1.0 + en)
    ref_si = xd * ref_sg
    ref_ds = ref_sg * (1.0 + xd * (1.0 - ref_sg))

    def rel(a, b, mask):
        return float(np.max(np.abs(a[mask] - b[mask]) / np.abs(b[mask])))

    big = float(np.finfo(np.float32).max)
    normal = (ref_e > 1e-37) & (ref_e < big)  # results below ~1e-37 may flush to 0
    assert rel(e, ref_e, normal) < 3e-7
    assert np.all(e[ref_e >= big * 1.0000001] == np.inf)
    assert np.all(e[xd < -87.33654] == 0)
    assert np.all(e[~np.isnan(e)] >= 0)
    for got in (sp, sp2):
        assert rel(got, ref_sp, ref_sp > 1e-37) < 6e-7
    assert rel(sg, ref_sg, ref_sg > 1e-37) < 6e-7
    assert rel(si, ref_si, np.abs(ref_si) > 1e-30) < 1e-6
    assert float(np.max(np.abs(ds - ref_ds))) < 1e-6


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_math_special_values(dtype):
    x = np.array([np.nan, np.inf, -np.inf, 0.0, 1e30, -1e30], dtype=dtype)
    e, sp, sp2, sg, si, ds = _math_kernels()(x)
    assert np.isnan(e[0]) and np.isnan(sp[0]) and np.isnan(sp2[0])
    assert e[1] == np.inf and e[2] == 0 and e[3] == 1
    assert e[4] == np.inf and e[5] == 0
    assert sp[1] == np.inf and sp2[1] == np.inf and sp[2] == 0 and sp2[2] == 0
    assert sp[4] == dtype(1e30) and sp[5] == 0
    np.testing.assert_allclose(sp[3], np.log(2.0), rtol=1e-6)
    assert sg[1] == 1 and sg[2] == 0 and sg[3] == 0.5
