"""The shared property suite, generated for every registered backend.

Each backend runs the same hypothesis-drawn cases against the float64 reference; a case a backend
cannot run here is skipped with the backend's own reasons (never silently passed).
"""

import os

import pytest
import torch
from hypothesis import assume, given

import scanlib
from scanlib.testing import assert_scan_close, backend_reasons, scan_cases

# Per-backend case sizes: the Triton CPU interpreter is slow, so it gets short sequences.
SETTINGS = {
    # triton computes in float32 and declines float64: draw only the dtypes it runs
    "triton": dict(
        seqlens=(1, 2, 7, 63, 65, 130, 257),
        max_elements=1 << 13,
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
        if not torch.cuda.is_available():
            pytest.skip(f"{backend} runs on CUDA tensors and no CUDA device is present")

    ran, declined = [], set()

    @given(case=scan_cases(**SETTINGS.get(backend, {})))
    def check(case):
        reasons = backend_reasons(backend, case, device)
        if reasons:
            # a case outside the backend's declared capabilities is drawn again, not failed
            declined.update(reasons)
            assume(False)
        assert_scan_close(case, backend, device)
        ran.append(case)

    check()
    # never a silent pass: the backend must have run cases, and say why it declined the others
    assert ran, f"{backend} declined every drawn case: {sorted(declined)}"
