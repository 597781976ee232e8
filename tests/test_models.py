"""VMamba models: official layout (parameter counts, state_dict keys), semantics against an
independent official-style forward, checkpoints, FLOPs, backends, routes, compile, backbone."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import scanlib
import vmamba
from vmamba import SS2D, CheckpointError, SSMConfig

REF_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "reference"
needs_ref = pytest.mark.skipif(
    not (REF_DIR / "README.md").exists(), reason=f"reference data not found at {REF_DIR}"
)

# exact parameter counts of the official configs (../shared/reference/README.md)
PARAMS = {
    "vmamba_tiny": 30_249_064,
    "vmamba_small": 50_147_752,
    "vmamba_base": 88_557_800,
    "vanilla_vmamba_tiny": 22_893_448,
    "vanilla_vmamba_small": 44_417_416,
    "vanilla_vmamba_base": 76_254_056,
    "vmamba_tiny_s2l5": 30_705_832,
    "vmamba_small_s1l20": 49_012_840,
    "vmamba_base_s1l20": 86_614_504,
}
KEY_FILES = {
    "vmamba_tiny": "vmamba_tiny_v2_keys.txt",
    "vmamba_small": "vmamba_small_v2_keys.txt",
    "vmamba_base": "vmamba_base_v2_keys.txt",
    "vanilla_vmamba_tiny": "vmamba_tiny_v0_keys.txt",
    "vanilla_vmamba_small": "vmamba_small_v0_keys.txt",
    "vanilla_vmamba_base": "vmamba_base_v0_keys.txt",
}
# the paper's FLOPs at 224x224 (one multiply-add = one FLOP; scan 9BLDN + BDL)
PAPER_FLOPS = {
    "vmamba_tiny": 4_905_609_984,
    "vmamba_small": 8_715_774_720,
    "vmamba_base": 15_358_944_256,
    "vanilla_vmamba_tiny": 5_626_895_040,
}


def meta_model(name: str, **kw) -> vmamba.VSSM:
    with torch.device("meta"):
        return vmamba.create_model(name, **kw)


def read_keys(fname: str) -> tuple[list[tuple[str, list[int]]], int]:
    entries, params = [], None
    for line in (REF_DIR / fname).read_text().splitlines():
        if line.startswith("#"):
            if "parameters=" in line:
                params = int(line.split("parameters=")[1].split(";")[0])
            continue
        if line.strip():
            key, shape, _dtype = line.split("\t")
            entries.append((key, ast.literal_eval(shape)))
    return entries, params


def perturb(model: torch.nn.Module, scale: float = 0.1, seed: int = 0) -> None:
    """Move every parameter off its initial value, so each one influences the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def tiny(name: str = "vmamba_tiny", **kw) -> vmamba.VSSM:
    # the torch backend unless a test picks one: keeps JIT compilation of other backends out of it
    kw = {"depths": (1, 1), "dims": (8, 16), "num_classes": 5, "scan_backend": "torch", **kw}
    return vmamba.create_model(name, **kw).eval()


# ------------------------------------------------------------------------------------------------
# official layout


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_counts(name):
    model = meta_model(name)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]


@needs_ref
@pytest.mark.parametrize("name", sorted(KEY_FILES))
def test_state_dict_keys_and_shapes(name):
    ref, params = read_keys(KEY_FILES[name])
    assert params == PARAMS[name]
    ours = [(k, list(v.shape)) for k, v in meta_model(name).state_dict().items()]
    assert ours == ref  # same keys, shapes and order


def test_family_constructors_and_registry():
    assert set(PARAMS) | {"vmamba_nano"} <= set(vmamba.list_models())
    assert vmamba.list_models("vanilla_*") == [
        "vanilla_vmamba_base",
        "vanilla_vmamba_small",
        "vanilla_vmamba_tiny",
    ]
    with pytest.raises(ValueError, match="unknown model"):
        vmamba.create_model("vmamba_huge")
    with pytest.raises(TypeError, match="unknown VSSMConfig fields"):
        vmamba.create_model("vmamba_nano", not_a_field=1)
    cfg = vmamba.model_config(
        "vmamba_small", num_classes=10, drop_path_rate=0.1, routes="snake", scan_backend="torch"
    )
    assert (
        cfg.num_classes == 10
        and cfg.ssm.scan_backend == "torch"
        and cfg.stage_routes() == ("snake",) * 4
    )
    cfg = vmamba.model_config("vmamba_tiny", routes=("cross2d", "cross2d", "zigzag", "unidi"))
    assert cfg.stage_routes()[2] == "zigzag"
    with torch.device("meta"):
        m = vmamba.vmamba_small(num_classes=10)
    assert m.classifier.head.out_features == 10 and m.config.drop_path_rate == 0.3


