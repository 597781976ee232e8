import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# CI: derandomized and bounded; SCANLIB_HYPOTHESIS_PROFILE=long for a deeper search.
settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=12,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev", max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "long", max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("SCANLIB_HYPOTHESIS_PROFILE", "ci"))

# Without a GPU the triton backend's kernels run in Triton's CPU interpreter (named backend only;
# it never wins automatic selection there). Triton reads this when the kernels are first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
