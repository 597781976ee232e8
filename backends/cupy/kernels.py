"""Host side of the CUDA kernels in ``selective_scan.cu``: the instantiation list, launch
geometry, argument lists, and the forward/backward glue for :func:`scanlib.autograd.scan_with_autograd`.

Nothing here imports cupy. Kernels are launched through a *launcher*, a callable
``launch(name, grid, block, shared_mem, args, device)`` where ``name`` is one of
:data:`NAME_EXPRESSIONS` and ``args`` is a list of ``(kind, value)`` pairs with kind ``"ptr"``
(a tensor or None), ``"i32"``, ``"i64"``, ``"f32"``; ``runtime.launch`` runs them with CuPy on the GPU,
``emulator.Emulator.launch`` on the CPU (tests). The ``(kind, value)`` list must match the
kernel's parameter list exactly; the emulator checks every size.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from typing import Any

import torch

from scanlib.inputs import BCForm, ScanInputs

#: the CUDA sources of this backend (each is one self-contained translation unit)
SOURCES = ("selective_scan.cu",)
SOURCE = SOURCES[0]
#: steps per chunk; must equal SCAN_CHUNK in selective_scan.cu
CHUNK = 32
#: chunks per checkpoint segment: the forward keeps the state every NSUB * CHUNK steps
NSUB = 8
#: largest state size: one thread per state, at most 256 threads per channel
MAX_DSTATE = 256
#: NVRTC options (CuPy adds the architecture)
COMPILE_OPTIONS = ("-std=c++17",)

#: the kernel's element type for each input dtype (16-bit types travel as raw bits)
CTYPES: dict[torch.dtype, str] = {
    torch.float32: "float",
    torch.float16: "scan_half",
    torch.bfloat16: "scan_bfloat16",
}
KERNELS = ("scan_fwd", "scan_bwd")
#: every template instantiation the backend uses: the RawModule's name_expressions and the list
#: the compile test instantiates
NAME_EXPRESSIONS: tuple[str, ...] = tuple(f"{k}<{c}>" for k in KERNELS for c in CTYPES.values())

Arg = tuple[str, Any]
Launcher = Callable[[str, int, int, int, list[Arg], torch.device], None]


def kernel_name(kernel: str, dtype: torch.dtype) -> str:
    return f"{kernel}<{CTYPES[dtype]}>"


def read_source(name: str = SOURCE) -> str:
    """The text of one of this backend's ``.cu`` files (shipped as package data)."""
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


# ---------------------------------------------------------------------- launch geometry
def threads_per_channel(dstate: int) -> int:
    """N rounded up to a power of two: one thread per state."""
    return 1 << (dstate - 1).bit_length()


def block_size(spc: int) -> int:
    """128 threads (several channels) up to 32 threads per channel, else one channel per block."""
    return 128 if spc <= 32 else spc