def test_nano_for_training_demo():
    model = vmamba.create_model("vmamba_nano", num_classes=10, in_chans=1, scan_backend="torch")
    x = torch.randn(4, 1, 32, 32)
    out = model(x)
    assert out.shape == (4, 10)
    out.logsumexp(-1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ------------------------------------------------------------------------------------------------
# semantics: an independent forward written like the official code (explicit flips/transposes
# for the cross scan, a sequential scan loop), reading the weights by their official names


def loop_scan(u, delta, A, Bs, Cs, D, delta_bias):
    """Sequential selective scan; u, delta [b, d, l]; A [d, n]; Bs, Cs [b, k, n, l] (grouped)."""
    b, d, length = u.shape
    k = Bs.shape[1]
    Bc = Bs.repeat_interleave(d // k, dim=1)
    Cc = Cs.repeat_interleave(d // k, dim=1)
    delta = F.softplus(delta + delta_bias[None, :, None])
    h = u.new_zeros(b, d, A.shape[1])
    ys = []
    for t in range(length):
        h = (
            torch.exp(delta[:, :, t, None] * A) * h
            + (delta[:, :, t] * u[:, :, t])[..., None] * Bc[..., t]
        )
        ys.append((h * Cc[..., t]).sum(-1) + D * u[:, :, t])
    return torch.stack(ys, dim=-1)


def ln_last(x, sd, p):
    return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], 1e-5)


def ln_cf(x, sd, p):
    return ln_last(x.permute(0, 2, 3, 1), sd, p).permute(0, 3, 1, 2)


def official_ss2d(sd, p, x, channel_first, z_gate):
    w_in = sd[p + "in_proj.weight"]
    x = F.conv2d(x, w_in[:, :, None, None]) if channel_first else F.linear(x, w_in)
    if z_gate:
        x, z = x.chunk(2, dim=1 if channel_first else -1)
        z = F.silu(z)
    if not channel_first:
        x = x.permute(0, 3, 1, 2)
    x = F.conv2d(
        x, sd[p + "conv2d.weight"], sd.get(p + "conv2d.bias"), padding=1, groups=x.shape[1]
    )
    x = F.silu(x)
    b, d, h, w = x.shape
    length = h * w
    x_hwwh = torch.stack([x.reshape(b, d, length), x.transpose(2, 3).reshape(b, d, length)], dim=1)
    xs = torch.cat([x_hwwh, x_hwwh.flip(-1)], dim=1)  # [b, 4, d, l]
    x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, sd[p + "x_proj_weight"])
    r = sd[p + "dt_projs_weight"].shape[2]
    n = sd[p + "A_logs"].shape[1]
    dts, Bs, Cs = torch.split(x_dbl, [r, n, n], dim=2)
    dts = torch.einsum("bkrl,kdr->bkdl", dts, sd[p + "dt_projs_weight"])
    out_y = loop_scan(
        xs.reshape(b, -1, length),
        dts.reshape(b, -1, length),
        -torch.exp(sd[p + "A_logs"]),
        Bs,
        Cs,
        sd[p + "Ds"],
        sd[p + "dt_projs_bias"].reshape(-1),
    ).view(b, 4, d, length)
    inv_y = out_y[:, 2:4].flip(-1)
    wh_y = out_y[:, 1].view(b, d, w, h).transpose(2, 3).reshape(b, d, length)
    invwh_y = inv_y[:, 1].view(b, d, w, h).transpose(2, 3).reshape(b, d, length)
    y = out_y[:, 0] + inv_y[:, 0] + wh_y + invwh_y
    if channel_first:
        y = ln_cf(y.view(b, d, h, w), sd, p + "out_norm")
    else:
        y = ln_last(y.transpose(1, 2).reshape(b, h, w, d), sd, p + "out_norm")
    if z_gate:
        y = y * z
    w_out = sd[p + "out_proj.weight"]
    return F.conv2d(y, w_out[:, :, None, None]) if channel_first else F.linear(y, w_out)


