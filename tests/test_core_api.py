"""The public API: selection precedence, errors, laziness."""

import subprocess
import sys
import threading

import pytest
import torch

import scanlib
from scanlib import selective_scan
from scanlib.inputs import BCForm
from scanlib.testing import ScanCase, assert_scan_close


def _args(b=2, d=4, L=5, n=3, dtype=torch.float32):
    return (
        torch.randn(b, d, L, dtype=dtype),
        torch.rand(b, d, L, dtype=dtype),
        -torch.rand(d, n),
        torch.randn(b, n, L, dtype=dtype),
        torch.randn(b, n, L, dtype=dtype),
    )


class _Recorder(scanlib.Backend):
    """A backend that records being called and delegates to the torch backend."""

    name = "recorder"
    priority = -50
    devices = frozenset({"cpu"})
    dtypes = frozenset({torch.float32})
    features = frozenset(scanlib.Feature) - {scanlib.Feature.Z_GATE}
    calls = 0

    def selective_scan(self, inputs):
        type(self).calls += 1
        return scanlib.get_backend("torch").selective_scan(inputs)


@pytest.fixture
def recorder():
    scanlib.register_backend(_Recorder(), replace=True)
    _Recorder.calls = 0
    yield _Recorder
    scanlib.unregister_backend("recorder")
    scanlib.set_backend(None)


def test_import_is_lazy():
    code = (
        "import sys, scanlib; "
        "bad = [m for m in ('numba', 'triton', 'cupy') if m in sys.modules]; "
        "assert not bad, bad; "
        "import torch; assert not torch.cuda.is_initialized()"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_precedence(recorder, monkeypatch):
    args = _args()
    monkeypatch.setenv("SCANLIB_BACKEND", "recorder")
    selective_scan(*args)
    assert recorder.calls == 1
    scanlib.set_backend("torch")  # set_backend beats the environment
    selective_scan(*args)
    assert recorder.calls == 1
    with scanlib.use_backend("recorder"):  # the context beats set_backend
        selective_scan(*args)
        assert recorder.calls == 2
        selective_scan(*args, backend="torch")  # per call beats everything
        assert recorder.calls == 2
        with scanlib.use_backend("torch"):
            selective_scan(*args)
        assert recorder.calls == 2
        selective_scan(*args)
        assert recorder.calls == 3
    scanlib.set_backend("auto")
    monkeypatch.delenv("SCANLIB_BACKEND")
    assert scanlib.current_selection()[1] == "automatic"


def test_context_is_per_thread(recorder):
    seen = {}

    def worker():
        seen["sel"] = scanlib.current_selection()[0]

    with scanlib.use_backend("recorder"):
        t = threading.Thread(target=worker)
        t.start()
        t.join()
        assert scanlib.current_selection()[0] == ("recorder",)
    assert seen["sel"] is None


def test_named_backend_that_declines_lists_reasons(recorder):
    u, delta, A, B, C = _args()
    z = torch.randn_like(u)
    with pytest.raises(scanlib.BackendUnavailableError, match="recorder: does not support z gate"):
        selective_scan(u, delta, A, B, C, z=z, backend="recorder")
    # an ordered list falls through to the next candidate that can run
    selective_scan(u, delta, A, B, C, z=z, backend=["recorder", "torch"])
    # automatic selection skips the decliner
    selective_scan(u, delta, A, B, C, z=z)


def test_unknown_backend_lists_known():
    with pytest.raises(scanlib.UnknownBackendError, match="known backends: .*torch"):
        selective_scan(*_args(), backend="nope")
    with pytest.raises(scanlib.UnknownBackendError):
        scanlib.set_backend("nope")


def test_explain_and_available():
    assert "torch" in scanlib.available_backends()
    info = scanlib.explain(*_args())
    assert info["torch"] == []
    assert info["selected"][0] in scanlib.available_backends()
    assert any(
        "cuda" in " ".join(r) or "not installed" in " ".join(r)
        for k, r in info.items()
        if k in ("cuda", "cupy")
    )


def test_missing_package_names_the_extra():
    class NeedsPkg(scanlib.Backend):
        name = "needspkg"
        requires = (scanlib.Requirement("scanlib_no_such_package", "nosuch"),)

    scanlib.register_backend(NeedsPkg(), replace=True)
    try:
        with pytest.raises(
            scanlib.BackendUnavailableError, match=r"pip install 'scanlib-vmamba\[nosuch\]'"
        ):
            selective_scan(*_args(), backend="needspkg")
    finally:
        scanlib.unregister_backend("needspkg")


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: a.__setitem__(0, torch.randn(2, 4)), r"u: expected shape \[B, D, L\]"),
        (
            lambda a: a.__setitem__(1, torch.rand(2, 4, 6)),
            r"delta: expected shape \[B=2, D=4, L=5\], got \[2, 4, 6\]",
        ),
        (lambda a: a.__setitem__(2, torch.rand(3, 3)), r"A: expected shape \[D=4, N\]"),
        (
            lambda a: a.__setitem__(3, torch.randn(2, 3, 3, 5)),
            r"B: D=4 is not divisible by the number of groups G=3",
        ),
        (lambda a: a.__setitem__(4, torch.randn(2, 2, 5)), r"C: expected shape \[B=2, N=3, L=5\]"),
        (
            lambda a: a.__setitem__(1, torch.rand(2, 4, 5, dtype=torch.float64)),
            "delta: dtype torch.float64 differs",
        ),
        (
            lambda a: a.__setitem__(2, -torch.rand(4, 3, dtype=torch.float16)),
            "A: dtype torch.float16 is not allowed",
        ),
        (
            lambda a: a.__setitem__(0, torch.randint(0, 3, (2, 4, 5))),
            "u: dtype torch.int64 is not supported",
        ),
    ],
)
def test_bad_input(change, match):
    a = list(_args())
    change(a)
    with pytest.raises(scanlib.ScanInputError, match=match):
        selective_scan(*a)


