"""The cupy backend: its CUDA sources compile for sm_80/sm_90 without a GPU (nvcc or NVRTC), it
declines cleanly without cupy or a GPU, its kernels match the reference when run on the CPU
emulator, and (marked ``gpu``) on a real device through CuPy.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from scanlib_backends.cupy import CupyBackend, kernels

import scanlib
from scanlib.errors import BackendUnavailableError
from scanlib.inputs import BCForm, ScanInputs
from scanlib.registry import select
from scanlib.testing import ScanCase, assert_scan_close, backend_reasons, rel_error, scan_cases

PKG_DIR = Path(kernels.__file__).parent
CU_SOURCES = sorted(PKG_DIR.glob("*.cu"))
ARCHS = ("sm_80", "sm_90")
PIP_HINT = "pip install 'scanlib-vmamba[cupy]'"
HAS_CUPY = importlib.util.find_spec("cupy") is not None
RUN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _case(**kw) -> ScanCase:
    return ScanCase.example(**{**dict(seed=7), **kw})


# ---------------------------------------------------------------------- sources and the one list
def test_sources_are_listed():
    assert CU_SOURCES, "the cupy backend has no .cu source"
    assert {p.name for p in CU_SOURCES} == set(kernels.SOURCES)


def test_chunk_constant_matches_source():
    text = (PKG_DIR / kernels.SOURCE).read_text()
    m = re.search(r"#define\s+SCAN_CHUNK\s+(\d+)", text)
    assert m and int(m.group(1)) == kernels.CHUNK


def test_name_expressions_cover_every_kernel_and_dtype():
    expected = {f"{k}<{c}>" for k in kernels.KERNELS for c in kernels.CTYPES.values()}
    assert set(kernels.NAME_EXPRESSIONS) == expected
    assert set(kernels.CTYPES) == set(CupyBackend.dtypes)
    text = (PKG_DIR / kernels.SOURCE).read_text()
    for k in kernels.KERNELS:
        assert re.search(rf"__global__\s+void\s+{k}\s*\(", text), k


@pytest.mark.parametrize("src", CU_SOURCES, ids=lambda p: p.name)
def test_sources_include_nothing_nvrtc_lacks(src):
    # NVRTC has no host headers; CuPy ships only the fp16 header, so these sources include nothing
    includes = re.findall(r"^\s*#\s*include\s*[<\"]([^>\"]+)[>\"]", src.read_text(), re.M)
    assert includes == [], f"{src.name} includes {includes}"


# ---------------------------------------------------------------------- compile without a GPU
def _instantiation_unit(src: Path) -> str:
    """The source plus an explicit use of every instantiation the backend asks NVRTC for."""
    exprs = kernels.NAME_EXPRESSIONS if src.name == kernels.SOURCE else ()
    lines = [f'#include "{src}"', "extern void* const scanlib_instances[];"]
    lines.append("void* const scanlib_instances[] = {")
    lines += [f"    (void*)&{e}," for e in exprs] or ["    nullptr,"]
    lines.append("};")
    return "\n".join(lines) + "\n"


def _compile_nvcc(src: Path, arch: str, tmp: Path) -> None:
    tu = tmp / f"{src.stem}_{arch}.cu"
    tu.write_text(_instantiation_unit(src))
    cmd = ["nvcc", "-std=c++17", f"-arch={arch}", "-c", str(tu), "-o", str(tmp / f"{tu.stem}.o")]
    cmd += ["-Werror", "all-warnings"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout}\n{res.stderr}"


class _Nvrtc:
    """NVRTC through cupy.cuda.nvrtc, or through ctypes on a libnvrtc found on this machine."""

    def __init__(self):
        self.cupy_nvrtc = None
        self.lib = None
        if HAS_CUPY:
            try:
                from cupy.cuda import nvrtc

                self.cupy_nvrtc = nvrtc
                return
            except Exception:  # a broken cupy install: fall back to ctypes
                pass
        path = self._find_library()
        if path is not None:
            for b in sorted(glob.glob(str(Path(path).parent / "libnvrtc-builtins*.so*"))):
                ctypes.CDLL(b, mode=ctypes.RTLD_GLOBAL)  # so libnvrtc's dlopen finds them
            self.lib = ctypes.CDLL(path)

    @staticmethod
    def _find_library() -> str | None:
        env = os.environ.get("SCANLIB_NVRTC_LIB")
        if env and Path(env).exists():
            return env
        spec = importlib.util.find_spec("nvidia")
        for root in list(spec.submodule_search_locations) if spec else []:
            hits = sorted(glob.glob(os.path.join(root, "*", "lib", "libnvrtc.so*")))
            hits = [h for h in hits if "builtins" not in h and ".alt." not in h]
            if hits:
                return hits[0]
        return ctypes.util.find_library("nvrtc")

    @property
    def available(self) -> bool:
        return self.cupy_nvrtc is not None or self.lib is not None

    def compile(self, source: str, name: str, exprs, options) -> None:
        if self.cupy_nvrtc is not None:
            nv = self.cupy_nvrtc
            prog = nv.createProgram(source, name, (), ())
            try:
                # some CuPy releases spell it addAddNameExpression
                add = getattr(nv, "addNameExpression", None) or nv.addAddNameExpression
                for e in exprs:
                    add(prog, e)
                try:
                    nv.compileProgram(prog, list(options))
                except nv.NVRTCError as err:
                    raise AssertionError(f"NVRTC: {err}\n{nv.getProgramLog(prog)}") from err
                for e in exprs:
                    assert nv.getLoweredName(prog, e)
            finally:
                nv.destroyProgram(prog)
            return
        lib = self.lib
        prog = ctypes.c_void_p()
        assert (
            lib.nvrtcCreateProgram(
                ctypes.byref(prog), source.encode(), name.encode(), 0, None, None
            )
            == 0
        )
        try:
            for e in exprs:
                assert lib.nvrtcAddNameExpression(prog, e.encode()) == 0
            opts = [o.encode() for o in options]
            rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log)
            assert rc == 0, f"NVRTC error {rc}:\n{log.value.decode(errors='replace')}"
            for e in exprs:
                lowered = ctypes.c_char_p()
                assert lib.nvrtcGetLoweredName(prog, e.encode(), ctypes.byref(lowered)) == 0, e
        finally:
            lib.nvrtcDestroyProgram(ctypes.byref(prog))


_NVRTC: _Nvrtc | None = None


def _nvrtc() -> _Nvrtc:
    global _NVRTC
    if _NVRTC is None:
        _NVRTC = _Nvrtc()
    return _NVRTC


def _compile_nvrtc(src: Path, arch: str) -> None:
    exprs = kernels.NAME_EXPRESSIONS if src.name == kernels.SOURCE else ()
    options = (*kernels.COMPILE_OPTIONS, f"--gpu-architecture={arch}")
    _nvrtc().compile(src.read_text(), src.name, exprs, options)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("src", CU_SOURCES, ids=lambda p: p.name)
def test_cuda_sources_compile(src, arch, tmp_path):
    """Every .cu with every instantiation the backend uses, without a GPU: nvcc, else NVRTC."""
    if shutil.which("nvcc"):
        _compile_nvcc(src, arch, tmp_path)
    elif _nvrtc().available:
        _compile_nvrtc(src, arch)
    else:
        pytest.skip("neither nvcc nor NVRTC (cupy, or a libnvrtc) is available to compile CUDA")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("src", CU_SOURCES, ids=lambda p: p.name)
def test_cuda_sources_compile_with_nvrtc(src, arch):
    """The compiler CuPy really uses, where one can be found (set SCANLIB_NVRTC_LIB to point at a
    libnvrtc.so)."""
    if not _nvrtc().available:
        pytest.skip("NVRTC not found (no cupy, no libnvrtc); the nvcc test covers compilation")
    _compile_nvrtc(src, arch)


# ---------------------------------------------------------------------- declining and fallback
def test_import_and_capability_checks_do_not_import_cupy(tmp_path):
    # a cupy that fails on import: importing the backend and asking it questions must not load it
    (tmp_path / "cupy").mkdir()
    (tmp_path / "cupy" / "__init__.py").write_text("raise ImportError('cupy was imported')\n")
    code = (
        "import sys, torch, scanlib, scanlib_backends.cupy, scanlib_backends.cupy.kernels\n"
        "from scanlib.testing import ScanCase\n"
        "b = scanlib.get_backend('cupy')\n"
        "assert b.availability_reasons() == []\n"
        "kw = dict(u=torch.randn(1, 2, 5), delta=torch.rand(1, 2, 5), A=-torch.rand(2, 3),\n"
        "          B=torch.randn(1, 3, 5), C=torch.randn(1, 3, 5))\n"
        "print(scanlib.explain(**kw)['cupy'])\n"
        "print('cupy' in sys.modules)\n"
    )
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "False"
    assert "runs on cuda tensors" in res.stdout


def test_class_data():
    b = CupyBackend()
    assert b.name == "cupy" and b.priority == 30
    assert b.devices == frozenset({"cuda"})
    assert b.dtypes == frozenset(RUN_DTYPES)
    assert b.deterministic is False
    assert [r.extra for r in b.requires] == ["cupy"]


@pytest.fixture
def no_cupy(monkeypatch):
    """Pretend cupy is not installed (find_spec returns None for a None entry in sys.modules)."""
    monkeypatch.setitem(sys.modules, "cupy", None)


def test_without_cupy_declines_with_pip_extra(no_cupy):
    reasons = CupyBackend().availability_reasons()
    assert any(PIP_HINT in r for r in reasons), reasons
    assert "cupy" not in scanlib.available_backends()
    inputs = _case().inputs("cpu", requires_grad=False)
    assert any(PIP_HINT in r for r in scanlib.get_backend("cupy").not_supported_reasons(inputs))


def test_without_cupy_automatic_selection_falls_back(no_cupy):
    kw = _case().make("cpu", requires_grad=False)
    inputs = ScanInputs(**kw)
    assert select(inputs).name != "cupy"
    # a named list falls back past cupy to the next backend that can run the call
    with scanlib.use_backend(["cupy", "torch"]):
        out, last = scanlib.selective_scan(**kw)
    ref_out, ref_last = scanlib.selective_scan(**kw, backend="reference")
    assert rel_error(out, ref_out) < 1e-4 and rel_error(last, ref_last) < 1e-4
    explained = scanlib.explain(inputs)
    assert any(PIP_HINT in r for r in explained["cupy"])


def test_without_cupy_named_backend_raises_with_pip_extra(no_cupy):
    kw = _case().make("cpu", requires_grad=False)
    with pytest.raises(BackendUnavailableError, match=re.escape(PIP_HINT)):
        scanlib.selective_scan(**kw, backend="cupy")


def test_without_gpu_reports_no_cuda_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reasons = CupyBackend().device_reasons(torch.device("cuda"))
    assert any("no CUDA device" in r for r in reasons), reasons
    inputs = _case().inputs("cpu", requires_grad=False)
    assert any("no CUDA device" in r for r in CupyBackend().not_supported_reasons(inputs))


def test_declines_float64_and_huge_state():
    b = CupyBackend()
    r64 = b.not_supported_reasons(_case(dtype=torch.float64).inputs("cpu", requires_grad=False))
    assert any("float64" in r for r in r64)
    big = kernels.limits_reasons(
        _case(dstate=kernels.MAX_DSTATE + 1, seqlen=2).inputs("cpu", requires_grad=False)
    )
    assert any("exceeds" in r for r in big)
    assert (
        kernels.limits_reasons(
            _case(dstate=kernels.MAX_DSTATE, seqlen=2).inputs("cpu", requires_grad=False)
        )
        == []
    )


def test_launch_geometry_fits_the_kernels():
    for n in range(1, kernels.MAX_DSTATE + 1):
        spc = kernels.threads_per_channel(n)
        block = kernels.block_size(spc)
        assert spc >= n and spc & (spc - 1) == 0
        assert block % 32 == 0 and block % spc == 0 and block <= 1024
        assert spc <= 32 or block == spc  # wide layout: one channel per block
        # no opt-in needed: at most 48 KiB of dynamic shared memory
        assert kernels.fwd_shared_bytes(spc, block) <= 48 * 1024
        assert kernels.bwd_shared_bytes(spc, block) <= 48 * 1024


def test_runtime_glue_with_a_stand_in_cupy(monkeypatch):
    """runtime.launch with a stand-in cupy module: one RawModule built from the .cu and the shared
    name list, tensors handed over zero-copy through DLPack (bf16 as int16 bits), scalars typed
    to match the kernel parameters, the launch on torch's current stream."""
    import contextlib
    import types

    import numpy as np
    import torch.utils.dlpack

    calls = {"modules": [], "launches": [], "streams": []}

    class FakeModule:
        def __init__(self, code, options, name_expressions):
            calls["modules"].append((code, options, tuple(name_expressions)))

        def get_function(self, name):
            def fn(grid, block, args, shared_mem=0):
                calls["launches"].append((name, grid, block, args, shared_mem))

            return fn

    cuda = types.SimpleNamespace(
        Device=lambda i: contextlib.nullcontext(),
        ExternalStream=lambda ptr: calls["streams"].append(ptr) or contextlib.nullcontext(),
    )
    fake = types.ModuleType("cupy")
    fake.RawModule = FakeModule
    fake.cuda = cuda
    fake.from_dlpack = lambda capsule: torch.utils.dlpack.from_dlpack(capsule)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.delitem(sys.modules, "scanlib_backends.cupy.runtime", raising=False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda i: contextlib.nullcontext())
    monkeypatch.setattr(
        torch.cuda, "current_stream", lambda i=None: types.SimpleNamespace(cuda_stream=4242)
    )
    from scanlib_backends.cupy import runtime

    monkeypatch.setattr(runtime, "_module", None)
    case = _case(dtype=torch.bfloat16, B_form=BCForm.CONSTANT, has_D=False, out_float32=True)
    inputs = case.inputs("cpu", requires_grad=False)
    out, last, ckpt = kernels.ScanKernels(runtime.launch, save_states=True).forward(inputs)
    assert out.dtype == torch.float32 and ckpt.shape == (2, 6, 1, 4)
    ((code, options, names),) = calls["modules"]
    assert code == (PKG_DIR / kernels.SOURCE).read_text() and options == kernels.COMPILE_OPTIONS
    assert names == kernels.NAME_EXPRESSIONS
    assert calls["streams"] == [4242]
    ((name, grid, block, args, smem),) = calls["launches"]
    assert (
        name == "scan_fwd<scan_bfloat16>" and grid == (1,) and block == (128,)
    )  # 12 channels, 32 per block
    assert smem == kernels.fwd_shared_bytes(4, 128)
    # u, delta, z: zero-copy views of the inputs' bf16 storage as int16
    for arg, t in zip(args[:3], (inputs.u, inputs.delta, inputs.z)):
        assert isinstance(arg, torch.Tensor) and arg.dtype == torch.int16
        assert arg.data_ptr() == t.data_ptr()
    assert args[6] == np.uint64(0) and type(args[6]) is np.uint64  # D absent: null pointer
    assert args[9].data_ptr() == out.data_ptr() and args[11].data_ptr() == ckpt.data_ptr()
    scalars = args[12:]
    assert all(type(a) is np.int32 for a in scalars[:8])  # sizes and flags
    assert all(type(a) is np.int64 for a in scalars[8:17])  # u, delta, z strides
    assert [type(a) for a in scalars[17:]] == [np.int32, np.int32] + [np.int64] * 4 + [
        np.int32,
        np.int32,
    ] + [np.int64] * 4


