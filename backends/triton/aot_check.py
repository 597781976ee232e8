"""Compile the triton backend's kernels for a GPU target without a GPU (a developer check).

    python -m scanlib_backends.triton.aot_check [--arch 90] [--all-configs]

Triton's CPU interpreter checks what the kernels compute, not whether they compile: a loop-carried
value changing type, an op the GPU lowering lacks, a tile that spills registers only show up when
compiling. This builds each kernel exactly as a launch would (same arguments, so the same
specializations: integers equal to 1 become constants, multiples of 16 get divisibility hints)
for ``sm_<arch>`` and, when triton ships ``ptxas``, reports registers and spill bytes per
configuration. Must run without ``TRITON_INTERPRET=1`` (interpreted kernels do not compile).
Exit status 1 if any kernel fails to compile.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
import subprocess
import sys
import tempfile

import torch

_PTR_TYPES = {
    torch.float32: "*fp32",
    torch.float16: "*fp16",
    torch.bfloat16: "*bf16",
    torch.int32: "*i32",
    torch.int64: "*i64",
}


@dataclasses.dataclass
class Result:
    name: str
    config: str
    ok: bool
    registers: int | None = None
    spill_bytes: int | None = None
    error: str = ""


def compile_launch(launch, arch: int = 90) -> tuple[object, dict]:
    """Compile ``launch`` (a :class:`~scanlib_backends.triton.tuning.Launch`) for ``sm_<arch>``.

    Returns (compiled kernel, {"registers", "spill_bytes"} when ptxas is available)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = launch.kernel
    names = list(inspect.signature(fn.fn).parameters)
    kwargs = dict(launch.kwargs)
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    values = list(launch.args) + [kwargs[n] for n in names[len(launch.args) :]]
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, v) in enumerate(zip(names, values)):
        if isinstance(v, torch.Tensor):
            signature[name] = _PTR_TYPES[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif name in kwargs or isinstance(v, bool):
            signature[name] = "constexpr"
            constexprs[(i,)] = v
        elif v == 1:  # what triton's launcher does with an integer 1
            signature[name] = "constexpr"
            constexprs[(i,)] = 1
        else:
            signature[name] = "i32" if -(2**31) <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    target = GPUTarget("cuda", arch, 32)
    kernel = triton.compile(
        ASTSource(fn, signature, constexprs, attrs), target=target, options=options
    )
    info: dict = {}
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if os.path.exists(ptxas) and "ptx" in kernel.asm:
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(kernel.asm["ptx"])
        suffix = "a" if arch >= 90 else ""
        try:
            r = subprocess.run(
                [ptxas, f"-arch=sm_{arch}{suffix}", "-v", f.name, "-o", os.devnull],
                capture_output=True,
                text=True,
                timeout=300,
            )
            regs = re.search(r"Used (\d+) registers", r.stderr)
            spill = re.search(r"(\d+) bytes spill stores", r.stderr)
            info = {
                "registers": int(regs.group(1)) if regs else None,
                "spill_bytes": int(spill.group(1)) if spill else None,
            }
        finally:
            os.unlink(f.name)
    return kernel, info


def _cases():
    from scanlib.inputs import BCForm
    from scanlib.testing import ScanCase

    # VMamba-T's first stage: bf16 in, float32 out, no z, no states
    vm = ScanCase.example(
        batch=1,
        dim=384,
        seqlen=3136,
        dstate=1,
        groups=4,
        has_z=False,
        has_initial_state=False,
        return_last_state=False,
        dtype=torch.bfloat16,
        out_float32=True,
    )
    every = dataclasses.replace(
        vm,
        dim=48,
        seqlen=500,
        dstate=4,
        B_form=BCForm.CONSTANT,
        has_z=True,
        has_initial_state=True,
        return_last_state=True,
        dtype=torch.float32,
        out_float32=False,
    )
    mamba = dataclasses.replace(
        vm,
        dim=64,
        seqlen=1000,
        dstate=16,
        B_form=BCForm.SEQUENCE,
        C_form=BCForm.SEQUENCE,
        dtype=torch.float16,
        out_float32=False,
        has_z=True,
    )
    return {"vmamba_t_bf16_n1": vm, "every_feature_fp32_n4": every, "mamba_fp16_n16": mamba}


def scan_launches(case, all_configs: bool):
    """(label, Launch) for the forward (saving and not) and backward of ``case`` on CPU tensors."""
    from . import scan_kernels as sk

    inputs = case.inputs("cpu", requires_grad=False)
    plan = sk._plan(inputs)
    bl = sk._training_block_l(plan)
    fwd = sk.candidate_configs(plan) if all_configs else [sk.default_config(plan, False)]
    bwd = (
        sk.candidate_configs(plan, bl, 1024) if all_configs else [sk.candidate_configs(plan, bl)[0]]
    )
    out = torch.empty(plan.batch, plan.dim, plan.L, dtype=inputs.result_dtype)
    last = torch.empty(plan.batch, plan.dim, plan.N)
    for cfg in fwd:
        states = torch.empty(plan.batch, plan.dim, plan.N, -(-plan.L // cfg.block_l))
        yield "fwd", cfg, sk.fwd_launch(inputs, plan, cfg, out, last, None)
        if cfg.block_l == bl:
            yield "fwd+save", cfg, sk.fwd_launch(inputs, plan, cfg, out, last, states)
    dout = torch.empty(plan.batch, plan.dim, plan.L, dtype=inputs.result_dtype)
    for cfg in bwd:
        states = torch.empty(plan.batch, plan.dim, plan.N, -(-plan.L // cfg.block_l))
        bufs = sk.bwd_buffers(inputs, plan, cfg)
        dlast = last if inputs.return_last_state else None
        yield "bwd", cfg, sk.bwd_launch(inputs, plan, cfg, states, dout, dlast, bufs)


def route_launches(all_configs: bool):
    from scanlib.routes import get_route_set

    from . import route_kernels as rk

    rs = get_route_set("cross2d")
    H = W = 56
    C = 96
    idx = rk._int32(rs.indices(H, W, "cpu"))
    inv = rk._int32(rs.inverse_indices(H, W, "cpu"))
    y = torch.empty(2, len(rs), C, H * W, dtype=torch.bfloat16)
    for cl in (False, True):
        x = torch.empty((2, H, W, C) if cl else (2, C, H, W), dtype=torch.bfloat16)
        layout = "channels_last" if cl else "channels_first"
        cands = (
            rk.candidate_configs(C, H * W) if all_configs else [rk.default_config(C, H * W, False)]
        )
        for cfg in cands:
            yield f"cross_scan {layout}", cfg, rk.scan_launch(x, idx, y, W, cl, cfg)
            yield f"cross_merge {layout}", cfg, rk.merge_launch(y, inv, x, W, cl, cfg)


def run(arch: int = 90, all_configs: bool = False, verbose: bool = True) -> list[Result]:
    from . import scan_kernels

    if scan_kernels.INTERPRETED:
        raise RuntimeError("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    todo = [
        (f"scan {n} {label}", cfg, lz)
        for n, c in _cases().items()
        for label, cfg, lz in scan_launches(c, all_configs)
    ]
    todo += [(label, cfg, lz) for label, cfg, lz in route_launches(all_configs)]
    results = []
    for name, cfg, launch in todo:
        desc = ",".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items())
        try:
            _, info = compile_launch(launch, arch)
            res = Result(name, desc, True, info.get("registers"), info.get("spill_bytes"))
        except Exception as e:  # report every failure, not just the first
            res = Result(name, desc, False, error=f"{type(e).__name__}: {str(e)[-400:]}")
        results.append(res)
        if verbose:
            regs = (
                "" if res.registers is None else f" regs={res.registers} spill={res.spill_bytes}B"
            )
            status = "ok" if res.ok else "FAILED " + res.error
            print(f"{name:40s} {desc:55s} {status}{regs}", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--arch", type=int, default=90, help="compute capability, e.g. 90 (H100/H200), 80"
    )
    p.add_argument(
        "--all-configs", action="store_true", help="every tuner candidate, not just defaults"
    )
    args = p.parse_args(argv)
    results = run(args.arch, args.all_configs)
    failed = [r for r in results if not r.ok]
    print(f"{len(results) - len(failed)}/{len(results)} kernels compiled for sm_{args.arch}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
