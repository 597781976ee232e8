"""Scan routes: read a 2D map as K 1D sequences (``cross_scan``) and put them back (``cross_merge``).

Built-in route sets: cross2d, unidi, bidi, rot90, snake, zigzag, hilbert, atrous, local<w>.
See docs/routes.md. Draw one with ``python -m scanlib.routes show cross2d --size 8x8 -o routes.png``.
"""

from __future__ import annotations

from . import builtin  # noqa: F401  (registers the built-in routes and sets)
from .builtin import gilbert, local_windows
from .core import (
    CHECK_SIZES,
    Route,
    RouteError,
    RouteSet,
    UnknownRouteError,
    get_route,
    get_route_set,
    list_route_sets,
    list_routes,
    register_route,
    register_route_set,
    register_route_set_family,
)
from .inputs import RouteInputs
from .ops import cross_merge, cross_scan, explain_routes

__all__ = [
    "CHECK_SIZES",
    "Route",
    "RouteError",
    "RouteInputs",
    "RouteSet",
    "UnknownRouteError",
    "cross_merge",
    "cross_scan",
    "explain_routes",
    "get_route",
    "get_route_set",
    "gilbert",
    "list_route_sets",
    "list_routes",
    "local_windows",
    "register_route",
    "register_route_set",
    "register_route_set_family",
]
