"""vmamba.analysis: the attention identity, the ERF measure, and the three commands at tiny sizes."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from torch import nn

import scanlib
from vmamba.analysis import (
    capture_scan_input,
    compute_erf,
    erf_area_ratios,
    load_images,
    scan_attention_matrix,
    scan_attention_mean,
    ss2d_attention,
    ss2d_scan_inputs,
)
from vmamba.config import SSMConfig
from vmamba.data.errors import ConfigError
from vmamba.layers import SS2D

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _has_timm() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


def _cli(argv: list[str]) -> int:
    """The analysis commands through the ``vmamba`` command when it is there, else directly."""
    try:
        from vmamba.cli import main
    except ImportError:
        from vmamba.analysis.cli import main
    return main(argv)


def _png(path) -> tuple[int, int]:
    from PIL import Image

    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as im:
        im.load()
        return im.size


def _tiny_layer(routes: str, d_state: int, channels_first: bool, seed: int = 0) -> SS2D:
    torch.manual_seed(seed)
    # the torch backend: no JIT compilation (numba) for the one real scan call below
    cfg = SSMConfig(d_state=d_state, ssm_ratio=1.0, routes=routes, init="v1", scan_backend="torch")
    return SS2D(6, cfg, channels_first=channels_first).double()


def _scan_input(layer: SS2D, h: int, w: int, seed: int = 1) -> tuple[torch.Tensor, bool]:
    g = torch.Generator().manual_seed(seed)
    shape = (2, 6, h, w) if layer.channels_first else (2, h, w, 6)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    return capture_scan_input(layer, layer, x)


# ------------------------------------------------------------------------------------------------
# the attention identity


@pytest.mark.parametrize(
    "routes, d_state, channels_first",
    [
        ("cross2d", 1, True),
        ("cross2d", 4, False),
        ("atrous", 2, True),
        ("hilbert", 3, False),
        ("local2", 1, True),
    ],
)
def test_attention_matrix_reproduces_the_scan(routes, d_state, channels_first):
    layer = _tiny_layer(routes, d_state, channels_first)
    xs, channels_last = _scan_input(layer, 4, 5)
    inp = ss2d_scan_inputs(layer, xs, channels_last)
    # the extracted inputs are the layer's: the float64 reference scan, merged, is its scan output
    y = scanlib.selective_scan_ref(**inp.scan_kwargs())
    merged = scanlib.cross_merge(
        y.view(2, inp.K, -1, y.shape[-1]),
        inp.routes,
        inp.H,
        inp.W,
        channels_last=not layer.channels_first,
    )
    torch.testing.assert_close(
        layer.scan(xs, channels_last=channels_last), merged, rtol=1e-9, atol=1e-10
    )
    # the identity: M u = y - D u, channel by channel
    M = scan_attention_matrix(
        inp.delta, inp.A, inp.B, inp.C, delta_bias=inp.delta_bias, delta_softplus=True
    )
    assert M.shape == (2, inp.u.shape[1], y.shape[-1], y.shape[-1])
    assert torch.all(M.triu(1) == 0), "attention must be causal"
    attended = torch.einsum("bdts,bds->bdt", M, inp.u)
    torch.testing.assert_close(attended, y - inp.D[:, None] * inp.u, rtol=1e-9, atol=1e-11)


def test_channel_mean_and_query_rows_match_the_full_matrix():
    layer = _tiny_layer("cross2d", 2, True)
    xs, cl = _scan_input(layer, 3, 4)
    inp = ss2d_scan_inputs(layer, xs, cl)
    args = dict(delta_bias=inp.delta_bias, delta_softplus=True)
    M = scan_attention_matrix(inp.delta, inp.A, inp.B, inp.C, **args)
    per_route = M.view(2, inp.K, -1, *M.shape[-2:])
    mean = scan_attention_mean(inp.delta, inp.A, inp.B, inp.C, **args)
    torch.testing.assert_close(mean, per_route.mean(2))
    absmean = scan_attention_mean(inp.delta, inp.A, inp.B, inp.C, reduce="absmean", **args)
    torch.testing.assert_close(absmean, per_route.abs().mean(2))
    q = torch.tensor([[0, 5], [11, 3], [7, 7], [2, 1]])
    rows = scan_attention_mean(inp.delta, inp.A, inp.B, inp.C, queries=q, **args)
    want = torch.stack([per_route.mean(2)[:, k, q[k]] for k in range(inp.K)], 1)
    torch.testing.assert_close(rows, want)


@pytest.mark.parametrize("routes", ["cross2d", "atrous", "zigzag"])
def test_combined_map_is_the_linear_map_in_image_positions(routes):
    """With every channel of the scan input equal to one map v, the channel mean of the merged
    scan output (minus the D term) at the query is <combined attention map, v>."""
    layer = _tiny_layer(routes, 2, True)
    H, W = 4, 5
    v = torch.randn(1, 1, H, W, dtype=torch.float64)
    xs = v.expand(1, layer.d_inner, H, W).contiguous()
    inp = ss2d_scan_inputs(layer, xs)
    y = scanlib.selective_scan_ref(**inp.scan_kwargs())
    y = y - inp.D[:, None] * inp.u
    merged = scanlib.cross_merge(
        y.view(1, inp.K, -1, y.shape[-1]), inp.routes, H, W
    )  # [1, Di, H, W]
    for query in [(0, 0), (2, 3), (H - 1, W - 1)]:
        maps = ss2d_attention(inp, query)
        assert maps.per_route.shape == (inp.K, H, W) and maps.combined.shape == (H, W)
        got = float((torch.from_numpy(maps.combined).double() * v[0, 0]).sum())
        want = float(merged[0, :, query[0], query[1]].mean())
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_attention_rejects_bad_shapes_and_queries():
    d = torch.rand(1, 4, 6)
    with pytest.raises(ValueError, match="A"):
        scan_attention_matrix(d, torch.rand(3, 2), torch.rand(1, 2, 6), torch.rand(1, 2, 6))
    with pytest.raises(ValueError, match="queries"):
        scan_attention_mean(
            d,
            -torch.rand(4, 2),
            torch.rand(1, 2, 6),
            torch.rand(1, 2, 6),
            queries=torch.tensor([[6]]),
        )
    layer = _tiny_layer("cross2d", 1, True)
    inp = ss2d_scan_inputs(layer, *_scan_input(layer, 3, 3))
    with pytest.raises(ValueError, match="outside"):
        ss2d_attention(inp, (3, 0))


# ------------------------------------------------------------------------------------------------
# the ERF measure


def test_erf_area_ratios():
    point = np.zeros((21, 21))
    point[10, 10] = 1.0
    assert erf_area_ratios(point)["0.99"] == pytest.approx(1 / 441)
    flat = np.ones((20, 20))
    r = erf_area_ratios(flat)
    assert r["0.2"] >= 0.2 and r["0.2"] < 0.3
    assert r["0.99"] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(r.values(), list(r.values())[1:]))


def test_erf_support_is_the_receptive_field():
    """Two stacked 3x3 convs see a 5x5 window: the ERF is zero outside it, positive inside."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)).double()
    with torch.no_grad():  # positive weights: every pixel of the window contributes positively
        for m in net:
            m.weight.abs_()
    x = torch.rand(3, 1, 11, 11, dtype=torch.float64)
    erf = compute_erf(net, x, batch_size=2)
    assert erf.shape == (11, 11)
    inside = torch.zeros(11, 11, dtype=torch.bool)
    inside[3:8, 3:8] = True
    assert torch.all(erf[inside] > 0) and torch.all(erf[~inside] == 0)


