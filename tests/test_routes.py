"""Scan routes: definitions (against independent re-implementations), coverage, adjointness,
gradients, layouts, the backend registry, torch.compile, errors and the picture command."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import scanlib
from scanlib import registry
from scanlib.errors import MissingDependencyError
from scanlib.routes import (
    Route,
    RouteError,
    RouteInputs,
    RouteSet,
    UnknownRouteError,
    cross_merge,
    cross_scan,
    get_route_set,
    gilbert,
    list_route_sets,
    register_route,
    register_route_set,
)
from scanlib.routes.__main__ import main as routes_cli

BUILTIN = [
    "cross2d",
    "unidi",
    "bidi",
    "rot90",
    "snake",
    "zigzag",
    "atrous",
    "hilbert",
    "local2",
    "local4",
    "local7",
]
ALL_SETS = BUILTIN + ["local1", "local3", "local5"]
sizes = st.integers(1, 40)


# ---------------------------------------------------------------------- independent definitions
def _pos(h, w, W):
    return h * W + w


def oracle(name: str, H: int, W: int) -> list[list[int]]:
    """Each set's routes written out the slow, obvious way (loops over cells)."""
    row = [_pos(h, w, W) for h in range(H) for w in range(W)]
    col = [_pos(h, w, W) for w in range(W) for h in range(H)]
    if name == "cross2d":
        return [row, col, row[::-1], col[::-1]]
    if name == "unidi":
        return [row] * 4
    if name == "bidi":
        return [row, row, row[::-1], row[::-1]]
    if name == "rot90":
        grid = torch.arange(H * W).view(H, W)
        return [torch.rot90(grid, k, (0, 1)).flatten().tolist() for k in range(4)]

    def sweep(start_row, start_col, dir_row, dir_col, by_rows):
        # boustrophedon from a corner, written like ZigMa's path builders but for H != W
        out = []
        if by_rows:
            for i in range(H):
                for j in range(W):
                    c = j if i % 2 == 0 else W - 1 - j
                    out.append(_pos(start_row + dir_row * i, start_col + dir_col * c, W))
        else:
            for j in range(W):
                for i in range(H):
                    r = i if j % 2 == 0 else H - 1 - i
                    out.append(_pos(start_row + dir_row * r, start_col + dir_col * j, W))
        return out

    if name == "snake":  # PlainMamba: row snake, its reverse, column snake, its reverse
        r, c = sweep(0, 0, 1, 1, True), sweep(0, 0, 1, 1, False)
        return [r, r[::-1], c, c[::-1]]
    if name == "zigzag":
        corners = [(0, 0, 1, 1), (0, W - 1, 1, -1), (H - 1, 0, -1, 1), (H - 1, W - 1, -1, -1)]
        return [sweep(*cn, by_rows) for cn in corners for by_rows in (True, False)]
    if name == "atrous":  # EfficientVMamba's sub-grid order, without its zero padding
        out = []
        for dh, dw, by_rows in ((0, 0, True), (1, 0, False), (0, 1, True), (1, 1, False)):
            hs, ws = range(dh, H, 2), range(dw, W, 2)
            cells = (
                [(h, w) for h in hs for w in ws] if by_rows else [(h, w) for w in ws for h in hs]
            )
            out.append([_pos(h, w, W) for h, w in cells])
        return out
    if name.startswith("local"):  # LocalMamba: pad to whole windows, view, permute, drop padding
        k = int(name[5:])
        Hp, Wp = -(-H // k) * k, -(-W // k) * k
        grid = torch.full((Hp, Wp), -1, dtype=torch.long)
        grid[:H, :W] = torch.arange(H * W).view(H, W)
        blocks = grid.view(Hp // k, k, Wp // k, k)
        r = [p for p in blocks.permute(0, 2, 1, 3).flatten().tolist() if p >= 0]
        c = [p for p in blocks.permute(2, 0, 3, 1).flatten().tolist() if p >= 0]
        return [r, c, r[::-1], c[::-1]]
    raise KeyError(name)


def table_rows(rs: RouteSet, H: int, W: int) -> list[list[int]]:
    return [[p for p in row if p >= 0] for row in rs.indices(H, W).tolist()]


# ---------------------------------------------------------------------- definitions and coverage
def test_cross2d_official_order():
    rs = get_route_set("cross2d")
    expected = [[0, 1, 2, 3, 4, 5], [0, 3, 1, 4, 2, 5], [5, 4, 3, 2, 1, 0], [5, 2, 4, 1, 3, 0]]
    assert rs.indices(2, 3).tolist() == expected
    x = torch.arange(6.0).view(1, 1, 2, 3)
    assert cross_scan(x, "cross2d")[0, :, 0].tolist() == expected
    assert (
        len(rs) == 4
        and rs.name == "cross2d"
        and [r.name for r in rs.routes] == ["row", "col", "row_rev", "col_rev"]
    )


def test_builtin_sets_are_listed():
    names = list_route_sets()
    for n in BUILTIN + ["local<w>"]:
        assert n in names


@given(name=st.sampled_from([n for n in ALL_SETS if n != "hilbert"]), H=sizes, W=sizes)
def test_route_sets_match_their_definitions(name, H, W):
    rs = get_route_set(name)
    assert table_rows(rs, H, W) == oracle(name, H, W)


@given(name=st.sampled_from(ALL_SETS), H=sizes, W=sizes)
def test_index_tables_cover_the_map(name, H, W):
    rs = get_route_set(name)
    idx = rs.indices(H, W)
    K, L = idx.shape
    assert idx.dtype == torch.long and K == len(rs)
    seen = torch.zeros(H * W, dtype=torch.bool)
    for k, row in enumerate(idx.tolist()):
        n = sum(p >= 0 for p in row)
        assert all(p >= 0 for p in row[:n]) and all(p == -1 for p in row[n:]), (
            "padding only at the end"
        )
        real = row[:n]
        assert len(set(real)) == n, "a route reads each position at most once"
        if not rs.routes[k].subset:
            assert sorted(real) == list(range(H * W))
        seen[real] = True
    assert bool(seen.all()), "the routes together read every position"
    assert L == (H * W if rs.is_permutation else max(len(r) for r in table_rows(rs, H, W)))
    inv = rs.inverse_indices(H, W)
    for k in range(K):
        for step, p in enumerate(idx[k].tolist()):
            if p >= 0:
                assert inv[k, p] == step


@given(H=sizes, W=sizes)
def test_hilbert_routes_are_curves(H, W):
    rs = get_route_set("hilbert")
    assert len(rs) == 8
    corners = {0, W - 1, (H - 1) * W, H * W - 1}
    rows = rs.indices(H, W).tolist()
    for row in rows:
        assert sorted(row) == list(range(H * W))
        assert row[0] in corners
        h, w = np.divmod(np.asarray(row), W)
        d = np.abs(np.diff(h)) + np.abs(np.diff(w))
        # neighbour steps, at most one diagonal one (forced by some odd sizes)
        assert np.all((d == 1) | ((d == 2) & (np.diff(h) != 0) & (np.diff(w) != 0)))
        assert (d == 2).sum() <= 1
    if H > 1 and W > 1 and H * W > 4:
        assert len({tuple(r) for r in rows}) == 8, "the eight symmetries differ"


def _hilbert_d2xy(n: int, d: int) -> tuple[int, int]:
    """The textbook Hilbert curve on an n x n grid (n a power of two): step d -> (x, y)."""
    x = y = 0
    s = 1
    while s < n:
        rx = 1 & (d // 2)
        ry = 1 & (d ^ rx)
        if ry == 0:
            if rx == 1:
                x, y = s - 1 - x, s - 1 - y
            x, y = y, x
        x, y = x + s * rx, y + s * ry
        d //= 4
        s *= 2
    return x, y


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 32])
def test_gilbert_is_the_hilbert_curve_on_powers_of_two(n):
    classic = [y * n + x for x, y in (_hilbert_d2xy(n, d) for d in range(n * n))]
    assert gilbert(n, n).tolist() == classic
    assert get_route_set("hilbert").indices(n, n)[0].tolist() == classic


def test_documented_special_cases():
    assert torch.equal(
        get_route_set("local1").indices(5, 7), get_route_set("cross2d").indices(5, 7)
    )
    atrous = get_route_set("atrous")
    assert atrous.indices(3, 5).tolist() == [
        [0, 2, 4, 10, 12, 14],
        [5, 7, 9, -1, -1, -1],
        [1, 3, 11, 13, -1, -1],
        [6, 8, -1, -1, -1, -1],
    ]
    x = _rand(2, 3, 5, 7)
    assert torch.equal(cross_merge(cross_scan(x, atrous), atrous, 5, 7), x)  # one route per cell


def test_local_family_is_parameterized():
    rs = get_route_set("local5")
    assert rs is get_route_set("local5") and rs.name == "local5" and len(rs) == 4
    assert table_rows(rs, 7, 11) == oracle("local5", 7, 11)
    with pytest.raises(RouteError, match="w >= 1"):
        get_route_set("local0")
    with pytest.raises(RouteError, match="family"):
        register_route_set("local9", ["row"])


# ---------------------------------------------------------------------- the ops
def _rand(*shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


@given(
    name=st.sampled_from(ALL_SETS),
    H=sizes,
    W=sizes,
    B=st.integers(1, 2),
    C=st.integers(1, 3),
    channels_last=st.booleans(),
)
def test_merge_is_the_adjoint_of_scan(name, H, W, B, C, channels_last):
    rs = get_route_set(name)
    x = _rand(B, C, H, W, seed=1)
    xin = x.permute(0, 2, 3, 1).contiguous() if channels_last else x
    s = cross_scan(xin, name, channels_last=channels_last)
    assert s.shape == (B, len(rs), C, rs.length(H, W)) and s.is_contiguous()
    y = _rand(*s.shape, seed=2)  # random values in the padding too: merge must ignore them
    m = cross_merge(y, rs, H, W, channels_last=channels_last)
    assert m.is_contiguous()
    if channels_last:
        m = m.permute(0, 3, 1, 2)
    torch.testing.assert_close((s * y).sum(), (x * m).sum(), rtol=1e-10, atol=1e-10)
    if rs.is_permutation:
        torch.testing.assert_close(cross_merge(cross_scan(x, rs), rs, H, W), len(rs) * x)
    # scan values: exactly the table's gather, 0 on padding
    idx = rs.indices(H, W)
    flat = torch.cat([x.reshape(B, C, H * W), x.new_zeros(B, C, 1)], 2)
    expect = flat[:, :, torch.where(idx < 0, H * W, idx)].permute(0, 2, 1, 3)
    assert torch.equal(s, expect)


@given(name=st.sampled_from(ALL_SETS), H=st.integers(1, 12), W=st.integers(1, 12))
def test_channels_last_equals_channels_first(name, H, W):
    x = _rand(2, 3, H, W, dtype=torch.float32)
    s = cross_scan(x, name)
    assert torch.equal(cross_scan(x.permute(0, 2, 3, 1).contiguous(), name, channels_last=True), s)
    # non-contiguous inputs too
    assert torch.equal(cross_scan(x.transpose(2, 3).contiguous().transpose(2, 3), name), s)
    m = cross_merge(s, name, H, W)
    torch.testing.assert_close(
        cross_merge(s, name, H, W, channels_last=True), m.permute(0, 2, 3, 1)
    )


@pytest.mark.parametrize(
    "name,H,W", [("cross2d", 3, 4), ("atrous", 3, 5), ("local3", 4, 5), ("hilbert", 2, 3)]
)
def test_gradcheck(name, H, W):
    rs = get_route_set(name)
    x = _rand(2, 2, H, W).requires_grad_()
    y = _rand(2, len(rs), 2, rs.length(H, W)).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: cross_scan(t, name), (x,))
    assert torch.autograd.gradcheck(lambda t: cross_merge(t, name, H, W), (y,))
    xl = x.detach().permute(0, 2, 3, 1).contiguous().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: cross_scan(t, name, channels_last=True), (xl,))
    assert torch.autograd.gradcheck(lambda t: cross_merge(t, name, H, W, channels_last=True), (y,))
    assert torch.autograd.gradgradcheck(lambda t: cross_scan(t, name), (x,))


