"""Analysis and benchmarks of VMamba (and timm) models.

* :mod:`.erf`: effective receptive fields (``vmamba analyze erf``);
* :mod:`.attention`: the selective scan of an SS2D layer as an attention matrix
  (``vmamba analyze attention``);
* :mod:`.throughput`: throughput, latency and memory against resolution (``vmamba bench
  throughput``).

Importing this package imports neither matplotlib nor timm.
"""

from __future__ import annotations

from .attention import (
    AttentionMaps,
    SS2DScanInputs,
    capture_scan_input,
    find_ss2d_layers,
    run_attention,
    scan_attention_matrix,
    scan_attention_mean,
    ss2d_attention,
    ss2d_scan_inputs,
)
from .common import LoadedModel, ModelSpec, feature_extractor, load_images, load_model
from .erf import ERFResult, compute_erf, erf_area_ratios, run_erf
from .throughput import BenchResult, measure, run_throughput, scaling_summary

__all__ = [
    "AttentionMaps",
    "BenchResult",
    "ERFResult",
    "LoadedModel",
    "ModelSpec",
    "SS2DScanInputs",
    "capture_scan_input",
    "compute_erf",
    "erf_area_ratios",
    "feature_extractor",
    "find_ss2d_layers",
    "load_images",
    "load_model",
    "measure",
    "run_attention",
    "run_erf",
    "run_throughput",
    "scaling_summary",
    "scan_attention_matrix",
    "scan_attention_mean",
    "ss2d_attention",
    "ss2d_scan_inputs",
]