def test_bad_optional_inputs():
    u, delta, A, B, C = _args()
    with pytest.raises(scanlib.ScanInputError, match=r"D: expected shape \[D=4\]"):
        selective_scan(u, delta, A, B, C, D=torch.randn(5))
    with pytest.raises(
        scanlib.ScanInputError, match=r"initial_state: expected shape \[B=2, D=4, N=3\]"
    ):
        selective_scan(u, delta, A, B, C, initial_state=torch.randn(2, 4))
    with pytest.raises(scanlib.ScanInputError, match="out_dtype"):
        selective_scan(u, delta, A, B, C, out_dtype=torch.float16)
    if torch.cuda.is_available():  # pragma: no cover - device mix needs two devices
        with pytest.raises(scanlib.ScanInputError, match="device"):
            selective_scan(u, delta, A.cuda(), B, C)


def test_inputs_are_not_modified_and_strides_accepted():
    b, d, L, n = 2, 6, 9, 2
    u = torch.randn(b, L, d).transpose(1, 2)  # non-contiguous
    delta = torch.rand(b, d, L)
    A = -torch.rand(n, d).t()
    B = torch.randn(b, 3, L, n).transpose(2, 3)
    C = torch.randn(b, 3, n, L)
    copies = [t.clone() for t in (u, delta, A, B, C)]
    out = selective_scan(u, delta, A, B, C, delta_softplus=True)
    ref = scanlib.selective_scan_ref(*copies, delta_softplus=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for t, c in zip((u, delta, A, B, C), copies):
        assert torch.equal(t, c)


def test_gradcheck_reference_float64():
    case = ScanCase(
        2,
        4,
        7,
        3,
        BCForm.GROUPED,
        BCForm.CONSTANT,
        2,
        True,
        True,
        True,
        True,
        True,
        True,
        torch.float64,
        False,
        3,
    )
    kw = case.make()
    names = [k for k, v in kw.items() if isinstance(v, torch.Tensor)]
    tensors = [kw[k] for k in names]

    def f(*ts):
        args = dict(kw)
        args.update(zip(names, ts))
        out, last = scanlib.selective_scan_ref(**args)
        return out, last

    assert torch.autograd.gradcheck(f, tensors, eps=1e-6, atol=1e-5)


def test_gradcheck_torch_backend_float64():
    case = ScanCase(
        1,
        6,
        11,
        2,
        BCForm.SEQUENCE,
        BCForm.GROUPED,
        3,
        True,
        True,
        True,
        True,
        True,
        True,
        torch.float64,
        False,
        5,
    )
    kw = case.make()
    names = [k for k, v in kw.items() if isinstance(v, torch.Tensor)]

    def f(*ts):
        args = dict(kw)
        args.update(zip(names, ts))
        return selective_scan(**args, backend="torch")

    assert torch.autograd.gradcheck(f, [kw[k] for k in names], eps=1e-6, atol=1e-5)


def test_torch_long_sequence_matches_reference():
    """The chunked path stays accurate (float32) at L = 65536."""
    g = torch.Generator().manual_seed(0)
    b, d, n, L = 1, 3, 2, 65536
    u = torch.randn(b, d, L, generator=g)
    delta = torch.randn(b, d, L, generator=g) - 2
    A = -torch.exp(torch.rand(d, n, generator=g) * 3 - 2)
    B = torch.randn(b, 1, n, L, generator=g)
    C = torch.randn(b, 1, n, L, generator=g)
    out, last = selective_scan(
        u, delta, A, B, C, delta_softplus=True, return_last_state=True, backend="torch"
    )
    ref, ref_last = scanlib.selective_scan_ref(
        *(t.double() for t in (u, delta, A, B, C)), delta_softplus=True, return_last_state=True
    )
    assert float((out.double() - ref).norm() / ref.norm()) < 1e-5
    assert float((last.double() - ref_last).norm() / ref_last.norm()) < 1e-5


def test_steep_decay_stays_finite():
    """Decays far beyond exp's float32 range inside one chunk must not overflow."""
    b, d, n, L = 1, 2, 2, 300
    u = torch.randn(b, d, L)
    delta = torch.full((b, d, L), 30.0)
    A = -torch.full((d, n), 10.0)
    B = torch.randn(b, n, L)
    C = torch.randn(b, n, L)
    out = selective_scan(u, delta, A, B, C, backend="torch")
    ref = scanlib.selective_scan_ref(*(t.double() for t in (u, delta, A, B, C)))
    assert torch.isfinite(out).all()
    assert float((out.double() - ref).norm() / ref.norm()) < 1e-5


@pytest.mark.parametrize("N", [1, 3])
def test_torch_backend_many_blocks_match_reference(monkeypatch, N):
    """Tiny blocks force the torch backend's plan to split the batch and the channels of each
    group across blocks (and pad the last chunk): every block boundary must be invisible."""
    from scanlib_backends.torch import chunked

    monkeypatch.setattr(chunked, "_BLOCK_ELEMS", 64)
    chunked.release_workspace()
    case = ScanCase.example(batch=3, dim=12, groups=3, seqlen=45, dstate=N, seed=5)
    plan = chunked._Plan(scanlib.scan_inputs(**case.make(requires_grad=False)))
    assert len({(b0, b1) for b0, b1, _, _ in plan.blocks}) > 1  # batch split
    assert any(j1 - j0 < plan.Dg for _, _, j0, j1 in plan.blocks)  # channels split
    assert plan.rem  # padded last chunk
    assert_scan_close(case, "torch")
