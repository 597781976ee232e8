"""Host side of the numba backend: tensors to C-contiguous numpy views, work partition, reductions.

Imported on first use only (it imports numba through ``kernels``).
"""

from __future__ import annotations

import functools
import threading

import numba
import numpy as np
import torch

from scanlib import memory
from scanlib.inputs import BCForm, ScanInputs

from . import (
    _team,
    _threading,  # noqa: F401  (picks numba's threading layer before any kernel runs)
)
from . import kernels as K

# The workqueue threading layer of numba aborts when two threads enter parallel code at once;
# one scan already uses every core, so serialising concurrent calls costs nothing.
_lock = threading.Lock()

#: work units the backward aims for (independent of the thread count: the partition fixes the
#: order of the dB/dC sums, so results do not depend on how many threads run)
_BWD_UNITS = 32


def _threads() -> int:
    """Threads for a call: numba's count, capped by torch's (``torch.set_num_threads(1)`` then
    keeps the whole model on one core)."""
    return min(numba.get_num_threads(), torch.get_num_threads())


def _on_team(kind: str, args: tuple, n_units: int) -> bool:
    """Run kernel ``kind``'s units on torch's OpenMP team (``_team.run``); False when the caller
    must launch it itself."""
    return _team.run(K.TEAM[kind, args[0].dtype == np.float64], args, n_units, _threads())