def official_v2_forward(sd, x, depths):
    x = F.conv2d(x, sd["patch_embed.0.weight"], sd["patch_embed.0.bias"], stride=2, padding=1)
    x = F.gelu(ln_cf(x, sd, "patch_embed.2"))
    x = F.conv2d(x, sd["patch_embed.5.weight"], sd["patch_embed.5.bias"], stride=2, padding=1)
    x = ln_cf(x, sd, "patch_embed.7")
    for i, depth in enumerate(depths):
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            x = x + official_ss2d(sd, p + "op.", ln_cf(x, sd, p + "norm"), True, False)
            hid = F.conv2d(
                ln_cf(x, sd, p + "norm2"),
                sd[p + "mlp.fc1.weight"][..., None, None],
                sd[p + "mlp.fc1.bias"],
            )
            x = x + F.conv2d(
                F.gelu(hid), sd[p + "mlp.fc2.weight"][..., None, None], sd[p + "mlp.fc2.bias"]
            )
        if i < len(depths) - 1:
            p = f"layers.{i}.downsample."
            x = ln_cf(
                F.conv2d(x, sd[p + "1.weight"], sd[p + "1.bias"], stride=2, padding=1), sd, p + "3"
            )
    x = ln_cf(x, sd, "classifier.norm").mean((2, 3))
    return F.linear(x, sd["classifier.head.weight"], sd["classifier.head.bias"])


def official_v0_forward(sd, x, depths):
    x = F.conv2d(x, sd["patch_embed.0.weight"], sd["patch_embed.0.bias"], stride=4).permute(
        0, 2, 3, 1
    )
    x = ln_last(x, sd, "patch_embed.2")
    for i, depth in enumerate(depths):
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            x = x + official_ss2d(sd, p + "op.", ln_last(x, sd, p + "norm"), False, True)
        if i < len(depths) - 1:
            p = f"layers.{i}.downsample."
            parts = [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]]
            x = F.linear(ln_last(torch.cat(parts, -1), sd, p + "norm"), sd[p + "reduction.weight"])
    x = ln_last(x, sd, "classifier.norm").mean((1, 2))
    return F.linear(x, sd["classifier.head.weight"], sd["classifier.head.bias"])


@pytest.mark.parametrize(
    "channels_first, z_gate, d_state, ratio, dtype",
    [
        (True, False, 1, 2.0, torch.float64),
        (True, False, 3, 1.0, torch.float32),
        (False, True, 4, 2.0, torch.float64),
        (False, True, 2, 1.0, torch.float32),
    ],
)
def test_ss2d_matches_official_style_forward(channels_first, z_gate, d_state, ratio, dtype):
    torch.manual_seed(0)
    cfg = SSMConfig(
        d_state=d_state,
        ssm_ratio=ratio,
        z_gate=z_gate,
        conv_bias=not channels_first,
        scan_backend="torch",
    )
    op = SS2D(12, cfg, channels_first).to(dtype)
    perturb(op)
    x = (
        torch.randn(2, 12, 5, 7, dtype=dtype)
        if channels_first
        else torch.randn(2, 5, 7, 12, dtype=dtype)
    )
    sd = op.state_dict()
    want = official_ss2d(sd, "", x, channels_first, z_gate)
    got = op(x)
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("name", ["vmamba_tiny", "vanilla_vmamba_tiny"])
def test_whole_model_matches_official_style_forward(name):
    torch.manual_seed(0)
    depths = (1, 2)
    kw = dict(ssm_d_state=3) if name.startswith("vanilla") else dict(ssm_ratio=2.0)
    model = tiny(name, depths=depths, scan_backend="torch", **kw).double()
    perturb(model)
    x = torch.randn(2, 3, 32, 48, dtype=torch.float64)  # non-square maps: 8x12, 4x6
    reference = official_v0_forward if name.startswith("vanilla") else official_v2_forward
    want = reference(model.state_dict(), x, depths)
    torch.testing.assert_close(model(x), want, rtol=1e-9, atol=1e-10)


# ------------------------------------------------------------------------------------------------
# checkpoints