def fwd_shared_bytes(spc: int, block: int) -> int:
    return (block // min(spc, 32)) * CHUNK * 4


def bwd_shared_bytes(spc: int, block: int, nsub: int = NSUB) -> int:
    floats = (CHUNK + nsub) * block
    if spc > 32:
        floats += 2 * (block // 32) * CHUNK + CHUNK
    return floats * 4


def grid_size(batch: int, dim: int, spc: int, block: int) -> int:
    return -(-batch * dim // (block // spc))


def num_checkpoints(seqlen: int, nsub: int = NSUB) -> int:
    return -(-seqlen // (nsub * CHUNK))


# ---------------------------------------------------------------------- argument helpers
def _dense(t: torch.Tensor | None) -> torch.Tensor | None:
    """Detached; copied when a stride is 0 (a broadcast view: DLPack consumers may refuse it)."""
    if t is None:
        return None
    t = t.detach()
    if any(s == 0 and n > 1 for s, n in zip(t.stride(), t.shape)):
        t = t.contiguous()
    return t


def _param(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to(torch.float32).contiguous()


def _strides3(t: torch.Tensor | None) -> list[Arg]:
    s = (0, 0, 0) if t is None else t.stride()
    return [("i64", int(x)) for x in s]


class _BC:
    """B or C as the kernel reads it: a [B, G, N, L] stride view, or a float32 [D, N] constant."""

    def __init__(self, inputs: ScanInputs, name: str):
        t = getattr(inputs, name)
        self.form: BCForm = getattr(inputs, f"{name}_form")
        if self.form is BCForm.CONSTANT:
            self.tensor = _param(t)  # [D, N]
            self.groups = inputs.dim
            self.strides = (0, self.tensor.stride(0), self.tensor.stride(1), 0)
            self.is_f32 = 1
        elif self.form is BCForm.SEQUENCE:
            self.tensor = _dense(t)  # [B, N, L]
            self.groups = 1
            s = self.tensor.stride()
            self.strides = (s[0], 0, s[1], s[2])
            self.is_f32 = 0
        else:
            self.tensor = _dense(t)  # [B, G, N, L]
            self.groups = t.shape[1]
            self.strides = tuple(self.tensor.stride())
            self.is_f32 = 0

    def args(self) -> list[Arg]:
        return [("i32", self.groups), ("i32", self.is_f32)] + [
            ("i64", int(s)) for s in self.strides
        ]

    def grad_buffer(self, inputs: ScanInputs, alloc) -> torch.Tensor:
        b, n, L = inputs.batch, inputs.dstate, inputs.seqlen
        if self.form is BCForm.CONSTANT:
            return alloc((b, inputs.dim, n), dtype=torch.float32, device=inputs.device)
        return torch.zeros((b, self.groups, n, L), dtype=torch.float32, device=inputs.device)

    def grad(self, buf: torch.Tensor) -> torch.Tensor:
        if self.form is BCForm.CONSTANT:
            return buf.sum(0)  # per-batch partials -> [D, N]
        if self.form is BCForm.SEQUENCE:
            return buf.squeeze(1)
        return buf


# ---------------------------------------------------------------------- forward / backward
class ScanKernels:
    """``scanlib.autograd.ScanKernels`` over the CUDA kernels, run by ``launch``.

    save_states: keep the checkpoint states ([B, D, ceil(L / 256), N] float32) the backward
    restarts from; off for inference. ``alloc`` allocates every output the kernels fully
    overwrite (tests pass a NaN-filling one to catch unwritten elements).
    """

    def __init__(self, launch: Launcher, save_states: bool, alloc=torch.empty):
        self.launch = launch
        self.save_states = save_states
        self.alloc = alloc

    def forward(self, inputs: ScanInputs) -> tuple[torch.Tensor, torch.Tensor, Any]:
        b, d, L, n = inputs.batch, inputs.dim, inputs.seqlen, inputs.dstate
        dev = inputs.device
        spc = threads_per_channel(n)
        block = block_size(spc)
        u, delta, z = _dense(inputs.u), _dense(inputs.delta), _dense(inputs.z)
        Bv, Cv = _BC(inputs, "B"), _BC(inputs, "C")
        out_dtype = inputs.result_dtype
        out_f32 = out_dtype != inputs.dtype
        out = self.alloc((b, d, L), dtype=torch.float32 if out_f32 else inputs.dtype, device=dev)
        last = self.alloc((b, d, n), dtype=torch.float32, device=dev)
        ckpt = None
        if self.save_states:
            ckpt = self.alloc((b, d, num_checkpoints(L), n), dtype=torch.float32, device=dev)
        args: list[Arg] = [
            ("ptr", u),
            ("ptr", delta),
            ("ptr", z),
            ("ptr", _param(inputs.A)),
            ("ptr", Bv.tensor),
            ("ptr", Cv.tensor),
            ("ptr", _param(inputs.D)),
            ("ptr", _param(inputs.delta_bias)),
            ("ptr", _param(inputs.initial_state)),
            ("ptr", out),
            ("ptr", last),
            ("ptr", ckpt),
            ("i32", b),
            ("i32", d),
            ("i32", L),
            ("i32", n),
            ("i32", spc),
            ("i32", NSUB),
            ("i32", int(inputs.delta_softplus)),
            ("i32", int(out_f32)),
            *_strides3(u),
            *_strides3(delta),
            *_strides3(z),
            *Bv.args(),
            *Cv.args(),
        ]
        self.launch(
            kernel_name("scan_fwd", inputs.dtype),
            grid_size(b, d, spc, block),
            block,
            fwd_shared_bytes(spc, block),
            args,
            dev,
        )
        if out.dtype != out_dtype:  # out_dtype=float64: the kernel writes float32
            out = out.to(out_dtype)
        return out, last, ckpt

    def backward(
        self,
        inputs: ScanInputs,
        saved: Any,
        dout: torch.Tensor | None,
        dlast: torch.Tensor | None,
    ) -> dict[str, torch.Tensor | None]:
        ckpt = saved
        if ckpt is None:
            raise RuntimeError(
                "cupy backend: backward needs the states saved by a forward with save_states"
            )
        b, d, L, n = inputs.batch, inputs.dim, inputs.seqlen, inputs.dstate
        dev, T = inputs.device, inputs.dtype
        spc = threads_per_channel(n)
        block = block_size(spc)
        u, delta, z = _dense(inputs.u), _dense(inputs.delta), _dense(inputs.z)
        Bv, Cv = _BC(inputs, "B"), _BC(inputs, "C")
        if dout is not None:
            dout = _dense(dout)
            if dout.dtype not in (T, torch.float32):
                dout = dout.to(torch.float32)
        dout_f32 = int(dout is not None and dout.dtype == torch.float32)
        dlast = _param(dlast)
        du = self.alloc((b, d, L), dtype=T, device=dev)
        ddelta = self.alloc((b, d, L), dtype=T, device=dev)
        dz = None if z is None else self.alloc((b, d, L), dtype=T, device=dev)
        dA = self.alloc((b, d, n), dtype=torch.float32, device=dev)
        dD = None if inputs.D is None else self.alloc((b, d), dtype=torch.float32, device=dev)
        dbias = None
        if inputs.delta_bias is not None:
            dbias = self.alloc((b, d), dtype=torch.float32, device=dev)
        dh0 = None
        if inputs.initial_state is not None:
            dh0 = self.alloc((b, d, n), dtype=torch.float32, device=dev)
        dB = Bv.grad_buffer(inputs, self.alloc)
        dC = Cv.grad_buffer(inputs, self.alloc)
        args: list[Arg] = [
            ("ptr", u),
            ("ptr", delta),
            ("ptr", z),
            ("ptr", _param(inputs.A)),
            ("ptr", Bv.tensor),
            ("ptr", Cv.tensor),
            ("ptr", _param(inputs.D)),
            ("ptr", _param(inputs.delta_bias)),
            ("ptr", ckpt),
            ("ptr", dout),
            ("ptr", dlast),
            ("ptr", du),
            ("ptr", ddelta),
            ("ptr", dz),
            ("ptr", dA),
            ("ptr", dD),
            ("ptr", dbias),
            ("ptr", dh0),
            ("ptr", dB),
            ("ptr", dC),
            ("i32", b),
            ("i32", d),
            ("i32", L),
            ("i32", n),
            ("i32", spc),
            ("i32", NSUB),
            ("i32", int(inputs.delta_softplus)),
            ("i32", dout_f32),
            *_strides3(u),
            *_strides3(delta),
            *_strides3(z),
            *_strides3(dout),
            *Bv.args(),
            *Cv.args(),
        ]
        self.launch(
            kernel_name("scan_bwd", T),
            grid_size(b, d, spc, block),
            block,
            bwd_shared_bytes(spc, block),
            args,
            dev,
        )
        return {
            "u": du,
            "delta": ddelta,
            "z": dz,
            "A": dA.sum(0),
            "B": Bv.grad(dB),
            "C": Cv.grad(dC),
            "D": None if dD is None else dD.sum(0),
            "delta_bias": None if dbias is None else dbias.sum(0),
            "initial_state": dh0,
        }


def limits_reasons(inputs: ScanInputs) -> list[str]:
    """Sizes the kernels cannot take (32-bit channel and group indices, one thread per state)."""
    out = []
    if inputs.dstate > MAX_DSTATE:
        out.append(f"state size N={inputs.dstate} exceeds {MAX_DSTATE} (one thread per state)")
    if inputs.batch * inputs.dim >= 2**31:
        out.append(f"batch * D = {inputs.batch * inputs.dim} does not fit a 32-bit index")
    if inputs.seqlen >= 2**31 - NSUB * CHUNK:
        out.append(f"L={inputs.seqlen} does not fit a 32-bit index")
    return out


__all__ = [
    "CHUNK",
    "COMPILE_OPTIONS",
    "CTYPES",
    "MAX_DSTATE",
    "NAME_EXPRESSIONS",
    "NSUB",
    "SOURCES",
    "ScanKernels",
    "bwd_shared_bytes",
    "fwd_shared_bytes",
    "limits_reasons",
    "read_source",
    "threads_per_channel",
]
