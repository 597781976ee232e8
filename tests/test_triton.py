"""The triton backend: capabilities, scan and route kernels against the references.

Without a GPU the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set by
conftest.py before triton is imported) on small CPU tensors; the ``gpu`` tests compare the
compiled kernels on CUDA with the float64 reference at real sizes, VMamba-T's stage shape included.
The shared property suite (tests/test_backends_property.py) covers the rest of the contract.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import scanlib
from scanlib.inputs import BCForm, ScanInputs
from scanlib.testing import ScanCase, assert_scan_close, rel_error

BACKEND = "triton"


def _reasons(device: str) -> list[str]:
    z = torch.zeros
    inputs = ScanInputs(z(1, 2, 3), z(1, 2, 3), z(2, 1), z(1, 1, 3), z(1, 1, 3))
    if device == "cuda":
        if not torch.cuda.is_available():
            return ["no CUDA device"]
        inputs = ScanInputs(
            *(t.cuda() for t in (z(1, 2, 3), z(1, 2, 3), z(2, 1), z(1, 1, 3), z(1, 1, 3)))
        )
    return scanlib.get_backend(BACKEND).not_supported_reasons(inputs)


CPU_REASONS = _reasons("cpu")
needs_interpreter = pytest.mark.skipif(
    bool(CPU_REASONS), reason="triton cannot run CPU tensors here: " + "; ".join(CPU_REASONS)
)


def _case(**kw) -> ScanCase:
    return ScanCase.example(**{**dict(dim=4, seqlen=70, dstate=3, groups=2, seed=3), **kw})


# ---------------------------------------------------------------------------------- no kernels run
def test_import_does_not_import_triton():
    code = (
        "import sys, scanlib, scanlib_backends.triton as t; "
        "b = scanlib.get_backend('triton'); b.availability_reasons(); "
        "assert 'triton' not in sys.modules, 'triton imported'; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_capabilities(monkeypatch):
    from scanlib_backends.triton import TritonBackend

    b = scanlib.get_backend(BACKEND)
    assert isinstance(b, TritonBackend)
    assert TritonBackend.priority == 40
    assert b.ops == {"selective_scan", "cross_scan", "cross_merge"}
    assert b.dtypes == {torch.float32, torch.float16, torch.bfloat16}
    assert b.features == frozenset(scanlib.Feature)
    assert b.deterministic is True
    assert [r.module for r in b.requires] == ["triton"]
    assert b.device_reasons(torch.device("cuda")) == []
    # the interpreter flag is read at call time
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert b.device_reasons(torch.device("cpu"))
    assert b.priority == 40
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if (
        "scanlib_backends.triton.scan_kernels" not in sys.modules
        or sys.modules["scanlib_backends.triton.scan_kernels"].INTERPRETED
    ):
        assert b.device_reasons(torch.device("cpu")) == []
    # interpreted, it is never picked automatically while another backend can run
    assert b.priority < scanlib.get_backend("torch").priority


def test_float64_declined_with_reason():
    kw = _case(dtype=torch.float64).make("cpu", requires_grad=False)
    info = scanlib.explain(**kw)
    assert any("float64" in r for r in info[BACKEND])
    with pytest.raises(scanlib.BackendUnavailableError, match="float64"):
        scanlib.selective_scan(**kw, backend=BACKEND)


def test_interpreter_not_selected_automatically():
    kw = _case().make("cpu", requires_grad=False)
    assert scanlib.explain(**kw)["selected"] != [BACKEND]


# ---------------------------------------------------------------------------------- scan, interpreter
# L = 70 spans three 32-step chunks of the interpreter configuration
INTERPRETER_CASES = {
    "grouped_all_features": _case(),
    "mixed_groups_6_3_2": _case(dim=6, groups=3, B_form=BCForm.GROUPED, C_form=BCForm.SEQUENCE),
    "constant_bc": _case(B_form=BCForm.CONSTANT, C_form=BCForm.CONSTANT, has_z=False),
    "constant_b_grouped_c": _case(B_form=BCForm.CONSTANT, C_form=BCForm.GROUPED, dstate=5),
    "bf16_out_fp32": _case(dtype=torch.bfloat16, out_float32=True, has_initial_state=False),
    "fp16_plain": _case(
        dtype=torch.float16,
        has_D=False,
        has_z=False,
        has_delta_bias=False,
        delta_softplus=False,
        return_last_state=False,
    ),
    "many_states_one_step": _case(seqlen=1, dstate=17, dim=3, groups=3),
}


@needs_interpreter
@pytest.mark.parametrize("name", list(INTERPRETER_CASES))
def test_scan_interpreter_matches_reference(name):
    assert_scan_close(INTERPRETER_CASES[name], BACKEND, "cpu")


@needs_interpreter
def test_scan_strided_inputs():
    """Non-contiguous u/delta/z and B/C views are read through their strides."""
    g = torch.Generator().manual_seed(0)
    b, d, L, n, G = 2, 4, 40, 2, 2
    u = torch.randn(b, L, d, generator=g).transpose(1, 2)  # [B, D, L], stride(-1) = D
    delta = (torch.rand(b, d, 2 * L, generator=g) * 0.5)[..., ::2]
    z = torch.randn(d, b, L, generator=g).transpose(0, 1)
    Bm = torch.randn(b, L, G, n, generator=g).permute(0, 2, 3, 1)  # [B, G, N, L] non-contiguous
    Cm = torch.randn(b, n, L + 3, generator=g)[..., 3:]
    A = -torch.rand(d, n, generator=g) - 0.1
    Dv = torch.randn(d, generator=g)
    args = [u, delta, A, Bm, Cm, Dv, z]
    out = scanlib.selective_scan(*args, return_last_state=True, backend=BACKEND)
    ref = scanlib.selective_scan_ref(*[t.double() for t in args], return_last_state=True)
    assert rel_error(out[0], ref[0]) < 1e-5 and rel_error(out[1], ref[1]) < 1e-5


@needs_interpreter
@pytest.mark.parametrize("which", ["out_only", "last_only"])
def test_scan_gradient_through_one_output(which):
    kw = _case(seqlen=40, has_z=False).make("cpu")
    ref_kw = {
        k: v.detach().double().requires_grad_() if isinstance(v, torch.Tensor) else v
        for k, v in kw.items()
    }
    names = [k for k, v in kw.items() if isinstance(v, torch.Tensor)]

    def loss(res):
        out, last = res
        return (out**2).sum() if which == "out_only" else (last**3).sum()

    res = scanlib.selective_scan(**kw, backend=BACKEND)
    grads = torch.autograd.grad(loss(res), [kw[n] for n in names], allow_unused=True)
    res = scanlib.selective_scan_ref(**ref_kw)
    ref = torch.autograd.grad(loss(res), [ref_kw[n] for n in names], allow_unused=True)
    for n, g, r in zip(names, grads, ref):
        if r is None:  # e.g. D does not reach the last state
            assert g is None or not g.any(), n
        else:
            assert rel_error(g, r) < 1e-4, n


@needs_interpreter
def test_scan_backward_is_deterministic():
    kw = _case(seqlen=50, groups=1, dim=6).make("cpu")
    names = [k for k, v in kw.items() if isinstance(v, torch.Tensor)]
    runs = []
    for _ in range(2):
        out, last = scanlib.selective_scan(**kw, backend=BACKEND)
        runs.append(torch.autograd.grad(out.sum() + last.sum(), [kw[n] for n in names]))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@needs_interpreter
def test_plan_grid_groups():
    from scanlib_backends.triton import scan_kernels as sk

    def plan(dim, gb, gc, fb=BCForm.GROUPED, fc=BCForm.GROUPED):
        c = _case(dim=dim, groups=gb, B_form=fb, C_form=fc)
        inputs = c.inputs("cpu", requires_grad=False)
        if fc is BCForm.GROUPED and gc != gb:
            inputs = ScanInputs(
                inputs.u, inputs.delta, inputs.A, inputs.B, inputs.C[:, :1].repeat(1, gc, 1, 1)
            )
        return sk._plan(inputs)

    assert plan(384, 4, 4).DG == 96
    p = plan(12, 2, 3)  # groups of 6 and 4 channels: grid groups of gcd = 2
    assert (p.DG, p.DGB, p.DGC, p.GB, p.GC) == (2, 6, 4, 2, 3)
    p = plan(12, 2, 0, fc=BCForm.CONSTANT)  # constant C does not constrain the grid
    assert (p.DG, p.DGC) == (6, 1)
    assert plan(12, 1, 0, fb=BCForm.CONSTANT, fc=BCForm.CONSTANT).DG == 12
    gpu = sk.default_config(
        sk._plan(_case(dim=384, groups=4, seqlen=3136, dstate=1).inputs("cpu", False)), False
    )
    assert gpu.block_d * gpu.block_l <= 4096 and 96 % gpu.block_d == 0
    for cfg in sk.candidate_configs(p):
        assert cfg.block_d >= 1 and cfg.block_l >= 16


# ---------------------------------------------------------------------------------- routes, interpreter
def _route_sets():
    from scanlib.routes import RouteSet

    # a user-defined set with a sub-grid route: -1 padding in the index table
    mine = RouteSet("test_mine", ["row", "col_rev", "atrous_11_col"])
    return ["cross2d", "bidi", "snake", "zigzag", "hilbert", "atrous", "local3", mine]


def _check_routes(rs, H, W, channels_last, dtype, device):
    g = torch.Generator().manual_seed(H * 31 + W)
    x = torch.randn(2, 3, H, W, generator=g).to(dtype)
    if channels_last:
        x = x.permute(0, 2, 3, 1).contiguous()
    x = x.to(device).requires_grad_(True)
    tol = dict(rtol=8e-3, atol=1e-6) if dtype == torch.bfloat16 else dict(rtol=1e-6, atol=1e-6)
    s = scanlib.cross_scan(x, rs, channels_last=channels_last, backend=BACKEND)
    ref = scanlib.cross_scan(x.detach().cpu(), rs, channels_last=channels_last, backend="torch")
    assert s.shape == ref.shape and s.is_contiguous()
    assert torch.equal(s.cpu(), ref)  # a gather is exact
    y = torch.randn(s.shape, generator=g).to(dtype).to(device)
    (dx,) = torch.autograd.grad(s, x, y)
    y64 = y.detach().cpu().double()
    ref_dx = scanlib.cross_merge(y64, rs, H, W, channels_last=channels_last, backend="torch")
    torch.testing.assert_close(dx.cpu().double(), ref_dx, **tol)
    # merge and its backward (= scan)
    y.requires_grad_(True)
    m = scanlib.cross_merge(y, rs, H, W, channels_last=channels_last, backend=BACKEND)
    assert m.shape == x.shape and m.is_contiguous()
    torch.testing.assert_close(m.cpu().double(), ref_dx, **tol)
    dm = torch.randn(m.shape, generator=g).to(dtype).to(device)
    (dy,) = torch.autograd.grad(m, y, dm)
    ref_dy = scanlib.cross_scan(dm.cpu(), rs, channels_last=channels_last, backend="torch")
    assert torch.equal(dy.cpu(), ref_dy)


@needs_interpreter
@pytest.mark.parametrize("channels_last", [False, True], ids=["cf", "cl"])
@pytest.mark.parametrize("routes", range(8), ids=lambda i: f"set{i}")
def test_routes_interpreter_match_torch(routes, channels_last):
    rs = _route_sets()[routes]
    for H, W in ((5, 7), (1, 4)):
        _check_routes(rs, H, W, channels_last, torch.float32, "cpu")


@needs_interpreter
def test_routes_interpreter_bf16_and_strided():
    _check_routes("cross2d", 6, 5, True, torch.bfloat16, "cpu")
    # a channels-first view of channels-last memory, read in place
    x = torch.randn(2, 5, 6, 3).permute(0, 3, 1, 2)
    s = scanlib.cross_scan(x, "cross2d", backend=BACKEND)
    assert torch.equal(s, scanlib.cross_scan(x.contiguous(), "cross2d", backend="torch"))
    y = torch.randn(2, 4, 30, 3).transpose(2, 3)  # [B, K, C, L] with stride(-1) != 1
    m = scanlib.cross_merge(y, "cross2d", 5, 6, backend=BACKEND)
    torch.testing.assert_close(
        m, scanlib.cross_merge(y.contiguous(), "cross2d", 5, 6, backend="torch")
    )


@needs_interpreter
def test_routes_adjoint():
    """<cross_scan(x), y> == <x, cross_merge(y)> for a padded set."""
    rs = _route_sets()[-1]
    x = torch.randn(1, 2, 4, 6, dtype=torch.float64).float()
    s = scanlib.cross_scan(x, rs, backend=BACKEND)
    y = torch.randn(s.shape)
    m = scanlib.cross_merge(y, rs, 4, 6, backend=BACKEND)
    torch.testing.assert_close((s.double() * y.double()).sum(), (x.double() * m.double()).sum())


# ---------------------------------------------------------------------------------- compiled mode
def test_kernels_compile_for_sm90():
    """Every kernel at its default configuration compiles for sm_90 (no GPU needed): catches what
    the interpreter cannot, e.g. a loop-carried value changing type or an op the GPU lacks."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "scanlib_backends.triton.aot_check", "--arch", "90"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]


