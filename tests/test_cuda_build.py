"""The compiled CUDA backend without a GPU: nvcc builds for sm_80 and sm_90, build errors name the
failing command, the backend declines with reasons, the C ABI matches its Python mirror, and the
kernels themselves run through their CPU emulation (csrc/emulation.h) against the reference.
Tests marked ``gpu`` run the shared property cases on a CUDA device (bench/gpu_check.sh)."""

import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from scanlib_backends.cuda import CudaBackend, EmulatedCudaBackend, _lib, ops

import scanlib
from scanlib import build as scanbuild
from scanlib.inputs import BCForm
from scanlib.reference import selective_scan_ref
from scanlib.testing import ScanCase, assert_scan_close, rel_error, scan_cases

NVCC = scanbuild.find_nvcc()
needs_nvcc = pytest.mark.skipif(
    NVCC is None, reason="nvcc not found: the CUDA toolkit is not installed"
)
CSRC = scanbuild.source_dir()
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
EMU = "cuda-emulation"


# ---------------------------------------------------------------------- nvcc builds
@needs_nvcc
def test_nvcc_compiles_for_sm80_and_sm90(tmp_path):
    objs = scanbuild.compile_objects(["sm_80", "sm_90"], tmp_path, nvcc=NVCC, jobs=2, threads=2)
    assert {o.name for o in objs} == {p.stem + ".o" for p in scanbuild.gpu_sources()}
    assert all(o.stat().st_size > 0 for o in objs)