# ---------------------------------------------------------------------- the kernels on the CPU emulator
@pytest.fixture(scope="module")
def emulated():
    from scanlib_backends.cupy import emulator

    if emulator.find_compiler() is None:
        pytest.skip("no host C++ compiler for the CUDA emulator")
    backend = emulator.emulated_backend(emulator.build())
    scanlib.register_backend(backend, replace=True)
    yield backend
    scanlib.unregister_backend(backend.name)


def test_emulator_half_and_bfloat16_conversions(emulated):
    from scanlib_backends.cupy import emulator

    lib = emulator.build().lib
    g = torch.Generator().manual_seed(0)
    vals = torch.cat(
        [
            torch.randn(2000, generator=g) * 10.0 ** torch.randint(-9, 6, (2000,), generator=g),
            torch.tensor(
                [0.0, -0.0, 65504.0, 65519.0, 65520.0, 1e6, -1e6, 2.0**-24, 2.0**-25, 3 * 2.0**-26]
            ),
            torch.tensor(
                [
                    2.0**-14,
                    2.0**-15 * 1.5,
                    1.0 + 2.0**-11,
                    1.0 + 3 * 2.0**-11,
                    float("inf"),
                    -float("inf"),
                ]
            ),
        ]
    ).float()
    # exact ties of bf16 rounding: halfway between two bf16 values
    ties = (torch.arange(1, 200, dtype=torch.int32) * 65536 + 32768).view(torch.float32)
    vals = torch.cat([vals, ties, -ties])
    half_bits = torch.tensor([lib.emu_float_to_half(float(v)) for v in vals], dtype=torch.int32)
    assert torch.equal(half_bits, vals.half().view(torch.int16).to(torch.int32) & 0xFFFF)
    bf_bits = torch.tensor([lib.emu_float_to_bfloat16(float(v)) for v in vals], dtype=torch.int32)
    assert torch.equal(bf_bits, vals.bfloat16().view(torch.int16).to(torch.int32) & 0xFFFF)
    every_half = torch.arange(0, 65536, dtype=torch.int32).to(torch.int16).view(torch.float16)
    finite = torch.isfinite(every_half)
    back = torch.tensor(
        [lib.emu_half_to_float(int(b) & 0xFFFF) for b in every_half.view(torch.int16)]
    )
    assert torch.equal(back[finite], every_half.float()[finite])
    assert lib.emu_half_to_float(0x7E00) != lib.emu_half_to_float(0x7E00)  # nan


