"""Shared test helpers: hypothesis strategies for valid scan inputs, tolerances, and
``assert_scan_close``, which checks a backend's output, last state and every gradient against the
float64 reference run on the same (upcast) inputs.

Needs ``hypothesis`` (the ``dev`` extra) only for :func:`scan_cases`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .inputs import BCForm, ScanInputs
from .reference import selective_scan_ref_inputs
from .registry import get_backend

#: max ||x - ref|| / ||ref|| per input dtype, for outputs, last state and gradients
TOLERANCES: dict[torch.dtype, float] = {
    torch.float64: 1e-9,
    torch.float32: 2e-4,
    torch.float16: 5e-3,
    torch.bfloat16: 3e-2,
}

SEQLENS = (1, 2, 7, 63, 64, 65, 130, 257, 2049)
DIMS = (1, 2, 3, 5, 6, 12, 24)
DSTATES = (1, 2, 3, 4, 8, 16)


@dataclass(frozen=True)
class ScanCase:
    """One drawn configuration of a selective-scan call; ``make`` builds its tensors."""

    batch: int
    dim: int
    seqlen: int
    dstate: int
    B_form: BCForm
    C_form: BCForm
    groups: int
    has_D: bool
    has_z: bool
    has_delta_bias: bool
    delta_softplus: bool
    has_initial_state: bool
    return_last_state: bool
    dtype: torch.dtype
    out_float32: bool
    seed: int

    @classmethod
    def example(cls, **overrides) -> ScanCase:
        """A small case with every option on (grouped B/C, D, z, bias + softplus, initial and
        last state, float32); ``overrides`` change any field."""
        fields = dict(
            batch=2,
            dim=6,
            seqlen=40,
            dstate=4,
            B_form=BCForm.GROUPED,
            C_form=BCForm.GROUPED,
            groups=3,
            has_D=True,
            has_z=True,
            has_delta_bias=True,
            delta_softplus=True,
            has_initial_state=True,
            return_last_state=True,
            dtype=torch.float32,
            out_float32=False,
            seed=0,
        )
        fields.update(overrides)
        return cls(**fields)

    def make(self, device: str | torch.device = "cpu", requires_grad: bool = True) -> dict:
        """Keyword arguments for ``selective_scan`` (float32 params, inputs in ``dtype``)."""
        g = torch.Generator().manual_seed(self.seed)
        b, d, L, n = self.batch, self.dim, self.seqlen, self.dstate
        pdt = torch.float64 if self.dtype == torch.float64 else torch.float32

        def rnd(*shape, scale=1.0, shift=0.0, dtype=self.dtype):
            return (torch.randn(*shape, generator=g) * scale + shift).to(dtype)

        bc_shape = {
            BCForm.CONSTANT: (d, n),
            BCForm.SEQUENCE: (b, n, L),
            BCForm.GROUPED: (b, self.groups, n, L),
        }

        if self.delta_softplus:
            delta = rnd(b, d, L, scale=1.0, shift=-1.0)
        else:
            delta = (torch.rand(b, d, L, generator=g) * 0.5 + 0.01).to(self.dtype)
        kw = dict(
            u=rnd(b, d, L),
            delta=delta,
            A=-torch.exp(torch.rand(d, n, generator=g) * 3.0 - 2.0).to(pdt),
            B=rnd(
                *bc_shape[self.B_form], dtype=pdt if self.B_form is BCForm.CONSTANT else self.dtype
            ),
            C=rnd(
                *bc_shape[self.C_form], dtype=pdt if self.C_form is BCForm.CONSTANT else self.dtype
            ),
            D=rnd(d, dtype=pdt) if self.has_D else None,
            z=rnd(b, d, L) if self.has_z else None,
            # without softplus keep delta + bias > 0: a growing state would overflow float32 for real
            delta_bias=(torch.rand(d, generator=g) - (0.5 if self.delta_softplus else 0.0)).to(pdt)
            if self.has_delta_bias
            else None,
            delta_softplus=self.delta_softplus,
            return_last_state=self.return_last_state,
            initial_state=rnd(b, d, n, dtype=pdt) if self.has_initial_state else None,
            out_dtype=torch.float32 if self.out_float32 else None,
        )
        for k, v in kw.items():
            if isinstance(v, torch.Tensor):
                v = v.to(device)
                kw[k] = v.requires_grad_(requires_grad)
        return kw

    def inputs(self, device: str | torch.device = "cpu", requires_grad: bool = True) -> ScanInputs:
        return ScanInputs(**self.make(device, requires_grad))


def scan_cases(
    dtypes: Sequence[torch.dtype] = (torch.float32, torch.float16, torch.bfloat16, torch.float64),
    seqlens: Sequence[int] = SEQLENS,
    dims: Sequence[int] = DIMS,
    dstates: Sequence[int] = DSTATES,
    max_batch: int = 3,
    max_elements: int = 1 << 16,
    forms: Sequence[BCForm] = tuple(BCForm),
):
    """Hypothesis strategy of :class:`ScanCase` (odd sizes: L = 1, 63, 2049; D not a power of two).

    ``max_elements`` bounds batch * dim * dstate * seqlen so a drawn case stays cheap.
    """
    from hypothesis import strategies as st

    @st.composite
    def _case(draw):
        L = draw(st.sampled_from(list(seqlens)))
        n = draw(st.sampled_from(list(dstates)))
        dim_opts = [d for d in dims if d * n * L <= max_elements] or [min(dims)]
        d = draw(st.sampled_from(dim_opts))
        b = draw(st.integers(1, max(1, min(max_batch, max_elements // max(1, d * n * L)))))
        groups = draw(st.sampled_from([g for g in range(1, d + 1) if d % g == 0]))
        dtype = draw(st.sampled_from(list(dtypes)))
        return ScanCase(
            batch=b,
            dim=d,
            seqlen=L,
            dstate=n,
            B_form=draw(st.sampled_from(list(forms))),
            C_form=draw(st.sampled_from(list(forms))),
            groups=groups,
            has_D=draw(st.booleans()),
            has_z=draw(st.booleans()),
            has_delta_bias=draw(st.booleans()),
            delta_softplus=draw(st.booleans()),
            has_initial_state=draw(st.booleans()),
            return_last_state=draw(st.booleans()),
            dtype=dtype,
            out_float32=dtype in (torch.float16, torch.bfloat16) and draw(st.booleans()),
            seed=draw(st.integers(0, 2**31 - 1)),
        )

    return _case()


def rel_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64 (absolute error when ref is all zeros)."""
    x = x.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    if not torch.isfinite(x).all():
        return float("inf")
    denom = ref.norm()
    diff = (x - ref).norm()
    return float(diff / denom) if denom > 0 else float(diff)