def test_backward_is_the_other_op():
    rs = get_route_set("atrous")
    x = _rand(2, 3, 5, 7).requires_grad_()
    g = _rand(2, 4, 3, rs.length(5, 7))
    cross_scan(x, rs).backward(g)
    assert torch.equal(x.grad, cross_merge(g, rs, 5, 7))
    y = g.clone().requires_grad_()
    gm = _rand(2, 3, 5, 7)
    cross_merge(y, rs, 5, 7).backward(gm)
    assert torch.equal(y.grad, cross_scan(gm, rs))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_dtypes(dtype):
    x = _rand(2, 3, 5, 6, dtype=dtype)
    s = cross_scan(x, "cross2d")
    assert s.dtype == dtype and torch.equal(s.double(), cross_scan(x.double(), "cross2d"))
    m = cross_merge(s, "cross2d", 5, 6)
    assert m.dtype == dtype
    torch.testing.assert_close(m.double(), 4 * x.double(), rtol=1e-2, atol=1e-2)


def test_index_tables_are_cached_and_usable_after_inference_mode():
    rs = RouteSet("fresh", ["row", "col"])
    with torch.inference_mode():
        first = rs.indices(6, 7)
        cross_scan(torch.randn(1, 2, 6, 7), rs)
    assert rs.indices(6, 7) is first and rs.indices(6, 7, "cpu") is first
    x = torch.randn(1, 2, 6, 7, requires_grad=True)
    cross_scan(x, rs).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 2.0))


