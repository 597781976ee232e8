"""Validated, normalised inputs of one ``selective_scan`` call.

Letters: B batch, D channels, L sequence length, N state size, G groups of B/C.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from .errors import ScanInputError

FLOAT16_TYPES = (torch.float16, torch.bfloat16)
INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class Feature(str, enum.Enum):
    """Optional parts of the selective-scan contract a backend may or may not implement."""

    CONSTANT_BC = "constant B/C [D, N]"
    SEQUENCE_BC = "per-sequence B/C [B, N, L]"
    GROUPED_BC = "grouped B/C [B, G, N, L]"
    D_SKIP = "D skip term"
    Z_GATE = "z gate"
    DELTA_BIAS = "delta_bias"
    DELTA_SOFTPLUS = "delta_softplus"
    INITIAL_STATE = "initial_state"
    LAST_STATE = "return_last_state"
    BACKWARD = "backward"
    OUT_FLOAT32 = "out_dtype=float32 for 16-bit inputs"

    def __str__(self) -> str:
        return self.value


class BCForm(str, enum.Enum):
    CONSTANT = "constant"  # [D, N]
    SEQUENCE = "sequence"  # [B, N, L]
    GROUPED = "grouped"  # [B, G, N, L]


_FORM_FEATURE = {
    BCForm.CONSTANT: Feature.CONSTANT_BC,
    BCForm.SEQUENCE: Feature.SEQUENCE_BC,
    BCForm.GROUPED: Feature.GROUPED_BC,
}


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _expect(name: str, t: torch.Tensor, expected: tuple[int, ...], letters: str) -> None:
    if tuple(t.shape) != expected:
        exp = "[" + ", ".join(f"{c}={n}" for c, n in zip(letters.split(","), expected)) + "]"
        raise ScanInputError(f"{name}: expected shape {exp}, got {_shape(t)}")


@dataclass
class ScanInputs:
    """The tensors of one call plus what a backend needs to decide whether it can run it.

    u, delta, z: [B, D, L]; A: [D, N]; B, C: [D, N] | [B, N, L] | [B, G, N, L];
    D, delta_bias: [D]; initial_state: [B, D, N].
    """

    u: torch.Tensor
    delta: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    D: torch.Tensor | None = None
    z: torch.Tensor | None = None
    delta_bias: torch.Tensor | None = None
    delta_softplus: bool = False
    return_last_state: bool = False
    initial_state: torch.Tensor | None = None
    out_dtype: torch.dtype | None = None
    # derived by validate()
    batch: int = field(init=False, default=0)
    dim: int = field(init=False, default=0)
    seqlen: int = field(init=False, default=0)
    dstate: int = field(init=False, default=0)
    B_form: BCForm = field(init=False, default=BCForm.GROUPED)
    C_form: BCForm = field(init=False, default=BCForm.GROUPED)
    B_groups: int = field(init=False, default=1)
    C_groups: int = field(init=False, default=1)

    op = "selective_scan"

    def __post_init__(self) -> None:
        self._validate()

    # ---------------------------------------------------------------- validation
    def _validate(self) -> None:
        u = self.u
        for name in ("u", "delta", "A", "B", "C"):
            if not isinstance(getattr(self, name), torch.Tensor):
                raise ScanInputError(
                    f"{name}: expected a torch.Tensor, got {type(getattr(self, name)).__name__}"
                )
        if u.dim() != 3:
            raise ScanInputError(f"u: expected shape [B, D, L] (3 dims), got {_shape(u)}")
        b, d, L = u.shape
        if L < 1 or d < 1 or b < 1:
            raise ScanInputError(f"u: every size must be >= 1, got {_shape(u)}")
        _expect("delta", self.delta, (b, d, L), "B,D,L")
        if self.A.dim() != 2 or self.A.shape[0] != d:
            raise ScanInputError(f"A: expected shape [D={d}, N], got {_shape(self.A)}")
        n = self.A.shape[1]
        if n < 1:
            raise ScanInputError(f"A: N must be >= 1, got {_shape(self.A)}")
        if self.A.is_complex():
            raise ScanInputError("A: complex A is not supported; pass a real tensor")
        self.batch, self.dim, self.seqlen, self.dstate = b, d, L, n
        self.B_form, self.B_groups = self._bc_form("B", self.B)
        self.C_form, self.C_groups = self._bc_form("C", self.C)
        if self.z is not None:
            _expect("z", self.z, (b, d, L), "B,D,L")
        if self.D is not None:
            _expect("D", self.D, (d,), "D")
        if self.delta_bias is not None:
            _expect("delta_bias", self.delta_bias, (d,), "D")
        if self.initial_state is not None:
            _expect("initial_state", self.initial_state, (b, d, n), "B,D,N")

        # dtypes: one input dtype for the [.., L] tensors; parameters in the compute dtype
        dt = u.dtype
        if dt not in INPUT_DTYPES:
            raise ScanInputError(
                f"u: dtype {dt} is not supported; use float32, float16, bfloat16 or float64"
            )
        for name in ("delta", "B", "C", "z"):
            t = getattr(self, name)
            if t is None or (
                name in ("B", "C") and getattr(self, f"{name}_form") is BCForm.CONSTANT
            ):
                continue
            if t.dtype != dt:
                raise ScanInputError(
                    f"{name}: dtype {t.dtype} differs from u's {dt}; u, delta, B, C and z share one dtype"
                )
        cdt = self.compute_dtype
        for name in ("A", "D", "delta_bias"):
            t = getattr(self, name)
            if t is None:
                continue
            ok = (torch.float32, torch.float64) if cdt == torch.float64 else (torch.float32,)
            if t.dtype not in ok:
                raise ScanInputError(
                    f"{name}: dtype {t.dtype} is not allowed with {dt} inputs; expected "
                    + " or ".join(str(o) for o in ok)
                )
        for name in ("B", "C"):
            t = getattr(self, name)
            if getattr(self, f"{name}_form") is BCForm.CONSTANT and t.dtype not in (
                dt,
                torch.float32,
                cdt,
            ):
                raise ScanInputError(
                    f"{name}: constant B/C dtype {t.dtype} must be {dt} or float32"
                )
        if self.initial_state is not None and self.initial_state.dtype not in (torch.float32, cdt):
            raise ScanInputError(f"initial_state: dtype {self.initial_state.dtype} must be {cdt}")
        if self.out_dtype is not None:
            if self.out_dtype not in (dt, torch.float32, torch.float64):
                raise ScanInputError(
                    f"out_dtype: {self.out_dtype} is not allowed with {dt} inputs; use None, {dt} or torch.float32"
                )
        # devices
        dev = u.device
        for name in ("delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"):
            t = getattr(self, name)
            if t is not None and t.device != dev:
                raise ScanInputError(
                    f"{name}: on device {t.device}, but u is on {dev}; all tensors must share one device"
                )

    def _bc_form(self, name: str, t: torch.Tensor) -> tuple[BCForm, int]:
        b, d, L, n = self.batch, self.dim, self.seqlen, self.dstate
        if t.dim() == 2:
            _expect(name, t, (d, n), "D,N")
            return BCForm.CONSTANT, d
        if t.dim() == 3:
            _expect(name, t, (b, n, L), "B,N,L")
            return BCForm.SEQUENCE, 1
        if t.dim() == 4:
            g = t.shape[1]
            if g < 1 or d % g != 0:
                raise ScanInputError(
                    f"{name}: D={d} is not divisible by the number of groups G={g}"
                )
            _expect(name, t, (b, g, n, L), "B,G,N,L")
            return BCForm.GROUPED, g
        raise ScanInputError(
            f"{name}: expected [D={d}, N={n}], [B={b}, N={n}, L={L}] or [B={b}, G, N={n}, L={L}], got {_shape(t)}"
        )

    # ---------------------------------------------------------------- derived facts
    @property
    def dtype(self) -> torch.dtype:
        return self.u.dtype

    @property
    def device(self) -> torch.device:
        return self.u.device

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.float64 if self.u.dtype == torch.float64 else torch.float32

    @property
    def result_dtype(self) -> torch.dtype:
        return self.out_dtype if self.out_dtype is not None else self.u.dtype

    @property
    def needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(
            t.requires_grad for t in self.tensors() if t is not None
        )

    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        return (
            self.u,
            self.delta,
            self.A,
            self.B,
            self.C,
            self.D,
            self.z,
            self.delta_bias,
            self.initial_state,
        )

    @property
    def features(self) -> frozenset[Feature]:
        f = {_FORM_FEATURE[self.B_form], _FORM_FEATURE[self.C_form]}
        if self.D is not None:
            f.add(Feature.D_SKIP)
        if self.z is not None:
            f.add(Feature.Z_GATE)
        if self.delta_bias is not None:
            f.add(Feature.DELTA_BIAS)
        if self.delta_softplus:
            f.add(Feature.DELTA_SOFTPLUS)
        if self.initial_state is not None:
            f.add(Feature.INITIAL_STATE)
        if self.return_last_state:
            f.add(Feature.LAST_STATE)
        if self.needs_grad:
            f.add(Feature.BACKWARD)
        if self.result_dtype != self.dtype:
            f.add(Feature.OUT_FLOAT32)
        return frozenset(f)

    def grouped(self, name: str) -> torch.Tensor:
        """B or C as a [B, G, N, L] view (stride 0 where broadcast; constant form has G = D)."""
        t = getattr(self, name)
        form = getattr(self, f"{name}_form")
        if form is BCForm.GROUPED:
            return t
        if form is BCForm.SEQUENCE:
            return t.unsqueeze(1)
        return t.unsqueeze(0).unsqueeze(-1).expand(self.batch, self.dim, self.dstate, self.seqlen)

    def describe(self) -> str:
        return (
            f"u [B={self.batch}, D={self.dim}, L={self.seqlen}] {self.dtype} on {self.device}, N={self.dstate}, "
            f"B {self.B_form.value}, C {self.C_form.value}"
        )