def test_save_load_round_trip(tmp_path):
    model = tiny("vmamba_tiny")
    perturb(model)
    x = torch.randn(2, 3, 32, 32)
    path = tmp_path / "ckpt.pth"
    vmamba.save_pretrained(model, path, epoch=3)
    again = vmamba.load_model(path).eval()
    torch.testing.assert_close(again(x), model(x))
    path2 = tmp_path / "ckpt2.pth"
    vmamba.save_pretrained(again, path2)
    third = tiny("vmamba_tiny")
    vmamba.load_pretrained(third, path2)
    torch.testing.assert_close(third(x), model(x))
    # the training engineer's format and the official one: {"model": ..., "model_ema": ...}
    ema = {k: v + 1 for k, v in model.state_dict().items()}
    torch.save({"model": model.state_dict(), "model_ema": ema, "epoch": 1}, tmp_path / "off.pth")
    vmamba.load_pretrained(third, tmp_path / "off.pth", use_ema=True)
    assert torch.equal(third.classifier.head.bias, ema["classifier.head.bias"])
    vmamba.load_pretrained(third, model.state_dict())  # a bare state dict
    torch.testing.assert_close(third(x), model(x))
    with pytest.raises(CheckpointError, match="model_ema"):
        vmamba.load_pretrained(third, {"model": model.state_dict()}, use_ema=True)


class PickledConfig(dict):
    """Like the official files' yacs CfgNode: a dict subclass pickled beside the weights."""

    loaded = False

    def __setstate__(self, state):
        type(self).loaded = True  # would mean code from the file ran
        self.__dict__.update(state)


