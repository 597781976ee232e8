"""``vmamba train``: train a VMamba classifier from the command line.

With no arguments it trains ``vmamba_nano`` on the embedded handwritten digits (CPU, minutes).
``--data DIR`` trains on an image folder (``DIR/train/<class>/*.jpg``, ``DIR/val/<class>/*.jpg``)
with the paper's ImageNet recipe (``--preset imagenet``). Also runnable as
``python -m vmamba.train ...`` and under ``torchrun --nproc_per_node=N -m vmamba.train ...``.

Reproducibility and resumption: the data order is a function of (seed, epoch), augmentation of
(seed, epoch, sample) and mixup of (seed, epoch, step); the checkpoint holds everything else
(model, EMA, optimizer, scheduler, scaler, RNG states, epoch and batch position). A checkpoint is
written atomically at the end of every epoch and when SIGTERM/SIGINT arrives, so
``vmamba train --resume RUN_DIR`` continues a killed run to the same result.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import importlib
import json
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .data import (
    CheckpointError,
    ConfigError,
    DigitsDataset,
    EvalBatchSampler,
    ImageFolder,
    MixupCutmix,
    TrainBatchSampler,
    UsageError,
    batch_rng,
    collate,
    eval_transform,
    raise_if_failed,
    take_subset,
    train_transform,
)

logger = logging.getLogger("vmamba.train")

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.json"
PLOT_NAME = "curves.png"
CHECKPOINT_FORMAT = "vmamba-train"
CHECKPOINT_VERSION = 1


# --------------------------------------------------------------------------------------------
# configuration


@dataclass
class TrainConfig:
    """Every option of a training run (command-line flags use dashes: ``--batch-size``).

    Precedence, lowest first: these defaults, the preset, the config file, command-line flags.
    On ``--resume`` the checkpoint's saved configuration replaces defaults and preset.
    """

    data: str | None = None  # image folder root; None = the embedded digits
    preset: str | None = None  # "digits" (default without --data) or "imagenet"
    model: str = "vmamba_tiny"  # a vmamba model name, or "package.module:factory"
    model_kwargs: dict = field(default_factory=dict)  # extra keyword arguments of the model
    img_size: int = 224
    epochs: int = 300
    batch_size: int = 1024  # global: summed over all processes, per optimizer step
    lr: float | None = None  # peak learning rate; None = base_lr * batch_size / 1024
    base_lr: float = 1e-3
    min_lr_ratio: float = 0.01  # final lr of the cosine, relative to the peak
    warmup_lr_ratio: float = 0.001  # first lr of the linear warmup, relative to the peak
    warmup_epochs: float = 20.0
    weight_decay: float = 0.05
    clip_grad: float | None = 5.0  # max global gradient norm; None or 0 = off
    drop_path: float | None = None  # None = the model's default
    ema: bool = True
    ema_decay: float = 0.9999
    label_smoothing: float = 0.1
    mixup: float = 0.8  # mixup alpha (0 = off)
    cutmix: float = 1.0  # cutmix alpha (0 = off)
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    reprob: float = 0.25  # random erasing probability
    hflip: float = 0.5
    scale_min: float = 0.08  # random resized crop: smallest area fraction
    crop_pct: float = 0.875  # evaluation: center crop fraction
    interpolation: str = "bicubic"
    max_shift: int = 2  # digits only: random translation in pixels
    scan_backend: str | None = (
        None  # scanlib backend(s), e.g. "torch" or "cuda,triton"; None = auto
    )
    amp: str = "auto"  # auto | none | bf16 | fp16 (auto = bf16 on CUDA, none on CPU)
    device: str = "auto"  # auto | cpu | cuda
    workers: int = 8  # data loader processes per training process
    threads: int | None = None  # torch CPU threads per process; None = torch's default
    seed: int = 0
    output: str | None = None  # run directory; None = runs/<timestamp>
    eval_batch_size: int | None = None  # per process; None = the per-process train batch
    max_train_samples: int | None = None  # use a fixed random subset (quick experiments)
    max_eval_samples: int | None = None
    log_every: int = 0  # log a line every N steps (0 = only per epoch)
    progress: bool = True  # progress bar on a terminal


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}

PRESETS: dict[str, dict[str, Any]] = {
    # The embedded default: CPU friendly, a few minutes on 2 cores.
    "digits": dict(
        model="vmamba_nano",
        img_size=32,
        epochs=8,
        batch_size=32,
        lr=2e-3,
        warmup_epochs=1.0,
        weight_decay=0.05,
        clip_grad=5.0,
        drop_path=0.0,
        ema=False,
        label_smoothing=0.0,
        mixup=0.0,
        cutmix=0.0,
        reprob=0.0,
        hflip=0.0,
        max_shift=2,
        workers=0,
        # At 8x8 tokens the chunked PyTorch scan is the fastest CPU backend and needs no JIT
        # compilation (numba's first compile alone costs ~45 s of CPU); on a GPU the compiled
        # CUDA kernel comes first (an ordered list: the first backend that can run wins).
        scan_backend="cuda,torch",
        # Small tensors: one thread is about as fast as two, and does not collapse when the
        # cores are shared (OpenMP threads spin-wait for each other).
        threads=1,
    ),
    # The paper's ImageNet-1k recipe (the TrainConfig defaults are this recipe).
    "imagenet": dict(model="vmamba_tiny", img_size=224, epochs=300, batch_size=1024),
}

# Options that may change on --resume without affecting the result.
_RESUME_HARMLESS = {
    "output",
    "workers",
    "threads",
    "log_every",
    "progress",
    "device",
    "eval_batch_size",
}


def _coerce(name: str, value: Any, where: str) -> Any:
    """Check/convert one option value against the TrainConfig field type."""
    kind = str(FIELDS[name].type)
    if isinstance(value, str) and value.lower() in ("none", "null") and "None" in kind:
        return None
    if value is None:
        if "None" in kind:
            return None
        raise ConfigError(f"{where}: option {name!r} may not be empty")
    try:
        if kind.startswith("bool"):
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if kind.startswith("int"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if kind.startswith("float"):
            return float(value)
        if kind.startswith("dict"):
            if isinstance(value, str):
                value = json.loads(value)
            if not isinstance(value, dict):
                raise ValueError(value)
            return dict(value)
        return str(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: option {name!r} got {value!r}, expected {kind}") from e


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Options from a YAML (.yaml/.yml) or TOML (.toml) file: a flat mapping of option names."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                raise ConfigError(
                    f"reading {path} needs Python >= 3.11 (tomllib); use a YAML config instead"
                ) from None
            raw = tomllib.loads(text)
        elif path.suffix.lower() in (".yaml", ".yml"):
            try:
                import yaml
            except ModuleNotFoundError:
                raise ConfigError(
                    f"reading {path} needs PyYAML: pip install 'scanlib-vmamba[train]'"
                ) from None
            raw = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"config file {path}: use a .yaml, .yml or .toml file")
    except ConfigError:
        raise
    except Exception as e:  # parser errors of either format
        raise ConfigError(f"cannot parse config file {path}: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option names to values")
    out = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            raise ConfigError(
                f"config file {path}: unknown option {key!r} (known: {', '.join(FIELDS)})"
            )
        out[name] = _coerce(name, value, f"config file {path}")
    return out


def resolve_config(
    explicit: dict[str, Any] | None = None,
    config_file: str | os.PathLike | None = None,
    base: dict[str, Any] | None = None,
) -> TrainConfig:
    """Merge defaults, preset (or ``base``, a saved config), config file and explicit options."""
    explicit = {k: _coerce(k, v, "command line") for k, v in (explicit or {}).items()}
    from_file = load_config_file(config_file) if config_file else {}
    if base is not None:
        values = {k: v for k, v in base.items() if k in FIELDS}
    else:
        preset = explicit.get("preset") or from_file.get("preset")
        if preset is None:
            preset = "imagenet" if (explicit.get("data") or from_file.get("data")) else "digits"
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
        values = dataclasses.asdict(TrainConfig())
        values.update(PRESETS[preset])
        values["preset"] = preset
    values.update(from_file)
    values.update(explicit)
    cfg = TrainConfig(**values)
    validate_config(cfg)
    return cfg


def validate_config(cfg: TrainConfig) -> None:
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    need(cfg.epochs >= 1, f"--epochs must be >= 1, got {cfg.epochs}")
    need(cfg.batch_size >= 1, f"--batch-size must be >= 1, got {cfg.batch_size}")
    need(cfg.img_size >= 1, f"--img-size must be >= 1, got {cfg.img_size}")
    need(cfg.seed >= 0, f"--seed must be >= 0, got {cfg.seed}")
    need(cfg.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {cfg.warmup_epochs}")
    need(cfg.workers >= 0, f"--workers must be >= 0, got {cfg.workers}")
    need(0.0 <= cfg.ema_decay < 1.0, f"--ema-decay must be in [0, 1), got {cfg.ema_decay}")
    need(0.0 <= cfg.label_smoothing < 1.0, "--label-smoothing must be in [0, 1)")
    need(0.0 < cfg.scale_min <= 1.0, "--scale-min must be in (0, 1]")
    need(0.0 < cfg.crop_pct <= 1.0, "--crop-pct must be in (0, 1]")
    need(cfg.amp in ("auto", "none", "bf16", "fp16"), "--amp must be auto, none, bf16 or fp16")
    need(cfg.device in ("auto", "cpu", "cuda"), "--device must be auto, cpu or cuda")
    need(
        cfg.interpolation in ("nearest", "bilinear", "bicubic"),
        "--interpolation must be nearest, bilinear or bicubic",
    )
    need(cfg.drop_path is None or 0.0 <= cfg.drop_path < 1.0, "--drop-path must be in [0, 1)")
    need(cfg.lr is None or cfg.lr > 0, "--lr must be > 0")


def peak_lr(cfg: TrainConfig) -> float:
    return cfg.lr if cfg.lr is not None else cfg.base_lr * cfg.batch_size / 1024


# --------------------------------------------------------------------------------------------
# processes, devices, randomness


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool  # we initialised the process group, so we tear it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_runtime(cfg: TrainConfig) -> Runtime:
    """Read torchrun's environment, pick the device, start the process group if needed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want = cfg.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for, but torch sees no CUDA device")
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns = True
    return Runtime(rank, world, local_rank, device, owns)


