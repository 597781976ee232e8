"""The compiled kernels as ``torch.library`` custom ops.

``torch.ops.scanlib_cuda.selective_scan_fwd`` and ``..._bwd`` each launch one kernel through the
C ABI (ctypes) on the current CUDA stream; ``register_fake`` gives their output shapes, so
``torch.compile`` keeps the scan as one graph node, and ``register_autograd`` makes the forward
differentiable with the backward op.

Op arguments (B batch, D channels, L length, N states, G groups):
    u, delta, z: [B, D, L] (one dtype: float32, float16 or bfloat16); A: [D, N] float32;
    B, C: [D, N] float32 (constant) or [B, G, N, L] in u's dtype (the per-sequence form is G = 1);
    D, delta_bias: [D] float32; initial_state: [B, D, N] float32.
Absent optional outputs of the backward are empty tensors.

CPU tensors run on the CPU emulation of the same kernels when a test has loaded it with
:func:`set_emulation_library`; that path exists to test the kernels and this glue without a GPU.
"""

# no `from __future__ import annotations`: torch.library reads the annotations at runtime
import threading
from pathlib import Path

import torch

from scanlib.inputs import BCForm, ScanInputs

from . import _lib

CHUNK = 256  # SCANLIB_CHUNK: steps between saved chunk states
_CODES = {torch.float32: _lib.F32, torch.float16: _lib.F16, torch.bfloat16: _lib.BF16}

_lock = threading.Lock()
_by_arch: dict[str, _lib.Library] = {}
_failed: dict[str, str] = {}
_emulation: _lib.Library | None = None


# ---------------------------------------------------------------------- libraries
def set_emulation_library(path: str | Path | None) -> None:
    """Run CPU tensors through the CPU emulation library at ``path`` (tests); None turns it off."""
    global _emulation
    _emulation = None if path is None else _lib.load(path)


def device_arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def library_problem(arch: str) -> str | None:
    """Why the library for ``arch`` cannot be used here (None: it is loaded, built or buildable)."""
    if arch in _by_arch:
        return None
    if arch in _failed:
        return _failed[arch]
    from scanlib.build import library_status

    return library_status(arch)


def library_for(device: torch.device) -> _lib.Library:
    """The loaded library for ``device`` (building it on first use when needed)."""
    if device.type == "cpu":
        if _emulation is None:
            raise _lib.KernelError(
                "scanlib_cuda ops run on CUDA tensors; CPU tensors need the CPU emulation library, "
                "which only tests load (backends.cuda.ops.set_emulation_library)"
            )
        return _emulation
    if device.type != "cuda":
        raise _lib.KernelError(f"scanlib_cuda ops run on CUDA tensors, not {device.type}")
    arch = device_arch(device)
    lib = _by_arch.get(arch)
    if lib is not None:
        return lib
    from scanlib.build import CudaBuildError, ensure_library

    with _lock:
        if arch in _by_arch:
            return _by_arch[arch]
        try:
            lib = _lib.load(ensure_library(arch))
        except (CudaBuildError, _lib.KernelError) as e:
            # later selections decline with this reason instead of failing again
            _failed[arch] = f"the compiled library is unusable: {e}"
            raise
        if lib.chunk != CHUNK:
            raise _lib.KernelError(
                f"{lib.path} uses chunks of {lib.chunk} steps, scanlib expects {CHUNK}"
            )
        _by_arch[arch] = lib
        return lib


# ---------------------------------------------------------------------- argument plumbing
def _unit_stride(t: torch.Tensor | None) -> torch.Tensor | None:
    """The kernels read [.., L] tensors with stride 1 along L."""
    if t is None:
        return None
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _param(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.float32).contiguous()


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None or t.numel() == 0 else t.data_ptr()


def _stride(t: torch.Tensor, dim: int) -> int:
    return 0 if t.shape[dim] == 1 else t.stride(dim)  # size-1 dims never move the pointer


def _set_rows(p: _lib.Params, name: str, t: torch.Tensor | None) -> None:
    if t is not None:
        setattr(p, f"{name}_stride_batch", _stride(t, 0))
        setattr(p, f"{name}_stride_dim", _stride(t, 1))
    setattr(p, name, _ptr(t))