# ---------------------------------------------------------------------- registry and compile
def test_route_ops_go_through_the_backend_registry():
    seen = []

    class Spy(registry.Backend):
        name = "routes_spy"
        priority = 10_000
        ops = frozenset({"cross_scan", "cross_merge"})
        dtypes = frozenset({torch.float32})

        def cross_scan(self, inputs):
            seen.append(inputs)
            from scanlib.routes import reference

            return reference.cross_scan(inputs)

        def cross_merge(self, inputs):
            seen.append(inputs)
            from scanlib.routes import reference

            return reference.cross_merge(inputs)

    scanlib.register_backend(Spy())
    try:
        x = torch.randn(2, 3, 4, 5)
        s = cross_scan(x, "cross2d")
        cross_merge(s, "cross2d", 4, 5, channels_last=True)
        cross_scan(x.double(), "cross2d")  # the spy declines float64: automatic selection moves on
        assert cross_scan(x, "cross2d", backend="torch").shape == s.shape
    finally:
        scanlib.unregister_backend("routes_spy")
    assert [i.op for i in seen] == ["cross_scan", "cross_merge"]
    inp = seen[1]
    assert (
        isinstance(inp, RouteInputs)
        and inp.channels_last
        and (inp.H, inp.W, inp.K, inp.L) == (4, 5, 4, 20)
    )
    assert inp.device.type == "cpu" and inp.dtype == torch.float32 and inp.features == frozenset()
    assert "cross_merge" in inp.describe() and "cross2d" in inp.describe()
    assert registry.select(seen[0]).name == "torch"