def test_official_file_with_pickled_objects(tmp_path):
    model = tiny("vmamba_tiny")
    cfg = PickledConfig(MODEL=PickledConfig(NAME="vssm"), LR=0.1)
    cfg.frozen = True
    path = tmp_path / "official.pth"
    torch.save({"model": model.state_dict(), "config": cfg, "max_accuracy": np.float64(82.6)}, path)
    with pytest.raises(pickle.UnpicklingError):  # torch's weights-only loader refuses it
        torch.load(path, weights_only=True)
    fresh = tiny("vmamba_tiny")
    vmamba.load_pretrained(fresh, path)
    for a, b in zip(fresh.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    assert not PickledConfig.loaded


def to_legacy(sd: dict, stacked_lists: bool) -> dict:
    out = {}
    for k, v in sd.items():
        k = k.replace("patch_embed.0.", "patch_embed.proj.").replace(
            "patch_embed.2.", "patch_embed.norm."
        )
        k = k.replace(".norm.", ".ln_1.") if ".blocks." in k else k
        k = k.replace(".op.", ".self_attention.")
        if k.startswith("classifier."):
            k = k[len("classifier.") :]
        if k.endswith("x_proj_weight") and stacked_lists:
            for i in range(v.shape[0]):
                out[k.replace("x_proj_weight", f"x_proj.{i}.weight")] = v[i]
            continue
        k = k.replace("x_proj_weight", "x_proj.weight").replace(
            "dt_projs_weight", "dt_projs.weight"
        )
        out[k] = v
    return out


@pytest.mark.parametrize("stacked_lists", [False, True])
def test_legacy_names_load(stacked_lists):
    model = tiny("vanilla_vmamba_tiny")
    perturb(model)
    legacy = to_legacy(model.state_dict(), stacked_lists)
    assert "layers.0.blocks.0.ln_1.weight" in legacy and "head.weight" in legacy
    fresh = tiny("vanilla_vmamba_tiny")
    result = vmamba.load_pretrained(fresh, {"model": legacy})
    assert result.renamed["patch_embed.proj.weight"] == "patch_embed.0.weight"
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(fresh(x), model(x))


def test_mismatch_errors_list_everything():
    model = tiny("vmamba_tiny")
    sd = model.state_dict()
    bad = dict(sd)
    del bad["layers.0.blocks.0.op.Ds"]
    bad["extra.weight"] = torch.zeros(1)
    bad["classifier.head.weight"] = torch.zeros(7, 16)
    with pytest.raises(CheckpointError) as err:
        vmamba.load_pretrained(model, bad)
    msg = str(err.value)
    assert "layers.0.blocks.0.op.Ds" in msg and "extra.weight" in msg
    assert "classifier.head.weight: checkpoint [7, 16] vs model [5, 16]" in msg
    result = vmamba.load_pretrained(model, bad, strict=False)
    assert result.missing == ["layers.0.blocks.0.op.Ds"] and result.unexpected == ["extra.weight"]
    assert list(result.mismatched) == ["classifier.head.weight"]


def test_from_official_kwargs():
    with torch.device("meta"):
        t = vmamba.from_official_kwargs(
            depths=[2, 2, 8, 2],
            dims=96,
            ssm_d_state=1,
            ssm_ratio=1.0,
            ssm_dt_rank="auto",
            ssm_conv=3,
            ssm_conv_bias=False,
            forward_type="v05_noz",
            mlp_ratio=4.0,
            downsample_version="v3",
            patchembed_version="v2",
            norm_layer="ln2d",
            drop_path_rate=0.2,
        )
        v0 = vmamba.from_official_kwargs(
            depths=[2, 2, 9, 2],
            dims=96,
            ssm_d_state=16,
            ssm_ratio=2.0,
            forward_type="v0",
            mlp_ratio=0.0,
            downsample_version="v1",
            patchembed_version="v1",
        )
    assert sum(p.numel() for p in t.parameters()) == PARAMS["vmamba_tiny"]
    assert sum(p.numel() for p in v0.parameters()) == PARAMS["vanilla_vmamba_tiny"]
    assert list(t.state_dict()) == list(meta_model("vmamba_tiny").state_dict())
    assert list(v0.state_dict()) == list(meta_model("vanilla_vmamba_tiny").state_dict())
    with pytest.raises(TypeError, match="not_an_arg"):
        vmamba.from_official_kwargs(not_an_arg=1)


def test_forward_type_parsing():
    p = vmamba.parse_forward_type
    assert p("v05_noz")["z_gate"] is False and p("v05_noz")["force_fp32"] is False
    assert p("v2")["z_gate"] is True and p("v2")["force_fp32"] is True
    assert p("v2_no32")["force_fp32"] is False
    got = p("v05_onsigmoid_nozact_oact")
    assert (
        got["out_norm"] is vmamba.OutNorm.SIGMOID
        and got["z_act"] is False
        and got["out_act"] is True
    )
    assert p("v3_ondwconv3_noz")["out_norm"] is vmamba.OutNorm.DWCONV3
    assert p("v052d_noz")["routes"] == "bidi" and p("v051d_noz")["routes"] == "unidi"
    assert p("v0")["z_gate"] is True
    for bad in ("xv1a", "v052dc_noz", "m0_noz", "v9", "v05_noz_onnone"):
        with pytest.raises(ValueError, match="unsupported forward_type"):
            p(bad)


@pytest.mark.parametrize(
    "forward_type",
    ["v05_ondwconv3_noz", "v05_oncnorm_noz_oact", "v3_onsoftmax", "v2_onnone_nozact"],
)
def test_out_norm_variants_run(forward_type):
    model = vmamba.from_official_kwargs(
        depths=[1],
        dims=[8],
        ssm_d_state=2,
        forward_type=forward_type,
        num_classes=3,
        norm_layer="ln2d",
    ).eval()
    out = model(torch.randn(1, 3, 16, 16))
    assert out.shape == (1, 3) and torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------------
# FLOPs


@pytest.mark.parametrize("name", sorted(PAPER_FLOPS))
def test_flops_match_paper(name):
    flops = vmamba.count_flops(meta_model(name), img_size=224)
    if name.startswith("vanilla"):
        # the official count rounds each einsum to 4 significant digits (fvcore reads numpy's
        # printed einsum_path report); the v0 mixer has 30 einsums, the rest is exact
        assert abs(flops - PAPER_FLOPS[name]) <= 2e-6 * PAPER_FLOPS[name]
    else:
        assert flops == PAPER_FLOPS[name]


def test_flops_on_real_tensors_equal_meta():
    model = vmamba.create_model("vmamba_nano", num_classes=10, in_chans=1)
    detailed = vmamba.count_flops(model, img_size=32, detailed=True)
    assert detailed.total == vmamba.count_flops(
        meta_model("vmamba_nano", num_classes=10, in_chans=1), img_size=32
    )
    assert detailed.by_op["scanlib.selective_scan"] > 0
    assert model.training  # restored


# ------------------------------------------------------------------------------------------------
# backends and routes

CPU_BACKENDS = ["torch", "reference", "numba", "triton"]


def backend_reasons(name: str) -> list[str]:
    """Why ``name`` cannot run a small grouped float32 CPU scan (empty: it can)."""
    if name not in scanlib.registered_backends():
        return [f"backend {name} is not registered"]
    z = torch.zeros
    return list(
        scanlib.explain(z(1, 4, 3), z(1, 4, 3), z(4, 1), z(1, 1, 1, 3), z(1, 1, 1, 3)).get(name, [])
    )


def backend_or_skip(name: str) -> None:
    reasons = backend_reasons(name)
    if reasons:
        pytest.skip(f"backend {name} cannot run here: {'; '.join(reasons)}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("routes", ["cross2d", "snake", "zigzag", "atrous"])
def test_forward_backward_backends_routes(backend, routes):
    backend_or_skip(backend)
    torch.manual_seed(0)
    model = tiny("vmamba_tiny", routes=routes, scan_backend=backend).train()
    x = torch.randn(2, 3, 20, 28)
    out = model(x)
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.square().sum().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n


@pytest.mark.parametrize("name", ["vmamba_tiny", "vanilla_vmamba_tiny"])
def test_backends_agree(name):
    torch.manual_seed(0)
    model = tiny(name, routes=("cross2d", "hilbert"))
    perturb(model)
    x = torch.randn(2, 3, 24, 20)
    model.set_scan_backend("reference")
    want = model(x)
    ran = []
    for backend in CPU_BACKENDS:
        if backend == "reference" or backend_reasons(backend):
            continue
        model.set_scan_backend(backend)
        torch.testing.assert_close(
            model(x), want, rtol=1e-5, atol=1e-5, msg=lambda m, b=backend: f"{b}: {m}"
        )
        ran.append(backend)
    assert "torch" in ran


def test_custom_route_set_deepcopy_and_pickle(tmp_path):
    import copy

    custom = scanlib.RouteSet("mine", ["row", "col_rev"])  # unregistered, K = 2
    model = tiny("vmamba_tiny", routes=custom)
    assert model.layers[0].blocks[0].op.k_group == 2
    twin = copy.deepcopy(model)  # e.g. an EMA copy
    x = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(twin(x), model(x))
    torch.save(model, tmp_path / "whole.pth")  # pickles the module itself


def test_route_sets_change_parameter_shapes():
    model = tiny("vmamba_tiny", routes="zigzag")  # 8 routes
    op = model.layers[0].blocks[0].op
    assert (
        op.k_group == 8 and op.x_proj_weight.shape[0] == 8 and op.A_logs.shape[0] == 8 * op.d_inner
    )


# ------------------------------------------------------------------------------------------------
# compile, autocast, checkpointing, backbone, timm


def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    model = tiny("vmamba_tiny", routes=("cross2d", "snake"))
    x = torch.randn(2, 3, 16, 20)
    # fullgraph=True fails on any graph break (the scan and route ops are opaque custom ops)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.parametrize("name", ["vmamba_tiny", "vanilla_vmamba_tiny"])
def test_autocast_scan_in_float32(name, monkeypatch):
    seen = []
    real = scanlib.selective_scan

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(scanlib, "selective_scan", spy)
    model = tiny(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 16, 16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert seen and all(d == torch.float32 for d in seen)


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    model = tiny("vmamba_tiny", drop_path_rate=0.0).train()
    x = torch.randn(2, 3, 16, 16)
    model(x).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=n)


@pytest.mark.parametrize("name", ["vmamba_tiny", "vanilla_vmamba_tiny"])
@pytest.mark.parametrize(
    "size, expect",
    [
        ((64, 96), [(16, 24), (8, 12), (4, 6), (2, 3)]),
        ((70, 50), [(18, 13), (9, 7), (5, 4), (3, 2)]),
    ],
)
def test_backbone_shapes(name, size, expect):
    dims = (8, 16, 32, 64)
    model = vmamba.create_model(
        name, depths=(1, 1, 1, 1), dims=dims, out_indices=(0, 1, 2, 3)
    ).eval()
    assert not hasattr(model, "classifier") and hasattr(model, "outnorm3")
    feats = model(torch.randn(1, 3, *size))
    assert [tuple(f.shape) for f in feats] == [(1, d, *hw) for d, hw in zip(dims, expect)]
    assert [f["reduction"] for f in model.feature_info] == [4, 8, 16, 32]
    partial = vmamba.create_model(name, depths=(1, 1, 1, 1), dims=dims, out_indices=(1, 2)).eval()
    assert [f.shape[1] for f in partial(torch.randn(1, 3, 64, 64))] == [16, 32]


def test_backbone_loads_classifier_checkpoint_non_strict():
    cls = tiny("vmamba_tiny", depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))
    bb = vmamba.create_model(
        "vmamba_tiny", depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), out_indices=(0, 1, 2, 3)
    )
    result = vmamba.load_pretrained(bb, cls.state_dict(), strict=False)
    assert all(k.startswith("outnorm") for k in result.missing)
    assert all(k.startswith("classifier.") for k in result.unexpected)