def backend_reasons(backend: str, case: ScanCase, device: str | torch.device = "cpu") -> list[str]:
    """Why ``backend`` cannot run ``case`` (empty: it can)."""
    return get_backend(backend).not_supported_reasons(case.inputs(device, requires_grad=True))


def assert_scan_close(
    case: ScanCase,
    backend: str,
    device: str | torch.device = "cpu",
    tolerances: dict[torch.dtype, float] | None = None,
    check_grads: bool = True,
) -> dict[str, float]:
    """Run ``backend`` on ``case`` and the float64 reference on the same inputs; assert output, last
    state and every gradient agree within the dtype's tolerance. Returns the errors seen."""
    from .scan import selective_scan

    tol = (tolerances or TOLERANCES)[case.dtype]
    kw = case.make(device, requires_grad=check_grads)
    # the truth: the same values upcast to float64, on the CPU
    ref_kw = {
        k: (
            v.detach().cpu().to(torch.float64).requires_grad_(check_grads)
            if isinstance(v, torch.Tensor)
            else v
        )
        for k, v in kw.items()
    }
    ref_kw["out_dtype"] = None
    ref_kw["return_last_state"] = True
    ref_out, ref_last = selective_scan_ref_inputs(ScanInputs(**ref_kw))

    res = selective_scan(**kw, backend=backend)
    out, last = res if case.return_last_state else (res, None)
    expected_dtype = torch.float32 if case.out_float32 else case.dtype
    assert out.dtype == expected_dtype, (
        f"{backend}: output dtype {out.dtype}, expected {expected_dtype}"
    )
    assert out.shape == (case.batch, case.dim, case.seqlen)
    errors = {"out": rel_error(out, ref_out)}
    if last is not None:
        assert last.shape == (case.batch, case.dim, case.dstate)
        errors["last_state"] = rel_error(last, ref_last)
    if check_grads:
        g = torch.Generator().manual_seed(case.seed + 1)
        # the upstream gradients the backend sees (rounded to its output dtypes) feed the truth too
        gout = torch.randn(out.shape, generator=g).to(out.dtype).to(torch.float32)
        glast = torch.randn(ref_last.shape, generator=g)
        if last is not None:
            glast = glast.to(last.dtype).to(torch.float32)
        names = [k for k, v in kw.items() if isinstance(v, torch.Tensor)]
        loss = (out * gout.to(out.device, out.dtype)).sum()
        ref_loss = (ref_out * gout.to(torch.float64)).sum()
        if last is not None:
            loss = loss + (last * glast.to(last.device, last.dtype)).sum()
            ref_loss = ref_loss + (ref_last * glast.to(torch.float64)).sum()
        grads = torch.autograd.grad(loss, [kw[n] for n in names], allow_unused=True)
        ref_grads = torch.autograd.grad(ref_loss, [ref_kw[n] for n in names], allow_unused=True)
        for n, gr, rg in zip(names, grads, ref_grads):
            assert gr is not None, f"{backend}: no gradient for {n}"
            assert gr.shape == kw[n].shape and gr.dtype == kw[n].dtype, (
                f"{backend}: gradient of {n} has shape {tuple(gr.shape)} {gr.dtype}"
            )
            errors[f"d{n}"] = rel_error(
                gr, rg if rg is not None else torch.zeros_like(gr, dtype=torch.float64)
            )
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"{backend} differs from the float64 reference beyond {tol:g} on {case}: {bad}"
    return errors


def replace(case: ScanCase, **changes) -> ScanCase:
    return dataclasses.replace(case, **changes)