def scan_backend_context(spec: str | None):
    """Run the block with these scanlib backends ("a" or "a,b" in order of preference)."""
    if not spec:
        return nullcontext()
    import scanlib

    names = [s.strip() for s in spec.split(",") if s.strip()]
    return scanlib.use_backend(names if len(names) > 1 else names[0])


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    mode = cfg.amp
    if mode == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states in a form ``torch.load(weights_only=True)`` reads."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    npst = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": npst["bit_generator"],
            "state": {"key": npst["key"].numpy().astype(np.uint32), "pos": npst["pos"]},
            "has_gauss": npst["has_gauss"],
            "gauss": npst["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------
# data


def build_datasets(cfg: TrainConfig):
    """(train dataset, test dataset, info dict) for ``cfg.data`` (None = embedded digits)."""
    if cfg.data is None:
        train = DigitsDataset(
            "train", img_size=cfg.img_size, augment=cfg.max_shift > 0, max_shift=cfg.max_shift
        )
        test = DigitsDataset("test", img_size=cfg.img_size)
        info = dict(
            dataset="digits",
            classes=list(train.classes),
            in_chans=1,
            mean=list(train.mean),
            std=list(train.std),
        )
    else:
        from .data import IMAGENET_MEAN, IMAGENET_STD

        tf = train_transform(
            cfg.img_size,
            scale=(cfg.scale_min, 1.0),
            hflip=cfg.hflip,
            reprob=cfg.reprob,
            interpolation=cfg.interpolation,
        )
        train = ImageFolder(cfg.data, "train", tf)
        test = ImageFolder(
            cfg.data,
            "val",
            eval_transform(cfg.img_size, crop_pct=cfg.crop_pct, interpolation=cfg.interpolation),
            classes=train.classes,
        )
        info = dict(
            dataset=str(Path(cfg.data).resolve()),
            classes=list(train.classes),
            in_chans=3,
            mean=list(IMAGENET_MEAN),
            std=list(IMAGENET_STD),
        )
    info.update(img_size=cfg.img_size, crop_pct=cfg.crop_pct, interpolation=cfg.interpolation)
    train = take_subset(train, cfg.max_train_samples, cfg.seed)
    test = take_subset(test, cfg.max_eval_samples, cfg.seed)
    return train, test, info


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)  # workers decode images; leave the cores to the model


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def make_loader(dataset, batch_sampler, workers: int, device: torch.device, seed: int):
    workers = min(workers, _cpu_count())  # more loader processes than cores only thrash
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        worker_init_fn=_worker_init if workers > 0 else None,
        persistent_workers=workers > 0,
        # An explicit generator: creating an iterator must not draw from the global torch RNG.
        generator=torch.Generator().manual_seed(seed),
    )