@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is not installed")
def test_timm_registration():
    import timm

    assert "vmamba_tiny" in timm.list_models("vmamba*")
    model = timm.create_model("vmamba_nano", num_classes=7, in_chans=1)
    assert isinstance(model, vmamba.VSSM) and model.num_classes == 7
    with pytest.raises(ValueError, match="local checkpoint"):
        timm.create_model("vmamba_nano", pretrained=True)


def test_config_is_typed():
    cfg = vmamba.model_config("vmamba_tiny")
    assert isinstance(cfg.ssm.out_norm, vmamba.OutNorm) and cfg.norm is vmamba.NormKind.LN2D
    with pytest.raises(ValueError, match="out_norm"):
        dataclasses.replace(cfg.ssm, out_norm="batchnorm")
    with pytest.raises(ValueError, match="routes"):
        cfg.replace(routes=("cross2d", "cross2d"))


def test_cpu_inference_batch_chunking_is_exact(monkeypatch):
    """VSS blocks run a CPU inference batch in groups of samples; results must not change."""
    import vmamba.layers as layers

    model = vmamba.create_model("vmamba_nano").eval()
    x = torch.randn(5, 3, 64, 64)
    with torch.inference_mode():
        monkeypatch.setattr(layers, "_CPU_BLOCK_CHUNK", 1)  # one sample per group everywhere
        chunked = model(x)
        monkeypatch.setattr(layers, "_CPU_BLOCK_CHUNK", 1 << 40)  # never split
        whole = model(x)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=0)