def _empty_out(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    """A large kernel output: pages reused from earlier calls' freed outputs (scanlib.memory),
    since faulting in fresh multi-MB outputs costs as much as the kernel at VMamba sizes."""
    return memory.empty(*shape, dtype=dtype)


def _np(t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """A C-contiguous numpy array sharing memory with ``t`` when it already is one (no copy)."""
    return t.detach().to(dtype).contiguous().numpy(force=True)


def _empty(ndim: int, dtype: np.dtype) -> np.ndarray:
    return np.empty((0,) * ndim, dtype=dtype)


def chunk_len(L: int, N: int) -> int:
    """Steps per saved state: about 1024 / N (buffers of a tile stay in L2), a power of two in [16, 256]."""
    c = 16
    while c < 256 and c * 2 * N <= 1024:
        c *= 2
    return max(1, min(c, L))


def _per(inputs: ScanInputs, name: str) -> int:
    """Channels per group of B or C (D for the constant form: the group index is then 0)."""
    if getattr(inputs, f"{name}_form") is BCForm.CONSTANT:
        return inputs.dim
    return inputs.dim // getattr(inputs, f"{name}_groups")


@functools.lru_cache(maxsize=256)
def partition(
    dim: int, b_per: int, c_per: int, batch: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tiles [T, 2] (first channel, lanes) that never straddle a B or C group; parts [P, 2] (tile
    range) of tiles sharing their groups; each part's B and C group [P, 2]."""
    cuts = sorted({d for d in range(dim) if d % b_per == 0 or d % c_per == 0} | {dim})
    tiles = []
    segments = []
    for s0, s1 in zip(cuts[:-1], cuts[1:]):
        first = len(tiles)
        for d in range(s0, s1, K.CT):
            tiles.append((d, min(K.CT, s1 - d)))
        segments.append((first, len(tiles)))
    split = max(1, -(-_BWD_UNITS // (batch * len(segments))))
    parts = []
    for first, end in segments:
        n = end - first
        s = min(split, n)
        bounds = [first + (n * i) // s for i in range(s + 1)]
        parts += [(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    tiles_a = np.array(tiles, dtype=np.int64).reshape(-1, 2)
    parts_a = np.array(parts, dtype=np.int64).reshape(-1, 2)
    groups = np.stack(
        [tiles_a[parts_a[:, 0], 0] // b_per, tiles_a[parts_a[:, 0], 0] // c_per], axis=1
    )
    # shared by every call of this layout: read only by the kernels (not flagged read-only, so
    # the kernels' numba and team entry points compile for the same array types)
    return tiles_a, parts_a, groups


class _Prepared:
    """The numpy views and layout facts of one call, shared by forward and backward."""

    def __init__(self, inputs: ScanInputs):
        cdt = inputs.compute_dtype
        npdt = np.float64 if cdt == torch.float64 else np.float32
        b, d, L, n = inputs.batch, inputs.dim, inputs.seqlen, inputs.dstate
        self.cdt, self.npdt = cdt, npdt
        self.u = _np(inputs.u, cdt)
        self.delta = _np(inputs.delta, cdt)
        self.z = _np(inputs.z, cdt) if inputs.z is not None else _empty(3, npdt)
        self.dbias = (
            _np(inputs.delta_bias, cdt) if inputs.delta_bias is not None else np.zeros(d, npdt)
        )
        self.A = _np(inputs.A, cdt)
        self.Dp = _np(inputs.D, cdt) if inputs.D is not None else np.zeros(d, npdt)
        self.bconst = inputs.B_form is BCForm.CONSTANT
        self.cconst = inputs.C_form is BCForm.CONSTANT
        self.Bg = _empty(4, npdt) if self.bconst else _np(inputs.grouped("B"), cdt)
        self.Bc = _np(inputs.B, cdt) if self.bconst else _empty(2, npdt)
        self.Cg = _empty(4, npdt) if self.cconst else _np(inputs.grouped("C"), cdt)
        self.Cc = _np(inputs.C, cdt) if self.cconst else _empty(2, npdt)
        self.h0 = (
            _np(inputs.initial_state, cdt) if inputs.initial_state is not None else _empty(3, npdt)
        )
        self.b_per, self.c_per = _per(inputs, "B"), _per(inputs, "C")
        self.tiles, self.parts, self.part_groups = partition(d, self.b_per, self.c_per, b)
        self.chunk = chunk_len(L, n)
        self.nchunks = -(-L // self.chunk)
        self.flags = np.zeros(8, dtype=np.int64)
        self.flags[K.F_SOFTPLUS] = inputs.delta_softplus
        self.flags[K.F_Z] = inputs.z is not None
        self.flags[K.F_BCONST] = self.bconst
        self.flags[K.F_CCONST] = self.cconst
        self.flags[K.F_H0] = inputs.initial_state is not None


def forward(
    inputs: ScanInputs, save: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(out [B, D, L] in the result dtype, last state [B, D, N], saved chunk start states or None)."""
    p = _Prepared(inputs)
    b, d, L, n = inputs.batch, inputs.dim, inputs.seqlen, inputs.dstate
    out = _empty_out(b, d, L, dtype=p.cdt)
    last = torch.empty(b, d, n, dtype=p.cdt)
    saved = torch.empty(b, len(p.tiles), p.nchunks, n, K.CT, dtype=p.cdt) if save else None
    flags = p.flags.copy()
    flags[K.F_SAVE] = save
    args = (
        p.u, p.delta, p.z, p.dbias, p.A, p.Dp, p.Bg, p.Bc, p.Cg, p.Cc, p.h0,
        p.tiles, p.b_per, p.c_per, flags, p.chunk,
        out.numpy(), last.numpy(), saved.numpy() if save else _empty(5, p.npdt),
    )  # fmt: skip
    if not _on_team("fwd", args, b * len(p.tiles)):
        with _lock:
            K.scan_fwd(*args)
    return out.to(inputs.result_dtype), last, saved


def backward(
    inputs: ScanInputs, saved: torch.Tensor, dout: torch.Tensor | None, dlast: torch.Tensor | None
) -> dict[str, torch.Tensor | None]:
    """Gradients of every tensor input (compute dtype; scan_with_autograd casts them back)."""
    p = _Prepared(inputs)
    b, d, L, n = inputs.batch, inputs.dim, inputs.seqlen, inputs.dstate
    cdt, npdt = p.cdt, p.npdt
    nparts = len(p.parts)
    flags = p.flags.copy()
    flags[K.F_DOUT] = dout is not None
    flags[K.F_DLAST] = dlast is not None
    du = _empty_out(b, d, L, dtype=cdt)
    ddelta = _empty_out(b, d, L, dtype=cdt)
    dz = _empty_out(b, d, L, dtype=cdt) if inputs.z is not None else None
    dA_p = torch.empty(b, d, n, dtype=cdt)
    dD_p = torch.empty(b, d, dtype=cdt)
    dbias_p = torch.empty(b, d, dtype=cdt)
    dB_p = None if p.bconst else torch.empty(b, nparts, n, L, dtype=cdt)
    dC_p = None if p.cconst else torch.empty(b, nparts, n, L, dtype=cdt)
    dBc_p = torch.empty(b, d, n, dtype=cdt) if p.bconst else None
    dCc_p = torch.empty(b, d, n, dtype=cdt) if p.cconst else None
    dh0 = torch.empty(b, d, n, dtype=cdt) if inputs.initial_state is not None else None

    def arr(t: torch.Tensor | None, ndim: int) -> np.ndarray:
        return t.numpy() if t is not None else _empty(ndim, npdt)

    args = (
        p.u, p.delta, p.z, p.dbias, p.A, p.Dp, p.Bg, p.Bc, p.Cg, p.Cc,
        p.tiles, p.parts, p.b_per, p.c_per, flags, p.chunk, saved.numpy(),
        _np(dout, cdt) if dout is not None else _empty(3, npdt),
        _np(dlast, cdt) if dlast is not None else _empty(3, npdt),
        du.numpy(), ddelta.numpy(), arr(dz, 3), dA_p.numpy(), dD_p.numpy(), dbias_p.numpy(),
        arr(dB_p, 4), arr(dC_p, 4), arr(dBc_p, 3), arr(dCc_p, 3), arr(dh0, 3),
    )  # fmt: skip
    if not _on_team("bwd", args, b * nparts):
        with _lock:
            K.scan_bwd(*args)

    def bc_grad(
        name: str, const_p: torch.Tensor | None, part_p: torch.Tensor | None, col: int
    ) -> torch.Tensor:
        if const_p is not None:
            return const_p.sum(0)
        groups = inputs.B_groups if name == "B" else inputs.C_groups
        idx = torch.from_numpy(p.part_groups[:, col].copy())
        g = torch.zeros(b, groups, n, L, dtype=cdt).index_add_(1, idx, part_p)
        return g.squeeze(1) if getattr(inputs, f"{name}_form") is BCForm.SEQUENCE else g

    return {
        "u": du,
        "delta": ddelta,
        "A": dA_p.sum(0),
        "B": bc_grad("B", dBc_p, dB_p, 0),
        "C": bc_grad("C", dCc_p, dC_p, 1),
        "D": dD_p.sum(0) if inputs.D is not None else None,
        "z": dz,
        "delta_bias": dbias_p.sum(0) if inputs.delta_bias is not None else None,
        "initial_state": dh0,
    }


class Kernels:
    """The ``scan_with_autograd`` kernels object of the numba backend."""

    def forward(self, inputs: ScanInputs):
        # inside the autograd Function grad mode is off, so ask the tensors themselves; under
        # no_grad with parameters that require grad this saves states needlessly (1/chunk of them)
        save = any(t is not None and t.requires_grad for t in inputs.tensors())
        return forward(inputs, save=save)

    def backward(self, inputs: ScanInputs, saved, dout, dlast):
        return backward(inputs, saved, dout, dlast)


KERNELS = Kernels()
