"""``vmamba eval``: top-1 / top-5 accuracy and throughput of a checkpoint.

Our training checkpoints carry the model and data description, so ``--checkpoint RUN_DIR`` is
enough (it evaluates on the run's own test split). Official VMamba weights need ``--model`` and
``--data`` (an image folder whose ``val/<class>`` folders are in the checkpoint's class order,
e.g. ImageNet's sorted WordNet ids); they are loaded with :func:`vmamba.load_pretrained`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from .data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CheckpointError,
    ConfigError,
    DigitsDataset,
    EvalBatchSampler,
    ImageFolder,
    eval_transform,
    take_subset,
)
from .train import (
    CHECKPOINT_FORMAT,
    TrainConfig,
    amp_dtype,
    build_model,
    checkpoint_path,
    evaluate_sums,
    make_loader,
    scan_backend_context,
    summarize_eval,
)

logger = logging.getLogger("vmamba.evaluate")


def _peek(path: Path) -> dict[str, Any] | None:
    """Our checkpoint dict, or None when the file is something else (e.g. official weights)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # official files may hold pickled objects; load_pretrained reads those
        return None
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        return obj
    return None


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(name)


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    *,
    data: str | os.PathLike | None = None,
    split: str = "val",
    model: str | None = None,
    model_kwargs: dict | None = None,
    num_classes: int | None = None,
    ema: bool = False,
    img_size: int | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
    batch_size: int = 256,
    workers: int = 4,
    device: str = "auto",
    amp: str = "auto",
    max_samples: int | None = None,
    scan_backend: str | None = None,
    trust_checkpoint: bool = False,
) -> dict[str, Any]:
    """Evaluate a checkpoint; returns loss, acc1, acc5 (percent), images, seconds, images_per_s.

    ``scan_backend``: scanlib backend(s) to use (default: the run's, or automatic).
    ``trust_checkpoint``: allow official files that pickle arbitrary objects (unsafe to load
    from untrusted sources)."""
    path = checkpoint_path(checkpoint)
    dev = _device(device)
    ckpt = _peek(path)
    if ckpt is not None:
        mc, info, cfg = ckpt["model_config"], ckpt["data"], ckpt["config"]
        if model is not None and model != mc["name"]:
            raise ConfigError(f"{path} holds a {mc['name']} model, not {model}")
        net = build_model(mc["name"], mc["num_classes"], mc["in_chans"], None, mc["kwargs"])
        state = ckpt["model_ema"] if ema else ckpt["model"]
        if state is None:
            raise CheckpointError(f"{path} has no EMA weights (the run was trained without EMA)")
        net.load_state_dict(state)
        size = img_size or info["img_size"]
        root = data if data is not None else cfg["data"]
        if root is None:
            dataset = DigitsDataset("test", img_size=size)
        else:
            tf = eval_transform(
                size,
                mean=info["mean"],
                std=info["std"],
                crop_pct=crop_pct or info["crop_pct"],
                interpolation=interpolation or info["interpolation"],
            )
            dataset = ImageFolder(root, split, tf, classes=info["classes"], in_chans=mc["in_chans"])
        name = mc["name"]
        scan_backend = scan_backend or cfg.get("scan_backend")
    else:
        if model is None:
            raise ConfigError(
                f"{path} is not a vmamba training checkpoint; for official weights pass "
                "--model NAME (and --data DIR)"
            )
        if data is None:
            raise ConfigError(f"evaluating official weights {path} needs --data DIR")
        size = img_size or 224
        tf = eval_transform(
            size,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            crop_pct=crop_pct or 0.875,
            interpolation=interpolation or "bicubic",
        )
        dataset = ImageFolder(data, split, tf)
        net = build_model(model, num_classes or len(dataset.classes), 3, None, model_kwargs or {})
        import vmamba

        try:
            vmamba.load_pretrained(net, str(path), use_ema=ema, weights_only=not trust_checkpoint)
        except (KeyError, RuntimeError, ValueError, OSError) as e:
            raise CheckpointError(f"cannot load {path} into {model}: {e}") from e
        name = model
    dataset = take_subset(dataset, max_samples)
    net.to(dev)
    loader = make_loader(dataset, EvalBatchSampler(len(dataset), batch_size), workers, dev, seed=0)
    dtype = amp_dtype(TrainConfig(amp=amp), dev)
    with scan_backend_context(scan_backend):
        result = summarize_eval(evaluate_sums(net, loader, dev, dtype))
    result.update(model=name, weights="ema" if ema else "model", checkpoint=str(path))
    return result


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval",
        help="top-1/top-5 accuracy and images/s of a checkpoint",
        description=(
            "Evaluate a checkpoint: ours (a run directory or checkpoint.pt; the run's own test "
            "split unless --data is given) or official VMamba weights (--model and --data needed)."
        ),
    )
    p.add_argument("--checkpoint", required=True, help="run directory or checkpoint file")
    p.add_argument("--data", help="image folder root (default: the data the run trained on)")
    p.add_argument("--split", default="val", help="folder of --data to evaluate (default: val)")
    p.add_argument("--model", help="model name (needed for official checkpoints)")
    p.add_argument(
        "--model-kwargs", type=json.loads, default=None, help="JSON object of model kwargs"
    )
    p.add_argument("--num-classes", type=int, help="official weights: classes of the head")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    p.add_argument("--img-size", type=int, help="input size (default: the run's, or 224)")
    p.add_argument("--crop-pct", type=float, help="center crop fraction (default 0.875)")
    p.add_argument("--interpolation", choices=["nearest", "bilinear", "bicubic"])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument(
        "--workers", type=int, default=None, help="loader processes (default 4; 0 for digits)"
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--amp", choices=["auto", "none", "bf16", "fp16"], default="auto")
    p.add_argument("--max-samples", type=int, help="evaluate a fixed random subset")
    p.add_argument("--scan-backend", help="scanlib backend(s) (default: the run's, or automatic)")
    p.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="load official files that pickle Python objects (only for files you trust)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run_command)
    return p


def run_command(args: argparse.Namespace) -> int:
    workers = args.workers
    if workers is None:
        workers = 4 if args.data else 0
    result = evaluate_checkpoint(
        args.checkpoint,
        data=args.data,
        split=args.split,
        model=args.model,
        model_kwargs=args.model_kwargs,
        num_classes=args.num_classes,
        ema=args.ema,
        img_size=args.img_size,
        crop_pct=args.crop_pct,
        interpolation=args.interpolation,
        batch_size=args.batch_size,
        workers=workers,
        device=args.device,
        amp=args.amp,
        max_samples=args.max_samples,
        scan_backend=args.scan_backend,
        trust_checkpoint=args.trust_checkpoint,
    )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"{result['model']} ({result['weights']} weights): top-1 {result['acc1']:.2f}%  "
            f"top-5 {result['acc5']:.2f}%  loss {result['loss']:.4f}  "
            f"{result['images']} images, {result['images_per_s']:.0f} images/s"
        )
    return 0
