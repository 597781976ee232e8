"""The scan as one torch.library op: opcheck, gradients, torch.compile without graph breaks."""

import torch

import scanlib
from scanlib.inputs import BCForm
from scanlib.testing import ScanCase


def _case_kwargs(seed=0, dtype=torch.float32):
    case = ScanCase(
        2,
        4,
        9,
        2,
        BCForm.GROUPED,
        BCForm.GROUPED,
        2,
        True,
        True,
        True,
        True,
        True,
        True,
        dtype,
        False,
        seed,
    )
    return case.make()


def test_op_matches_eager_and_gradients():
    kw = _case_kwargs(dtype=torch.float64)
    names = [k for k, v in kw.items() if isinstance(v, torch.Tensor)]
    out, last = scanlib.selective_scan(**kw, backend="torch")
    g_eager = torch.autograd.grad(out.sum() + last.sum(), [kw[n] for n in names])
    with scanlib.through_custom_op():
        out2, last2 = scanlib.selective_scan(**kw, backend="torch")
    assert out2.grad_fn is not None
    g_op = torch.autograd.grad(out2.sum() + last2.sum(), [kw[n] for n in names])
    torch.testing.assert_close(out2, out)
    torch.testing.assert_close(last2, last)
    for a, b in zip(g_op, g_eager):
        torch.testing.assert_close(a, b)


def test_opcheck():
    kw = _case_kwargs()
    args = (
        kw["u"],
        kw["delta"],
        kw["A"],
        kw["B"],
        kw["C"],
        kw["D"],
        kw["z"],
        kw["delta_bias"],
        kw["initial_state"],
        True,
        None,
        "torch",
    )
    torch.library.opcheck(torch.ops.scanlib.selective_scan.default, args)


def test_compile_has_no_graph_break():
    kw = _case_kwargs()
    kw = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}

    def f(u, delta):
        out, last = scanlib.selective_scan(
            u * 2,
            delta,
            kw["A"],
            kw["B"],
            kw["C"],
            kw["D"],
            kw["z"],
            kw["delta_bias"],
            True,
            True,
            initial_state=kw["initial_state"],
        )
        return out.sum() + last.sum()

    explanation = torch._dynamo.explain(f)(kw["u"], kw["delta"])
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(kw["u"], kw["delta"]), f(kw["u"], kw["delta"]))


def test_custom_op_backward_on_the_reference_backend():
    """The reference records its graph with plain aten ops, which the custom op's backward runs
    below the autograd key; the gradients must still come out (and equal eager ones)."""
    case = ScanCase.example()
    kw = case.make()
    with scanlib.use_backend("reference"), scanlib.through_custom_op():
        out, last = scanlib.selective_scan(**kw)
        (out.sum() + last.square().sum()).backward()
    eager = case.make()
    out, last = scanlib.selective_scan(**eager, backend="reference")
    (out.sum() + last.square().sum()).backward()
    for name, t in kw.items():
        if isinstance(t, torch.Tensor):
            torch.testing.assert_close(t.grad, eager[name].grad, rtol=1e-6, atol=1e-6)
