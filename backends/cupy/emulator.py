"""Run this backend's CUDA kernels on the CPU (for tests and for debugging kernel edits without a GPU).

:func:`build` compiles ``selective_scan.cu`` together with ``cuda_emulator.h`` into a shared
library with the host C++ compiler (``$CXX``, else ``g++`` or ``clang++``); :class:`Emulator`'s
``launch`` has the same signature as the CuPy launcher, so :class:`kernels.ScanKernels` runs
unchanged on CPU tensors. Each CUDA thread is a fiber, barriers and warp shuffles are emulated, and
misuse (divergent barriers, shared-memory overflow, wrong argument sizes) raises
:class:`EmulatorError`. Slow: keep the sizes small.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from importlib import resources
from pathlib import Path

import torch

from . import kernels

HEADER = "cuda_emulator.h"
#: the name of the kernels' ``extern __shared__`` array
SMEM_SYMBOL = "scan_smem"

_lock = threading.Lock()
_cache: dict[str, Emulator] = {}


class EmulatorError(RuntimeError):
    """The emulated kernel misbehaved or could not be launched."""


def find_compiler() -> str | None:
    """The host C++ compiler the emulator builds with, or None."""
    cxx = os.environ.get("CXX")
    if cxx and shutil.which(cxx):
        return cxx
    for c in ("g++", "clang++"):
        if shutil.which(c):
            return c
    return None


def translation_unit(package_dir: Path) -> str:
    """The C++ source: the emulator header, every kernel source, and a dispatch table over
    :data:`kernels.NAME_EXPRESSIONS`."""
    lines = [f'#include "{package_dir / HEADER}"']
    lines += [f'#include "{package_dir / s}"' for s in kernels.SOURCES]
    lines.append(f"alignas(16) float {SMEM_SYMBOL}[EMU_SMEM_BYTES / 4];")
    lines.append("static const emu::Kernel emu_table[] = {")
    lines += [f"    EMU_KERNEL({e})," for e in kernels.NAME_EXPRESSIONS]
    lines.append("};")
    lines.append(
        """
