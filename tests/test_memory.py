"""scanlib.memory (the CPU output cache) and the torch backend's reused workspace."""

from __future__ import annotations

import gc

import torch

import scanlib
from scanlib import memory
from scanlib.testing import ScanCase, assert_scan_close


def test_cached_buffer_is_reused_only_after_every_view_dies():
    memory.release_cached_memory()
    a = memory.empty(4, 1 << 18, dtype=torch.float32)
    ptr = a.data_ptr()
    view = a[1:]
    del a
    gc.collect()
    assert memory.cached_bytes() == 0  # the view still holds the storage
    b = memory.empty(4, 1 << 18, dtype=torch.float32)
    assert b.data_ptr() != ptr
    view.fill_(3.0)
    del view
    assert memory.cached_bytes() == 4 << 20
    c = memory.empty(4, 1 << 18, dtype=torch.float32)
    assert c.data_ptr() == ptr and memory.cached_bytes() == 0
    assert b.shape == c.shape == (4, 1 << 18)
    del b, c
    assert memory.release_cached_memory() == 8 << 20
    assert memory.cached_bytes() == 0


def test_cache_limit_and_small_or_16bit_tensors():
    memory.release_cached_memory()
    small = memory.empty(3, 5, dtype=torch.float32)  # below MIN_BYTES: a plain tensor
    assert small.shape == (3, 5)
    bf = memory.empty(2, 1 << 19, dtype=torch.bfloat16)
    assert bf.dtype == torch.bfloat16 and bf.shape == (2, 1 << 19)
    bf.fill_(1.5)
    assert float(bf[1, 7]) == 1.5
    memory.set_cache_limit(0)
    try:
        x = memory.empty(1 << 20, dtype=torch.float32)
        del x
        assert memory.cached_bytes() == 0
    finally:
        memory.set_cache_limit(256 << 20)


def test_torch_backend_interleaved_calls_keep_their_own_state():
    """Two forwards, then the two backwards in the other order: the reused workspace must not
    leak one call's state into the other's gradients."""
    cases = [
        ScanCase.example(batch=3, dim=8, seqlen=300, dstate=1, groups=4, seed=1),
        ScanCase.example(batch=2, dim=6, seqlen=77, dstate=3, groups=3, seed=2),
    ]
    kws = [c.make() for c in cases]
    outs = [scanlib.selective_scan(**kw, backend="torch") for kw in kws]
    grads = []
    for (out, _last), kw in zip(reversed(outs), reversed(kws)):
        out.sum().backward()
        grads.append({k: v.grad.clone() for k, v in kw.items() if isinstance(v, torch.Tensor)})
    for case in cases:  # the same calls one at a time match the float64 reference
        assert_scan_close(case, "torch")
    for case, g in zip(reversed(cases), grads):
        fresh = case.make()
        out = scanlib.selective_scan(**fresh, backend="torch")[0]
        out.sum().backward()
        for name, grad in g.items():
            torch.testing.assert_close(grad, fresh[name].grad, rtol=0, atol=0)


def test_torch_backend_first_call_under_inference_mode():
    """The reused workspace is created by whichever call comes first; a first call under
    inference_mode must not leave inference tensors that later autograd calls write into."""
    from scanlib_backends.torch import chunked

    chunked.release_workspace()
    case = ScanCase.example(batch=2, dim=6, seqlen=50, dstate=2, groups=3, seed=4)
    with torch.inference_mode():
        scanlib.selective_scan(**case.make(requires_grad=False), backend="torch")
    assert_scan_close(case, "torch")
