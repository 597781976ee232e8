"""``vmamba analyze erf``, ``vmamba analyze attention`` and ``vmamba bench throughput``.

:func:`add_parser` registers the ``analyze`` and ``bench`` subcommands with the ``vmamba``
command (``vmamba.cli``); :func:`main` runs them without it (``main(["analyze", "erf"])``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

MODEL_HELP = (
    "a vmamba model name (vmamba_tiny, vmamba_nano, ...), a timm model name (random init, nothing "
    "is downloaded), NAME@CHECKPOINT, or a `vmamba train` checkpoint / run directory"
)


def _common_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra constructor argument (repeatable), e.g. --model-arg routes=snake",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    p.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights")


def add_parser(subparsers) -> None:
    """Register ``analyze`` (``erf``, ``attention``) and ``bench`` (``throughput``)."""
    analyze = subparsers.add_parser(
        "analyze",
        help="effective receptive fields and SS2D attention maps",
        description="Analyse trained or untrained models: effective receptive fields and SS2D attention maps.",
    )
    asub = analyze.add_subparsers(title="analyses", dest="analysis", metavar="ANALYSIS")
    analyze.set_defaults(func=lambda args: _help(analyze))

    erf = asub.add_parser(
        "erf",
        help="effective receptive field heatmaps",
        description=(
            "Effective receptive field: the gradient of the central output position of a stage "
            "with respect to the input, rectified, summed over channels and averaged over "
            "images. Several models are drawn side by side. Writes OUT (PNG), OUT.json (area "
            "ratios) and OUT.npz (the maps)."
        ),
    )
    erf.add_argument(
        "--models", nargs="+", default=["vmamba_tiny"], metavar="MODEL", help=MODEL_HELP
    )
    erf.add_argument(
        "--images",
        default=None,
        help="a folder of images, 'sklearn' (scikit-learn's sample photographs, the default) or "
        "'digits' (the embedded digits; the default for a model trained on them)",
    )
    erf.add_argument(
        "--img-size", type=int, default=None, help="input size (default: 224, or the checkpoint's)"
    )
    erf.add_argument("--num-images", type=int, default=None, help="use at most this many images")
    erf.add_argument(
        "--crops-per-image",
        type=int,
        default=1,
        help="square crops per photograph (centre, then random)",
    )
    erf.add_argument(
        "--stage",
        type=int,
        default=-1,
        help="stage (or timm block index) whose central output is used (default: last)",
    )
    erf.add_argument("--batch-size", type=int, default=1)
    erf.add_argument("--seed", type=int, default=0)
    erf.add_argument("--out", default="erf.png", help="output PNG (default: erf.png)")
    _common_model_args(erf)
    erf.set_defaults(func=_run_erf)

    att = asub.add_parser(
        "attention",
        help="SS2D attention map of a query pixel",
        description=(
            "The selective scan's equivalent attention matrix for one SS2D layer (token t attends "
            "to s <= t with weight C_t . exp(sum_{s<r<=t} delta_r A) . delta_s B_s, averaged over "
            "channels), mapped from route order to image positions and summed over the routes; "
            "drawn as the activation map of a query pixel over the image. Works with any route set."
        ),
    )
    att.add_argument("--model", default="vmamba_tiny", help=MODEL_HELP)
    att.add_argument("--images", default=None, help="as for `analyze erf`")
    att.add_argument("--image-index", type=int, default=0, help="which image (default: 0)")
    att.add_argument(
        "--img-size", type=int, default=None, help="input size (default: 224, or the checkpoint's)"
    )
    att.add_argument(
        "--layer",
        default=None,
        help="SS2D module name, e.g. layers.1.blocks.0.op (overrides --stage/--block)",
    )
    att.add_argument("--stage", type=int, default=0, help="stage of the SS2D layer (default: 0)")
    att.add_argument("--block", type=int, default=-1, help="block within the stage (default: last)")
    att.add_argument(
        "--query",
        type=float,
        nargs=2,
        metavar=("Y", "X"),
        default=None,
        help="query pixel in the input image (default: centre)",
    )
    att.add_argument(
        "--routes",
        default=None,
        help="rebuild the model with this route set (e.g. snake, hilbert, atrous, local7)",
    )
    att.add_argument(
        "--reduce",
        choices=("mean", "absmean"),
        default="mean",
        help="channel average of the weights or of their magnitudes",
    )
    att.add_argument(
        "--matrix",
        action="store_true",
        help="also draw each route's attention matrix (OUT_matrix.png)",
    )
    att.add_argument("--out", default="attention.png", help="output PNG (default: attention.png)")
    _common_model_args(att)
    att.set_defaults(func=_run_attention)

    bench = subparsers.add_parser(
        "bench",
        help="throughput and resolution-scaling benchmarks",
        description="Benchmarks of whole models.",
    )
    bsub = bench.add_subparsers(title="benchmarks", dest="benchmark", metavar="BENCHMARK")
    bench.set_defaults(func=lambda args: _help(bench))
    tp = bsub.add_parser(
        "throughput",
        help="images/s, latency and peak memory against resolution",
        description=(
            "Images/s, latency per image and peak memory of models at several resolutions and "
            "batch sizes (warm-up, then the median of timed runs; bf16 autocast on GPU). Writes "
            "a CSV, a JSON summary and a log-log plot of latency per image against pixel count "
            "with linear and quadratic reference slopes. CPU peak memory is the growth of the "
            "resident set, measured in a fresh process per configuration."
        ),
    )
    tp.add_argument(
        "--models",
        nargs="+",
        default=None,
        metavar="MODEL",
        help="models to run (default: vmamba_tiny plus the timm baselines swin_tiny_patch4_window7_224, "
        "convnext_tiny, deit_small_patch16_224 when timm is installed)",
    )
    tp.add_argument("--resolutions", type=int, nargs="+", default=[224, 384, 512, 768, 1024])
    tp.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    tp.add_argument(
        "--backward", action="store_true", help="time forward + backward instead of forward only"
    )
    tp.add_argument("--warmup", type=int, default=1, help="untimed runs first (default: 1)")
    tp.add_argument(
        "--repeats", type=int, default=3, help="timed runs; the median is reported (default: 3)"
    )
    tp.add_argument(
        "--amp",
        choices=("auto", "none", "bf16", "fp16"),
        default="auto",
        help="autocast dtype (auto: bf16 on GPU, none on CPU)",
    )
    tp.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's)"
    )
    tp.add_argument(
        "--no-isolate",
        action="store_true",
        help="run every configuration in this process (CPU memory then undercounts)",
    )
    tp.add_argument(
        "--timeout", type=float, default=None, help="seconds allowed per isolated configuration"
    )
    tp.add_argument(
        "--rounds",
        type=int,
        default=0,
        help="interleave: build every configuration in this process, then time each once per "
        "round for ROUNDS rounds in a rotating order, and report the median of the per-round "
        "latency ratios against the first model (robust to a drifting machine load; replaces "
        "--repeats and isolation; peak memory is not measured)",
    )
    tp.add_argument(
        "--scan-backends",
        nargs="+",
        default=None,
        metavar="BACKEND",
        help="measure each vmamba model with each of these scan backends, e.g. numba torch "
        "(default: the automatic choice)",
    )
    tp.add_argument(
        "--out",
        default="throughput.csv",
        help="output CSV (the plot is OUT.png; default: throughput.csv)",
    )
    tp.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    tp.add_argument(
        "--model-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra constructor argument for vmamba models (repeatable)",
    )
    tp.set_defaults(func=_run_throughput)


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _run_erf(args: argparse.Namespace) -> int:
    from .common import parse_model_arg
    from .erf import run_erf

    results = run_erf(
        args.models,
        out=args.out,
        images=args.images,
        img_size=args.img_size,
        num_images=args.num_images,
        crops_per_image=args.crops_per_image,
        stage=args.stage,
        batch_size=args.batch_size,
        model_args=parse_model_arg(args.model_arg),
        device=args.device,
        seed=args.seed,
        use_ema=args.ema,
    )
    for r in results:
        ratios = ", ".join(
            f"{100 * v:.1f}% ({float(k) * 100:g}% mass)" for k, v in r.area_ratios.items()
        )
        print(f"{r.label}: stage {r.stage}, {r.num_images} images; area ratios: {ratios}")
    print(f"wrote {args.out}")
    return 0


def _run_attention(args: argparse.Namespace) -> int:
    from .attention import run_attention
    from .common import parse_model_arg

    maps = run_attention(
        args.model,
        out=args.out,
        images=args.images,
        image_index=args.image_index,
        img_size=args.img_size,
        layer=args.layer,
        stage=args.stage,
        block=args.block,
        query=args.query,
        routes=args.routes,
        model_args=parse_model_arg(args.model_arg),
        matrix=args.matrix,
        reduce=args.reduce,
        device=args.device,
        use_ema=args.ema,
    )
    H, W = maps.combined.shape
    print(f"query {maps.query} on the {H}x{W} map, routes: {', '.join(maps.route_names)}")
    print(f"wrote {args.out}")
    return 0


def _run_throughput(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .common import parse_model_arg
    from .throughput import run_throughput

    model_args = parse_model_arg(args.model_arg)
    out = Path(args.out)
    results = run_throughput(
        args.models,
        resolutions=args.resolutions,
        batch_sizes=args.batch_sizes,
        device=args.device,
        backward=args.backward,
        warmup=args.warmup,
        repeats=args.repeats,
        amp=args.amp,
        threads=args.threads,
        isolate=False if args.no_isolate else None,
        model_args=model_args,
        out_csv=out,
        out_png=out.with_suffix(".png"),
        timeout=args.timeout,
        scan_backends=args.scan_backends or (None,),
        rounds=args.rounds,
    )
    print(f"{'model':<30} {'res':>5} {'batch':>5} {'ms/image':>10} {'images/s':>9} {'peak MiB':>9}")
    for r in results:
        if r.error:
            print(f"{r.label:<30} {r.resolution:>5} {r.batch:>5}  error: {r.error}")
            continue
        mem = f"{r.peak_mem_mib:9.0f}" if r.peak_mem_mib is not None else f"{'n/a':>9}"
        print(
            f"{r.label:<30} {r.resolution:>5} {r.batch:>5} {r.ms_per_image:10.1f} {r.images_per_s:9.2f} {mem}"
        )
    from .throughput import paired_ratios, scaling_summary

    if args.rounds:
        print(
            f"latency over the first model's, median of {args.rounds} paired rounds "
            "(> 1: the first model is faster)"
        )
        for p in paired_ratios(results):
            print(
                f"  {p['resolution']}x{p['resolution']} batch {p['batch']}: {p['model']} / "
                f"{p['reference']} = {p['ratio']:.2f}"
            )

    for s in scaling_summary(results):
        print(
            f"{s['model']} (batch {s['batch']}): {s['from']} -> {s['to']}: latency x{s['latency_ratio']:.2f} "
            f"for x{s['pixel_ratio']:.2f} pixels (log-log slope {s['loglog_slope']:.2f})"
        )
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0 if any(not r.error for r in results) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the analysis subcommands without the rest of the ``vmamba`` command."""
    import logging

    parser = argparse.ArgumentParser(prog="vmamba")
    add_parser(parser.add_subparsers(dest="command", metavar="COMMAND"))
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