# --------------------------------------------------------------------------------------------
# model, optimizer, schedule, EMA


def resolve_model_factory(name: str) -> Callable[..., nn.Module]:
    """``"vmamba_nano"`` -> vmamba.create_model; ``"pkg.module:factory"`` -> that callable."""
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            raise ConfigError(f"--model {name}: cannot import {module_name!r} ({e})") from e
        try:
            return getattr(module, attr)
        except AttributeError:
            raise ConfigError(f"--model {name}: {module_name!r} has no {attr!r}") from None
    import vmamba

    known = vmamba.list_models()
    if name not in known:
        raise ConfigError(f"unknown model {name!r}; available: {', '.join(known)}")
    return lambda **kw: vmamba.create_model(name, **kw)


def build_model(
    name: str, num_classes: int, in_chans: int, drop_path: float | None, kwargs: dict
) -> nn.Module:
    factory = resolve_model_factory(name)
    kw = dict(kwargs)
    kw.update(num_classes=num_classes, in_chans=in_chans)
    if drop_path is not None:
        kw["drop_path_rate"] = drop_path
    try:
        return factory(**kw)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"cannot build model {name!r} with {kw}: {e}") from e


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on weights only: not on biases, norms, 1-D parameters or those the model
    exempts (``no_weight_decay()`` names, ``no_weight_decay_keywords()``, ``_no_weight_decay``)."""
    skip = set(getattr(model, "no_weight_decay", lambda: ())())
    keywords = tuple(getattr(model, "no_weight_decay_keywords", lambda: ())())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = (
            p.ndim <= 1
            or name.endswith(".bias")
            or name in skip
            or any(k in name for k in keywords)
            or getattr(p, "_no_weight_decay", False)
        )
        (no_decay if exempt else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def warmup_cosine(
    total_steps: int, warmup_steps: int, warmup_ratio: float, min_ratio: float
) -> Callable[[int], float]:
    """lr multiplier at optimizer step s: linear warmup, then cosine down to ``min_ratio``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return warmup_ratio + (1.0 - warmup_ratio) * step / warmup_steps
        if total_steps <= warmup_steps:
            return 1.0
        t = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))

    return factor