extern "C" int emu_launch(const char* name, int grid, int block, int smem, int nargs, void** args,
                          const int* sizes, unsigned int seed, char* err, int errlen) {
  emu::smem = reinterpret_cast<unsigned char*>(scan_smem);
  return emu::launch(emu_table, (int)(sizeof emu_table / sizeof emu_table[0]), name, grid, block,
                     smem, nargs, args, sizes, seed, err, errlen);
}
extern "C" unsigned short emu_float_to_half(float f) { return scan_float_to_half(f); }
extern "C" float emu_half_to_float(unsigned short h) { return scan_half_to_float(h); }
extern "C" unsigned short emu_float_to_bfloat16(float f) { return scan_float_to_bfloat16(f); }
"""
    )
    return "\n".join(lines) + "\n"


_CTYPE = {"i32": ctypes.c_int32, "i64": ctypes.c_int64, "f32": ctypes.c_float}


class Emulator:
    """A compiled emulator library. ``launch`` matches :data:`kernels.Launcher`."""

    def __init__(self, path: Path):
        self.path = path
        self.lib = ctypes.CDLL(str(path))
        self.lib.emu_launch.restype = ctypes.c_int
        self.lib.emu_float_to_half.restype = ctypes.c_uint16
        self.lib.emu_float_to_half.argtypes = [ctypes.c_float]
        self.lib.emu_half_to_float.restype = ctypes.c_float
        self.lib.emu_half_to_float.argtypes = [ctypes.c_uint16]
        self.lib.emu_float_to_bfloat16.restype = ctypes.c_uint16
        self.lib.emu_float_to_bfloat16.argtypes = [ctypes.c_float]
        self.seed = 0
        self.launches: list[tuple[str, int, int, int]] = []

    def launch(
        self,
        name: str,
        grid: int,
        block: int,
        shared_mem: int,
        args: list[kernels.Arg],
        device: torch.device,
    ) -> None:
        if device.type != "cpu":
            raise EmulatorError(f"the emulator runs on CPU tensors, not {device}")
        values = []
        for kind, v in args:
            if kind == "ptr":
                if v is not None and v.device.type != "cpu":
                    raise EmulatorError("a tensor argument is not on the CPU")
                values.append(ctypes.c_void_p(0 if v is None else v.data_ptr()))
            else:
                values.append(_CTYPE[kind](v))
        n = len(values)
        argv = (ctypes.c_void_p * n)(
            *[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values]
        )
        sizes = (ctypes.c_int * n)(*[ctypes.sizeof(v) for v in values])
        err = ctypes.create_string_buffer(512)
        self.seed += 1
        self.launches.append((name, grid, block, shared_mem))
        rc = self.lib.emu_launch(
            name.encode(),
            ctypes.c_int(grid),
            ctypes.c_int(block),
            ctypes.c_int(shared_mem),
            ctypes.c_int(n),
            argv,
            sizes,
            ctypes.c_uint(self.seed),
            err,
            ctypes.c_int(len(err)),
        )
        if rc != 0:
            raise EmulatorError(
                f"{name} (grid {grid}, block {block}, smem {shared_mem}): {err.value.decode()}"
            )


def build(cache_dir: str | os.PathLike | None = None) -> Emulator:
    """Compile (or reuse) the emulator library for the current kernel sources."""
    cxx = find_compiler()
    if cxx is None:
        raise EmulatorError("no host C++ compiler (set CXX, or install g++)")
    pkg = Path(str(resources.files(__package__)))
    tu = translation_unit(pkg)
    texts = [tu] + [(pkg / f).read_text(encoding="utf-8") for f in (HEADER, *kernels.SOURCES)]
    key = hashlib.sha256("\0".join([cxx, *texts]).encode()).hexdigest()[:16]
    with _lock:
        if key in _cache:
            return _cache[key]
        out_dir = (
            Path(cache_dir)
            if cache_dir is not None
            else Path(tempfile.gettempdir()) / "scanlib_cupy_emulator"
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        lib = out_dir / f"scan_emulator_{key}.so"
        if not lib.exists():
            src = out_dir / f"scan_emulator_{key}.cpp"
            src.write_text(tu, encoding="utf-8")
            tmp = out_dir / f"scan_emulator_{key}.{os.getpid()}.so"
            cmd = [cxx, "-std=c++17", "-O1", "-shared", "-fPIC", "-o", str(tmp), str(src)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise EmulatorError(
                    f"building the emulator failed:\n{' '.join(cmd)}\n{res.stderr[-4000:]}"
                )
            os.replace(tmp, lib)
        emu = Emulator(lib)
        _cache[key] = emu
        return emu


def _nan_empty(size, *, dtype, device):
    return torch.full(size, float("nan"), dtype=dtype, device=device)


def emulated_backend(emulator: Emulator | None = None, *, nan_fill: bool = True):
    """A ``cupy``-like backend named ``cupy-emulated`` that runs the kernels on CPU tensors through
    the emulator. Register it yourself (``scanlib.register_backend``); it is never chosen
    automatically (priority -1000). ``nan_fill`` fills every kernel output with NaN before the
    launch, so an element the kernels forget to write fails the comparison."""
    from scanlib.registry import Backend

    from . import CupyBackend

    emu = emulator or build()

    class EmulatedCupyBackend(CupyBackend):
        name = "cupy-emulated"
        priority = -1000
        devices = frozenset({"cpu"})
        requires = ()
        description = "the cupy backend's CUDA kernels on the CPU emulator (slow; tests)"

        def device_reasons(self, device: torch.device) -> list[str]:
            return Backend.device_reasons(self, device)

        def _launcher(self):
            return emu.launch

        def _alloc(self):
            return _nan_empty if nan_fill else torch.empty

    return EmulatedCupyBackend()