EMULATED_CASES = {
    "narrow-grouped-merge": _case(dim=16, groups=2, dstate=4, seqlen=70),
    "narrow-N1-sequence": _case(
        dstate=1, B_form=BCForm.SEQUENCE, C_form=BCForm.CONSTANT, seqlen=65
    ),
    "narrow-N3-tail-block": _case(batch=3, dim=5, groups=5, dstate=3, seqlen=33),
    "narrow-N32": _case(batch=1, dim=2, groups=1, dstate=32, seqlen=20, B_form=BCForm.CONSTANT),
    "wide-N40": _case(batch=1, dim=2, groups=2, dstate=40, seqlen=40, C_form=BCForm.SEQUENCE),
    "multi-segment-L300": _case(batch=1, dim=3, groups=3, dstate=2, seqlen=300, has_z=False),
    "fp16-out32": _case(dtype=torch.float16, out_float32=True, dstate=5, seqlen=45),
    "bf16-plain": _case(
        dtype=torch.bfloat16,
        has_D=False,
        has_z=False,
        has_delta_bias=False,
        delta_softplus=False,
        has_initial_state=False,
        return_last_state=False,
    ),
}


@pytest.mark.parametrize("name", list(EMULATED_CASES))
def test_emulated_kernels_match_reference(emulated, name):
    assert_scan_close(EMULATED_CASES[name], emulated.name, "cpu")


