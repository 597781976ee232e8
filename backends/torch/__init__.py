"""The ``torch`` backend (fast chunked pure-PyTorch scan) and the ``reference`` backend (sequential)."""

from __future__ import annotations

import torch

from scanlib.autograd import scan_with_autograd
from scanlib.inputs import Feature, ScanInputs
from scanlib.reference import selective_scan_ref_inputs
from scanlib.registry import Backend

from . import chunked

ALL_FEATURES = frozenset(Feature)
ALL_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16, torch.float64})


class _ChunkedKernels:
    def forward(self, inputs: ScanInputs):
        # grad mode is off inside the autograd Function: ask the tensors whether a backward follows
        save = any(t is not None and t.requires_grad for t in inputs.tensors())
        return chunked.scan_fwd(inputs, save=save)

    def backward(self, inputs: ScanInputs, saved, dout, dlast):
        return chunked.scan_bwd(inputs, saved, dout, dlast)


class TorchBackend(Backend):
    """Pure PyTorch, any device torch runs on; chunked over L with a recomputing backward."""

    name = "torch"
    priority = 10
    ops = frozenset({"selective_scan", "cross_scan", "cross_merge"})
    devices = frozenset({"cpu", "cuda", "mps", "xpu"})
    dtypes = ALL_DTYPES
    features = ALL_FEATURES
    deterministic = True
    description = "pure PyTorch: chunked scan with a custom backward; gather/scatter routes"

    _kernels = _ChunkedKernels()

    def selective_scan(self, inputs: ScanInputs):
        return scan_with_autograd(self._kernels, inputs)

    def cross_scan(self, inputs):
        from scanlib.routes import reference as routes_ref

        return routes_ref.cross_scan(inputs)

    def cross_merge(self, inputs):
        from scanlib.routes import reference as routes_ref

        return routes_ref.cross_merge(inputs)


class ReferenceBackend(Backend):
    """The sequential reference (autograd through a Python loop). Never chosen automatically
    while ``torch`` can run; name it explicitly to compare against the truth."""

    name = "reference"
    priority = -100
    devices = frozenset({"cpu", "cuda", "mps", "xpu"})
    dtypes = ALL_DTYPES
    features = ALL_FEATURES
    description = "sequential loop over L: the ground truth, slow"

    def selective_scan(self, inputs: ScanInputs):
        return selective_scan_ref_inputs(inputs)
