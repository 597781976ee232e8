"""``python -m scanlib.routes``: list the route sets, or show one (ASCII, or a PNG with -o).

python -m scanlib.routes list
python -m scanlib.routes show cross2d --size 4x6
python -m scanlib.routes show cross2d --size 8x8 -o routes.png
"""

from __future__ import annotations

import argparse
import re
import sys

from ..errors import ScanlibError
from .core import get_route_set, list_route_sets, route_set_description
from .plot import ascii_route_set, draw_route_set


def _size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX,]\s*(\d+))?\s*", text)
    if m is None or int(m.group(1)) < 1 or (m.group(2) is not None and int(m.group(2)) < 1):
        raise argparse.ArgumentTypeError(
            f"expected HxW with H, W >= 1 (e.g. 8x8 or 6x10), got {text!r}"
        )
    H = int(m.group(1))
    return H, int(m.group(2) or H)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scanlib.routes", description="scanlib scan routes"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the registered route sets")
    show = sub.add_parser("show", help="show the routes of a set (ASCII, or a PNG with -o)")
    show.add_argument("name", help="route-set name, e.g. cross2d, hilbert, local4")
    show.add_argument("--size", type=_size, default=(8, 8), help="map size HxW (default 8x8)")
    show.add_argument(
        "-o", "--output", help="write a PNG here (needs matplotlib) instead of printing"
    )
    show.add_argument("--columns", type=int, default=None, help="routes per row in the PNG")
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            for name in list_route_sets():
                print(f"{name:10s} {route_set_description(name)}")
            return 0
        rs = get_route_set(args.name)
        H, W = args.size
        if args.output:
            path = draw_route_set(rs, H, W, args.output, columns=args.columns)
            print(f"wrote {path} ({rs.name}, K={len(rs)}, {H}x{W})")
        else:
            print(
                f"route set {rs.name!r} ({rs.description}), H={H}, W={W}; cells show the step at which each route reads them\n"
            )
            print(ascii_route_set(rs, H, W), end="")
        return 0
    except ScanlibError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