# ---------------------------------------------------------------------------------- GPU
GPU_CASES = {
    # VMamba-T stage 1 (K*C = 384 channels, 4 route groups, 56 x 56 map) at batch 2
    "vmamba_t_stage1_bf16": _case(
        batch=2,
        dim=384,
        seqlen=3136,
        dstate=1,
        groups=4,
        dtype=torch.bfloat16,
        out_float32=True,
        has_z=False,
        has_initial_state=False,
        return_last_state=False,
    ),
    "vmamba_t_stage3_fp32": _case(batch=2, dim=1536, seqlen=196, dstate=1, groups=4, has_z=False),
    "mamba_n16_fp16": _case(
        batch=2,
        dim=64,
        seqlen=1000,
        dstate=16,
        B_form=BCForm.SEQUENCE,
        C_form=BCForm.SEQUENCE,
        dtype=torch.float16,
        delta_softplus=True,
    ),
    "constant_bc_fp32": _case(
        batch=3, dim=48, seqlen=777, dstate=8, B_form=BCForm.CONSTANT, C_form=BCForm.CONSTANT
    ),
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_scan_gpu_matches_reference(name):
    reasons = _reasons("cuda")
    if reasons:
        pytest.skip("; ".join(reasons))
    assert_scan_close(GPU_CASES[name], BACKEND, "cuda")


@pytest.mark.gpu
def test_scan_gpu_deterministic_and_tuned(monkeypatch):
    """Above the tuning threshold (the tuner runs) two backward passes agree bitwise. Same flags
    as bench/scan_gpu.py, so the benchmark reuses these compiled kernels."""
    if _reasons("cuda"):
        pytest.skip("; ".join(_reasons("cuda")))
    monkeypatch.setenv("SCANLIB_TRITON_AUTOTUNE", "1")
    case = _case(
        batch=4,
        dim=384,
        seqlen=3136,
        dstate=1,
        groups=4,
        dtype=torch.bfloat16,
        out_float32=True,
        has_z=False,
        has_initial_state=False,
        return_last_state=False,
    )
    kw = case.make("cuda")
    names = [k for k, v in kw.items() if isinstance(v, torch.Tensor)]
    dout = torch.randn(4, 384, 3136, device="cuda")
    runs = []
    for _ in range(2):
        out = scanlib.selective_scan(**kw, backend=BACKEND)
        runs.append(torch.autograd.grad(out, [kw[n] for n in names], dout))
    for n, a, b in zip(names, *runs):
        assert torch.equal(a, b), n
    ref_out = scanlib.selective_scan(**kw, backend="torch")
    assert rel_error(out, ref_out) < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["cf", "cl"])
def test_routes_gpu_match_torch(channels_last):
    if _reasons("cuda"):
        pytest.skip("; ".join(_reasons("cuda")))
    for rs in ("cross2d", "hilbert", _route_sets()[-1]):
        _check_routes(rs, 56, 56, channels_last, torch.bfloat16, "cuda")
        _check_routes(rs, 7, 9, channels_last, torch.float32, "cuda")