def test_ss2d_constants_cached_without_grad_and_follow_updates():
    """Without gradients SS2D hands the scan the same A, D and delta_bias tensors on every call
    (so backends can cache their host copies); an in-place parameter update makes new ones, and
    with gradients they are made afresh (part of the graph)."""
    model = vmamba.create_model("vmamba_nano").eval()
    ss2d = next(m for m in model.modules() if isinstance(m, SS2D))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        first = ss2d._constants(torch.float32)
        assert all(a is b for a, b in zip(first, ss2d._constants(torch.float32)))
        assert not any(t.is_inference() for t in first)
        y0 = model(x)
        for m in model.modules():
            if isinstance(m, SS2D):
                m.A_logs.add_(0.5)
                m.Ds.mul_(0.5)
                m.dt_projs_bias.sub_(0.1)
        again = ss2d._constants(torch.float32)
        assert again[0] is not first[0] and again[2] is not first[2]  # (D is Ds itself)
        torch.testing.assert_close(again[0], -torch.exp(ss2d.A_logs))
        torch.testing.assert_close(again[2], ss2d.dt_projs_bias.reshape(-1))
        y1 = model(x)
    with torch.inference_mode():
        assert torch.equal(model(x), y1)
    fresh = vmamba.create_model("vmamba_nano").eval()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), y1)
    assert not torch.allclose(y0, y1)
    a, _, _ = ss2d._constants(torch.float32)  # grad enabled, parameters require grad
    assert a.requires_grad and a is not again[0]


def test_inference_activations_respect_forward_hooks():
    """In inference the activations after a conv or fc1 run in place, unless a forward hook could
    see the overwritten tensor or the activation module: hooks see what they would in eager."""
    model = vmamba.create_model("vmamba_nano").eval()
    mlp = next(m for m in model.modules() if isinstance(m, vmamba.layers.Mlp))
    ss2d = next(m for m in model.modules() if isinstance(m, SS2D))
    seen = {}

    def keep(name):
        return lambda mod, inp, out: seen.setdefault(name, out)

    handles = [
        mlp.fc1.register_forward_hook(keep("fc1")),
        ss2d.act.register_forward_hook(keep("act")),
    ]
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        model(x)
        fc1_in = {}
        h = mlp.fc1.register_forward_pre_hook(lambda mod, inp: fc1_in.setdefault("x", inp[0]))
        seen.clear()
        model(x)
        h.remove()
        torch.testing.assert_close(seen["fc1"], mlp.fc1(fc1_in["x"]))  # not GELU'd in place
    assert "act" in seen  # the SiLU module itself ran
    for h in handles:
        h.remove()
