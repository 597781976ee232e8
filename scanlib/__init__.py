"""scanlib: one selective-scan API over interchangeable kernels, plus 2D scan routes.

Importing scanlib imports no optional backend package (numba, triton, cupy) and probes no device.
"""

from __future__ import annotations

from .cross import CrossScanInputs, cross_selective_scan
from .errors import (
    BackendUnavailableError,
    MissingDependencyError,
    ScanInputError,
    ScanlibError,
    UnknownBackendError,
)
from .inputs import BCForm, Feature, ScanInputs
from .ops import through_custom_op
from .reference import selective_scan_ref
from .registry import (
    Backend,
    Requirement,
    available_backends,
    current_selection,
    get_backend,
    register_backend,
    registered_backends,
    set_backend,
    unregister_backend,
    use_backend,
)
from .routes import (
    Route,
    RouteError,
    RouteInputs,
    RouteSet,
    UnknownRouteError,
    cross_merge,
    cross_scan,
    get_route_set,
    list_route_sets,
    register_route,
    register_route_set,
)
from .scan import explain, scan_inputs, selective_scan

__all__ = [
    "Backend",
    "BackendUnavailableError",
    "BCForm",
    "CrossScanInputs",
    "Feature",
    "MissingDependencyError",
    "Requirement",
    "Route",
    "RouteError",
    "RouteInputs",
    "RouteSet",
    "ScanInputError",
    "ScanInputs",
    "ScanlibError",
    "UnknownBackendError",
    "UnknownRouteError",
    "available_backends",
    "cross_merge",
    "cross_scan",
    "cross_selective_scan",
    "current_selection",
    "explain",
    "get_backend",
    "get_route_set",
    "list_route_sets",
    "register_backend",
    "register_route",
    "register_route_set",
    "registered_backends",
    "scan_inputs",
    "selective_scan",
    "selective_scan_ref",
    "set_backend",
    "through_custom_op",
    "unregister_backend",
    "use_backend",
]

__version__ = "0.1.0"