def _set_bc(p: _lib.Params, name: str, t: torch.Tensor) -> None:
    if t.dim() == 2:
        setattr(p, f"{name}_const", 1)
        setattr(p, f"{name}_groups", t.shape[0])
    else:
        setattr(p, f"{name}_const", 0)
        setattr(p, f"{name}_groups", t.shape[1])
        setattr(p, f"{name}_stride_batch", _stride(t, 0))
        setattr(p, f"{name}_stride_group", _stride(t, 1))
        setattr(p, f"{name}_stride_n", _stride(t, 2))
    setattr(p, name, _ptr(t))


def channels_per_block(dim: int, dstate: int, B: torch.Tensor, C: torch.Tensor) -> int:
    """Warps (channels) per thread block: as many as divide D and every varying group size, at
    most 8 (4 for N > 64, to bound shared memory)."""
    cap = 8 if dstate <= 64 else 4
    sizes = [dim // t.shape[1] for t in (B, C) if t.dim() == 4]
    for c in (8, 4, 2, 1):
        if c <= cap and dim % c == 0 and all(s % c == 0 for s in sizes):
            return c
    return 1


def _check(u, delta, A, B, C, D, z, delta_bias, initial_state) -> None:
    if u.dtype not in _CODES:
        raise ValueError(
            f"scanlib_cuda: dtype {u.dtype} is not supported (float32, float16, bfloat16)"
        )
    for name, t in (("delta", delta), ("z", z)):
        if t is not None and (t.dtype != u.dtype or t.shape != u.shape):
            raise ValueError(f"scanlib_cuda: {name} must match u's shape and dtype")
    for name, t in (("B", B), ("C", C)):
        ok = (t.dim() == 2 and t.dtype == torch.float32) or (t.dim() == 4 and t.dtype == u.dtype)
        if not ok:
            raise ValueError(
                f"scanlib_cuda: {name} must be [D, N] float32 or [B, G, N, L] in u's dtype"
            )
    for name, t in (
        ("A", A),
        ("D", D),
        ("delta_bias", delta_bias),
        ("initial_state", initial_state),
    ):
        if t is not None and t.dtype != torch.float32:
            raise ValueError(f"scanlib_cuda: {name} must be float32")
    devices = {
        t.device for t in (u, delta, A, B, C, D, z, delta_bias, initial_state) if t is not None
    }
    if len(devices) != 1:
        raise ValueError(
            f"scanlib_cuda: all tensors must be on one device, got {sorted(map(str, devices))}"
        )


def _common_params(
    u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus
) -> _lib.Params:
    p = _lib.Params()
    p.batch, p.dim, p.seqlen = u.shape
    p.dstate = A.shape[1]
    p.in_dtype = _CODES[u.dtype]
    p.delta_softplus = int(delta_softplus)
    p.channels_per_block = channels_per_block(p.dim, p.dstate, B, C)
    _set_rows(p, "u", u)
    _set_rows(p, "delta", delta)
    _set_rows(p, "z", z)
    _set_bc(p, "B", B)
    _set_bc(p, "C", C)
    p.A = _ptr(A)
    p.D = _ptr(D)
    p.delta_bias = _ptr(delta_bias)
    p.initial_state = _ptr(initial_state)
    return p


def _launch(kind: str, lib: _lib.Library, p: _lib.Params, device: torch.device) -> None:
    if device.type == "cuda":
        with torch.cuda.device(device):
            stream = torch.cuda.current_stream(device).cuda_stream
            (lib.forward if kind == "fwd" else lib.backward)(p, stream)
    else:
        (lib.forward if kind == "fwd" else lib.backward)(p, None)


def nchunks(seqlen: int) -> int:
    return -(-seqlen // CHUNK)


# ---------------------------------------------------------------------- forward op
@torch.library.custom_op("scanlib_cuda::selective_scan_fwd", mutates_args=())
def selective_scan_fwd(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    delta_softplus: bool,
    out_float32: bool,
    save_states: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out [B, D, L], last_state [B, D, N] float32, chunk_states [B, D, ceil(L/256), N] float32
    or empty when not ``save_states``)."""
    _check(u, delta, A, B, C, D, z, delta_bias, initial_state)
    lib = library_for(u.device)
    u, delta, z = _unit_stride(u), _unit_stride(delta), _unit_stride(z)
    B = _param(B) if B.dim() == 2 else _unit_stride(B)
    C = _param(C) if C.dim() == 2 else _unit_stride(C)
    A, D, delta_bias, initial_state = (
        _param(A),
        _param(D),
        _param(delta_bias),
        _param(initial_state),
    )
    b, d, L = u.shape
    n = A.shape[1]
    out = torch.empty(b, d, L, dtype=torch.float32 if out_float32 else u.dtype, device=u.device)
    last = torch.empty(b, d, n, dtype=torch.float32, device=u.device)
    states = (
        torch.empty(b, d, nchunks(L), n, dtype=torch.float32, device=u.device)
        if save_states
        else u.new_empty(0, dtype=torch.float32)
    )
    p = _common_params(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus)
    p.out_dtype = _CODES[out.dtype]
    _set_rows(p, "out", out)
    p.last_state = _ptr(last)
    p.chunk_states = _ptr(states)
    _launch("fwd", lib, p, u.device)
    return out, last, states


@selective_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, out_float32, save_states):
    b, d, L = u.shape
    n = A.shape[1]
    out = u.new_empty((b, d, L), dtype=torch.float32 if out_float32 else u.dtype)
    last = u.new_empty((b, d, n), dtype=torch.float32)
    states = u.new_empty((b, d, nchunks(L), n) if save_states else (0,), dtype=torch.float32)
    return out, last, states


# ---------------------------------------------------------------------- backward op
@torch.library.custom_op("scanlib_cuda::selective_scan_bwd", mutates_args=())
def selective_scan_bwd(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    chunk_states: torch.Tensor,
    dout: torch.Tensor | None,
    dlast: torch.Tensor | None,
    delta_softplus: bool,
) -> tuple[
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
]:
    """(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state), each shaped and typed like
    its input; empty for absent inputs. ``dout`` is out-shaped (out's dtype), ``dlast`` [B, D, N]."""
    _check(u, delta, A, B, C, D, z, delta_bias, initial_state)
    lib = library_for(u.device)
    b, d, L = u.shape
    n = A.shape[1]
    if chunk_states.shape != (b, d, nchunks(L), n) or chunk_states.dtype != torch.float32:
        raise ValueError(
            "scanlib_cuda backward: chunk_states must be the forward's [B, D, ceil(L/256), N] float32 "
            "(run the forward with save_states=True)"
        )
    in_dtype, B_dtype, C_dtype = u.dtype, B.dtype, C.dtype
    u, delta, z, dout = _unit_stride(u), _unit_stride(delta), _unit_stride(z), _unit_stride(dout)
    Bk = _param(B) if B.dim() == 2 else _unit_stride(B)
    Ck = _param(C) if C.dim() == 2 else _unit_stride(C)
    A, D, delta_bias, initial_state = (
        _param(A),
        _param(D),
        _param(delta_bias),
        _param(initial_state),
    )
    dlast = _param(dlast)
    chunk_states = chunk_states.contiguous()
    p = _common_params(u, delta, A, Bk, Ck, D, z, delta_bias, initial_state, delta_softplus)
    cpb = p.channels_per_block
    dev = u.device
    f32 = dict(dtype=torch.float32, device=dev)

    du = torch.empty(b, d, L, dtype=in_dtype, device=dev)
    ddelta = torch.empty_like(du)
    dz = torch.empty_like(du) if z is not None else None
    dA = torch.empty(b, d, n, **f32)
    dD = torch.empty(b, d, **f32) if D is not None else None
    dbias = torch.empty(b, d, **f32) if delta_bias is not None else None
    dinit = torch.empty(b, d, n, **f32) if initial_state is not None else None

    def partial(t: torch.Tensor) -> torch.Tensor:
        return (
            torch.empty(b, d, n, **f32) if t.dim() == 2 else torch.empty(b, d // cpb, n, L, **f32)
        )

    dB, dC = partial(Bk), partial(Ck)
    p.out_dtype = (
        _CODES[dout.dtype]
        if dout is not None
        else (_lib.F32 if in_dtype == torch.float32 else p.in_dtype)
    )
    _set_rows(p, "dout", dout)
    p.dlast = _ptr(dlast)
    p.chunk_states = _ptr(chunk_states)
    _set_rows(p, "du", du)
    _set_rows(p, "ddelta", ddelta)
    _set_rows(p, "dz", dz)
    p.dA, p.dD, p.ddelta_bias, p.dinitial_state = _ptr(dA), _ptr(dD), _ptr(dbias), _ptr(dinit)
    p.dB, p.dC = _ptr(dB), _ptr(dC)
    _launch("bwd", lib, p, dev)

    # deterministic second stage: fixed-order sums of the per-block partials
    def reduce_bc(part: torch.Tensor, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if t.dim() == 2:
            return part.sum(0).to(dtype)
        g = t.shape[1]
        return part.view(b, g, d // cpb // g, n, L).sum(2).to(dtype)

    def present(t: torch.Tensor | None) -> torch.Tensor:
        return t if t is not None else u.new_empty(0)  # a fresh tensor: outputs may not alias

    return (
        du,
        ddelta,
        dA.sum(0),
        reduce_bc(dB, Bk, B_dtype),
        reduce_bc(dC, Ck, C_dtype),
        present(dD.sum(0) if dD is not None else None),
        present(dz),
        present(dbias.sum(0) if dbias is not None else None),
        present(dinit),
    )


@selective_scan_bwd.register_fake
def _(
    u, delta, A, B, C, D, z, delta_bias, initial_state, chunk_states, dout, dlast, delta_softplus
):
    def like(t):
        return u.new_empty(0) if t is None else torch.empty_like(t)

    return (
        torch.empty_like(u),
        torch.empty_like(delta),
        torch.empty_like(A),
        torch.empty_like(B),
        torch.empty_like(C),
        like(D),
        like(z),
        like(delta_bias),
        like(initial_state),
    )


# ---------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, _out_f32, _save = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, output[2])
    ctx.delta_softplus = delta_softplus


def _backward(ctx, dout, dlast, _dstates):
    u, delta, A, B, C, D, z, delta_bias, initial_state, states = ctx.saved_tensors
    if states.numel() == 0:
        raise RuntimeError(
            "scanlib_cuda: the forward ran with save_states=False, so it cannot be differentiated"
        )
    du, ddelta, dA, dB, dC, dD, dz, dbias, dinit = torch.ops.scanlib_cuda.selective_scan_bwd(
        u, delta, A, B, C, D, z, delta_bias, initial_state, states, dout, dlast, ctx.delta_softplus
    )
    return (
        du,
        ddelta,
        dA,
        dB,
        dC,
        dD if D is not None else None,
        dz if z is not None else None,
        dbias if delta_bias is not None else None,
        dinit if initial_state is not None else None,
        None,
        None,
        None,
    )


selective_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------- the backend's entry
def _bc_arg(inputs: ScanInputs, name: str) -> torch.Tensor:
    t = getattr(inputs, name)
    form = getattr(inputs, f"{name}_form")
    if form is BCForm.CONSTANT:
        return t.to(torch.float32)
    if form is BCForm.SEQUENCE:
        return t.unsqueeze(1)  # [B, 1, N, L]
    return t


def selective_scan(inputs: ScanInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, D, L] in inputs.result_dtype, last_state [B, D, N] float32), differentiable."""
    out, last, _ = torch.ops.scanlib_cuda.selective_scan_fwd(
        inputs.u,
        inputs.delta,
        inputs.A,
        _bc_arg(inputs, "B"),
        _bc_arg(inputs, "C"),
        inputs.D,
        inputs.z,
        inputs.delta_bias,
        inputs.initial_state,
        inputs.delta_softplus,
        inputs.result_dtype == torch.float32,
        inputs.needs_grad,
    )
    return out, last


__all__ = [
    "CHUNK",
    "channels_per_block",
    "library_for",
    "library_problem",
    "selective_scan",
    "selective_scan_bwd",
    "selective_scan_fwd",
    "set_emulation_library",
]