def test_emulated_wide_N256(emulated):
    assert_scan_close(_case(batch=1, dim=1, groups=1, dstate=256, seqlen=9), emulated.name, "cpu")


def test_emulated_strided_inputs_and_partial_grads(emulated):
    """Non-contiguous u/z/B, a broadcast (stride 0) delta, and gradients from the output only or
    from the last state only."""
    kw = _case(dim=4, groups=2, dstate=3, seqlen=37).make("cpu", requires_grad=True)
    g = torch.Generator().manual_seed(3)
    b, d, L, n = 2, 4, 37, 3
    sources = {
        "u": torch.randn(b, L, d, generator=g).requires_grad_(),
        "z": torch.randn(b, L, d, generator=g).requires_grad_(),
        "delta": (torch.rand(1, d, L, generator=g) - 1.0).requires_grad_(),
        "B": torch.randn(b, 2, L, n, generator=g).requires_grad_(),
    }
    kw["u"] = sources["u"].transpose(1, 2)
    kw["z"] = sources["z"].transpose(1, 2)
    kw["delta"] = sources["delta"].expand(b, d, L)
    kw["B"] = sources["B"].transpose(2, 3)
    leaves = list(sources.values()) + [
        v for v in kw.values() if isinstance(v, torch.Tensor) and v.is_leaf
    ]
    for loss_of in ("out", "last"):
        res = {}
        for backend in (emulated.name, "reference"):
            out, last = scanlib.selective_scan(**kw, backend=backend)
            loss = out.sum() if loss_of == "out" else (last * last).sum()
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
            res[backend] = (out.detach(), last.detach(), grads)
        e_out, e_last, e_grads = res[emulated.name]
        r_out, r_last, r_grads = res["reference"]
        assert rel_error(e_out, r_out) < 1e-5 and rel_error(e_last, r_last) < 1e-5
        for eg, rg in zip(e_grads, r_grads):
            eg = torch.zeros_like(rg) if eg is None else eg
            rg = torch.zeros_like(eg) if rg is None else rg
            assert rel_error(eg, rg) < 1e-4, loss_of


