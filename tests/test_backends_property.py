"""The shared property suite, generated for every registered backend.

Each backend runs the same hypothesis-drawn cases against the float64 reference; a case a backend
cannot run here is skipped with the backend's own reasons (never silently passed).
"""

import os

import pytest
import torch
from hypothesis import given

import scanlib
from scanlib.testing import assert_scan_close, backend_reasons, scan_cases

# Per-backend case sizes: the Triton CPU interpreter is slow, so it gets short sequences.
SETTINGS = {
    # triton computes in float32 and declines float64: draw only the dtypes it runs
    "triton": dict(
        seqlens=(1, 2, 7, 63, 65, 130),
        max_elements=1 << 12,
        dims=(1, 2, 3, 5, 6, 12),
        dtypes=(torch.float32, torch.float16, torch.bfloat16),
    ),
    # cupy computes in float32 and declines float64
    "cupy": dict(dtypes=(torch.float32, torch.float16, torch.bfloat16)),
}
DEVICE = {
    "triton": "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda",
    "cupy": "cuda",
    "cuda": "cuda",
}

BACKENDS = [b for b in scanlib.registered_backends() if b not in ("reference",)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_reference(backend):
    unavailable = scanlib.get_backend(backend).availability_reasons()
    if unavailable:
        pytest.skip(f"{backend}: " + "; ".join(unavailable))
    device = DEVICE.get(backend, "cpu")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            pytest.skip(f"{backend} runs on CUDA tensors and no CUDA device is present")

    @given(case=scan_cases(**SETTINGS.get(backend, {})))
    def check(case):
        reasons = backend_reasons(backend, case, device)
        if reasons:
            # only capability limits the backend declares may skip a case
            pytest.skip(f"{backend} declines: " + "; ".join(reasons))
        assert_scan_close(case, backend, device)

    check()
