"""numba-backend specific tests (the shared property suite covers the general contract)."""

from __future__ import annotations

import subprocess
import sys

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


def test_no_grad_and_bad_input():
    kw = _case().make("cpu", requires_grad=False)
    with torch.no_grad():
        out, last = scanlib.selective_scan(**kw, backend="numba")
    assert out.shape == (2, 6, 65) and last.shape == (2, 6, 4)
    kw["u"] = kw["u"].to(torch.float64)
    with pytest.raises(scanlib.ScanInputError):
        scanlib.selective_scan(**kw, backend="numba")