def test_compile_without_graph_breaks():
    rs = RouteSet("mine", ["row", "col_rev", "atrous_11_col"])  # unregistered, padded

    def f(x):
        s = cross_scan(x, "cross2d", channels_last=True)
        m = cross_merge(s * s, "cross2d", x.shape[1], x.shape[2], channels_last=True)
        t = cross_scan(m, rs, channels_last=True)
        return cross_merge(t, rs, x.shape[1], x.shape[2], channels_last=True)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 5, 7, 3, requires_grad=True)
    out = compiled(x)
    out.sum().backward()
    g = x.grad.clone()
    x.grad = None
    ref = f(x)
    ref.sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g, x.grad)


def test_through_custom_op_matches_eager():
    x = _rand(2, 3, 5, 7).requires_grad_()
    with scanlib.through_custom_op():
        s = cross_scan(x, "local3")
        out = cross_merge(s * s, "local3", 5, 7)
    out.sum().backward()
    g = x.grad.clone()
    x.grad = None
    ref = cross_merge(cross_scan(x, "local3") ** 2, "local3", 5, 7)
    ref.sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g, x.grad)


def test_custom_ops_pass_opcheck():
    from scanlib.routes.ops import cross_merge_op, cross_scan_op

    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    torch.library.opcheck(cross_scan_op, (x, "atrous", False, None))
    y = torch.randn(2, 4, 3, 20, requires_grad=True)
    torch.library.opcheck(cross_merge_op, (y, "cross2d", 4, 5, True, None))


