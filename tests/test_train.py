"""`vmamba train` / `vmamba eval`: data, config, outputs, resume after SIGTERM, DDP equality.

Most tests train a tiny stand-in network (written to a temporary module, passed as
``--model tinynet:tiny``) on a tiny image folder, so each takes seconds; one smoke test runs
the real ``vmamba_nano``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from vmamba import cli
from vmamba.data import (
    DIGITS_FILE,
    DataError,
    DigitsDataset,
    ImageFolder,
    MixupCutmix,
    SampleKey,
    TrainBatchSampler,
    eval_transform,
    train_transform,
)
from vmamba.train import (
    CHECKPOINT_NAME,
    METRICS_NAME,
    PLOT_NAME,
    PRESETS,
    TrainConfig,
    atomic_write_bytes,
    load_checkpoint,
    resolve_config,
    save_checkpoint,
)

ROOT = Path(__file__).resolve().parents[1]

TINYNET = textwrap.dedent(
    """
    import os, time
    import torch
    import torch.nn as nn

    class TinyNet(nn.Module):
        # conv -> pool -> MLP; no batch norm. TINY_SLEEP slows the forward so a test can
        # signal the process mid-epoch.
        def __init__(self, num_classes, in_chans, drop_path_rate=0.0, dropout=0.0):
            super().__init__()
            self.conv = nn.Conv2d(in_chans, 8, 3, padding=1)
            self.pool = nn.AdaptiveAvgPool2d(2)
            self.fc1 = nn.Linear(32, 16)
            self.drop = nn.Dropout(dropout)
            self.fc2 = nn.Linear(16, num_classes)
            self.sleep = float(os.environ.get("TINY_SLEEP", "0"))

        def forward(self, x):
            if self.sleep:
                time.sleep(self.sleep)
            x = self.pool(torch.relu(self.conv(x))).flatten(1)
            return self.fc2(self.drop(torch.relu(self.fc1(x))))

    def tiny(**kw):
        return TinyNet(**kw)
    """
)


@pytest.fixture
def tinynet(tmp_path, monkeypatch):
    """Directory holding the tinynet module, importable here and in subprocesses."""
    mod_dir = tmp_path / "mods"
    mod_dir.mkdir()
    (mod_dir / "tinynet.py").write_text(TINYNET)
    monkeypatch.syspath_prepend(str(mod_dir))
    return mod_dir


def make_folder(root: Path, classes=("a", "b", "c"), n_train=12, n_val=4, size=10) -> Path:
    """A learnable toy dataset: class k is a noisy image of a class-specific colour."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for k, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True)
            colour = np.array([255 * (k == 0), 255 * (k == 1), 255 * (k == 2)])
            for i in range(n):
                img = np.clip(colour + rng.normal(0, 60, (size, size, 3)), 0, 255)
                Image.fromarray(img.astype(np.uint8)).save(d / f"{i}.png")
    return root


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "data")


def tiny_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--data", str(data), "--model", "tinynet:tiny", "--img-size", "8", "--epochs", "2",
        "--batch-size", "4", "--lr", "0.01", "--warmup-epochs", "0.5", "--workers", "0",
        "--threads", "1", "--no-progress", "--output", str(out), *extra,
    ]  # fmt: skip


def run_cli(argv: list[str]) -> int:
    return cli.main(argv)