def test_emulated_inference_saves_no_states(emulated):
    from scanlib_backends.cupy import emulator

    emu = emulator.build()
    before = len(emu.launches)
    kw = _case(seqlen=300).make("cpu", requires_grad=False)
    out, last = scanlib.selective_scan(**kw, backend=emulated.name)
    ref_out, ref_last = scanlib.selective_scan(**kw, backend="reference")
    assert rel_error(out, ref_out) < 1e-5 and rel_error(last, ref_last) < 1e-5
    assert [x[0] for x in emu.launches[before:]] == ["scan_fwd<float>"]


# the module-scoped emulator fixture is shared by every example on purpose
@settings(
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
@given(
    case=scan_cases(
        dtypes=RUN_DTYPES,
        seqlens=(1, 2, 7, 33, 63, 65, 257, 300),
        dims=(1, 2, 3, 5, 6, 12),
        dstates=(1, 2, 3, 4, 8, 16, 17, 40),
        max_elements=1 << 12,
    )
)
def test_emulated_property_suite(emulated, case):
    assert not backend_reasons(emulated.name, case, "cpu")
    assert_scan_close(case, emulated.name, "cpu")


# ---------------------------------------------------------------------- on a GPU (bench/gpu_check.sh)
needs_cupy = pytest.mark.skipif(not HAS_CUPY, reason=f"cupy is not installed: {PIP_HINT}")


@pytest.mark.gpu
@needs_cupy
@given(case=scan_cases(dtypes=RUN_DTYPES))
def test_gpu_property_suite(case):
    reasons = backend_reasons("cupy", case, "cuda")
    assume(not reasons)
    assert_scan_close(case, "cupy", "cuda")


GPU_CASES = {
    "wide-N64": _case(dstate=64, seqlen=300),
    "wide-N256": _case(batch=1, dim=3, groups=1, dstate=256, seqlen=70),
    "N17-L2049": _case(dstate=17, seqlen=2049, dtype=torch.float16),
    "N16-merge-bf16": _case(
        batch=2, dim=48, groups=2, dstate=16, seqlen=600, dtype=torch.bfloat16, out_float32=True
    ),
    "N1-long": _case(batch=2, dim=64, groups=4, dstate=1, seqlen=3000),
    "constant-BC": _case(B_form=BCForm.CONSTANT, C_form=BCForm.CONSTANT, dstate=8, seqlen=513),
}


@pytest.mark.gpu
@needs_cupy
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_gpu_cases(name):
    assert_scan_close(GPU_CASES[name], "cupy", "cuda")


@pytest.mark.gpu
@needs_cupy
def test_gpu_side_stream_and_strided_inputs():
    case = _case(dim=8, groups=2, dstate=16, seqlen=257)
    kw = case.make("cuda", requires_grad=False)
    kw["u"] = kw["u"].transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous view
    ref_out, ref_last = scanlib.selective_scan(**kw, backend="torch")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out, last = scanlib.selective_scan(**kw, backend="cupy")
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    assert rel_error(out, ref_out) < 2e-4 and rel_error(last, ref_last) < 2e-4
    # forward has no atomics: bitwise repeatable
    again, _ = scanlib.selective_scan(**kw, backend="cupy")
    assert torch.equal(out, again)


@pytest.mark.gpu
@needs_cupy
def test_gpu_cuda_graph_capture():
    case = _case(dim=8, groups=2, dstate=16, seqlen=128, has_initial_state=False)
    kw = case.make("cuda", requires_grad=False)
    static = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    scanlib.selective_scan(**static, backend="cupy")  # warm-up: compiles the module
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, last = scanlib.selective_scan(**static, backend="cupy")
    fresh = _case(dim=8, groups=2, dstate=16, seqlen=128, has_initial_state=False, seed=99).make(
        "cuda", requires_grad=False
    )
    for k, v in fresh.items():
        if isinstance(v, torch.Tensor):
            static[k].copy_(v)
    graph.replay()
    torch.cuda.synchronize()
    ref_out, ref_last = scanlib.selective_scan(**fresh, backend="torch")
    assert rel_error(out, ref_out) < 2e-4 and rel_error(last, ref_last) < 2e-4


@pytest.mark.gpu
@needs_cupy
@pytest.mark.parametrize("dtype", RUN_DTYPES, ids=str)
def test_gpu_model_sized_call_matches_torch_backend(dtype):
    """A VMamba-like call (grouped B/C, 4 groups, N=16, L=1024), forward and every gradient,
    against the torch backend on the same GPU."""
    case = _case(
        batch=2, dim=192, groups=4, dstate=16, seqlen=1024, dtype=dtype, has_initial_state=False
    )
    kw = case.make("cuda", requires_grad=True)
    res = {}
    for backend in ("cupy", "torch"):
        out, last = scanlib.selective_scan(**kw, backend=backend)
        loss = out.float().pow(2).mean() + last.pow(2).mean()
        params = [v for v in kw.values() if isinstance(v, torch.Tensor)]
        res[backend] = (out.detach(), last.detach(), torch.autograd.grad(loss, params))
    tol = {torch.float32: 2e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    for a, b in zip(res["cupy"][:2] + res["cupy"][2], res["torch"][:2] + res["torch"][2]):
        assert rel_error(a, b) < tol