def test_load_images():
    x, shown, names = load_images(None, 40, num_images=3, crops_per_image=2)
    assert x.shape == (3, 3, 40, 40) and shown.shape == (3, 40, 40, 3) and len(names) == 3
    assert 0 <= shown.min() and shown.max() <= 1
    g, _, _ = load_images("sklearn", 24, in_chans=1)
    assert g.shape == (2, 1, 24, 24)
    d, shown, _ = load_images("digits", 16, in_chans=1, num_images=4)
    assert d.shape == (4, 1, 16, 16) and shown.shape == (4, 16, 16, 3)


# ------------------------------------------------------------------------------------------------
# the commands


def test_erf_command(tmp_path):
    import vmamba

    model = vmamba.create_model("vmamba_nano", num_classes=10, in_chans=1)
    ckpt = tmp_path / "nano.pt"
    vmamba.save_pretrained(model, ckpt)
    out = tmp_path / "erf.png"
    models = ["vmamba_nano", f"vmamba_nano@{ckpt}"]
    if _has_timm():
        models.append("test_convnext")
    rc = _cli(
        [
            "analyze",
            "erf",
            "--models",
            *models,
            "--img-size",
            "32",
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    w, h = _png(out)
    assert w > h > 100
    summary = json.loads(out.with_suffix(".json").read_text())
    assert [s["model"] for s in summary] == [m.partition("@")[0] for m in models]
    for s in summary:
        assert set(s["area_ratios"]) == {"0.2", "0.3", "0.5", "0.99"}
        assert all(0 < v <= 1 for v in s["area_ratios"].values())
    maps = np.load(out.with_suffix(".npz"))
    assert len(maps.files) == len(models)
    for k in maps.files:
        assert maps[k].shape == (32, 32) and np.isfinite(maps[k]).all() and maps[k].max() > 0


def test_attention_command(tmp_path):
    out = tmp_path / "att.png"
    argv = [
        "analyze",
        "attention",
        "--model",
        "vmamba_nano",
        "--img-size",
        "32",
        "--routes",
        "snake",
    ]
    argv += ["--query", "3", "30", "--matrix", "--out", str(out), "--device", "cpu"]
    assert _cli(argv) == 0
    _png(out)
    _png(tmp_path / "att_matrix.png")
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["routes"] == "snake" and meta["map_size"] == [8, 8] and meta["query_map"] == [0, 7]
    arrays = np.load(out.with_suffix(".npz"))
    assert arrays["per_route"].shape == (4, 8, 8) and arrays["combined"].shape == (8, 8)
    assert arrays["matrices"].shape == (4, 64, 64)
    np.testing.assert_allclose(arrays["per_route"].sum(0), arrays["combined"], rtol=1e-5, atol=1e-7)
    assert np.abs(arrays["combined"]).max() > 0


def test_attention_command_errors():
    from vmamba.analysis import run_attention

    with pytest.raises(ConfigError, match="layer"):
        run_attention("vmamba_nano", img_size=32, layer="layers.9.blocks.0.op")
    with pytest.raises(ConfigError, match="outside"):
        run_attention("vmamba_nano", img_size=32, query=(40, 0))
    with pytest.raises(ConfigError, match="unknown model"):
        run_attention("no_such_model")


def test_throughput_command(tmp_path):
    out = tmp_path / "tp.csv"
    argv = ["bench", "throughput", "--models", "vmamba_nano", "--resolutions", "32", "64"]
    argv += ["--batch-sizes", "1", "2", "--warmup", "0", "--repeats", "2", "--no-isolate"]
    argv += ["--device", "cpu", "--scan-backends", "torch", "reference", "--out", str(out)]
    assert _cli(argv) == 0
    rows = list(csv.DictReader(out.open()))
    want = [
        (be, res, b) for be in ("torch", "reference") for res in ("32", "64") for b in ("1", "2")
    ]
    assert [(r["scan_backend"], r["resolution"], r["batch"]) for r in rows] == want
    for r in rows:
        assert r["label"] == f"vmamba_nano [{r['scan_backend']}]"
        assert r["error"] == "" and r["mode"] == "forward" and r["dtype"] == "float32"
        assert float(r["median_s"]) > 0 and float(r["images_per_s"]) > 0
        ms = 1e3 * float(r["median_s"]) / int(r["batch"])
        assert float(r["ms_per_image"]) == pytest.approx(ms, rel=1e-4)
        assert int(r["pixels"]) == int(r["resolution"]) ** 2
    _png(out.with_suffix(".png"))
    summary = json.loads(out.with_suffix(".json").read_text())
    got = {(s["model"], s["batch"]) for s in summary["scaling"]}
    assert got == {(f"vmamba_nano [{be}]", b) for be in ("torch", "reference") for b in (1, 2)}
    assert summary["scaling"][0]["pixel_ratio"] == pytest.approx(4.0)


def test_throughput_interleaved_rounds_pair_the_models(tmp_path):
    """--rounds: every configuration in one process, one timing per round each, and the median
    of the per-round ratios against the first model in the JSON summary and the output."""
    out = tmp_path / "tp.csv"
    argv = ["bench", "throughput", "--models", "vmamba_nano", "--resolutions", "32", "48"]
    argv += ["--batch-sizes", "1", "2", "--warmup", "1", "--rounds", "3", "--device", "cpu"]
    argv += ["--scan-backends", "torch", "reference", "--out", str(out)]
    assert _cli(argv) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 8 and all(r["error"] == "" and r["repeats"] == "3" for r in rows)
    assert all(r["peak_mem_mib"] == "" for r in rows)  # not measured when interleaved
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["rounds"] == 3
    assert all(len(r["times_s"]) == 3 for r in summary["runs"])
    pairs = {(p["resolution"], p["batch"]): p for p in summary["paired_ratios"]}
    assert set(pairs) == {(32, 1), (32, 2), (48, 1), (48, 2)}
    for (res, b), p in pairs.items():
        assert p["reference"] == "vmamba_nano [torch]" and p["model"] == "vmamba_nano [reference]"
        ref, other = (
            next(r["times_s"] for r in summary["runs"]
                 if r["label"] == lab and r["resolution"] == res and r["batch"] == b)
            for lab in (p["reference"], p["model"])
        )  # fmt: skip
        want = sorted(o / t for o, t in zip(other, ref))[1]
        assert p["ratio"] == pytest.approx(want) and p["rounds"] == 3


def test_throughput_isolated_backward_measures_memory(tmp_path):
    from vmamba.analysis import run_throughput

    (r,) = run_throughput(
        ["vmamba_nano"], resolutions=[32], device="cpu", backward=True, warmup=0, repeats=1,
        isolate=True, model_args={"scan_backend": "torch"}, out_csv=tmp_path / "t.csv",
        out_png=None, timeout=120,
    )  # fmt: skip
    assert r.error == "" and r.mode == "forward+backward" and r.median_s > 0
    assert r.scan_backend == "torch"
    if r.mem_method:  # Linux: peak RSS growth in the fresh process
        assert r.peak_mem_mib is not None and r.peak_mem_mib >= 0


@pytest.mark.skipif(not _has_timm(), reason="timm is not installed")
def test_throughput_timm_model(tmp_path):
    from vmamba.analysis import run_throughput

    (r,) = run_throughput(
        ["test_vit"], resolutions=[64], device="cpu", warmup=0, repeats=1, isolate=False,
        out_csv=None, out_png=None,
    )  # fmt: skip
    assert r.error == "" and r.median_s > 0 and r.scan_backend == "" and r.params_m > 0


def test_throughput_rejects_bad_options(tmp_path):
    from vmamba.analysis import run_throughput

    with pytest.raises(ConfigError):
        run_throughput(["vmamba_nano"], resolutions=[8], out_csv=None, out_png=None)
    with pytest.raises(ConfigError, match="unknown model"):
        run_throughput(["no_such_model"], resolutions=[32], out_csv=None, out_png=None)