def error_line(err: str) -> str:
    """The CLI's one-line error (log lines may surround it); no traceback allowed."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1, err
    return lines[0]


def subprocess_env(tinynet: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tinynet), str(ROOT), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


# ------------------------------------------------------------------------------------------
# command line


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "train" in out and "eval" in out


def test_missing_subcommand_module_is_skipped(monkeypatch):
    monkeypatch.setattr(cli, "SUBCOMMANDS", ("vmamba.train", "vmamba.no_such_module"))
    parser = cli.build_parser()
    assert "train" in parser.format_help()
    # ... but a module that exists and fails to import is an error, not skipped
    err = ModuleNotFoundError("No module named 'foo'", name="foo")
    assert not cli._missing("vmamba.train", err)
    assert cli._missing("vmamba.analysis.cli", ModuleNotFoundError(name="vmamba.analysis"))


def test_no_command_prints_help(capsys):
    assert run_cli([]) == 2
    assert "train" in capsys.readouterr().err


def test_python_m_entry_points(tinynet):
    for argv in (
        ["-m", "vmamba", "train", "--print-config"],
        ["-m", "vmamba.train", "--print-config"],
    ):
        out = subprocess.run(
            [sys.executable, *argv, "--epochs", "3"],
            capture_output=True, text=True, timeout=300, env=subprocess_env(tinynet), cwd=ROOT,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        cfg = json.loads(out.stdout)
        assert cfg["epochs"] == 3 and cfg["model"] == "vmamba_nano" and cfg["preset"] == "digits"


# ------------------------------------------------------------------------------------------
# data


def test_embedded_digits():
    train, test = DigitsDataset("train", augment=True), DigitsDataset("test")
    assert len(train) == 1437 and len(test) == 360
    x, y = test[0]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32 and 0 <= y < 10
    assert sorted(set(test.labels.tolist())) == list(range(10))  # stratified: all classes
    assert abs(float(train.images.mean())) < 0.05  # normalized with train statistics
    # augmentation is a function of the key alone
    a = train[SampleKey(5, 0, 1)][0]
    assert torch.equal(a, train[SampleKey(5, 0, 1)][0])
    assert any(not torch.equal(a, train[SampleKey(5, 0, e)][0]) for e in range(2, 8))


def test_embedded_digits_match_sklearn():
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits()
    with np.load(DIGITS_FILE) as f:
        images, labels = f["images"], f["labels"]
        train_idx, test_idx = f["train_idx"], f["test_idx"]
    np.testing.assert_array_equal(labels, d.target)
    np.testing.assert_array_equal(images, np.rint(d.images * 255 / 16).astype(np.uint8))
    assert len(set(train_idx) | set(test_idx)) == 1797 and not set(train_idx) & set(test_idx)


def test_transforms():
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8))
    tf = train_transform(16, reprob=0.5)
    a = tf(img, np.random.default_rng(1))
    assert a.shape == (3, 16, 16)
    assert torch.equal(a, tf(img, np.random.default_rng(1)))
    assert eval_transform(16)(img, None).shape == (3, 16, 16)
    mix = MixupCutmix(5, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
    x = torch.randn(6, 3, 8, 8)
    y = torch.arange(6) % 5
    for seed in range(6):
        xm, t = mix(x, y, np.random.default_rng(seed))
        assert xm.shape == x.shape and t.shape == (6, 5)
        torch.testing.assert_close(t.sum(1), torch.ones(6))


def test_batch_sampler_shards_and_resumes():
    full = TrainBatchSampler(50, 8, seed=3)
    full.set_epoch(2)
    batches = [[k.index for k in b] for b in full]
    assert len(batches) == 6 and len({i for b in batches for i in b}) == 48
    shards = []
    for rank in range(2):
        s = TrainBatchSampler(50, 8, seed=3, rank=rank, world_size=2)
        s.set_epoch(2)
        shards.append([[k.index for k in b] for b in s])
    assert [a + b for a, b in zip(*shards)] == batches
    full.set_epoch(2, start=4)
    assert [[k.index for k in b] for b in full] == batches[4:]
    full.set_epoch(3)
    assert [[k.index for k in b] for b in full] != batches


def test_bad_data_errors(folder, tmp_path, capsys, tinynet):
    out = tmp_path / "run"
    # unreadable image: one line naming the file, nonzero exit
    bad = folder / "train" / "b" / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg")
    assert run_cli(["train", *tiny_args(folder, out)]) == 1
    err = error_line(capsys.readouterr().err)
    assert str(bad) in err and "cannot read image" in err
    bad.unlink()
    # empty class folder
    (folder / "train" / "d").mkdir()
    assert run_cli(["train", *tiny_args(folder, tmp_path / "run2")]) == 1
    err = error_line(capsys.readouterr().err)
    assert "empty class folder" in err and str(folder / "train" / "d") in err
    (folder / "train" / "d").rmdir()
    # missing split
    import shutil

    shutil.rmtree(folder / "val")
    with pytest.raises(DataError, match="missing split folder .*val"):
        ImageFolder(folder, "val", eval_transform(8))
    assert run_cli(["train", *tiny_args(folder, tmp_path / "run3")]) == 1
    assert "missing split folder" in error_line(capsys.readouterr().err)


def test_unreadable_image_in_loader_worker(folder, tmp_path, tinynet, capsys):
    (folder / "train" / "a" / "zz.png").write_bytes(b"\x89PNG broken")
    assert run_cli(["train", *tiny_args(folder, tmp_path / "r"), "--workers", "1"]) == 1
    assert "zz.png" in error_line(capsys.readouterr().err)


# ------------------------------------------------------------------------------------------
# configuration


def test_config_precedence(tmp_path):
    cfg = resolve_config({})
    assert cfg.preset == "digits" and cfg.model == PRESETS["digits"]["model"] and cfg.data is None
    cfg = resolve_config({"data": "x"})
    assert cfg.preset == "imagenet" and cfg.epochs == 300 and cfg.ema and cfg.clip_grad == 5.0
    assert cfg.weight_decay == 0.05 and cfg.warmup_epochs == 20 and cfg.lr is None
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("epochs: 7\nbatch-size: 16\nlr: 0.5\nmodel_kwargs: {dims: 8}\n")
    cfg = resolve_config({"epochs": "9"}, yaml_file)
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.model_kwargs) == (9, 16, 0.5, {"dims": 8})
    toml_file = tmp_path / "c.toml"
    toml_file.write_text('preset = "imagenet"\ndata = "d"\nepochs = 5\n')
    if sys.version_info >= (3, 11):
        cfg = resolve_config({"ema": False}, toml_file)
        assert (cfg.preset, cfg.epochs, cfg.ema, cfg.img_size) == ("imagenet", 5, False, 224)
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochz: 3\n")
    with pytest.raises(ValueError, match="unknown option 'epochz'"):
        resolve_config({}, bad)
    with pytest.raises(ValueError, match="batch-size"):
        resolve_config({"batch_size": "0"})


def test_cli_flags_override_config_file(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("epochs: 7\nseed: 4\n")
    assert run_cli(["train", "--config", str(f), "--epochs", "2", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["epochs"] == 2 and cfg["seed"] == 4


# ------------------------------------------------------------------------------------------
# training runs


def test_train_outputs_and_eval(folder, tmp_path, tinynet, capsys):
    out = tmp_path / "run"
    assert run_cli(["train", *tiny_args(folder, out)]) == 0
    for name in (CHECKPOINT_NAME, METRICS_NAME, PLOT_NAME):
        assert (out / name).is_file(), name
    assert (out / PLOT_NAME).read_bytes()[:4] == b"\x89PNG"
    ckpt = load_checkpoint(out)
    for key in ("model", "optimizer", "scheduler", "scaler", "epoch", "step", "rng", "config"):
        assert key in ckpt, key
    assert set(ckpt["rng"]) >= {"python", "numpy", "torch"}
    assert ckpt["epoch"] == 2 and ckpt["step"] == 18
    assert ckpt["model_ema"] is not None  # --data selects the imagenet preset: EMA on
    metrics = json.loads((out / METRICS_NAME).read_text())
    assert metrics["finished"] and len(metrics["history"]) == 2
    assert not list(out.glob(".*tmp*"))  # no temporary files left behind
    capsys.readouterr()
    # eval reproduces the last epoch's test accuracy
    assert run_cli(["eval", "--checkpoint", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 12
    assert result["acc1"] == pytest.approx(metrics["final"]["test_acc1"])
    assert result["acc5"] == 100.0  # 3 classes
    # a second run into the same directory is refused (nothing overwritten)
    assert run_cli(["train", *tiny_args(folder, out)]) == 1
    assert "--resume" in capsys.readouterr().err


def test_train_recipe_options(folder, tmp_path, tinynet):
    """Mixup, cutmix, label smoothing, random erasing, EMA, grad clipping, bf16 autocast."""
    out = tmp_path / "run"
    extra = ["--mixup", "0.8", "--cutmix", "1.0", "--label-smoothing", "0.1", "--reprob", "0.5",
             "--ema", "--ema-decay", "0.9", "--clip-grad", "1.0", "--workers", "1",
             "--amp", "bf16"]  # fmt: skip
    assert run_cli(["train", *tiny_args(folder, out), *extra]) == 0
    ckpt = load_checkpoint(out)
    assert ckpt["model_ema"] is not None
    assert "ema_acc1" in ckpt["history"][-1]
    assert not torch.equal(ckpt["model_ema"]["fc2.weight"], ckpt["model"]["fc2.weight"])


def test_vmamba_nano_digits_smoke(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--epochs", "1", "--batch-size", "16", "--max-train-samples", "48",
            "--max-eval-samples", "32", "--output", str(out), "--no-progress", "--threads", "1"]  # fmt: skip
    assert run_cli(argv) == 0
    ckpt = load_checkpoint(out)
    assert ckpt["model_config"]["name"] == "vmamba_nano" and ckpt["step"] == 3
    capsys.readouterr()
    assert run_cli(["eval", "--checkpoint", str(out / CHECKPOINT_NAME), "--max-samples", "16"]) == 0
    assert "top-1" in capsys.readouterr().out


def test_eval_official_style_checkpoint(folder, tmp_path, capsys):
    import vmamba

    model = vmamba.create_model("vmamba_nano", num_classes=3)
    path = tmp_path / "official.pth"
    torch.save({"model": model.state_dict()}, path)
    argv = [
        "eval",
        "--checkpoint",
        str(path),
        "--data",
        str(folder),
        "--img-size",
        "32",
        "--workers",
        "0",
    ]
    assert run_cli(argv) == 1  # official weights need --model
    assert "--model" in capsys.readouterr().err
    assert run_cli([*argv, "--model", "vmamba_nano", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 12 and 0 <= result["acc1"] <= 100


def test_atomic_checkpoint_write(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"a": torch.ones(2)})

    def failing(f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write_bytes(path, failing)
    assert torch.equal(torch.load(path)["a"], torch.ones(2))  # the old checkpoint survives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def _same_state(a: dict, b: dict) -> None:
    for part in ("model", "model_ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k}"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    for k in sa:
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(sa[k][name], sb[k][name]), f"optimizer {k}.{name}"
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"]
    keys = ("train_loss", "train_acc", "test_loss", "test_acc1", "ema_acc1", "lr")
    assert [[h[k] for k in keys] for h in a["history"]] == [
        [h[k] for k in keys] for h in b["history"]
    ]


def test_resume_after_sigterm_matches_uninterrupted(folder, tmp_path, tinynet):
    common = ["--epochs", "3", "--seed", "3", "--ema", "--ema-decay", "0.9", "--mixup", "0.8",
              "--cutmix", "1.0", "--label-smoothing", "0.1", "--reprob", "0.25",
              "--model-kwargs", '{"dropout": 0.2}', "--log-every", "1"]  # fmt: skip
    ref = tmp_path / "ref"
    assert run_cli(["train", *tiny_args(folder, ref), *common]) == 0

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "vmamba.train", *tiny_args(folder, run), *common, "--workers", "2"]
    env = subprocess_env(tinynet, TINY_SLEEP="0.1")
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    seen = []
    try:
        for line in proc.stderr:  # kill once epoch 2 is under way
            seen.append(line)
            if line.startswith("epoch 2/3 step 3/9"):
                proc.send_signal(signal.SIGTERM)
                break
        rest = proc.communicate(timeout=300)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    log = "".join(seen) + rest
    assert proc.returncode == 128 + signal.SIGTERM, log
    assert "stopped by SIGTERM" in log and "--resume" in log
    ckpt = load_checkpoint(run)
    assert ckpt["epoch"] == 1 and 0 < ckpt["batch"] < 9, (ckpt["epoch"], ckpt["batch"])
    assert len(ckpt["history"]) == 1

    assert run_cli(["train", "--resume", str(run), "--workers", "0"]) == 0
    _same_state(load_checkpoint(ref), load_checkpoint(run))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(folder, tmp_path, tinynet):
    common = ["--epochs", "2", "--batch-size", "8", "--ema", "--ema-decay", "0.5",
              "--label-smoothing", "0.1", "--reprob", "0.25", "--clip-grad", "1.0",
              "--mixup", "0", "--cutmix", "0"]  # fmt: skip
    single = tmp_path / "single"
    assert run_cli(["train", *tiny_args(folder, single), *common]) == 0

    multi = tmp_path / "multi"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
           "-m", "vmamba.train", *tiny_args(folder, multi), *common]  # fmt: skip
    t0 = time.time()
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env=subprocess_env(tinynet), cwd=ROOT
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert time.time() - t0 < 300
    a, b = load_checkpoint(single), load_checkpoint(multi)
    assert b["world_size"] == 2 and b["step"] == a["step"] == 8
    assert len(b["rng_per_rank"]) == 2
    for part in ("model", "model_ema"):
        for k in a[part]:
            torch.testing.assert_close(b[part][k], a[part][k], atol=1e-6, rtol=1e-5, msg=k)
    for ha, hb in zip(a["history"], b["history"]):
        assert hb["test_acc1"] == ha["test_acc1"]
        assert hb["train_loss"] == pytest.approx(ha["train_loss"], abs=1e-5)


def test_train_config_defaults_are_the_paper_recipe():
    cfg = TrainConfig()
    assert (cfg.base_lr, cfg.batch_size, cfg.weight_decay, cfg.warmup_epochs, cfg.epochs) == (
        1e-3,
        1024,
        0.05,
        20.0,
        300,
    )
    assert (cfg.clip_grad, cfg.ema, cfg.label_smoothing, cfg.mixup, cfg.cutmix) == (
        5.0,
        True,
        0.1,
        0.8,
        1.0,
    )