class ModelEma:
    """Exponential moving average of a model's parameters and buffers: ema = d*ema + (1-d)*w."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for ema_v, v in zip(self.module.state_dict().values(), model.state_dict().values()):
            if ema_v.is_floating_point():
                ema_v.lerp_(v.detach(), 1.0 - self.decay)
            else:
                ema_v.copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)


# --------------------------------------------------------------------------------------------
# files


def atomic_write_bytes(path: Path, write: Callable[[Any], None]) -> None:
    """Write through ``write(fileobj)`` to a temporary file, fsync, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_write_bytes(path, lambda f: torch.save(state, f))


def checkpoint_path(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a run directory holding ``checkpoint.pt``."""
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT_NAME
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} does not exist")
    return p


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load one of our training checkpoints (CheckpointError if it is not one)."""
    p = checkpoint_path(path)
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {p}: {e}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{p} is not a vmamba training checkpoint (official weights are evaluated with "
            "`vmamba eval --checkpoint PATH --model NAME --data DIR`)"
        )
    return ckpt


def write_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, default=str) + "\n"
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def plot_curves(history: list[dict[str, Any]], path: Path, title: str = "") -> bool:
    """Loss and accuracy per epoch as a PNG. False (and a warning) when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ModuleNotFoundError:
        logger.warning(
            "matplotlib is not installed, so no plot was written: "
            "pip install 'scanlib-vmamba[plot]'"
        )
        return False
    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h["test_loss"] for h in history], "s-", label="test")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy loss")
    ax_loss.set_title("loss")
    ax_acc.plot(epochs, [h["train_acc"] for h in history], "o-", label="train")
    ax_acc.plot(epochs, [h["test_acc1"] for h in history], "s-", label="test top-1")
    if any("ema_acc1" in h for h in history):
        ax_acc.plot(
            epochs, [h.get("ema_acc1", float("nan")) for h in history], "^-", label="test (EMA)"
        )
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.set_title("accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
        ax.xaxis.get_major_locator().set_params(integer=True)
    if title:
        fig.suptitle(title)
    fig.tight_layout()

    def write(f) -> None:
        fig.savefig(f, format="png")

    atomic_write_bytes(path, write)
    return True


# --------------------------------------------------------------------------------------------
# progress and signals


class ProgressBar:
    """One self-overwriting line on a terminal: ``epoch 2/8 [#####.....] 23/44 loss ... img/s``."""

    def __init__(self, total: int, desc: str, enabled: bool, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.total = total
        self.desc = desc
        self.last = 0.0

    def due(self, force: bool = False) -> bool:
        """Whether a redraw is wanted now (at most five per second)."""
        return self.enabled and (force or time.monotonic() - self.last >= 0.2)

    def update(self, done: int, text: str) -> None:
        if not self.enabled:
            return
        self.last = time.monotonic()
        width = 24
        filled = int(width * done / max(1, self.total))
        bar = "#" * filled + "." * (width - filled)
        self.stream.write(f"\r{self.desc} [{bar}] {done}/{self.total} {text}\033[K")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r\033[K")
            self.stream.flush()


class StopRequest:
    """Turns SIGTERM/SIGINT into a flag the loop checks between steps (a second SIGINT aborts)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum, _frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the user insists
        self.signum = signum
        logger.warning(
            "received %s: saving a checkpoint after the current step", signal.Signals(signum).name
        )

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        try:
            yield self
        finally:
            for sig, old in self._old.items():
                signal.signal(sig, old)


class TrainingInterrupted(Exception):
    """Training stopped on a signal after writing a resumable checkpoint."""

    def __init__(self, signum: int, path: Path | None, epoch: int, batch: int) -> None:
        self.signum = signum
        self.path = path
        name = signal.Signals(signum).name
        where = f"epoch {epoch + 1}, batch {batch}"
        saved = f"checkpoint saved to {path}" if path else "checkpoint saved by rank 0"
        run_dir = path.parent if path else "RUN_DIR"
        super().__init__(
            f"stopped by {name} in {where}; {saved}; continue with: vmamba train --resume {run_dir}"
        )


class TrainingDiverged(UsageError):
    """The loss became NaN or infinite."""


# --------------------------------------------------------------------------------------------
# distributed helpers


def all_reduce_sum(values: list[float], rt: Runtime) -> list[float]:
    if not rt.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=rt.device)
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool, rt: Runtime) -> bool:
    if not rt.distributed:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=rt.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_objects(obj: Any, rt: Runtime) -> list[Any]:
    if not rt.distributed:
        return [obj]
    out: list[Any] = [None] * rt.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, rt: Runtime) -> Any:
    if not rt.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --------------------------------------------------------------------------------------------
# evaluation and training


@torch.no_grad()
def evaluate_sums(
    model: nn.Module, loader, device: torch.device, dtype: torch.dtype | None
) -> list[float]:
    """[loss sum, top-1 correct, top-5 correct, images, seconds] over this process's shard."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    c1 = torch.zeros((), dtype=torch.float64, device=device)
    c5 = torch.zeros((), dtype=torch.float64, device=device)
    n = 0
    start = time.perf_counter()
    for batch in loader:
        x, y = raise_if_failed(batch)
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        with autocast(device, dtype):
            logits = model(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hits = top.eq(y.view(-1, 1))
        c1 += hits[:, 0].sum()
        c5 += hits.any(dim=1).sum()
        n += y.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    model.train(was_training)
    return [loss_sum.item(), c1.item(), c5.item(), float(n), seconds]


def reduce_eval(sums: list[float], rt: Runtime) -> list[float]:
    """Sum the counts over processes; the time is this process's (they run in parallel)."""
    return all_reduce_sum(sums[:4], rt) + [sums[4]]


def summarize_eval(sums: list[float]) -> dict[str, float]:
    loss_sum, c1, c5, n, seconds = sums
    n = max(n, 1.0)
    return {
        "loss": loss_sum / n,
        "acc1": 100.0 * c1 / n,
        "acc5": 100.0 * c5 / n,
        "images": int(n),
        "seconds": seconds,
        "images_per_s": n / seconds if seconds > 0 else float("nan"),
    }


def _default_output() -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path("runs") / stamp
    i = 1
    while out.exists():
        out = Path("runs") / f"{stamp}-{i}"
        i += 1
    return out


def _status(loss_sum, correct, seen: int, carried, elapsed: float, world: int) -> str:
    """Running loss / accuracy of this process (plus the resumed part) and the global rate."""
    k = max(seen + carried[2], 1.0)
    loss = (loss_sum.item() + carried[0]) / k
    acc = 100.0 * (correct.item() + carried[1]) / k
    return f"loss {loss:.4f} acc {acc:.1f}% {seen * world / max(elapsed, 1e-9):.0f} img/s"


def _fmt_time(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def train(
    cfg: TrainConfig,
    *,
    resume: str | os.PathLike | dict[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Run training as configured; returns the final metrics (also written to metrics.json).

    ``resume``: a checkpoint file or run directory to continue from (or the checkpoint dict
    :func:`load_checkpoint` returned). ``progress``: draw a
    progress bar on stderr when it is a terminal (rank 0 only).
    """
    validate_config(cfg)
    rt = setup_runtime(cfg)
    old_threads = torch.get_num_threads()
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        with scan_backend_context(cfg.scan_backend):
            return _train(cfg, rt, resume, progress)
    finally:
        torch.set_num_threads(old_threads)
        if rt.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(
    cfg: TrainConfig, rt: Runtime, resume: str | os.PathLike | dict | None, progress: bool
) -> dict[str, Any]:
    if isinstance(resume, dict):
        ckpt, resume_name = resume, "the given checkpoint"
    elif resume is not None:
        ckpt, resume_name = load_checkpoint(resume), str(checkpoint_path(resume))
    else:
        ckpt, resume_name = None, ""

    # output directory: rank 0 decides, everyone learns it
    if rt.is_main:
        out_dir = Path(cfg.output) if cfg.output else _default_output()
        if ckpt is None and (out_dir / CHECKPOINT_NAME).exists():
            raise ConfigError(
                f"{out_dir} already holds a checkpoint; continue it with --resume {out_dir} "
                "or choose another --output"
            )
    else:
        out_dir = None
    out_dir = Path(broadcast_object(str(out_dir) if out_dir else None, rt))
    cfg = dataclasses.replace(cfg, output=str(out_dir))

    train_ds, test_ds, data_info = build_datasets(cfg)
    num_classes = len(data_info["classes"])
    if ckpt is not None and ckpt["data"]["classes"] != data_info["classes"]:
        raise CheckpointError(
            f"the checkpoint was trained on classes {ckpt['data']['classes'][:5]}..., "
            f"but the data has {data_info['classes'][:5]}..."
        )

    # model: identical initialisation on every rank, then a per-rank stream for dropout etc.
    seed_everything(cfg.seed)
    model = build_model(
        cfg.model, num_classes, data_info["in_chans"], cfg.drop_path, cfg.model_kwargs
    )
    model.to(rt.device)
    seed_everything(cfg.seed + rt.rank)
    ema = ModelEma(model, cfg.ema_decay) if cfg.ema else None
    n_params = sum(p.numel() for p in model.parameters())

    sampler = TrainBatchSampler(
        len(train_ds), cfg.batch_size, seed=cfg.seed, rank=rt.rank, world_size=rt.world_size
    )
    steps_per_epoch = sampler.steps_per_epoch
    eval_bs = cfg.eval_batch_size or sampler.local_batch
    train_loader = make_loader(train_ds, sampler, cfg.workers, rt.device, cfg.seed)
    test_loader = make_loader(
        test_ds,
        EvalBatchSampler(len(test_ds), eval_bs, rank=rt.rank, world_size=rt.world_size),
        cfg.workers,
        rt.device,
        cfg.seed,
    )

    lr = peak_lr(cfg)
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=lr, betas=(0.9, 0.999), eps=1e-8
    )
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = int(round(cfg.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total_steps, warmup_steps, cfg.warmup_lr_ratio, cfg.min_lr_ratio)
    )
    dtype = amp_dtype(cfg, rt.device)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=dtype is torch.float16)
    mix = MixupCutmix(
        num_classes,
        mixup_alpha=cfg.mixup,
        cutmix_alpha=cfg.cutmix,
        prob=cfg.mixup_prob,
        switch_prob=cfg.mixup_switch_prob,
        label_smoothing=cfg.label_smoothing,
    )

    start_epoch, start_batch, step = 0, 0, 0
    history: list[dict[str, Any]] = []
    partial = [0.0, 0.0, 0.0]  # loss sum, correct, images of the interrupted epoch (global)
    train_time = 0.0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        if ema is not None:
            if ckpt.get("model_ema") is not None:
                ema.load_state_dict(ckpt["model_ema"])
            else:
                ema = ModelEma(model, cfg.ema_decay)
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, start_batch, step = ckpt["epoch"], ckpt["batch"], ckpt["step"]
        history = list(ckpt["history"])
        partial = list(ckpt["partial"]) if rt.is_main else [0.0, 0.0, 0.0]
        train_time = float(ckpt.get("train_time_s", 0.0))
        states = ckpt.get("rng_per_rank") or [ckpt["rng"]]
        if rt.rank < len(states):
            set_rng_state(states[rt.rank])
        if start_batch >= steps_per_epoch:  # the batch size changed; start the next epoch
            start_epoch, start_batch = start_epoch + 1, 0
        if rt.is_main:
            logger.info(
                "resuming %s from epoch %d, batch %d/%d (step %d)",
                resume_name,
                start_epoch + 1,
                start_batch,
                steps_per_epoch,
                step,
            )

    ddp = model
    if rt.distributed:
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None
        )

    ckpt_file = out_dir / CHECKPOINT_NAME
    if rt.is_main:  # only now: a run that fails to start leaves no empty directory behind
        out_dir.mkdir(parents=True, exist_ok=True)
    title = f"{cfg.model} on {data_info['dataset'] if cfg.data else 'digits'}"
    if rt.is_main:
        logger.info(
            "training %s (%.2fM parameters) on %s: %d train / %d test images, %d classes; "
            "%d epochs x %d steps, batch %d%s, lr %.2e, device %s%s; output %s",
            cfg.model,
            n_params / 1e6,
            "the embedded digits" if cfg.data is None else cfg.data,
            len(train_ds),
            len(test_ds),
            num_classes,
            cfg.epochs,
            steps_per_epoch,
            cfg.batch_size,
            f" ({rt.world_size} processes)" if rt.distributed else "",
            lr,
            rt.device,
            f", {dtype}".replace("torch.", "") if dtype else "",
            out_dir,
        )

    def build_state(epoch: int, batch: int, partial_sums: list[float]) -> dict[str, Any] | None:
        """The full training state (collective: every rank must call it)."""
        rngs = gather_objects(rng_state(), rt)
        if not rt.is_main:
            return None
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "model": model.state_dict(),
            "model_ema": ema.state_dict() if ema is not None else None,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": epoch,
            "batch": batch,
            "step": step,
            "partial": partial_sums,
            "history": history,
            "train_time_s": train_time,
            "rng": rngs[0],
            "rng_per_rank": rngs,
            "world_size": rt.world_size,
            "config": dataclasses.asdict(cfg),
            "model_config": {
                "name": cfg.model,
                "num_classes": num_classes,
                "in_chans": data_info["in_chans"],
                "drop_path_rate": cfg.drop_path,
                "kwargs": cfg.model_kwargs,
            },
            "data": data_info,
        }

    def write_outputs(final: bool = False) -> dict[str, Any]:
        best = max(history, key=lambda h: h["test_acc1"]) if history else None
        metrics = {
            "model": cfg.model,
            "dataset": data_info["dataset"],
            "num_params": n_params,
            "world_size": rt.world_size,
            "epochs_done": len(history),
            "finished": final,
            "train_time_s": train_time,
            "final": history[-1] if history else None,
            "best": {"epoch": best["epoch"], "test_acc1": best["test_acc1"]} if best else None,
            "history": history,
            "config": dataclasses.asdict(cfg),
        }
        if rt.is_main:
            write_json(out_dir / METRICS_NAME, metrics)
            if history:
                last = history[-1]
                plot_curves(
                    history,
                    out_dir / PLOT_NAME,
                    f"{title}: test top-1 {last['test_acc1']:.2f}% after {last['epoch']} epochs",
                )
        return metrics

    stop = StopRequest()
    with stop.installed():
        for epoch in range(start_epoch, cfg.epochs):
            first = start_batch if epoch == start_epoch else 0
            sampler.set_epoch(epoch, first)
            model.train()
            loss_sum = torch.zeros((), dtype=torch.float64, device=rt.device)
            correct = torch.zeros((), dtype=torch.float64, device=rt.device)
            seen = 0
            carried = partial if epoch == start_epoch else [0.0, 0.0, 0.0]
            bar = ProgressBar(
                steps_per_epoch,
                f"epoch {epoch + 1}/{cfg.epochs}",
                progress and rt.is_main,
            )
            t0 = time.perf_counter()
            it = iter(train_loader)
            batch_idx = first
            interrupted = False
            while batch_idx < steps_per_epoch:
                if any_rank(stop.signum is not None, rt):
                    interrupted = True
                    break
                try:
                    batch = next(it)
                except StopIteration:
                    break
                except Exception:
                    if stop.signum is None:
                        raise
                    # a loader worker died from the same signal: save what we have
                    interrupted = True
                    break
                x, y = raise_if_failed(batch)
                x = x.to(rt.device, non_blocking=True)
                y = y.to(rt.device, non_blocking=True)
                if mix.enabled:
                    x_in, targets = mix(x, y, batch_rng(cfg.seed, epoch, batch_idx))
                else:
                    x_in, targets = x, None
                with autocast(rt.device, dtype):
                    logits = ddp(x_in)
                logits = logits.float()
                if targets is None:
                    loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
                else:
                    loss = torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.clip_grad:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                step += 1
                if ema is not None:
                    ema.update(model)
                n = y.shape[0]
                loss_sum += loss.detach().double() * n
                correct += (logits.detach().argmax(dim=1) == y).sum()
                seen += n
                batch_idx += 1

                log_now = cfg.log_every and rt.is_main and batch_idx % cfg.log_every == 0
                if bar.due(force=batch_idx == steps_per_epoch) or log_now:
                    text = _status(
                        loss_sum, correct, seen, carried, time.perf_counter() - t0, rt.world_size
                    )
                    bar.update(batch_idx, text)
                    if log_now:
                        logger.info(
                            "epoch %d/%d step %d/%d %s lr %.3e",
                            epoch + 1,
                            cfg.epochs,
                            batch_idx,
                            steps_per_epoch,
                            text,
                            optimizer.param_groups[0]["lr"],
                        )
            bar.close()
            elapsed = time.perf_counter() - t0
            train_time += elapsed
            sums = all_reduce_sum([loss_sum.item(), correct.item(), float(seen)], rt)
            sums = [a + b for a, b in zip(sums, carried)]
            if interrupted:
                state = build_state(epoch, batch_idx, sums)
                if rt.is_main:
                    save_checkpoint(ckpt_file, state)
                    write_outputs()
                raise TrainingInterrupted(
                    stop.signum or signal.SIGTERM,
                    ckpt_file if rt.is_main else None,
                    epoch,
                    batch_idx,
                )

            if sums[2] > 0 and not math.isfinite(sums[0]):
                raise TrainingDiverged(
                    f"the training loss became {sums[0] / sums[2]} in epoch {epoch + 1}; "
                    "lower --lr or set --clip-grad"
                )
            test = summarize_eval(
                reduce_eval(evaluate_sums(model, test_loader, rt.device, dtype), rt)
            )
            record = {
                "epoch": epoch + 1,
                "step": step,
                "lr": optimizer.param_groups[0]["lr"],
                "train_loss": sums[0] / max(sums[2], 1.0),
                "train_acc": 100.0 * sums[1] / max(sums[2], 1.0),
                "test_loss": test["loss"],
                "test_acc1": test["acc1"],
                "test_acc5": test["acc5"],
                "epoch_time_s": elapsed,
                "images_per_s": (seen * rt.world_size) / elapsed if elapsed > 0 else None,
            }
            if ema is not None:
                ema_test = summarize_eval(
                    reduce_eval(evaluate_sums(ema.module, test_loader, rt.device, dtype), rt)
                )
                record["ema_acc1"] = ema_test["acc1"]
                record["ema_acc5"] = ema_test["acc5"]
            history.append(record)
            state = build_state(epoch + 1, 0, [0.0, 0.0, 0.0])
            if rt.is_main:
                save_checkpoint(ckpt_file, state)
                if epoch + 1 < cfg.epochs:  # the last epoch's outputs are written below
                    write_outputs()
                ema_txt = f", EMA {record['ema_acc1']:.2f}%" if ema is not None else ""
                logger.info(
                    "epoch %d/%d: train loss %.4f acc %.2f%% | test loss %.4f top-1 %.2f%% "
                    "top-5 %.2f%%%s | %.0f img/s, %s",
                    epoch + 1,
                    cfg.epochs,
                    record["train_loss"],
                    record["train_acc"],
                    record["test_loss"],
                    record["test_acc1"],
                    record["test_acc5"],
                    ema_txt,
                    record["images_per_s"] or 0.0,
                    _fmt_time(elapsed),
                )
            last_epoch = epoch + 1 == cfg.epochs
            if any_rank(stop.signum is not None, rt) and not last_epoch:  # saved just above
                raise TrainingInterrupted(
                    stop.signum or signal.SIGTERM, ckpt_file if rt.is_main else None, epoch + 1, 0
                )

    metrics = write_outputs(final=True)
    metrics["output"] = str(out_dir)
    if rt.is_main and history:
        last = history[-1]
        logger.info(
            "done in %s: test top-1 %.2f%% (best %.2f%% at epoch %d); wrote %s, %s, %s in %s",
            _fmt_time(train_time),
            last["test_acc1"],
            metrics["best"]["test_acc1"],
            metrics["best"]["epoch"],
            CHECKPOINT_NAME,
            METRICS_NAME,
            PLOT_NAME,
            out_dir,
        )
    return metrics


# --------------------------------------------------------------------------------------------
# command line

_HELP = {
    "data": "image folder root with train/<class>/* and val/<class>/* (default: embedded digits)",
    "preset": "option preset: 'digits' (default without --data) or 'imagenet' (the paper's recipe)",
    "model": "model name (see `python -c 'import vmamba; print(vmamba.list_models())'`) or "
    "'package.module:factory'",
    "model_kwargs": "JSON object of extra model keyword arguments, e.g. '{\"ssm_d_state\": 4}'",
    "batch_size": "global batch per optimizer step (split across processes)",
    "lr": "peak learning rate (default: base_lr * batch_size / 1024)",
    "base_lr": "peak learning rate for a batch of 1024 (used when --lr is not given)",
    "clip_grad": "clip the global gradient norm to this (0 = off)",
    "drop_path": "stochastic depth rate (default: the model's)",
    "scan_backend": "scanlib backend, or a comma-separated preference list (default: automatic)",
    "amp": "mixed precision: auto (bf16 on CUDA), none, bf16, fp16",
    "output": "run directory (default: runs/<timestamp>)",
    "threads": "torch CPU threads per process",
    "max_train_samples": "train on a fixed random subset of this size",
    "max_eval_samples": "evaluate on a fixed random subset of this size",
    "log_every": "log a progress line every N steps",
    "workers": "data loader worker processes per training process",
    "max_shift": "digits only: random translation in pixels",
}


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `vmamba train`; every default is SUPPRESS so that only given flags
    override the preset and the config file."""
    p.add_argument("--config", help="YAML or TOML file of options (flags override it)")
    p.add_argument(
        "--resume",
        metavar="PATH",
        help="continue the run in this directory (or from this checkpoint file)",
    )
    p.add_argument(
        "--print-config", action="store_true", help="print the resolved options and exit"
    )
    for name, f in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        kind = str(f.type)
        default = f.default if f.default is not dataclasses.MISSING else "{}"
        helptext = _HELP.get(name, "")
        helptext = f"{helptext} (default: {default})" if helptext else f"default: {default}"
        if kind.startswith("bool"):
            p.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=helptext,
            )
        else:
            choices = None
            if name == "amp":
                choices = ["auto", "none", "bf16", "fp16"]
            elif name == "device":
                choices = ["auto", "cpu", "cuda"]
            elif name == "preset":
                choices = list(PRESETS)
            p.add_argument(
                flag,
                default=argparse.SUPPRESS,
                choices=choices,
                metavar=None if choices else name.split("_")[-1].upper(),
                help=helptext,
            )


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train",
        help="train a model (no arguments: the embedded digits demo)",
        description=(
            "Train a VMamba classifier. Without --data: vmamba_nano on the embedded 8x8 "
            "handwritten digits (upsampled to 32x32), a few minutes on a CPU. With --data DIR: "
            "DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg with the paper's ImageNet recipe. "
            "Under torchrun every process trains its share of each batch."
        ),
    )
    add_train_arguments(p)
    p.set_defaults(func=run_command)
    return p


def _rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def run_command(args: argparse.Namespace) -> int:
    explicit = {k: v for k, v in vars(args).items() if k in FIELDS}
    base = saved = None
    if args.resume:
        saved = load_checkpoint(args.resume)
        base = saved["config"]
        changed = sorted(
            k for k, v in explicit.items() if k not in _RESUME_HARMLESS and base.get(k) != v
        )
        if changed and _rank0():
            logger.warning(
                "resuming with changed options %s: the result will differ from the original run",
                ", ".join(changed),
            )
        explicit.setdefault("output", str(checkpoint_path(args.resume).parent))
    cfg = resolve_config(explicit, args.config, base)
    if args.print_config:
        if _rank0():
            print(json.dumps(dataclasses.asdict(cfg), indent=2))
        return 0
    train(cfg, resume=saved, progress=cfg.progress)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m vmamba.train ...`` == ``vmamba train ...``."""
    from .cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
