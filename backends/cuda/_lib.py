"""ctypes view of the compiled library: the params struct and the loaded functions.

``Params`` mirrors ``scanlib_scan_params`` in ``csrc/scanlib_cuda.h`` field by field (every field
8 bytes: no padding); the library rejects a mismatched ``abi_version`` or ``struct_size`` and a
test compares the field names with the header.
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

from scanlib.errors import ScanlibError

ABI_VERSION = 1
F32, F16, BF16 = 0, 1, 2

_i64 = ctypes.c_int64
_ptr = ctypes.c_void_p

_INT_FIELDS = [
    "abi_version",
    "struct_size",
    "batch",
    "dim",
    "seqlen",
    "dstate",
    "in_dtype",
    "out_dtype",
    "delta_softplus",
    "channels_per_block",
    "B_const",
    "B_groups",
    "B_stride_batch",
    "B_stride_group",
    "B_stride_n",
    "C_const",
    "C_groups",
    "C_stride_batch",
    "C_stride_group",
    "C_stride_n",
]
_ROWS = ("u", "delta", "z", "out", "dout", "du", "ddelta", "dz")
for _name in _ROWS:
    _INT_FIELDS += [f"{_name}_stride_batch", f"{_name}_stride_dim"]
_PTR_FIELDS = [
    "u",
    "delta",
    "z",
    "B",
    "C",
    "A",
    "D",
    "delta_bias",
    "initial_state",
    "out",
    "last_state",
    "chunk_states",
    "dout",
    "dlast",
    "du",
    "ddelta",
    "dz",
    "dA",
    "dD",
    "ddelta_bias",
    "dinitial_state",
    "dB",
    "dC",
]


class Params(ctypes.Structure):
    _fields_ = [(n, _i64) for n in _INT_FIELDS] + [(n, _ptr) for n in _PTR_FIELDS]


class KernelError(ScanlibError, RuntimeError):
    """The compiled library refused a call (the message is the library's own)."""


class Library:
    """A loaded ``libscanlib_cuda.so`` (or the CPU emulation ``libscanlib_emu.so``)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            lib = ctypes.CDLL(str(self.path))
        except OSError as e:
            raise KernelError(
                f"cannot load {self.path}: {e}; rebuild it with `python -m scanlib.build --force`"
            ) from e
        for name in (
            "scanlib_abi_version",
            "scanlib_params_size",
            "scanlib_chunk_size",
            "scanlib_max_dstate",
        ):
            getattr(lib, name).restype = ctypes.c_int64
            getattr(lib, name).argtypes = []
        lib.scanlib_build_kind.restype = ctypes.c_char_p
        lib.scanlib_last_error.restype = ctypes.c_char_p
        for name in ("scanlib_selective_scan_fwd", "scanlib_selective_scan_bwd"):
            getattr(lib, name).restype = ctypes.c_int
            getattr(lib, name).argtypes = [ctypes.POINTER(Params), ctypes.c_void_p]
        if lib.scanlib_abi_version() != ABI_VERSION or lib.scanlib_params_size() != ctypes.sizeof(
            Params
        ):
            raise KernelError(
                f"{self.path} has ABI {lib.scanlib_abi_version()} ({lib.scanlib_params_size()}-byte params); "
                f"this scanlib expects ABI {ABI_VERSION} ({ctypes.sizeof(Params)} bytes): "
                "rebuild with `python -m scanlib.build --force`"
            )
        self._lib = lib
        self.kind = lib.scanlib_build_kind().decode()
        self.chunk = int(lib.scanlib_chunk_size())
        self.max_dstate = int(lib.scanlib_max_dstate())

    def _call(self, fn, params: Params, stream: int | None, what: str) -> None:
        params.abi_version = ABI_VERSION
        params.struct_size = ctypes.sizeof(Params)
        rc = fn(ctypes.byref(params), ctypes.c_void_p(stream or 0))
        if rc != 0:
            raise KernelError(
                f"scanlib {self.kind} {what}: {self._lib.scanlib_last_error().decode()}"
            )

    def forward(self, params: Params, stream: int | None) -> None:
        self._call(self._lib.scanlib_selective_scan_fwd, params, stream, "forward")

    def backward(self, params: Params, stream: int | None) -> None:
        self._call(self._lib.scanlib_selective_scan_bwd, params, stream, "backward")


_lock = threading.Lock()
_loaded: dict[str, Library] = {}


def load(path: str | Path) -> Library:
    """Load (once per path) a built library."""
    key = str(Path(path).resolve())
    with _lock:
        lib = _loaded.get(key)
        if lib is None:
            lib = _loaded[key] = Library(key)
        return lib