# ---------------------------------------------------------------------- user routes and errors
def test_user_defined_route_in_a_few_lines():
    def diagonal(H, W):  # anti-diagonals, top to bottom within each
        return sorted(range(H * W), key=lambda p: (p // W + p % W, p // W))

    register_route("test_diag", diagonal, replace=True)
    register_route("test_diag_rev", lambda H, W: diagonal(H, W)[::-1], replace=True)
    rs = register_route_set("test_diag2", ["test_diag", "test_diag_rev"], replace=True)
    assert rs.indices(2, 3).tolist() == [[0, 1, 3, 2, 4, 5], [5, 4, 2, 3, 1, 0]]
    x = torch.randn(1, 2, 3, 3)
    torch.testing.assert_close(cross_merge(cross_scan(x, "test_diag2"), "test_diag2", 3, 3), 2 * x)


def test_bad_routes_are_rejected_with_the_position():
    with pytest.raises(RouteError, match=r"position 5 \(h=1, w=2\) is missing"):
        register_route("test_bad", lambda H, W: list(range(H * W - 1)), check_sizes=[(2, 3)])
    with pytest.raises(
        RouteError, match=r"position 0 \(h=0, w=0\) is repeated \(read at steps 0, 1\)"
    ):
        register_route("test_bad", lambda H, W: [0] + list(range(H * W - 1)), check_sizes=[(2, 3)])
    with pytest.raises(RouteError, match="outside the map"):
        register_route("test_bad", lambda H, W: list(range(1, H * W + 1)))
    with pytest.raises(RouteError, match="integers"):
        register_route("test_bad", lambda H, W: np.arange(H * W, dtype=float))
    with pytest.raises(RouteError, match="1-D"):
        register_route("test_bad", lambda H, W: np.arange(H * W).reshape(H, W))
    with pytest.raises(RouteError, match="failed at H=1, W=1"):
        register_route("test_bad", lambda H, W: 1 // (H - 1))
    with pytest.raises(RouteError, match="already registered"):
        register_route("row", lambda H, W: range(H * W))
    # sub-grid routes must still cover the map together
    half = Route("test_top", lambda H, W: range(W), subset=True)
    with pytest.raises(RouteError, match=r"position 3 \(h=1, w=0\) is read by no route"):
        register_route_set("test_bad_set", [half], check_sizes=[(2, 3)])
    with pytest.raises(RouteError, match="at least one route"):
        RouteSet("empty", [])
    assert "test_bad" not in scanlib.routes.list_routes()


def test_unknown_names_list_the_known_ones():
    with pytest.raises(UnknownRouteError) as e:
        get_route_set("crossd2")
    msg = str(e.value)
    assert "crossd2" in msg and all(n in msg for n in ["cross2d", "hilbert", "local<w>", "atrous"])
    with pytest.raises(UnknownRouteError, match="known routes: .*row"):
        RouteSet("x", ["no_such_route"])
    with pytest.raises(KeyError):  # UnknownRouteError is also a KeyError
        cross_scan(torch.randn(1, 1, 2, 2), "nope")


def test_shape_errors():
    with pytest.raises(scanlib.ScanInputError, match=r"\[B, C, H, W\]"):
        cross_scan(torch.randn(3, 4, 5), "cross2d")
    with pytest.raises(scanlib.ScanInputError, match=r"K=4, C, L=20"):
        cross_merge(torch.randn(1, 4, 2, 19), "cross2d", 4, 5)
    with pytest.raises(scanlib.ScanInputError, match=r"K=4"):
        cross_merge(torch.randn(1, 2, 2, 20), "cross2d", 4, 5)


# ---------------------------------------------------------------------- the picture command
def test_cli_ascii_and_list(capsys):
    assert routes_cli(["show", "cross2d", "--size", "2x3"]) == 0
    out = capsys.readouterr().out
    assert "col_rev" in out and "5 3 1" in out
    assert routes_cli(["list"]) == 0
    assert "local<w>" in capsys.readouterr().out
    assert routes_cli(["show", "nope"]) == 2
    assert "known route sets" in capsys.readouterr().err


def test_cli_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "routes.png"
    assert routes_cli(["show", "atrous", "--size", "5x7", "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_png_without_matplotlib_names_the_extra(monkeypatch, tmp_path):
    import sys

    from scanlib.routes.plot import draw_route_set

    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'scanlib-vmamba\[plot\]'"):
        draw_route_set("cross2d", 4, 4, tmp_path / "x.png")


def test_every_builtin_route_name_is_unique_within_its_set():
    for name in BUILTIN:
        rs = get_route_set(name)
        names = [r.name for r in rs.routes]
        if name != "unidi" and name != "bidi":
            assert len(set(names)) == len(names)
    for a, b in itertools.combinations(["cross2d", "rot90", "zigzag"], 2):
        assert get_route_set(a) is not get_route_set(b)