@needs_nvcc
def test_build_failure_names_the_command_and_the_retry(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    (src / "scanlib_cuda.h").write_text((CSRC / "scanlib_cuda.h").read_text())
    (src / "api.cu").write_text('#include "scanlib_cuda.h"\nint broken( { return 0; }\n')
    monkeypatch.setenv("SCANLIB_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(scanbuild.CudaBuildError) as info:
        scanbuild.build("sm_80", src=src, nvcc=NVCC)
    msg = str(info.value)
    assert "$ " in msg and "nvcc" in msg and str(src / "api.cu") in msg
    assert "python -m scanlib.build --force --arch sm_80" in msg
    assert "error" in msg.lower()  # the compiler's own words
    logs = list((tmp_path / "cache").glob("*/build.log"))
    assert logs and "api.cu" in logs[0].read_text()
    assert not list((tmp_path / "cache").glob(f"*/{scanbuild.LIB_NAME}"))


def test_build_without_nvcc_names_the_remedy(tmp_path, monkeypatch):
    monkeypatch.setenv("SCANLIB_NVCC", str(tmp_path / "no-such-nvcc"))
    monkeypatch.setenv("SCANLIB_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("SCANLIB_CUDA_LIB", raising=False)
    assert scanbuild.find_nvcc() is None
    with pytest.raises(scanbuild.CudaBuildError, match="nvcc was not found"):
        scanbuild.build("sm_90")
    with pytest.raises(scanbuild.CudaBuildError, match=r"python -m scanlib\.build --arch sm_90"):
        scanbuild.ensure_library("sm_90")
    assert "python -m scanlib.build" in scanbuild.library_status("sm_90")
    assert scanbuild.main(["--arch", "sm_90"]) == 1


def test_arch_names_and_cache_keys(tmp_path, monkeypatch):
    for spelling in ("sm_90", "90", "9.0", "sm90", "compute_90"):
        assert scanbuild.normalize_arch(spelling) == "sm_90"
    assert scanbuild.normalize_arch("8.6") == "sm_86"
    assert scanbuild.normalize_arch("sm_90a") == "sm_90a"
    assert scanbuild.normalize_arch("10.0") == "sm_100"
    with pytest.raises(ValueError):
        scanbuild.normalize_arch("hopper")
    monkeypatch.setenv("SCANLIB_CACHE_DIR", str(tmp_path))
    base = scanbuild.build_dir("sm_90", "13.0.88")
    assert base.parent == tmp_path
    assert scanbuild.build_dir("sm_80", "13.0.88") != base
    assert scanbuild.build_dir("sm_90", "12.8.93") != base
    other = tmp_path / "src"
    shutil.copytree(CSRC, other, ignore=shutil.ignore_patterns("__pycache__"))
    assert scanbuild.build_dir("sm_90", "13.0.88", other) == base  # same sources, same key
    (other / "api.cu").write_text((other / "api.cu").read_text() + "\n// changed\n")
    assert scanbuild.build_dir("sm_90", "13.0.88", other) != base


def test_params_struct_matches_the_header():
    header = (CSRC / "scanlib_cuda.h").read_text()
    body = re.search(
        r"typedef struct scanlib_scan_params \{(.*?)\} scanlib_scan_params;", header, re.S
    ).group(1)
    body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)
    names = []
    for decl in body.split(";"):
        decl = decl.strip()
        if not decl:
            continue
        decl = re.sub(r"^(const\s+)?(int64_t|void|float)\s*", "", decl)
        names += [n.strip().lstrip("*").strip() for n in decl.split(",")]
    assert names == [f[0] for f in _lib.Params._fields_]
    assert all(ctype in (_lib._i64, _lib._ptr) for _, ctype in _lib.Params._fields_)  # 8 bytes each


# ---------------------------------------------------------------------- the backend's reasons
def test_backend_declines_without_a_cuda_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    backend = CudaBackend()
    assert any("no CUDA device" in r for r in backend.availability_reasons())
    case = ScanCase(
        2,
        4,
        16,
        2,
        BCForm.GROUPED,
        BCForm.GROUPED,
        2,
        True,
        True,
        True,
        True,
        False,
        True,
        F32,
        False,
        0,
    )
    reasons = backend.not_supported_reasons(case.inputs("cpu"))
    assert any("runs on cuda tensors, not cpu" in r for r in reasons)
    explained = scanlib.explain(**case.make("cpu"))
    assert explained["cuda"] and explained["selected"] != ["cuda"]


def test_backend_declines_when_the_library_is_missing_and_nvcc_absent(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(ops, "_by_arch", {})
    monkeypatch.setattr(ops, "_failed", {})
    monkeypatch.setenv("SCANLIB_NVCC", str(tmp_path / "no-such-nvcc"))
    monkeypatch.setenv("SCANLIB_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("SCANLIB_CUDA_LIB", raising=False)
    reasons = CudaBackend().availability_reasons()
    assert len(reasons) == 1 and "python -m scanlib.build" in reasons[0] and "sm_90" in reasons[0]
    # with nvcc present (or a cached build) the backend would build on first use instead
    monkeypatch.setenv("SCANLIB_CUDA_AUTOBUILD", "0")
    monkeypatch.setenv("SCANLIB_NVCC", sys.executable)  # exists; never run while a build is cached
    lib_dir = scanbuild.build_dir("sm_90", "1.2.3")
    monkeypatch.setattr(scanbuild, "nvcc_version", lambda nvcc: "1.2.3")
    assert "SCANLIB_CUDA_AUTOBUILD=0" in CudaBackend().availability_reasons()[0]
    lib_dir.mkdir(parents=True)
    (lib_dir / scanbuild.LIB_NAME).write_bytes(b"")
    assert CudaBackend().availability_reasons() == []


def test_importing_the_backend_probes_nothing():
    code = textwrap.dedent(
        """
        import subprocess, torch
        def boom(*a, **k):
            raise AssertionError("probed at import")
        torch.cuda.is_available = boom
        torch.cuda.get_device_capability = boom
        subprocess.run = boom
        import scanlib, scanlib_backends.cuda
        scanlib.get_backend("cuda")
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_dstate_limit_is_a_reason():
    case = ScanCase(
        1,
        2,
        8,
        257,
        BCForm.CONSTANT,
        BCForm.CONSTANT,
        1,
        False,
        False,
        False,
        False,
        False,
        False,
        F32,
        False,
        0,
    )
    assert any("exceeds" in r for r in CudaBackend().extra_reasons(case.inputs("cpu")))


# ---------------------------------------------------------------------- the kernels, emulated
@pytest.fixture(scope="module")
def emu():
    if NVCC is None or scanbuild.find_cxx() is None:
        pytest.skip("the CPU emulation build needs a host C++ compiler and the CUDA headers (nvcc)")
    path = scanbuild.build_emulation()
    backend = EmulatedCudaBackend(path)
    scanlib.register_backend(backend, replace=True)
    ops.set_emulation_library(path)
    yield _lib.load(path)
    ops.set_emulation_library(None)
    scanlib.unregister_backend(EMU)


def _case(L, N, dim, groups, dtype, B_form, C_form, seed, **flags):
    opts = dict(
        has_D=True,
        has_z=True,
        has_delta_bias=True,
        delta_softplus=True,
        has_initial_state=True,
        return_last_state=True,
        out_float32=False,
    )
    opts.update(flags)
    b = 1 + seed % 3
    return ScanCase(b, dim, L, N, B_form, C_form, groups, dtype=dtype, seed=seed, **opts)


G, S, K = BCForm.GROUPED, BCForm.SEQUENCE, BCForm.CONSTANT
EDGE_CASES = [
    # L around the 8-step lane segments and 256-step chunks; N around the unroll (4) and the
    # staged tile (16); channel tiles of 1, 2, 4 and 8 warps
    _case(1, 1, 1, 1, F32, G, G, 0),
    _case(7, 2, 3, 3, F16, G, S, 1, has_z=False),
    _case(63, 4, 6, 2, BF16, S, K, 2, out_float32=True),
    _case(64, 5, 8, 4, F32, K, G, 3, delta_softplus=False),
    _case(65, 16, 8, 2, F16, G, G, 4, has_initial_state=False, out_float32=True),
    _case(256, 17, 16, 2, BF16, S, S, 5, has_D=False),
    _case(257, 20, 4, 1, F32, K, K, 6, has_delta_bias=False),
    _case(513, 1, 24, 4, BF16, G, G, 7, out_float32=True),
    _case(300, 3, 12, 12, F32, G, K, 8, return_last_state=False),
    _case(130, 8, 16, 1, F16, S, G, 9, has_z=False, delta_softplus=False),
]


@pytest.mark.parametrize(
    "case", EDGE_CASES, ids=lambda c: f"L{c.seqlen}-N{c.dstate}-D{c.dim}-{str(c.dtype)[6:]}"
)
def test_emulated_kernels_match_the_reference(emu, case):
    assert_scan_close(case, EMU, "cpu")


@given(
    case=scan_cases(
        dtypes=(F32, F16, BF16), max_elements=1 << 13, seqlens=(1, 2, 7, 63, 64, 65, 130, 257, 520)
    )
)
def test_emulated_kernels_property(emu, case):
    assert_scan_close(case, EMU, "cpu")


@pytest.mark.parametrize("schedule", ["ahead", "behind", "random:5"])
def test_emulated_kernels_under_other_schedules(emu, monkeypatch, schedule):
    """Warps run far ahead of or behind each other: a missing __syncthreads would show."""
    monkeypatch.setenv("SCANLIB_EMU_SCHEDULE", schedule)
    assert_scan_close(_case(300, 5, 16, 2, F32, G, S, 11), EMU, "cpu")
    assert_scan_close(_case(70, 17, 8, 1, BF16, S, G, 12, out_float32=True), EMU, "cpu")


def _ref_grads(kw, out_grad, last_grad):
    ref = {
        k: (
            v.detach().double().requires_grad_(v.requires_grad)
            if isinstance(v, torch.Tensor)
            else v
        )
        for k, v in kw.items()
    }
    ref["out_dtype"] = None
    out, last = selective_scan_ref(**{**ref, "return_last_state": True})
    loss = 0
    if out_grad is not None:
        loss = loss + (out * out_grad.double()).sum()
    if last_grad is not None:
        loss = loss + (last * last_grad.double()).sum()
    names = [k for k, v in ref.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    grads = torch.autograd.grad(loss, [ref[n] for n in names], allow_unused=True)
    return (
        out,
        last,
        {n: torch.zeros_like(ref[n]) if gr is None else gr for n, gr in zip(names, grads)},
    )


def test_emulated_strided_inputs_and_mixed_groups(emu):
    g = torch.Generator().manual_seed(3)
    b, d, L, n = 2, 8, 200, 3
    big = torch.randn(b, 2 * d, L + 5, generator=g)
    u = big[:, ::2, 2 : L + 2]  # strided channels, unaligned start
    delta = (
        (torch.rand(b, d, L, generator=g) * 0.5).transpose(1, 2).contiguous().transpose(1, 2)
    )  # stride(-1) != 1
    A = -torch.rand(d, n, generator=g) - 0.1
    B = torch.randn(b, 4, n, L, generator=g)  # 4 groups
    C = torch.randn(b, 2, n, L * 2, generator=g)[..., ::2]  # 2 groups, stride 2 along L
    kw = dict(u=u, delta=delta, A=A, B=B, C=C, D=torch.randn(d, generator=g))
    for v in kw.values():
        v.requires_grad_(True)
    out, last = scanlib.selective_scan(**kw, return_last_state=True, backend=EMU)
    gout, glast = torch.randn(out.shape, generator=g), torch.randn(last.shape, generator=g)
    grads = torch.autograd.grad((out * gout).sum() + (last * glast).sum(), list(kw.values()))
    ref_out, ref_last, ref_grads = _ref_grads(kw, gout, glast)
    assert rel_error(out, ref_out) < 2e-5 and rel_error(last, ref_last) < 2e-5
    for name, gr in zip(kw, grads):
        assert rel_error(gr, ref_grads[name]) < 2e-5, name


@pytest.mark.parametrize("which", ["out", "last"])
def test_emulated_gradient_of_one_output_only(emu, which):
    case = _case(90, 4, 4, 2, F32, G, G, 13)
    kw = case.make("cpu")
    kw["return_last_state"] = True
    out, last = scanlib.selective_scan(**kw, backend=EMU)
    used = out if which == "out" else last
    g = torch.randn(used.shape, generator=torch.Generator().manual_seed(1))
    names = [k for k, v in kw.items() if isinstance(v, torch.Tensor)]
    grads = torch.autograd.grad((used * g).sum(), [kw[k] for k in names])
    _, _, ref = _ref_grads(kw, g if which == "out" else None, g if which == "last" else None)
    for name, gr in zip(names, grads):
        assert rel_error(gr, ref[name]) < 1e-4, name


def test_emulated_kernels_are_deterministic(emu):
    case = _case(300, 4, 16, 2, BF16, G, K, 14)
    runs = []
    for _ in range(2):
        kw = case.make("cpu")
        names = [k for k, v in kw.items() if isinstance(v, torch.Tensor)]
        out, last = scanlib.selective_scan(**kw, backend=EMU)
        runs.append(
            [
                out,
                last,
                *torch.autograd.grad(out.float().sum() + last.sum(), [kw[k] for k in names]),
            ]
        )
    for x, y in zip(*runs):
        assert torch.equal(x, y)


def test_largest_dstate(emu):
    assert_scan_close(_case(20, 256, 2, 1, F32, S, K, 15), EMU, "cpu")


def test_library_reports_bad_parameters_instead_of_aborting(emu):
    u = torch.zeros(1, 3, 8)
    p = _lib.Params()
    p.batch, p.dim, p.seqlen, p.dstate = 1, 3, 8, 2
    p.channels_per_block = 2  # does not divide D = 3
    p.u = p.delta = p.A = p.B = p.C = p.out = u.data_ptr()
    p.B_const = p.C_const = 1
    with pytest.raises(_lib.KernelError, match="channels_per_block=2 does not divide D=3"):
        emu.forward(p, None)
    p.channels_per_block, p.dstate = 1, 300
    with pytest.raises(_lib.KernelError, match="N=300 exceeds"):
        emu.forward(p, None)
    p.dstate = 2
    with pytest.raises(_lib.KernelError, match="chunk_states"):
        emu.backward(p, None)


def test_custom_ops_pass_opcheck(emu):
    g = torch.Generator().manual_seed(0)
    b, d, L, n = 2, 4, 40, 3
    args = (
        torch.randn(b, d, L, generator=g, requires_grad=True),
        (torch.rand(b, d, L, generator=g) * 0.5).requires_grad_(),
        (-torch.rand(d, n, generator=g) - 0.1).requires_grad_(),
        torch.randn(b, 2, n, L, generator=g, requires_grad=True),
        torch.randn(d, n, generator=g, requires_grad=True),
        torch.randn(d, generator=g, requires_grad=True),
        torch.randn(b, d, L, generator=g, requires_grad=True),
        None,
        torch.randn(b, d, n, generator=g, requires_grad=True),
        True,
        False,
        True,
    )
    torch.library.opcheck(torch.ops.scanlib_cuda.selective_scan_fwd.default, args)


def _scan_nodes(graphs):
    return [
        node
        for gm in graphs
        for node in gm.graph.nodes
        if node.op == "call_function" and "selective_scan" in str(node.target)
    ]


def test_torch_compile_keeps_the_scan_as_one_node(emu):
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    g = torch.Generator().manual_seed(0)
    b, d, L, n = 1, 4, 33, 2
    args = [
        torch.randn(b, d, L, generator=g),
        torch.rand(b, d, L, generator=g),
        -torch.rand(d, n, generator=g) - 0.1,
        torch.randn(b, 1, n, L, generator=g),
        torch.randn(d, n, generator=g),
    ]

    def public(u, delta, A, B, C):
        return scanlib.selective_scan(u, delta, A, B, C, delta_softplus=True, backend=EMU) * 2

    def backend_op(u, delta, A, B, C):
        out, last, _ = torch.ops.scanlib_cuda.selective_scan_fwd(
            u, delta, A, B, C, None, None, None, None, True, False, True
        )
        return out * 2 + last.sum()

    for fn in (public, backend_op):
        torch._dynamo.reset()
        graphs.clear()
        assert torch.allclose(torch.compile(fn, backend=record, fullgraph=True)(*args), fn(*args))
        assert len(_scan_nodes(graphs)) == 1, fn.__name__

    # fake tensors and the registered autograd: a compiled forward + backward matches eager
    torch._dynamo.reset()
    leaves = [a.clone().requires_grad_() for a in args]
    eager = torch.autograd.grad(backend_op(*leaves).square().sum(), leaves)
    compiled = torch.compile(backend_op, backend="aot_eager", fullgraph=True)
    grads = torch.autograd.grad(compiled(*leaves).square().sum(), leaves)
    for x, y in zip(grads, eager):
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


# ---------------------------------------------------------------------- on a GPU
@pytest.mark.gpu
@settings(max_examples=40)
@given(case=scan_cases(dtypes=(F32, F16, BF16)))
def test_gpu_matches_the_reference(case):
    reasons = scanlib.get_backend("cuda").not_supported_reasons(case.inputs("cuda"))
    assert not reasons, reasons  # builds the library on first use if needed
    assert_scan_close(case, "cuda", "cuda")


@pytest.mark.gpu
def test_gpu_vmamba_stage_shape_against_torch_backend():
    g = torch.Generator(device="cuda").manual_seed(0)
    b, d, L, n, groups = 8, 384, 3136, 1, 4
    dev, bf = "cuda", torch.bfloat16
    kw = dict(
        u=torch.randn(b, d, L, device=dev, generator=g).to(bf),
        delta=torch.randn(b, d, L, device=dev, generator=g).to(bf),
        A=-torch.rand(d, n, device=dev, generator=g) - 0.5,
        B=torch.randn(b, groups, n, L, device=dev, generator=g).to(bf),
        C=torch.randn(b, groups, n, L, device=dev, generator=g).to(bf),
        D=torch.randn(d, device=dev, generator=g),
        delta_bias=torch.randn(d, device=dev, generator=g) * 0.1,
        delta_softplus=True,
        out_dtype=torch.float32,
    )
    out = scanlib.selective_scan(**kw, backend="cuda")
    ref = scanlib.selective_scan(**kw, backend="torch")
    assert out.dtype == torch.float32 and rel_error(out, ref) < 1e-4


@pytest.mark.gpu
def test_gpu_runs_on_the_current_stream_and_is_deterministic():
    case = ScanCase(2, 24, 2049, 16, G, G, 3, True, True, True, True, True, True, BF16, True, 7)
    results = []
    for _ in range(2):
        kw = case.make("cuda")
        names = [k for k, v in kw.items() if isinstance(v, torch.Tensor)]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            out, last = scanlib.selective_scan(**kw, backend="cuda")
            grads = torch.autograd.grad(out.sum() + last.sum(), [kw[k] for k in names])
        torch.cuda.current_stream().wait_stream(stream)
        results.append([out, last, *grads])
    torch.cuda.synchronize()
    for x, y in zip(*results):
        assert torch.equal(x, y)


@pytest.mark.gpu
def test_gpu_torch_compile_one_node():
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def step(u, delta, A, B, C):
        out, last, _ = torch.ops.scanlib_cuda.selective_scan_fwd(
            u, delta, A, B, C, None, None, None, None, True, False, False
        )
        return out * 2

    dev = "cuda"
    args = (
        torch.randn(2, 8, 100, device=dev),
        torch.rand(2, 8, 100, device=dev),
        -torch.rand(8, 4, device=dev),
        torch.randn(2, 2, 4, 100, device=dev),
        torch.randn(2, 2, 4, 100, device=dev),
    )
    torch._dynamo.reset()
    assert torch.allclose(torch.compile(step, backend=record, fullgraph=True)(*args), step(*args))
    assert len(_scan_nodes(graphs)) == 1
    torch._dynamo.reset()
